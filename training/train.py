"""pc-train: fit a predictive-coding network to natural images on two timescales.

For each batch: T inference steps on the latents with U fixed (`model.infer`), then one learning
step U <- U - (k2/2) dE/dU at the settled latents (`model.weight_gradients`, averaged across
processes under torchrun, then `model.apply_weight_gradients`). All the mathematics lives in
pcmodel; this module samples data, schedules k2, watches for divergence and writes checkpoints,
the metrics log and figures.

    pc-train --preset rao-ballard-1999          # the paper, on scikit-image's bundled photos
    pc-train --preset conv-rgb --data photos/   # your own images
    pc-train --resume runs/conv-rgb/model.safetensors --updates 8000
    torchrun --nproc_per_node 2 -m training.train --preset conv-rgb
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import pcmodel
from pcmodel import ConfigError, ModelConfig, PCModel
from pcmodel.cliargs import (
    ArgumentParser,
    device_name,
    existing_file,
    existing_folder,
    fail,
    nonnegative_int,
    output_folder,
    positive_float,
    positive_int,
)

from . import data
from .metrics import error_sums

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything besides the model's config that decides a run. Saved in every checkpoint's provenance.

    The fields above the line decide the weights; those below only what is watched and written.
    """

    updates: int = 3000  # learning steps, one per global batch
    batch_size: int = 100  # global batch (split evenly across torchrun processes)
    infer_steps: int | None = None  # T inference steps per batch; None: the model's own (config.steps)
    seed: int = 0  # initial U and every batch
    scales: tuple[float, ...] = (1.0,)  # photos are also sampled resized by these factors
    # ---
    checkpoint_every: int = 500  # updates between checkpoints (and one at the end)
    eval_every: int = 100  # updates between held-out evaluations
    log_every: int = 10  # updates between lines of the metrics log
    check_every: int = 50  # updates between stability-bound checks (and at each checkpoint)
    held_out_count: int = 256  # held-out windows evaluated at each eval
    stability_margin: float = 0.9  # stop when k1 >= margin x the stability bound
    blowup_factor: float = 10.0  # stop when the energy's moving average exceeds this x its lowest

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        for name in ("updates", "batch_size", "checkpoint_every", "eval_every", "log_every", "check_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.infer_steps is not None and self.infer_steps < 1:
            raise ConfigError(f"infer_steps must be a positive int, got {self.infer_steps!r}")
        if not self.scales or not all(0 < s <= 1 for s in self.scales):
            raise ConfigError(f"scales must be factors in (0, 1], got {self.scales}")
        if not 0 < self.stability_margin <= 1:
            raise ConfigError(f"stability_margin must be in (0, 1], got {self.stability_margin}")

    WEIGHT_FIELDS = ("batch_size", "infer_steps", "seed", "scales")  # may not change on --resume


# Per-preset training defaults, chosen and measured as docs/TRAINING.md records.
PRESET_TRAINING: dict[str, TrainConfig] = {
    "rao-ballard-1999": TrainConfig(updates=3000, batch_size=100),
    # Crops of the photos at full size and resized by 1/2, 1/4 and 1/8, so the model also knows the
    # coarser structure of a whole photo resized to 32x32 (the service's default for this preset).
    "conv-rgb": TrainConfig(updates=3000, batch_size=64, scales=(1.0, 0.5, 0.25, 0.125)),
}

# The paper's schedule: k2 divided by 1.015 every 40 single inputs.
PAPER_SCHEDULE = {"k2_decay": 1.015, "k2_decay_every": 40, "k2_decay_unit": "inputs"}


class Interrupted(Exception):
    """A stop was requested (Ctrl-C, SIGTERM) and the current update has finished: save and exit."""


class TrainingStopped(RuntimeError):
    """Training cannot go on; the message names the setting to change."""

    def __init__(self, message: str, save: bool) -> None:
        super().__init__(message)
        self.save = save  # whether the current weights are still a loadable model


@dataclass
class RunState:
    """What a checkpoint must carry, besides the weights, for --resume to continue exactly."""

    step: int = 0  # updates done
    energy_average: float | None = None  # moving average of the batch energy (blow-up watch)
    energy_lowest: float | None = None  # its lowest value so far
    commands: list[str] = field(default_factory=list)  # every command that contributed, in order
    seconds: float = 0.0  # training time so far, over all commands


@dataclass
class Distributed:
    """This process's place in a torchrun job (world_size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: torch.device) -> tuple[Distributed, torch.device]:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(), device
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size()), device

    def stop(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def average(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The mean of every process's batch-mean gradients: the gradient of the global batch."""
        if self.world_size == 1:
            return grads
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        return [part.view_as(g) for part, g in zip(torch.split(flat, [g.numel() for g in grads]), grads)]

    def total(self, values: list[float], device: torch.device) -> list[float]:
        """Sum small statistics over processes (in float64)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM: finish the current update, save a checkpoint, exit.

    torchrun forwards the signal to every worker a moment after the terminal delivers it, so a
    second signal within a few seconds is the same request; a later one forces the exit.
    """

    def __init__(self) -> None:
        self.requested_at: float | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.requested_at is not None and now - self.requested_at > 3.0:
            raise KeyboardInterrupt
        if self.requested_at is None:
            self.requested_at = now

    @property
    def requested(self) -> bool:
        return self.requested_at is not None


@dataclass(frozen=True)
class DataSpec:
    """Where the photos come from, as provenance records it."""

    source: str  # "default" (scikit-image's photos) or a folder path
    held_out: str  # "default" (scikit-learn's sample photos) or a folder path

    def load(self) -> tuple[list[data.Photo], list[data.Photo]]:
        photos = data.default_photos() if self.source == "default" else _folder(self.source, "--data")
        held = data.held_out_photos() if self.held_out == "default" else _folder(self.held_out, "--held-out")
        return photos, held


def _folder(path: str, option: str) -> list[data.Photo]:
    """The readable images of a folder; the unreadable ones are listed in the log and skipped."""
    photos, skipped = data.folder_photos(path, option=option)
    for line in skipped:
        log.warning("%s: skipped unreadable image %s", option, line)
    log.info("%s: %d image(s) from %s (%d skipped)", option, len(photos), path, len(skipped))
    return photos


class Trainer:
    """The two-timescale loop with its checks, checkpoints and log (rank 0 writes everything)."""

    def __init__(
        self,
        model: PCModel,
        options: TrainConfig,
        state: RunState,
        photos: list[data.Photo],
        held_out: list[data.Photo],
        spec: DataSpec,
        out: Path,
        dist_info: Distributed | None = None,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.options = options
        self.state = state
        self.spec = spec
        self.out = out
        self.dist = dist_info or Distributed()
        self.progress = progress
        self.data_fingerprint = data.fingerprint(photos)
        config = model.config
        self.steps = options.infer_steps or config.steps
        self.sampler = data.PatchSampler(
            data.prepare(photos, config, options.scales), config.input_shape[1:], options.seed
        )
        self.held_out = data.held_out_windows(config, options.held_out_count, photos=held_out).to(model.device)
        if options.batch_size % self.dist.world_size:
            raise ConfigError(
                f"batch_size {options.batch_size} must be a multiple of the {self.dist.world_size} processes"
            )

    # ---- one update ------------------------------------------------------------------------

    def k2(self, step: int) -> float:
        """k2 for the update that follows `step` updates (inputs counted over the global batch)."""
        return self.model.config.learning.k2_at(updates=step, inputs=step * self.options.batch_size)

    def update(self) -> dict[str, float]:
        """Infer on this step's batch with U fixed, then one learning step. Returns the batch's metrics."""
        step = self.state.step
        batch = self.sampler.batch(step, self.options.batch_size)
        x = data.shard(batch, self.dist.rank, self.dist.world_size).to(self.model.device)
        result = self.model.infer(x, steps=self.steps)
        grads = self.model.weight_gradients(x, result.latents)
        start, final = result.energy[0], result.energy[-1]
        finite = bool(torch.isfinite(final).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
        err, norm = error_sums(result) if finite else (0.0, 1.0)
        stats = [
            float(start.double().sum()) if finite else 0.0,
            float(final.double().sum()) if finite else 0.0,
            err,
            norm,
            0.0 if finite else 1.0,
        ]
        start_sum, final_sum, err, norm, nonfinite = self.dist.total(stats, self.model.device)
        if nonfinite:
            raise TrainingStopped(
                f"training diverged at update {step + 1}: the energy or the gradient became NaN/Inf. "
                f"Lower k2 (now {self.k2(step):.3g}; --k2) or k1 (now {self.model.config.k1:.3g}; --k1)",
                save=False,
            )
        if final_sum > start_sum * (1 + 1e-4) + 1e-6:
            raise TrainingStopped(
                f"inference diverged at update {step + 1}: T = {self.steps} steps raised the energy "
                f"({start_sum / self.options.batch_size:.4g} -> {final_sum / self.options.batch_size:.4g} per input). "
                f"Lower k1 (now {self.model.config.k1:.3g}; --k1)",
                save=False,
            )
        k2 = self.k2(step)
        self.model.apply_weight_gradients(self.dist.average(grads), k2)
        self.state.step = step + 1
        energy = final_sum / self.options.batch_size
        self._watch_energy(energy, k2)
        return {"energy": energy, "rel_error": err / max(norm, 1e-30), "k2": k2}

    def _watch_energy(self, energy: float, k2: float) -> None:
        state = self.state
        state.energy_average = energy if state.energy_average is None else 0.9 * state.energy_average + 0.1 * energy
        if state.step < 20:  # the first updates move fast from the random start
            return
        if state.energy_lowest is None or state.energy_average < state.energy_lowest:
            state.energy_lowest = state.energy_average
        if state.energy_average > self.options.blowup_factor * state.energy_lowest:
            raise TrainingStopped(
                f"learning diverged at update {state.step}: the energy's moving average rose to "
                f"{state.energy_average:.4g}, over {self.options.blowup_factor:g}x its lowest "
                f"{state.energy_lowest:.4g}. Lower k2 (now {k2:.3g}; --k2 or a faster decay)",
                save=False,
            )

    def check_stability(self) -> float:
        """The model's stability bound; stops training before k1 comes too close to it."""
        bound = self.model.stability_bound()
        k1 = self.model.config.k1
        if k1 >= self.options.stability_margin * bound:
            raise TrainingStopped(
                f"at update {self.state.step} the stability bound fell to {bound:.4g}, within "
                f"{(1 - self.options.stability_margin):.0%} of k1 = {k1:.4g}: U has grown so much that more "
                f"training would make inference diverge and the model unloadable. Lower k1 (e.g. --k1 "
                f"{0.6 * bound:.3g}), lower k2 (--k2), or raise the weight decay lam (--set levels.N.lam=...)",
                save=k1 < bound,
            )
        return bound

    def evaluate(self) -> dict[str, float]:
        """Relative reconstruction error and energy on the fixed held-out windows."""
        result = self.model.infer(self.held_out, steps=self.steps)
        err, norm = error_sums(result)
        return {"held_out_rel_error": err / max(norm, 1e-30), "held_out_energy": float(result.energy[-1].mean())}

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train up to options.updates; returns the last metrics. Raises TrainingStopped or Interrupted."""
        options, state = self.options, self.state
        metrics_path = self.out / "metrics.jsonl"
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_log(metrics_path, state.step)
        last: dict[str, Any] = {}
        begun = time.monotonic()
        seconds_before = state.seconds
        bar = _ProgressBar(options.updates, state.step, enabled=self.progress and self.dist.is_main)
        with StopRequest() as stop, bar:
            while state.step < options.updates:
                try:
                    metrics = self.update()
                    stopping = self.dist.total([1.0 if stop.requested else 0.0], self.model.device)[0] > 0
                    step = state.step
                    state.seconds = seconds_before + time.monotonic() - begun
                    line: dict[str, Any] = {"step": step, **metrics}
                    extra = (
                        step % options.check_every == 0
                        or step % options.checkpoint_every == 0
                        or step == options.updates
                    )
                    if extra:
                        line["stability_bound"] = self.check_stability()
                    if self.dist.is_main and (step % options.eval_every == 0 or step == options.updates):
                        line.update(self.evaluate())
                        extra = True
                    line["seconds"] = round(state.seconds, 3)
                    if self.dist.is_main and (extra or step % options.log_every == 0 or step == 1):
                        with metrics_path.open("a") as f:
                            f.write(json.dumps(line) + "\n")
                    last.update(line)
                    bar.advance(metrics)
                    if "held_out_rel_error" in line:
                        log.info(
                            "update %d/%d  energy %.4g  rel. error %.4f  held-out %.4f  k2 %.3g",
                            step, options.updates, metrics["energy"], metrics["rel_error"],
                            line["held_out_rel_error"], metrics["k2"],
                        )  # fmt: skip
                    if step % options.checkpoint_every == 0 and step < options.updates:
                        self.save(history=True)
                    if stopping:
                        raise Interrupted
                except TrainingStopped as stopped:
                    if stopped.save:
                        self.save(history=True)
                    raise
        self.save(history=True)
        return last

    # ---- checkpoints -----------------------------------------------------------------------

    def provenance(self) -> dict[str, Any]:
        return {
            "command": self.state.commands[-1] if self.state.commands else "",
            "training": {
                "options": _jsonable(dataclasses.asdict(self.options)),
                "step": self.state.step,
                "state": {
                    "energy_average": self.state.energy_average,
                    "energy_lowest": self.state.energy_lowest,
                    "commands": self.state.commands,
                    "seconds": round(self.state.seconds, 3),
                },
                "data": {
                    "source": self.spec.source,
                    "held_out": self.spec.held_out,
                    "fingerprint": self.data_fingerprint,
                },
                "world_size": self.dist.world_size,
                "threads": torch.get_num_threads(),
                "device": str(self.model.device),
                "torch": torch.__version__,
            },
        }

    def save(self, history: bool = False) -> Path | None:
        """Write OUT/model.safetensors (and OUT/checkpoints/step-N with history); rank 0 only."""
        if not self.dist.is_main:
            return None
        path = self.out / "model.safetensors"
        self.model.save(path, provenance=self.provenance())
        if history:
            snapshot = self.out / "checkpoints" / f"step-{self.state.step:07d}.safetensors"
            self.model.save(snapshot, provenance=self.provenance())
        log.info("checkpoint at update %d: %s", self.state.step, path)
        return path


class _ProgressBar:
    """A rich progress bar with the energy, the relative error and k2 (or nothing)."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn(
                    "energy {task.fields[energy]:.4g}  rel. error {task.fields[error]:.4f}  k2 {task.fields[k2]:.3g}"
                ),
            )
            self.task = self.bar.add_task(
                "train", total=total, completed=done, energy=math.nan, error=math.nan, k2=math.nan
            )

    def __enter__(self) -> _ProgressBar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task, advance=1, energy=metrics["energy"], error=metrics["rel_error"], k2=metrics["k2"]
            )


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after `step`, so a resumed run's log reads as if it had never stopped."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# ---- configuration from the command line ------------------------------------------------------


