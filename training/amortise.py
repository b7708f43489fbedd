"""Learning the amortised start (pcmodel.amortiser) from settled latents, U fixed: hybrid predictive coding.

Each batch's latents are settled by the network's own dynamics; each level's map A_l then takes one Adam
step on its regression loss, each image's ||A_l(in_l) - r*_l||^2 / ||r*_l||^2 averaged over the batch
(pcmodel.amortiser.fitting_losses), from that batch alone and its own level's error alone (local). U never
reads A: a run that learns A alongside U (`pc-train --amortiser`) moves U exactly as one that does not,
and `pc-train --amortise CHECKPOINT` fits A to a finished model, U bit for bit unchanged. The fit uses
autograd: it is training, not inference.

With `--amortise` the latents settle from the amortised start itself (T steps from A's guess, the hybrid
scheme): as A learns, its targets come closer to the fixed point than T steps from zero reach. They settle
with the paper's dynamics (plain gradient steps, T = --infer-steps or TARGET_STEPS), whatever dynamics the
model is served with: what A is fitted to is the network's, not a serving choice, and a recorded fit
command refits the same A from the same file.

With `--amortise-targets fixed-point` the targets are the fixed point itself: a pool of windows drawn once
(`--target-pool`), each settled by the paper's dynamics from zero for REFERENCE_STEPS steps (the yardstick
every gap is measured against), and each update a batch of the pool. Where the energy has near-flat
directions (rao-ballard-1999's Cauchy prior on high-contrast windows), T steps from the guess leave the
targets far from the fixed point along them and the refinement barely moves there, so only a guess fitted
to the fixed point itself starts close to it (docs/PERFORMANCE.md, "Issue 21: the amortiser fitted to the
fixed point").
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pcmodel import Amortiser, AmortiserConfig, PCModel
from pcmodel.amortiser import FIT_FLOOR, fitting_losses

from . import data

log = logging.getLogger(__name__)

# The fit's defaults for --amortise (docs/TRAINING.md, "The amortised start of the shipped models").
AMORTISE_UPDATES = 1500
TARGET_STEPS = 100  # the paper's T: the default number of plain gradient steps that settle the targets
AMORTISE_LR = 3e-3
TARGETS = ("hybrid", "fixed-point")  # T steps from the guess at every batch; or a pool settled once
TARGET_POOL = 100_000
SETTLE_CHUNK = 4096  # windows settled at once for a fixed-point pool: memory bounded whatever the pool


@dataclass(frozen=True)
class AmortiseOptions:
    """What decides an amortiser's fit (saved in the checkpoint's provenance)."""

    updates: int = AMORTISE_UPDATES  # Adam steps, one per batch
    batch_size: int = 64
    infer_steps: int | None = None  # T refinement steps giving the targets; None: the model's steps
    lr: float = AMORTISE_LR  # Adam's step, decayed to 0 along a cosine over `updates`
    seed: int = 0  # the amortiser's initial draw and the batches
    scales: tuple[float, ...] = (1.0,)
    hidden: int = 32
    targets: str = "hybrid"  # TARGETS
    pool: int = TARGET_POOL  # with targets="fixed-point": the windows settled once
    floor: float = FIT_FLOOR  # the loss's floor (pcmodel.amortiser.fitting_losses)
    augment: bool = False  # also the photos turned by quarter turns and mirrored (8 views of each)


class AmortiserFitter:
    """Adam on the amortiser's regression losses, one step per batch of settled latents."""

    def __init__(self, model: PCModel, lr: float, total_updates: int, floor: float = FIT_FLOOR) -> None:
        assert model.amortiser is not None
        self.model = model
        self.lr = lr
        self.floor = floor
        self.total = max(int(total_updates), 1)
        self.params = {k: t.detach().clone().requires_grad_(True) for k, t in model.amortiser.params.items()}
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=lr)

    def step(self, update: int, x: torch.Tensor, settled: list[torch.Tensor]) -> list[float]:
        """One Adam step at update `update` (the cosine schedule's position); returns each level's loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * min(update, self.total) / self.total))
        levels = self.model.levels(x.shape[-2:])
        with torch.enable_grad():
            losses = fitting_losses(levels, self.params, x, [r.detach().clone() for r in settled], self.floor)
            self.optimizer.zero_grad(set_to_none=True)
            sum(losses).backward()
        self.optimizer.step()
        with torch.no_grad():
            for name, t in self.params.items():
                self.model.amortiser.params[name].copy_(t)
        return [float(v.detach()) for v in losses]


def fit(
    model: PCModel,
    sampler: data.PatchSampler,
    options: AmortiseOptions,
    held_out: torch.Tensor | None = None,
    eval_every: int = 100,
    metrics_path: Path | None = None,
) -> dict[str, Any]:
    """Fit a fresh amortiser to `model` (U fixed) on the sampler's batches; returns the last metrics."""
    model.amortiser = Amortiser.create(model.config, AmortiserConfig(hidden=options.hidden), seed=options.seed)
    fitter = AmortiserFitter(model, options.lr, options.updates, options.floor)
    steps = options.infer_steps or TARGET_STEPS
    pool = settled_pool(model, sampler, options) if options.targets == "fixed-point" else None
    draws = torch.Generator().manual_seed(options.seed)
    judge = StartJudge(model, held_out) if held_out is not None else None
    last: dict[str, Any] = {}
    curve: list[dict[str, Any]] = []  # the held-out measures at each evaluation: how the start improves
    begun = time.monotonic()
    for update in range(options.updates + 1):
        line: dict[str, Any] = {"step": update}
        if judge is not None and (update % eval_every == 0 or update == options.updates):
            line.update(judge.measure())
            curve.append({k: round(v, 6) for k, v in line.items()})
            log.info("amortiser update %d/%d  %s", update, options.updates, json.dumps(line))
        if update < options.updates:
            if pool is not None:
                pick = torch.randint(0, pool[0].shape[0], (options.batch_size,), generator=draws)
                x, settled = pool[0][pick].to(model.device), [r[pick].to(model.device) for r in pool[1]]
            else:
                x = sampler.batch(update, options.batch_size).to(model.device)
                # The torch backend always (as pc-train's updates): the automatic choice depends on the calls before.
                settled = model.infer(x, steps=steps, init="amortised", solver="gradient", backend="torch").latents
            losses = fitter.step(update, x, settled)
            line.update({f"fit_loss_{i}": v for i, v in enumerate(losses, 1)})
        line["seconds"] = round(time.monotonic() - begun, 3)
        if metrics_path is not None and ("held_out_fit_error_1" in line or update % 10 == 0):
            with metrics_path.open("a") as f:
                f.write(json.dumps(line) + "\n")
        last.update(line)
    return {**last, "curve": curve}


