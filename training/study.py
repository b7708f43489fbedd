"""pc-study: train and analyse a model over seeds and settings, with controls; one table of the results.

    pc-study --preset rao-ballard-1999 --seeds 0,1,2 --out studies/seeds
    pc-study --seeds 0,1 --grid levels.1.k2_scale=10,50 --set levels.1.sigma2=1 --updates 1000 --out studies/k2
    pc-study --seeds 0 --controls --out studies/controls      # + the Gaussian-prior run and the PCA fields

Each run is `python -m training.train` (one process at a time, --no-figures) into DIR/<run>/, then
pc-analyze's checks in this process into DIR/<run>/analysis/. A run whose folder already has
model.safetensors and analysis/report.json is read, not redone, so an interrupted study resumes
by running the same command again. Writes DIR/study.json and DIR/study.md: one row per run, and
the mean and spread (sample std) over seeds for each setting.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pcmodel
from pcmodel import ConfigError, ModelConfig
from pcmodel.atomic import write_all
from pcmodel.cliargs import (
    MAX_SEED,
    ArgumentParser,
    batch_size,
    config_file,
    fail,
    make_folder,
    out_of_memory,
    output_folder,
    positive_int,
    read_config,
    step_count,
    thread_count,
    write_failure,
)

from . import analysis, fields
from .train_args import apply_settings

log = logging.getLogger(__name__)

GAUSSIAN_PRIOR = "levels.0.prior=gaussian"  # the control: the same network without the sparse prior
# mean and spread over seeds
AVERAGED = (
    "gabor_share",
    "median_n_x",
    "rotated_share",
    "effective_dimension",
    "orientation_bins",
    "blobs",
    "held_out_error",
    "end_stopped_share",
)


@dataclass(frozen=True)
class Run:
    """One training run: a seed, the settings it adds to the base, and whether it is a control."""

    seed: int
    settings: tuple[str, ...]  # key=value, from --grid (and the control's)
    control: str = ""

    @property
    def name(self) -> str:
        parts = [s.replace("/", "_") for s in self.settings] + ([self.control] if self.control else [])
        return "__".join([*parts, f"seed{self.seed}"])


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give seeds like 0,1,2") from None
    if any(not 0 <= s <= MAX_SEED for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be distinct, from 0 to {MAX_SEED}")
    return seeds


def _setting(text: str) -> str:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: write key=value, e.g. levels.1.k2_scale=50")
    return text


def _grid(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    if not sep or not key or not all(values.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: write key=v1,v2,..., e.g. levels.1.k2_scale=10,50")
    return key, values.split(",")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="pc-study", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=list(pcmodel.PRESETS), help="a preset (default: rao-ballard-1999)")
    source.add_argument("--config", metavar="FILE", type=config_file, help="a model config as JSON instead")
    parser.add_argument("--out", type=output_folder, required=True, help="the study's folder (one sub-folder per run)")
    parser.add_argument("--seeds", type=_seeds, default=[0], help="training seeds, e.g. 0,1,2 (default: 0)")
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting for every run, as pc-train --set")  # fmt: skip
    parser.add_argument("--grid", type=_grid, action="append", default=[], metavar="KEY=V1,V2",
                        help="search over these values (several --grid: every combination)")  # fmt: skip
    parser.add_argument("--updates", type=positive_int, help="learning steps per run (default: pc-train's)")
    parser.add_argument("--batch-size", type=batch_size, help="inputs per update (default: pc-train's)")
    parser.add_argument(
        "--controls", action="store_true", help="add the Gaussian-prior run (first seed) and the PCA fields"
    )
    parser.add_argument("--analysis-steps", type=step_count, help="inference steps for the held-out error")
    parser.add_argument("--end-stopping-steps", type=step_count, help="inference steps for end-stopping")
    parser.add_argument("--random-draws", type=positive_int, default=fields.RANDOM_DRAWS,
                        help="random U2 for the level-2 comparison (default: %(default)s)")  # fmt: skip
    parser.add_argument("--threads", type=thread_count, default=1, help="torch threads (default: %(default)s)")
    return parser


def base_config(args: argparse.Namespace) -> ModelConfig:
    if args.config is None:
        config = pcmodel.get_preset(args.preset or "rao-ballard-1999")
    else:
        text = read_config(args.config)
        try:
            config = ModelConfig.from_json(text)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"--config {args.config}: not a model config ({exc})") from None
    return apply_settings(config, args.set)


def plan(args: argparse.Namespace) -> list[Run]:
    """Every (grid point, seed), then the controls; every setting is checked against the config here."""
    keys = [key for key, _ in args.grid]
    points = [
        tuple(f"{k}={v}" for k, v in zip(keys, values)) for values in itertools.product(*(v for _, v in args.grid))
    ]
    runs = [Run(seed, point) for point in points for seed in args.seeds]
    if args.controls:
        runs += [Run(args.seeds[0], point, "gaussian-prior") for point in points]
    base = base_config(args)
    for key, values in args.grid:
        for value in values:
            try:
                apply_settings(base, [f"{key}={value}"])
            except ConfigError as exc:
                raise ConfigError(str(exc).replace("--set ", "--grid ", 1)) from None
    for run in runs:
        apply_settings(base, run.settings + ((GAUSSIAN_PRIOR,) if run.control else ()))  # ConfigError if bad
    return runs


def train_command(args: argparse.Namespace, run: Run, folder: Path) -> list[str]:
    model = folder / "model.safetensors"
    command = [sys.executable, "-m", "training.train", "--threads", str(args.threads), "--no-figures", "--no-progress"]
    if model.is_file():  # an interrupted run: continue it
        return [*command, "--resume", str(model), *(["--updates", str(args.updates)] if args.updates else [])]
    source = (
        ["--config", str(args.config.resolve())] if args.config else ["--preset", args.preset or "rao-ballard-1999"]
    )
    settings = [*args.set, *run.settings, *([GAUSSIAN_PRIOR] if run.control else [])]
    command += [*source, "--seed", str(run.seed), "--out", str(folder)]
    command += [a for s in settings for a in ("--set", s)]
    command += ["--updates", str(args.updates)] if args.updates else []
    command += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    return command


def execute(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    """Train (unless done) and analyse (unless done) one run; returns its report (or why there is none)."""
    folder = (args.out / run.name).resolve()
    model_path, report_path = folder / "model.safetensors", folder / "analysis" / "report.json"
    if model_path.is_file() and report_path.is_file():
        log.info("%s: done before, read", run.name)
        return json.loads(report_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    command = train_command(args, run, folder)
    log.info("%s: %s", run.name, " ".join(command[1:]))
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's training package, whatever the cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    with (folder / "train.log").open("a") as logfile:
        code = subprocess.run(command, stdout=logfile, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0 or not model_path.is_file():
        log.warning("%s: pc-train exit status %d (see %s)", run.name, code, folder / "train.log")
        if not model_path.is_file():
            return {"error": f"pc-train exit status {code}, no model (see train.log)"}
    try:
        model = pcmodel.load(model_path)
    except (pcmodel.CheckpointError, pcmodel.UnstableStepError) as exc:
        return {"error": f"pc-train exit status {code}; the model does not load: {exc}"}
    log.info("%s: trained in %.0f s; analysing", run.name, time.perf_counter() - start)
    try:
        report = analysis.analyze(
            model,
            folder / "analysis",
            steps=args.analysis_steps,
            end_stopping_steps=args.end_stopping_steps,
            random_draws=args.random_draws,
        )
    except Exception as exc:  # torch's allocator raises RuntimeError, onnxruntime's arena its own classes
        if not out_of_memory(exc):
            raise
        log.warning("%s: out of memory analysing it", run.name)
        return {"error": "out of memory analysing the model (run pc-analyze on it where more is free)"}
    return {**report, "train_exit_status": code}


def row(run: Run, report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one run that the table shows (reports of other versions: missing keys are None)."""
    out: dict[str, Any] = {"run": run.name, "seed": run.seed, "settings": list(run.settings), "control": run.control}
    if "error" in report:
        return {**out, "error": report["error"]}
    g, es = report.get("gabor", {}), report.get("end_stopping") or {}
    l2 = (report.get("level2_fields") or {}).get("measures", {})
    return {
        **out,
        "gabor_share": g.get("share_good"),
        "median_n_x": g.get("median_n_x"),
        "orientation_bins": g.get("orientation_bins"),
        "blobs": g.get("blobs"),
        "rotated_share": (g.get("span_control") or {}).get("rotated_share_median"),
        "effective_dimension": (g.get("span_control") or {}).get("effective_dimension"),
        "held_out_error": report.get("held_out", {}).get("relative_error"),
        "end_stopped_share": ((es.get("summary") or {}).get("share_end_stopped") or {}).get("1"),
        "end_stopping": es.get("summary")
        or {k: v["long_over_short"] for k, v in es.get("ratios", {}).items() if k.startswith("cell")},
        "level2": {k: {"value": v["value"], "p": v["p"]} for k, v in l2.items()},
        "steady_state": (report.get("steady_state") or {}).get("median_relative_distance"),
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of each setting's scalar results (and each level-2 p-value)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((tuple(r["settings"]), r["control"]), []).append(r)
    summary = []
    for (settings, control), members in groups.items():
        values = {k: [m[k] for m in members if m.get(k) is not None] for k in AVERAGED}
        for name in members[0]["level2"]:
            values[f"level2_{name}_p"] = [m["level2"][name]["p"] for m in members if name in m["level2"]]
        stats = {
            k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
            for k, v in values.items()
            if v
        }
        summary.append({"settings": list(settings), "control": control, "seeds": len(members), **stats})
    return summary


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v, 2)}" for k, v in value.items()) or "–"
    if isinstance(value, list):
        return "/".join(_fmt(v, 2) for v in value)
    return str(value)


