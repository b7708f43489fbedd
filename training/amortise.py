"""Learning the amortised start (pcmodel.amortiser) from settled latents, U fixed: hybrid predictive coding.

Each batch's latents are settled by the network's own dynamics; each level's map A_l then takes one Adam
step on its regression loss ||A_l(in_l) - r*_l||^2 / ||r*_l||^2 (pcmodel.amortiser.fitting_losses), from
that batch alone and its own level's error alone (local). U never reads A: a run that learns A alongside U
(`pc-train --amortiser`) moves U exactly as one that does not, and `pc-train --amortise CHECKPOINT` fits
A to a finished model, U bit for bit unchanged. The fit uses autograd: it is training, not inference.

With `--amortise` the latents settle from the amortised start itself (T steps from A's guess, the hybrid
scheme): as A learns, its targets come closer to the fixed point than T steps from zero reach.
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
from pcmodel.amortiser import fitting_losses

from . import data

log = logging.getLogger(__name__)

# The fit's defaults for --amortise, chosen by measurement (docs/TRAINING.md, "The amortised start").
AMORTISE_UPDATES = 1500
AMORTISE_LR = 3e-3


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


class AmortiserFitter:
    """Adam on the amortiser's regression losses, one step per batch of settled latents."""

    def __init__(self, model: PCModel, lr: float, total_updates: int) -> None:
        assert model.amortiser is not None
        self.model = model
        self.lr = lr
        self.total = max(int(total_updates), 1)
        self.params = {k: t.detach().clone().requires_grad_(True) for k, t in model.amortiser.params.items()}
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=lr)

    def step(self, update: int, x: torch.Tensor, settled: list[torch.Tensor]) -> list[float]:
        """One Adam step at update `update` (the cosine schedule's position); returns each level's loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * min(update, self.total) / self.total))
        levels = self.model.levels(x.shape[-2:])
        with torch.enable_grad():
            losses = fitting_losses(levels, self.params, x, [r.detach().clone() for r in settled])
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
    fitter = AmortiserFitter(model, options.lr, options.updates)
    steps = options.infer_steps or model.config.steps
    last: dict[str, Any] = {}
    begun = time.monotonic()
    for update in range(options.updates):
        x = sampler.batch(update, options.batch_size).to(model.device)
        settled = model.infer(x, steps=steps, init="amortised").latents
        losses = fitter.step(update, x, settled)
        line: dict[str, Any] = {"step": update + 1, **{f"fit_loss_{i}": v for i, v in enumerate(losses, 1)}}
        if held_out is not None and ((update + 1) % eval_every == 0 or update + 1 == options.updates):
            line.update(start_quality(model, held_out))
            log.info("amortiser update %d/%d  %s", update + 1, options.updates, json.dumps(line))
        line["seconds"] = round(time.monotonic() - begun, 3)
        if metrics_path is not None and ("held_out_fit_error_1" in line or (update + 1) % 10 == 0):
            with metrics_path.open("a") as f:
                f.write(json.dumps(line) + "\n")
        last = line
    return last


def start_quality(model: PCModel, x: torch.Tensor, steps: int = 10, reference_steps: int = 1000) -> dict[str, float]:
    """How good the amortised start is on inputs x: each level's relative distance to the latents after
    `reference_steps` steps (from the amortised start) and the energy after `steps` steps from either start."""
    reference = model.infer(x, steps=reference_steps, init="amortised").latents
    guess = model.amortised_latents(x)
    out = {
        f"held_out_fit_error_{i}": float((g - r).norm() / r.norm().clamp_min(1e-30))
        for i, (g, r) in enumerate(zip(guess, reference), 1)
    }
    out[f"held_out_energy_{steps}_amortised"] = float(model.infer(x, steps=steps, init="amortised").energy[-1].mean())
    out[f"held_out_energy_{steps}_zero"] = float(model.infer(x, steps=steps, init="zero").energy[-1].mean())
    return out


def amortise_checkpoint(args: Any, model: PCModel, out: Path, photos: list[data.Photo]) -> int:
    """pc-train --amortise: fit an amortiser to the checkpoint's model, U unchanged; write OUT/model.safetensors."""
    saved = model.provenance.get("training", {}).get("options", {}) if isinstance(model.provenance, dict) else {}
    options = AmortiseOptions(
        updates=args.updates or AMORTISE_UPDATES,
        batch_size=args.batch_size or int(saved.get("batch_size", 64)),
        infer_steps=args.infer_steps,
        lr=args.amortise_lr,
        seed=args.seed if args.seed is not None else 0,
        scales=tuple(args.scales or saved.get("scales", (1.0,))),
        hidden=args.amortise_hidden,
    )
    weights_before = [w.clone() for w in model.weights]
    sha_before = model.sha256
    sampler = data.PatchSampler(
        data.prepare(photos, model.config, options.scales), model.config.input_shape[1:], options.seed
    )
    held = data.held_out_windows(model.config, 256).to(model.device)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "amortise_metrics.jsonl"
    metrics.unlink(missing_ok=True)
    log.info(
        "fitting an amortiser to %s (%s): %d updates of %d inputs, T = %d, hidden %d -> %s",
        args.amortise, sha_before[:12], options.updates, options.batch_size,
        options.infer_steps or model.config.steps, options.hidden, out,
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
    }
    path = out / "model.safetensors"
    model.save(path, provenance=provenance)
    log.info("amortiser fitted in %.0f s: %s; wrote %s (model %s, U unchanged)", last.get("seconds", 0.0),
             json.dumps({k: round(v, 4) for k, v in last.items() if k.startswith("held_out")}), path,
             sha_before[:12])  # fmt: skip
    return 0


