"""pc-analyze: does a trained model reproduce Rao & Ballard (1999)? (docs/MODEL.md section 5 D, E, F.)

    pc-analyze rao-ballard-1999                  # a shipped model by name, or a checkpoint path
    pc-analyze runs/rao-ballard-1999/model.safetensors   # -> runs/rao-ballard-1999/analysis/
    pc-analyze runs/rao-ballard-1999/model.safetensors --out report/

Writes report.md (with PNG figures) and report.json:
- D: a 2-D Gabor fitted to every level-1 basis function, with R^2, orientation and frequency; the
  share with R^2 >= 0.7 and the orientation bins they cover; the same for random weights (control)
  (training/gabor.py).
- E: relative reconstruction error on held-out photos (scikit-learn's china.jpg and flower.jpg)
  against the zero code (1.0) (training/measurements.py, like F and the steady state).
- F: end-stopping: every oriented horizontal cell of the centre module that bars drive, its level-1
  error response to bars of every length with the level-2 feedback and without it (the same U_1 with
  level 2 removed), at three contrasts, at the model's steps and after a long run (max(1,000, T) steps of
  the same dynamics); the headline cell's mechanism, time course and surround responses (training.responses).
- Steady state: how far each level is, after the model's steps, from its state after many more.
- The amortised start (where the model has one): the steps it and the zero start need to reach the fixed
  point, and with early stop how many each uses on held-out photos, noise and an unseen texture
  (training/amortise.py).
- Level-2 fields against random U_2, the photos' autocorrelation (the paper's Fig. 4) and the PCA
  control for D (training/fields.py).

This module runs them and writes the files (the text: training/report.py; the figures:
training/figures.py); `main` is the command.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pcmodel
from pcmodel import PCModel
from pcmodel.atomic import write_all
from pcmodel.cliargs import (
    ArgumentParser,
    fail,
    make_folder,
    memory_failure,
    model_source,
    out_of_memory,
    output_folder,
    positive_int,
    step_count,
    thread_count,
    write_failure,
)

from . import data, figures, responses
from . import fields as field_measures
from .amortise import start_report
from .gabor import fit_gabor, gabor_summary, level1_fields
from .measurements import END_STOPPING_STEPS, end_stopping, held_out_reconstruction, steady_state
from .report import markdown

# ---- the report -------------------------------------------------------------------------------


def analyze(
    model: PCModel,
    out: Path,
    steps: int | None = None,
    seed: int = 0,
    end_stopping_steps: int | None = None,
    random_draws: int = field_measures.RANDOM_DRAWS,
    reference_steps: int = responses.REFERENCE_STEPS,
) -> dict[str, Any]:
    """Run every check, write out/report.md, out/report.json and the figures; returns the numbers."""
    out.mkdir(parents=True, exist_ok=True)
    fields = level1_fields(model)
    fits = [fit_gabor(f) for f in fields]
    random_model = pcmodel.create(model.config, seed=seed + 1, allow_unstable=True)
    random_fits = [fit_gabor(f) for f in level1_fields(random_model)]
    report: dict[str, Any] = {
        "model": model.name,
        "sha256": model.sha256,
        "provenance_command": model.provenance.get("command", ""),
        "dynamics": {
            "solver": model.config.served_solver.label,
            "init": model.config.initial_latents,
            "steps": model.config.steps,
        },
        "gabor": {
            **gabor_summary(fits),
            "random_weights": gabor_summary(random_fits),
            "span_control": field_measures.span_control(np.stack(fields), seed=seed),
            "fits": [
                {
                    "r2": f.r2,
                    "n_x": f.n_x,
                    "oriented": f.oriented,
                    "orientation_deg": f.orientation,
                    "frequency": f.frequency,
                    "bin": f.orientation_bin,
                }
                for f in fits
            ],
        },
        "held_out": held_out_reconstruction(model, steps=steps),
        "end_stopping": end_stopping(model, fits, steady_steps=end_stopping_steps),
        "steady_state": steady_state(model, seed=seed, reference_steps=reference_steps),
        "amortised_start": start_report(model),
    }
    report.update(field_sections(model, out, seed=seed, draws=random_draws))
    figures.save(figures.gabor_figure(fields, fits, model.name), out / "gabor_fits.png")
    if report["end_stopping"] is not None:
        figures.save_end_stopping(report["end_stopping"], model.name, out)
    text = markdown(report)
    write_all([(out / "report.json", lambda f: f.write(json.dumps(report, indent=2).encode())),
               (out / "report.md", lambda f: f.write(text.encode()))])  # fmt: skip
    return report


def field_sections(
    model: PCModel, out: Path, seed: int = 0, draws: int = field_measures.RANDOM_DRAWS
) -> dict[str, Any]:
    """report["level2_fields"], ["autocorrelation"], ["pca_control"]; writes their figures into out."""
    acf = field_measures.autocorrelation(field_measures.training_images(model.config), seed=seed)
    figures.save(figures.autocorrelation_figure(acf, model.name), out / "autocorrelation.png")
    level2 = field_measures.level2_report(model, draws=draws, seed=seed)
    if level2 is not None:
        figures.save(figures.level2_measures_figure(level2, model.name), out / "level2_measures.png")
    return {
        "level2_fields": level2,
        "autocorrelation": acf,
        "pca_control": field_measures.pca_control(model.config, seed=seed),
    }


# ---- the command -------------------------------------------------------------------------------


def default_out(checkpoint: str, name: str) -> Path:
    """Where the report goes without --out: beside the checkpoint, so each run keeps its own.

    A run's model.safetensors -> <its folder>/analysis/; another checkpoint file (a snapshot in
    checkpoints/) -> <its folder>/analysis-<its name>/; a model's name (a shipped checkpoint inside the
    package) -> analysis/<the model's name>/ in the current folder.
    """
    path = Path(checkpoint)
    if not path.is_file():
        return Path("analysis") / name
    return path.parent / ("analysis" if path.name == "model.safetensors" else f"analysis-{path.stem}")


def larger_than_held_out(model: PCModel) -> str | None:
    """Why the model cannot be analysed on the held-out photos (each smaller than its input), else None."""
    height, width = model.config.input_shape[1:]
    photos = data.held_out_photos()
    if any(p.pixels.shape[0] >= height and p.pixels.shape[1] >= width for p in photos):
        return None
    sizes = ", ".join(f"{p.name} {p.pixels.shape[0]}x{p.pixels.shape[1]}" for p in photos)
    return f"the model's input {height}x{width} is larger than every held-out photo it is measured on ({sizes})"


def main(argv: list[str] | None = None) -> int:
    """pc-analyze; returns the exit status (2: a mistake in the command, one line on stderr)."""
    parser = ArgumentParser(prog="pc-analyze", description=__doc__.split("\n")[0])
    parser.add_argument(
        "checkpoint", type=model_source, help="checkpoint path or model name (rao-ballard-1999, conv-rgb, default)"
    )
    parser.add_argument(
        "--out",
        type=output_folder,
        help="report folder (default: beside the checkpoint: <its folder>/analysis/ for a run's model.safetensors, "
        "<its folder>/analysis-<name>/ for another checkpoint file; analysis/<name>/ for a model name)",
    )
    parser.add_argument(
        "--steps",
        type=step_count,
        help="inference steps of every measurement made at the model's steps: the reconstruction, end-stopping's "
        "headline, the distance from the steady state (default: the model's)",
    )
    parser.add_argument(
        "--solver",
        choices=pcmodel.SOLVERS,
        help="the dynamics of every measurement but the time courses (always plain gradient steps from zero): "
        "gradient (the paper's step, at the model's per-level k1_scale), momentum, nesterov or anderson with the "
        "model's momentum or window (default: the model's served dynamics)",
    )
    parser.add_argument(
        "--init",
        choices=("zero", "amortised"),
        help="where inference starts in every measurement but the time courses (default: the model's)",
    )
    parser.add_argument(
        "--end-stopping-steps",
        type=step_count,
        help="inference steps for end-stopping's long run (`steady` in report.json); it is also measured at the "
        "model's steps "
        f"(default: max({END_STOPPING_STEPS}, the model's))",
    )
    parser.add_argument(
        "--reference-steps",
        type=step_count,
        default=responses.REFERENCE_STEPS,
        help="inference steps taken as the steady state r(infinity) of every level (default: %(default)s)",
    )
    parser.add_argument(
        "--random-draws",
        type=positive_int,
        default=field_measures.RANDOM_DRAWS,
        help="random U2 the level-2 measures are compared with (default: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=thread_count, default=1, help="torch intra-op CPU threads (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    try:
        model = pcmodel.load(args.checkpoint)
    except (pcmodel.CheckpointError, pcmodel.UnstableStepError) as exc:
        return fail("pc-analyze", str(exc))
    if args.solver is not None or args.init is not None or args.steps is not None:
        try:
            model = model.with_dynamics(steps=args.steps, init=args.init, solver=args.solver)
        except (ValueError, pcmodel.UnstableStepError) as exc:
            option = "--init" if args.init == "amortised" and not model.has_amortiser else "--solver"
            return fail("pc-analyze", f"{option}: {exc}")
    too_large = larger_than_held_out(model)
    if too_large is not None:
        return fail("pc-analyze", too_large)
    out = args.out or default_out(args.checkpoint, model.name)
    error = make_folder(out)
    if error is not None:
        return fail("pc-analyze", error)
    try:
        report = analyze(
            model,
            out,
            end_stopping_steps=args.end_stopping_steps,
            reference_steps=args.reference_steps,
            random_draws=args.random_draws,
        )
    except OSError as exc:  # a figure or the report: a full disk exits 1, a path that cannot be written 2
        return write_failure("pc-analyze", f"--out {out}", exc, "make room and run the same command again")
    except Exception as exc:  # torch's allocator raises RuntimeError, onnxruntime's arena its own classes
        if not out_of_memory(exc):
            raise
        shape = "x".join(map(str, model.config.input_shape))
        return memory_failure(
            "pc-analyze", f"analysing {model.name} (inputs of {shape}): free memory, or run it where more is free"
        )
    g, e = report["gabor"], report["held_out"]
    summary = {
        "dynamics": report["dynamics"],
        "gabor_share": round(g["share_good"], 3),
        "orientation_bins": g["orientation_bins"],
        "held_out_relative_error": round(e["relative_error"], 4),
        "report": str(out / "report.md"),
    }
    if report["end_stopping"] is not None:
        summary["end_stopping"] = report["end_stopping"]["summary"]
        summary["end_stopping_steady"] = report["end_stopping"]["steady"]
    if report["amortised_start"] is not None:
        reach = report["amortised_start"]["curves"]
        summary["steps_to_fixed_point_zero_amortised"] = [
            reach["zero"]["steps_to_reach"],
            reach["amortised"]["steps_to_reach"],
        ]
    if report["steady_state"] is not None:
        distances = report["steady_state"]["median_relative_distance"]
        summary["steady_state_median_relative_distance"] = [round(v, 4) for v in distances]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