def _end_stopping(result: dict[str, Any]) -> str:
    """The end-stopping summary's headline (share end-stopped per contrast, passes), or the cell ratios."""
    if "passes" in result or "share_end_stopped" in result:
        return _fmt({"share": result.get("share_end_stopped"), "passes": result.get("passes")})
    return _fmt({k.replace("cell_", ""): v for k, v in result.items()})


def markdown(study: dict[str, Any]) -> str:
    lines = [
        f"# Study: {study['base']}",
        "",
        f"`{study['command']}`",
        "",
        "Gabor share: level-1 fields with R² ≥ 0.7 and n_x ≥ 0.1; rotated: the share of random rotations of the "
        "fields (the same span), and the span's effective dimension. End-stopped: the share of driven "
        "horizontal cells end-stopped at contrast x1. Level 2: p of each measure against random U2 "
        "(spread = energy outside the strongest module, orient = power-spectrum orientation index, agree = "
        "agreement of neighbouring modules' parts).",
        "",
        "| run | Gabor share | rotated | eff. dim. | median n_x | bins | blobs | held-out error | end-stopping | "
        "level-2 p (spread, orient, agree) | steady state |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in study["rows"]:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['error']} | | | | | | | | | |")
            continue
        l2 = r["level2"]
        ps = "/".join(
            _fmt(l2[k]["p"], 2) if k in l2 else "–" for k in ("outside_share", "orientation", "overlap_agreement")
        )
        lines.append(
            f"| {r['run']} | {_fmt(r['gabor_share'], 2)} | {_fmt(r.get('rotated_share'), 2)} "
            f"| {_fmt(r.get('effective_dimension'), 1)} | {_fmt(r['median_n_x'], 2)} | {_fmt(r['orientation_bins'])} "
            f"| {_fmt(r['blobs'])} | {_fmt(r['held_out_error'])} | {_end_stopping(r['end_stopping'])} | {ps} "
            f"| {_fmt(r['steady_state'])} |"
        )
    lines += ["", "## Over seeds (mean ± sample std)", "", "| settings | seeds | " + " | ".join(AVERAGED) + " |"]
    lines.append("|---|---:|" + "---:|" * len(AVERAGED))
    for s in study["summary"]:
        name = ", ".join(s["settings"] + ([s["control"]] if s["control"] else [])) or "base"
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" if k in s else "–" for k in AVERAGED]
        lines.append(f"| {name} | {s['seeds']} | " + " | ".join(cells) + " |")
    if study.get("controls"):
        c = study["controls"]
        lines += ["", "## Controls for the level-1 Gabor share", ""]
        lines += ["| fields | Gabor share | rotated | eff. dim. | blobs | bins |", "|---|---:|---:|---:|---:|---:|"]
        for name, g in c.items():
            lines.append(
                f"| {name} | {g['share_good']:.2f} | {_fmt(g.get('rotated_share'), 2)} | "
                f"{_fmt(g.get('effective_dimension'), 1)} | {g['blobs']} | {g['orientation_bins']} |"
            )
    return "\n".join(lines) + "\n"


