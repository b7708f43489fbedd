"""pc-train: fit a predictive-coding network to natural images on two timescales.

For each batch: T inference steps on the latents with U fixed (`model.infer`), then one learning
step U <- U - (k2/2) dE/dU at the settled latents (`model.weight_gradients`, averaged across
processes under torchrun, then `model.apply_weight_gradients`). All the mathematics lives in
pcmodel; this module samples data, schedules k2, watches for divergence and writes checkpoints,
the metrics log and figures. The flags and what they give: training/train_args.py; --resume:
training/resume.py; the run's options and state: training/run_config.py.

    pc-train --preset rao-ballard-1999          # the paper, on scikit-image's bundled photos
    pc-train --preset conv-rgb --data photos/   # your own images
    pc-train --resume runs/conv-rgb/model.safetensors --updates 8000
    torchrun --nproc_per_node 2 -m training.train --preset conv-rgb
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import pcmodel
from pcmodel import ConfigError, PCModel
from pcmodel.amortiser import FIT_FLOOR
from pcmodel.atomic import write_bytes
from pcmodel.cliargs import fail, make_folder, memory_failure, out_of_memory, write_failure

from . import amortise, data, resume
from .metrics import error_sums
from .run_config import DataSpec, RunState, TrainConfig
from .train_args import build_parser, model_config, new_run

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """A stop was requested (Ctrl-C, SIGTERM) and the current update has finished: save and exit."""


class TrainingStopped(RuntimeError):
    """Training cannot go on; the message names the setting to change."""

    def __init__(self, message: str, save: bool) -> None:
        super().__init__(message)
        self.save = save  # whether the current weights are still a loadable model


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
        # The amortised start learns from the same settled latents, after U's gradient is taken: U never reads it.
        self.fitter = None
        if model.amortiser is not None and options.amortiser_lr is not None:
            if self.dist.world_size > 1:
                raise ConfigError(
                    "--amortiser learns in one process only; train under torchrun without it, then fit one with "
                    "pc-train --amortise CHECKPOINT"
                )
            self.fitter = amortise.AmortiserFitter(model, options.amortiser_lr, options.updates)

    # ---- one update ------------------------------------------------------------------------

    def k2(self, step: int) -> float:
        """k2 for the update that follows `step` updates (inputs counted over the global batch)."""
        return self.model.config.learning.k2_at(updates=step, inputs=step * self.options.batch_size)

    def update(self) -> dict[str, float]:
        """Infer on this step's batch with U fixed, then one learning step. Returns the batch's metrics."""
        step = self.state.step
        batch = self.sampler.batch(step, self.options.batch_size)
        x = data.shard(batch, self.dist.rank, self.dist.world_size).to(self.model.device)
        # One backend for every update: the automatic choice depends on the calls before (the first call of a
        # loaded model may run a prepared fast backend, one after a learning step the torch one), and a resumed run
        # must repeat the straight one bit for bit. Torch is the fastest at training's batch sizes anyway.
        result = self.model.infer(x, steps=self.steps, backend="torch")
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
        fit = {}
        if self.fitter is not None:
            losses = self.fitter.step(step, x, result.latents)
            fit = {f"amortiser_loss_{i}": v for i, v in enumerate(losses, 1)}
        self.state.step = step + 1
        energy = final_sum / self.options.batch_size
        self._watch_energy(energy, k2)
        return {"energy": energy, "rel_error": err / max(norm, 1e-30), "k2": k2, **fit}

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
                        _append(metrics_path, json.dumps(line) + "\n")
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


def _append(path: Path, text: str) -> None:
    """Add a line to the metrics log; an OSError names the log (a full disk reports none on close). A line cut
    short by a full disk is dropped when the run resumes (_truncate_log)."""
    try:
        with path.open("a") as f:
            f.write(text)
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after `step`, so a resumed run's log reads as if it had never stopped. A line cut short
    (a kill or a full disk mid-append) is dropped too; the log is replaced whole (a kill now loses nothing)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
            keep.append(line)
    write_bytes(path, "".join(line + "\n" for line in keep).encode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    """pc-train; returns the exit status (2: a mistake in the command, one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    _configure_logging(progress)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    automatic = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(automatic if args.device in (None, "auto") else args.device)
    if args.amortise is not None:
        return _amortise(args, argv, device)
    fit_only = [flag for flag, given in _amortise_only(args) if given]
    if fit_only:
        return fail("pc-train", f"{', '.join(fit_only)} only shape a fit with --amortise CHECKPOINT")
    try:
        if args.resume is not None:
            model, options, state, spec = resume.load_run(args)
            if state.step >= options.updates:
                print(
                    f"pc-train: nothing to do: {args.resume} is at update {state.step} of {options.updates}; "
                    f"give --updates N (more than {state.step}) to train on",
                    file=sys.stderr,
                )
                return 0
        else:
            config = model_config(args)
            if args.print_config:
                print(json.dumps(config.to_dict(), indent=2))
                return 0
            model, options, state, spec = new_run(args, config)
        photos, held_out = spec.load()
        data.check_sizes(photos, model.config, spec.source, "--data")
        data.check_sizes(held_out, model.config, spec.held_out, "--held-out")
        if args.resume is not None:
            resume.check_same_photos(model, spec, photos)
    except (ConfigError, data.DataError, pcmodel.CheckpointError, pcmodel.UnstableStepError) as exc:
        return fail("pc-train", str(exc))
    dist_info, device = Distributed.start(device)
    if not dist_info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    model.to(device)
    out = args.out or (
        resume.run_folder(args.resume) if args.resume is not None else Path("runs") / run_name(model.name)
    )
    if dist_info.is_main:  # before any training: an --out that cannot be written is the user's mistake, in one line
        error = make_folder(out)
        if error is not None:
            dist_info.stop()
            return fail("pc-train", error)
    state.commands.append("pc-train " + shlex.join(argv))
    try:
        trainer = Trainer(model, options, state, photos, held_out, spec, out, dist_info, progress)
    except (ConfigError, data.DataError) as exc:
        dist_info.stop()
        return fail("pc-train", str(exc))
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        dist_info.stop()
        return memory_failure(
            "pc-train",
            f"preparing the photos (at scales {', '.join(f'{s:g}' for s in options.scales)}) and "
            f"{options.held_out_count} held-out windows of {'x'.join(map(str, model.config.input_shape))}: give "
            "fewer or smaller photos (--data, --held-out) or fewer --scales",
        )
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
        try:
            path = trainer.save(history=True)
        except OSError as exc:
            return _write_failure(out, exc)
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
    except (MemoryError, RuntimeError) as exc:  # TrainingStopped, a RuntimeError too, is caught above
        if not out_of_memory(exc):
            raise
        return memory_failure("pc-train", _memory_advice(state.step + 1, options, trainer.steps, model, args))
    except OSError as exc:  # a checkpoint or the log (a stopped run's checkpoint too): the disk is full
        return _write_failure(out, exc)
    finally:
        dist_info.stop()
    if dist_info.is_main and not args.no_figures and code in (0, 130):
        from .figures import write_figures

        try:
            write_figures(trainer.model, out / "figures", out / "metrics.jsonl", held_out, steps=trainer.steps)
        except OSError as exc:
            return write_failure(
                "pc-train",
                f"--out {out}",
                exc,
                f"the run is complete ({out / 'model.safetensors'}); some figures in {out / 'figures'} are missing",
            )
        log.info("figures in %s", out / "figures")
    return code


def _write_failure(out: Path, exc: OSError) -> int:
    """A checkpoint or the metrics log could not be written (a full disk: exit 1), in one line that says where
    to continue from: checkpoints are written whole, so OUT/model.safetensors, where there is one, is complete."""
    last = out / "model.safetensors"
    advice = (
        f"the last checkpoint is complete: make room and continue with: pc-train --resume {last}"
        if last.is_file()
        else "make room and run the same command again"
    )
    return write_failure("pc-train", f"--out {out}", exc, advice)


def _amortise_only(args: Any) -> list[tuple[str, bool]]:
    """The flags that shape only pc-train --amortise's fit, and whether each was given."""
    return [
        ("--amortise-targets", args.amortise_targets != "hybrid"),
        ("--target-pool", args.target_pool != amortise.TARGET_POOL),
        ("--amortise-floor", args.amortise_floor != FIT_FLOOR),
        ("--augment", args.augment),
    ]


def _amortise(args, argv: list[str], device: torch.device) -> int:
    """pc-train --amortise CHECKPOINT: fit an amortiser to the model, U bit for bit unchanged."""
    fixed = [f"--{n.replace('_', '-')}" for n in ("k1", "k2", "set") if getattr(args, n, None) not in (None, [])]
    if args.k2_schedule != "preset" or args.amortiser:
        fixed.append("--k2-schedule" if args.k2_schedule != "preset" else "--amortiser")
    if fixed:
        return fail("pc-train", f"--amortise leaves the model as it is, so {', '.join(fixed)} cannot be given")
    if args.target_pool != amortise.TARGET_POOL and args.amortise_targets != "fixed-point":
        return fail("pc-train", "--target-pool sizes the pool of --amortise-targets fixed-point; give both or neither")
    if args.infer_steps is not None and args.amortise_targets == "fixed-point":
        return fail("pc-train", "--infer-steps sets the hybrid targets' T; fixed-point targets are settled to the end")
    try:
        model = pcmodel.load(args.amortise, device=device)
        spec = DataSpec(
            source=str(args.data) if args.data else "default",
            held_out=str(args.held_out) if args.held_out else "default",
        )
        photos, held_out = spec.load()
        data.check_sizes(photos, model.config, spec.source, "--data")
        data.check_sizes(held_out, model.config, spec.held_out, "--held-out")
        scales = tuple(args.scales) if args.scales else None
        if scales is not None:  # the batches' source, checked now: a scale that leaves no image is a mistake
            data.prepare(photos, model.config, scales)
    except (ConfigError, data.DataError, pcmodel.CheckpointError, pcmodel.UnstableStepError) as exc:
        return fail("pc-train", str(exc))
    args.argv = argv
    out = args.out or Path("runs") / f"{run_name(model.name)}-amortised"
    error = make_folder(out)
    if error is not None:
        return fail("pc-train", error)
    options = amortise.amortise_options(args, model)
    try:
        return amortise.amortise_checkpoint(args, model, out, photos, held_out, options)
    except OSError as exc:  # the checkpoint or the log: a full disk exits 1
        return write_failure("pc-train", f"--out {out}", exc, "make room and run the same command again")
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        steps = options.infer_steps or amortise.TARGET_STEPS
        shape = "x".join(map(str, model.config.input_shape))
        if options.targets == "fixed-point":  # the pool, settled once, is held whole
            targets, last = f"a pool of {options.pool} settled windows", f"--target-pool (now {options.pool})"
        else:
            targets, last = f"T = {steps} inference steps", f"--infer-steps (now {steps})"
        return memory_failure(
            "pc-train",
            f"fitting the amortiser (hidden {options.hidden}, batches of {options.batch_size} inputs of {shape}, "
            f"{targets}): lower --amortise-hidden (now {options.hidden}), --batch-size (now {options.batch_size}) "
            f"or {last}",
        )


def _memory_advice(update: int, options: TrainConfig, steps: int, model: PCModel, args: Any) -> str:
    """Where a run ran out of memory and what to lower: memory grows with the batch times the inference steps
    (the torch backend keeps each step's state: pcmodel.config.MAX_STEPS)."""
    shape = "x".join(map(str, model.config.input_shape))
    where = f"at update {update} (batches of {options.batch_size} inputs of {shape}, T = {steps} inference steps)"
    if args.resume is not None:
        return (
            f"{where}: --resume keeps the run's --batch-size and --infer-steps, so free memory, or start a new run "
            "with lower ones"
        )
    return f"{where}: lower --batch-size (now {options.batch_size}) or --infer-steps (now {steps})"


def run_name(name: str) -> str:
    """A model's name as a folder under runs/: the name comes from a config or a checkpoint (untrusted), so
    only letters, digits, '.', '-' and '_' stay; a path (absolute, or with '..') never leaves runs/."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "model"
    return safe


def _configure_logging(progress: bool) -> None:
    if progress:
        from rich.logging import RichHandler

        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


if __name__ == "__main__":
    sys.exit(main())