def apply_settings(config: ModelConfig, settings: Sequence[str]) -> ModelConfig:
    """Apply `--set key.path=value` overrides (e.g. levels.0.alpha=0.5, learning.k2=0.01) to a config."""
    tree = json.loads(json.dumps(config.to_dict()))  # plain lists and dicts, every field present
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep:
            raise ConfigError(f"--set {setting!r}: write key=value, e.g. --set levels.0.alpha=0.5")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node: Any = tree
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    raise ConfigError(f"--set {key}: {part!r} is not an index 0..{len(node) - 1} (levels count from 0)")
                node = node[int(part)]
            else:
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                raise ConfigError(f"--set {key}: no such setting; see --print-config for the names")
        last = parts[-1]
        if isinstance(node, list) and last.isdigit():
            node[int(last)] = value
        elif isinstance(node, dict) and last in node:
            node[last] = value
        else:
            raise ConfigError(f"--set {key}: no such setting; see --print-config for the names")
    return ModelConfig.from_dict(tree)


def _scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give factors like 1,0.5,0.25") from None
    if not all(0 < s <= 1 for s in scales):
        raise argparse.ArgumentTypeError(f"{text!r}: every factor must be in (0, 1], e.g. 1,0.5,0.25")
    return scales


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pc-train",
        description="Train a predictive-coding network on natural images (see docs/TRAINING.md).",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=list(pcmodel.PRESETS), help="a preset (default: conv-rgb)")
    source.add_argument(
        "--config",
        metavar="FILE",
        type=existing_file,
        help="a model config as JSON, written with --print-config (default: none)",
    )
    source.add_argument(
        "--resume",
        metavar="CKPT",
        type=existing_file,
        help="continue a run from its checkpoint, exactly (default: a new run)",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        type=existing_folder,
        help="folder of training images (default: scikit-image's bundled photos)",
    )
    parser.add_argument(
        "--held-out",
        metavar="DIR",
        type=existing_folder,
        help="folder of held-out images (default: scikit-learn's sample photos)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=output_folder,
        help="output folder (default: runs/<model name>; on --resume, the run's folder)",
    )
    parser.add_argument(
        "--updates",
        metavar="N",
        type=positive_int,
        help="learning steps in all, one per batch (default: the preset's, 3000)",
    )
    parser.add_argument(
        "--batch-size",
        metavar="N",
        type=positive_int,
        help="inputs per learning step, over all processes (default: the preset's: 100 paper, 64 conv-rgb)",
    )
    parser.add_argument(
        "--infer-steps", metavar="T", type=positive_int, help="inference steps T per batch (default: the model's steps)"
    )
    parser.add_argument(
        "--seed", metavar="S", type=nonnegative_int, help="seed for the initial weights and the batches (default: 0)"
    )
    parser.add_argument(
        "--scales",
        metavar="LIST",
        type=_scales,
        help="also sample photos resized by these factors, e.g. 1,0.5,0.25 (default: the preset's: 1 paper, "
        "1,0.5,0.25,0.125 conv-rgb)",
    )
    parser.add_argument(
        "--k1",
        metavar="X",
        type=positive_float,
        help="inference step size, below the stability bound (default: the config's)",
    )
    parser.add_argument("--k2", metavar="X", type=positive_float, help="initial learning rate (default: the config's)")
    parser.add_argument(
        "--k2-schedule",
        choices=("preset", "paper", "constant"),
        default="preset",
        help="preset: the config's; paper: /1.015 every 40 inputs; constant (default: %(default)s)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (default: none)"
    )
    parser.add_argument(
        "--checkpoint-every",
        metavar="N",
        type=positive_int,
        help="updates between checkpoints (default: the preset's, 500)",
    )
    parser.add_argument(
        "--eval-every",
        metavar="N",
        type=positive_int,
        help="updates between held-out evaluations (default: the preset's, 100)",
    )
    parser.add_argument(
        "--log-every",
        metavar="N",
        type=positive_int,
        help="updates between metrics-log lines (default: the preset's, 10)",
    )
    parser.add_argument(
        "--check-every",
        metavar="N",
        type=positive_int,
        help="updates between stability checks (default: the preset's, 50)",
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=positive_int,
        default=1,
        help="torch intra-op CPU threads per process (default: %(default)s, which suits a shared machine: on a "
        "loaded 2-core machine one thread ran 10x faster than torch's choice; raise it on cores of your own)",
    )
    parser.add_argument(
        "--device", type=device_name, help="auto, cpu, cuda or cuda:N (default: auto, cuda when available)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar, log lines only (default: off)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures at the end (default: off)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the model config as JSON and exit (default: off)"
    )
    return parser