def controls(rows: list[dict[str, Any]], reports: dict[Run, dict[str, Any]], base: ModelConfig) -> dict[str, Any]:
    """Level-1 Gabor summaries side by side: each run, the PCA fields of the base config, random weights."""
    keys = ("rotated_share", "effective_dimension", "blobs", "orientation_bins")
    table = {
        r["run"]: {"share_good": r["gabor_share"], **{k: r.get(k) for k in keys}} for r in rows if "error" not in r
    }
    pca = fields.pca_control(base)
    span = pca["span_control"]
    table[f"PCA (top {base.levels[0].causes} components)"] = {
        **pca,
        "rotated_share": span["rotated_share_median"],
        "effective_dimension": span["effective_dimension"],
    }
    first = next((r for r in reports.values() if "gabor" in r), None)
    if first is not None:
        table["random weights"] = first["gabor"]["random_weights"]
    return table


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        runs = plan(args)
        base = base_config(args)
    except ConfigError as exc:
        return fail("pc-study", str(exc))
    error = make_folder(args.out)
    if error is not None:
        return fail("pc-study", error)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    try:
        return _study(args, argv, runs, base)
    except OSError as exc:  # a run's files or the study's: a full disk exits 1, a path that cannot be written 2
        advice = "make room and run the same command again (finished runs are read, not redone)"
        return write_failure("pc-study", f"--out {args.out}", exc, advice)


def _study(args: argparse.Namespace, argv: list[str], runs: list[Run], base: ModelConfig) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    reports = {run: execute(args, run) for run in runs}
    rows = [row(run, report) for run, report in reports.items()]
    study: dict[str, Any] = {
        "base": base.name,
        "command": "pc-study " + " ".join(argv),
        "rows": rows,
        "summary": summarise([r for r in rows if not r["control"]]),
    }
    if args.controls:
        study["controls"] = controls(rows, reports, base)
    text = markdown(study)
    write_all([(args.out / "study.json", lambda f: f.write(json.dumps(study, indent=2).encode())),
               (args.out / "study.md", lambda f: f.write(text.encode()))])  # fmt: skip
    log.info("wrote %s and %s", args.out / "study.json", args.out / "study.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