# ---- measuring the start -----------------------------------------------------------------------

STEP_COUNTS = (0, 5, 10, 20, 50, 100)
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
    """For each start: the median energy gap and per-level latent distance to `fixed` (an InferenceResult)
    after each of STEP_COUNTS plain gradient steps, and the steps each image needs to come within today's
    accuracy (the median gap of 100 steps from zero) of the fixed point."""
    e_fixed = fixed.energy[-1]
    out: dict[str, Any] = {}
    for init in inits:
        curve = {"energy_gap": {}, "latent_distance": {}}
        for steps in STEP_COUNTS:
            result = model.infer(x, steps=steps, init=init)
            curve["energy_gap"][steps] = float(energy_gap(result.energy[-1], e_fixed).median())
            curve["latent_distance"][steps] = [
                float(d.median()) for d in latent_distance(result.latents, fixed.latents)
            ]
        out[init] = curve
    target = out["zero"]["energy_gap"][100] if "zero" in out else None
    if target is not None:
        for init in inits:
            trace = energy_gap(model.infer(x, steps=REACH_STEPS, init=init).energy, e_fixed)  # (T + 1, B)
            reached = trace <= target
            first = torch.where(
                reached.any(0), reached.float().argmax(0), torch.full_like(reached[0], REACH_STEPS, dtype=torch.float32)
            )
            out[init]["steps_to_reach"] = float(first.median())
        out["reach_target_gap"] = target
    return out


def tolerance(model: PCModel, x: torch.Tensor, steps: int = 100) -> float:
    """The median gradient norm ||dE/dr|| after `steps` plain steps from zero: today's accuracy as a `tol`."""
    latents = model.infer(x, steps=steps, init="zero").latents
    grads = model.gradients(x, latents)
    return float(torch.sqrt(sum(g.double().square().flatten(1).sum(1) for g in grads)).median())


def steps_used(model: PCModel, x: torch.Tensor, tol: float, init: str, limit: int = REACH_STEPS) -> float:
    """The median steps an image takes from `init` until its gradient norm falls below tol (early stop)."""
    return float(model.infer(x, steps=limit, tol=tol, init=init).steps.double().median())


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