def _model_config(args: argparse.Namespace) -> ModelConfig:
    if args.config is not None:
        try:
            config = ModelConfig.from_json(args.config.read_text())
        except OSError as exc:
            raise ConfigError(f"--config {args.config}: {exc.strerror}") from None
        except (ValueError, TypeError, KeyError) as exc:  # not JSON, or not a model config
            raise ConfigError(
                f"--config {args.config}: not a model config ({exc}); write one with --print-config"
            ) from None
    else:
        config = pcmodel.get_preset(args.preset or "conv-rgb")
    learning = config.learning
    if args.k2_schedule == "paper":
        learning = dataclasses.replace(learning, **PAPER_SCHEDULE)
    elif args.k2_schedule == "constant":
        learning = dataclasses.replace(learning, k2_decay=1.0)
    if args.k2 is not None:
        learning = dataclasses.replace(learning, k2=args.k2)
    config = config.replace(learning=learning)
    if args.k1 is not None:
        config = config.replace(k1=args.k1)
    return apply_settings(config, args.set)


def _train_config(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    changes = {
        name: getattr(args, name)
        for name in ("updates", "batch_size", "infer_steps", "seed", "checkpoint_every", "eval_every", "log_every")
        if getattr(args, name) is not None
    }
    if args.check_every is not None:
        changes["check_every"] = args.check_every
    if args.scales is not None:
        changes["scales"] = args.scales
    return dataclasses.replace(base, **changes)


def _resume(args: argparse.Namespace) -> tuple[PCModel, TrainConfig, RunState, DataSpec]:
    try:
        model = pcmodel.load(args.resume)
    except (pcmodel.CheckpointError, pcmodel.UnstableStepError) as exc:
        raise ConfigError(f"--resume {exc}") from None
    training = model.provenance.get("training")
    if not isinstance(training, dict) or "options" not in training:
        raise ConfigError(f"--resume {args.resume}: this checkpoint was not written by pc-train (no training state)")
    fixed = ("preset", "config", "k1", "k2", "set")
    given = [f"--{n.replace('_', '-')}" for n in fixed if getattr(args, n, None) not in (None, [], False)]
    if args.k2_schedule != "preset":
        given.append("--k2-schedule")
    saved = TrainConfig(**{**training["options"], "scales": tuple(training["options"]["scales"])})
    for name in TrainConfig.WEIGHT_FIELDS:
        value = getattr(args, name)
        if value is not None and value != getattr(saved, name):
            given.append(f"--{name.replace('_', '-')}")
    if given:
        raise ConfigError(
            f"--resume continues the saved run exactly, so {', '.join(given)} cannot change; "
            f"start a new run (--preset or --config) to train with other settings"
        )
    options = _train_config(args, saved)
    saved_state = training.get("state", {})
    state = RunState(
        step=int(training["step"]),
        energy_average=saved_state.get("energy_average"),
        energy_lowest=saved_state.get("energy_lowest"),
        commands=list(saved_state.get("commands", [])),
        seconds=float(saved_state.get("seconds", 0.0)),
    )
    saved_data = training.get("data", {})
    spec = DataSpec(
        source=str(args.data) if args.data else saved_data.get("source", "default"),
        held_out=str(args.held_out) if args.held_out else saved_data.get("held_out", "default"),
    )
    return model, options, state, spec


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    _configure_logging(progress)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    automatic = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(automatic if args.device in (None, "auto") else args.device)
    try:
        if args.resume is not None:
            model, options, state, spec = _resume(args)
            if state.step >= options.updates:
                print(
                    f"pc-train: nothing to do: {args.resume} is at update {state.step} of {options.updates}; "
                    f"give --updates N (more than {state.step}) to train on",
                    file=sys.stderr,
                )
                return 0
        else:
            config = _model_config(args)
            if args.print_config:
                print(json.dumps(config.to_dict(), indent=2))
                return 0
            base = PRESET_TRAINING.get(config.name, TrainConfig()) if args.config is None else TrainConfig()
            options = _train_config(args, base)
            model = pcmodel.create(config, seed=options.seed)
            state = RunState()
            spec = DataSpec(
                source=str(args.data) if args.data else "default",
                held_out=str(args.held_out) if args.held_out else "default",
            )
        photos, held_out = spec.load()
        data.check_sizes(photos, model.config, spec.source, "--data")
        data.check_sizes(held_out, model.config, spec.held_out, "--held-out")
        if args.resume is not None:
            saved = model.provenance["training"].get("data", {}).get("fingerprint")
            if saved is not None and saved != data.fingerprint(photos):
                raise data.DataError(
                    f"--resume: the training images differ from the run's (source {spec.source}); "
                    "give the same --data to continue it, or start a new run"
                )
    except (ConfigError, data.DataError, pcmodel.CheckpointError, pcmodel.UnstableStepError) as exc:
        return fail("pc-train", str(exc))
    dist_info, device = Distributed.start(device)
    if not dist_info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    model.to(device)
    out = args.out or (_run_folder(args.resume) if args.resume is not None else Path("runs") / model.name)
    state.commands.append("pc-train " + shlex.join(argv))
    try:
        trainer = Trainer(model, options, state, photos, held_out, spec, out, dist_info, progress)
    except (ConfigError, data.DataError) as exc:
        dist_info.stop()
        return fail("pc-train", str(exc))
    if dist_info.is_main:
        log.info(
            "training %s: %d updates of %d inputs, T = %d, k1 = %g, from update %d, %d process(es) -> %s",
            model.name, options.updates, options.batch_size, trainer.steps, model.config.k1, state.step,
            dist_info.world_size, out,
        )  # fmt: skip
    code = 0
    try:
        last = trainer.run()
        if dist_info.is_main:
            log.info("done: %s", json.dumps({k: v for k, v in last.items() if k != "seconds"}))
    except Interrupted:
        path = trainer.save(history=True)
        if dist_info.is_main:
            log.warning(
                "interrupted at update %d; saved %s; continue with: pc-train --resume %s", state.step, path, path
            )
        code = 130
    except TrainingStopped as stopped:
        log.error("stopped: %s", stopped)
        code = 1
    except KeyboardInterrupt:  # a second Ctrl-C while the first was being honoured
        log.warning("interrupted again at update %d: quit without saving", state.step)
        return 130
    finally:
        dist_info.stop()
    if dist_info.is_main and not args.no_figures and code in (0, 130):
        from .figures import write_figures

        write_figures(trainer.model, out / "figures", out / "metrics.jsonl", held_out, steps=trainer.steps)
        log.info("figures in %s", out / "figures")
    return code


def _run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to: its folder, or the one above checkpoints/."""
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder


def _configure_logging(progress: bool) -> None:
    if progress:
        from rich.logging import RichHandler

        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


if __name__ == "__main__":
    sys.exit(main())