def settled_pool(
    model: PCModel, sampler: data.PatchSampler, options: AmortiseOptions
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`options.pool` windows (the sampler's draw for the seed) and their fixed points: the paper's dynamics
    from zero for REFERENCE_STEPS steps, SETTLE_CHUNK windows at a time, kept on the CPU."""
    x = sampler.batch(0, options.pool)
    backend = settling_backend(model)
    begun = time.monotonic()
    settled: list[list[torch.Tensor]] = []
    for lo in range(0, x.shape[0], SETTLE_CHUNK):
        chunk = x[lo : lo + SETTLE_CHUNK].to(model.device)
        result = model.infer(chunk, steps=REFERENCE_STEPS, init="zero", solver="gradient", backend=backend)
        settled.append([r.cpu() for r in result.latents])
        log.info("settled %d of %d target windows (%s, %.0f s)", min(lo + SETTLE_CHUNK, x.shape[0]), x.shape[0],
                 backend, time.monotonic() - begun)  # fmt: skip
    return x, [torch.cat(level) for level in zip(*settled)]


def settling_backend(model: PCModel) -> str:
    """numba where it runs the model (the paper's linear network: ~30x the batched loop on a CPU), else the
    batched loop; both run the definition's steps, so the pool does not depend on the calls before."""
    probe = torch.zeros((1, *model.config.input_shape), device=model.device)
    try:
        model.infer(probe, steps=1, init="zero", solver="gradient", backend="numba")
    except ValueError:  # pcmodel.engines.select: numba does not run this plan or device
        return "loop"
    return "numba"


class StartJudge:
    """How good the amortised start is on fixed inputs, as it learns: each level's relative distance of
    the guess to the fixed point, the median energy gap after 10 steps, and the median steps an image
    takes with early stop at today's accuracy (`tolerance`). The fixed point is computed once."""

    def __init__(self, model: PCModel, x: torch.Tensor, reference_steps: int = 1000) -> None:
        self.model, self.x = model, x
        self.fixed = model.infer(x, steps=reference_steps, init="zero", backend=LOOP, solver="gradient")
        self.tol = tolerance(model, x)
        zero = model.infer(x, steps=10, init="zero", backend=LOOP, solver="gradient").energy[-1]
        self.zero = {"held_out_gap_10_zero": float(energy_gap(zero, self.fixed.energy[-1]).median()),
                     "held_out_steps_tol_zero": steps_used(model, x, self.tol, "zero")}  # fmt: skip

    def measure(self) -> dict[str, float]:
        guess = self.model.amortised_latents(self.x)
        distance = latent_distance(guess, self.fixed.latents)
        out = {f"held_out_fit_error_{i}": float(d.median()) for i, d in enumerate(distance, 1)}
        after = self.model.infer(self.x, steps=10, init="amortised", backend=LOOP, solver="gradient").energy[-1]
        out["held_out_gap_10_amortised"] = float(energy_gap(after, self.fixed.energy[-1]).median())
        out["held_out_steps_tol_amortised"] = steps_used(self.model, self.x, self.tol, "amortised")
        return {**out, **self.zero, "tol": self.tol}


def amortise_options(args: Any, model: PCModel) -> AmortiseOptions:
    """pc-train --amortise's options: its flags, else the run's saved batch size and scales, else the defaults."""
    saved = model.provenance.get("training", {}).get("options", {}) if isinstance(model.provenance, dict) else {}
    return AmortiseOptions(
        updates=args.updates or AMORTISE_UPDATES,
        batch_size=args.batch_size or int(saved.get("batch_size", 64)),
        infer_steps=args.infer_steps,
        lr=args.amortise_lr,
        seed=args.seed if args.seed is not None else 0,
        scales=tuple(args.scales or saved.get("scales", (1.0,))),
        hidden=args.amortise_hidden,
        targets=args.amortise_targets,
        pool=args.target_pool,
        floor=args.amortise_floor,
        augment=args.augment,
    )


def amortise_checkpoint(
    args: Any,
    model: PCModel,
    out: Path,
    photos: list[data.Photo],
    held_out_photos: list[data.Photo] | None = None,
    options: AmortiseOptions | None = None,
) -> int:
    """pc-train --amortise: fit an amortiser to the checkpoint's model, U unchanged; write OUT/model.safetensors."""
    options = amortise_options(args, model) if options is None else options
    weights_before = [w.clone() for w in model.weights]
    sha_before = model.sha256
    size = model.config.input_shape[1:]
    images = data.prepare(photos, model.config, options.scales)
    sampler = data.PatchSampler(data.dihedral(images, size) if options.augment else images, size, options.seed)
    held = data.held_out_windows(model.config, 256, photos=held_out_photos).to(model.device)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "amortise_metrics.jsonl"
    metrics.unlink(missing_ok=True)
    log.info(
        "fitting an amortiser to %s (%s): %d updates of %d inputs, targets %s, hidden %d -> %s",
        args.amortise, sha_before[:12], options.updates, options.batch_size,
        f"T = {options.infer_steps or TARGET_STEPS} steps from the guess" if options.targets == "hybrid"
        else f"the fixed points of {options.pool} windows", options.hidden, out,
    )  # fmt: skip
    last = fit(model, sampler, options, held_out=held, eval_every=args.eval_every or 100, metrics_path=metrics)
    assert all(torch.equal(a, b) for a, b in zip(weights_before, model.weights)) and model.sha256 == sha_before
    provenance = dict(model.provenance)
    provenance["amortiser"] = {
        "command": "pc-train " + shlex.join(args.argv),
        "options": {**options.__dict__, "scales": list(options.scales)},
        "data": "default" if args.data is None else str(args.data),
        "threads": torch.get_num_threads(),
        "seconds": last.get("seconds"),
        "held_out": {k: v for k, v in last.items() if k.startswith("held_out")},
        "curve": last["curve"],
    }
    path = out / "model.safetensors"
    model.save(path, provenance=provenance)
    log.info("amortiser fitted in %.0f s: %s; wrote %s (model %s, U unchanged)", last.get("seconds", 0.0),
             json.dumps({k: round(v, 4) for k, v in last.items() if k.startswith("held_out")}), path,
             sha_before[:12])  # fmt: skip
    return 0


# ---- measuring the start -----------------------------------------------------------------------

STEP_COUNTS = (0, 5, 10, 20, 50, 100)
# Measurements run the definition (pcmodel.energy.infer_loop), batched: the fast backends are prepared for
# the served step count only, and the torch fallback runs a CPU batch row by row.
LOOP = "loop"
REFERENCE_STEPS = 3000  # the fixed point every gap is measured against (from zero, plain gradient steps)
REACH_STEPS = 400  # steps allowed to reach the fixed point (an image that never does counts as this many)


def energy_gap(energy: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """(E - E*) / |E*| per image: how far above the fixed point's energy E* an energy is."""
    return (energy - fixed) / fixed.abs().clamp_min(1e-30)


def latent_distance(latents: list[torch.Tensor], fixed: list[torch.Tensor]) -> list[torch.Tensor]:
    """||r_l - r_l*|| / ||r_l*|| per image and level."""
    return [(r - f).flatten(1).norm(dim=1) / f.flatten(1).norm(dim=1).clamp_min(1e-30) for r, f in zip(latents, fixed)]


def start_curves(
    model: PCModel, x: torch.Tensor, fixed: Any, inits: tuple[str, ...] = ("zero", "amortised")
) -> dict[str, Any]:
    """For each start: the median energy gap (and the gap of the mean energy) and per-level latent distance
    to `fixed` (an InferenceResult)
    after each of STEP_COUNTS plain gradient steps, and the steps each image needs to come within today's
    accuracy (the median gap of 100 steps from zero) of the fixed point."""
    e_fixed = fixed.energy[-1]
    out: dict[str, Any] = {}
    for init in inits:
        curve = {"energy_gap": {}, "energy_gap_of_mean": {}, "latent_distance": {}}
        for steps in STEP_COUNTS:
            result = model.infer(x, steps=steps, init=init, backend=LOOP, solver="gradient")
            curve["energy_gap"][steps] = float(energy_gap(result.energy[-1], e_fixed).median())
            # The gap of the mean energy: the high-contrast windows weigh in, where a median of ratios hides them.
            curve["energy_gap_of_mean"][steps] = float(energy_gap(result.energy[-1].mean(), e_fixed.mean()))
            curve["latent_distance"][steps] = [
                float(d.median()) for d in latent_distance(result.latents, fixed.latents)
            ]
        out[init] = curve
    target = out["zero"]["energy_gap"][100] if "zero" in out else None
    if target is not None:
        for init in inits:
            trace = energy_gap(
                model.infer(x, steps=REACH_STEPS, init=init, backend=LOOP, solver="gradient").energy, e_fixed
            )  # (T + 1, B)
            reached = trace <= target
            first = torch.where(
                reached.any(0), reached.float().argmax(0), torch.full_like(reached[0], REACH_STEPS, dtype=torch.float32)
            )
            out[init]["steps_to_reach"] = float(first.median())
        out["reach_target_gap"] = target
    return out


def tolerance(model: PCModel, x: torch.Tensor, steps: int = 100) -> float:
    """The median gradient norm ||dE/dr|| after `steps` plain steps from zero: today's accuracy as a `tol`."""
    latents = model.infer(x, steps=steps, init="zero", backend=LOOP, solver="gradient").latents
    grads = model.gradients(x, latents)
    return float(torch.sqrt(sum(g.double().square().flatten(1).sum(1) for g in grads)).median())


def steps_used(model: PCModel, x: torch.Tensor, tol: float, init: str, limit: int = REACH_STEPS) -> float:
    """The median steps an image takes from `init` until its gradient norm falls below tol (early stop)."""
    return float(
        model.infer(x, steps=limit, tol=tol, init=init, backend=LOOP, solver="gradient").steps.double().median()
    )


def unfamiliar_inputs(model: PCModel, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Windows the training never saw anything like: pixel noise, and crops of scikit-image's checkerboard
    (a texture of hard-edged squares; the training photos are natural scenes and three natural textures)."""
    from skimage import data as skdata

    generator = torch.Generator().manual_seed(seed)
    c, h, w = model.config.input_shape
    shape = (h * 4, w * 4, 3) if c == 3 else (h * 4, w * 4)
    noise = [
        data.Photo(f"noise{i}", (torch.rand(shape, generator=generator) * 255).to(torch.uint8).numpy())
        for i in range(4)
    ]
    texture = [data.Photo("checkerboard", skdata.checkerboard())]
    return {
        "noise": data.held_out_windows(model.config, count, seed=seed, photos=noise).to(model.device),
        "checkerboard": data.held_out_windows(model.config, count, seed=seed, photos=texture).to(model.device),
    }


def start_report(model: PCModel, count: int = 256, reference_steps: int = REFERENCE_STEPS) -> dict[str, Any] | None:
    """pc-analyze's "amortised start" section (and benchmarks/amortised.py's numbers); None without an amortiser.

    On `count` held-out windows: the gap curves of both starts (`start_curves`), the steps each needs to
    reach today's accuracy, and with early stop at tol = today's accuracy (`tolerance`) the median steps
    used on the held-out windows, on pixel noise and on an unseen texture; with the fit's own record of
    how the steps used fell as the amortiser learned (its provenance), where the fit wrote one.
    """
    if model.amortiser is None:
        return None
    x = data.held_out_windows(model.config, count).to(model.device)
    fixed = model.infer(x, steps=reference_steps, init="zero", backend=LOOP, solver="gradient")
    tol = tolerance(model, x)
    sets = {"held-out": x, **unfamiliar_inputs(model, count)}
    fit = model.provenance.get("amortiser", {}) if isinstance(model.provenance, dict) else {}
    return {
        "windows": count,
        "reference_steps": reference_steps,
        "hidden": model.amortiser.config.hidden,
        "curves": start_curves(model, x, fixed),
        "tol": tol,
        "steps_used_tol": {
            what: {init: steps_used(model, inputs, tol, init) for init in ("zero", "amortised")}
            for what, inputs in sets.items()
        },
        "steps_used_own_tol": own_tolerance_steps(model, sets),
        "learning_curve": [
            {
                "step": c["step"],
                "steps_used_tol": c.get("held_out_steps_tol_amortised"),
                "gap_10": c.get("held_out_gap_10_amortised"),
            }
            for c in fit.get("curve", [])
        ],
    }


def own_tolerance_steps(model: PCModel, sets: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per set of inputs, early stop at that set's own tol (its zero start's median gradient norm after 100
    steps: the zero start then uses about 100 on every set): the median steps used from each start. On
    familiar inputs the amortised start needs fewer; how much of that it keeps on unfamiliar ones."""
    out = {}
    for what, inputs in sets.items():
        tol = tolerance(model, inputs)
        out[what] = {"tol": tol, **{init: steps_used(model, inputs, tol, init) for init in ("zero", "amortised")}}
    return out
