"""PCModel: a predictive-coding hierarchy with its weights, and the public methods on it.

The mathematics lives in pcmodel.energy (docs/MODEL.md); the fast engines in pcmodel.engines. The model
owns its weights, its device and its engine state (`engines`: what it is prepared for, plans and
programs), and calls both; neither calls back.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .amortiser import Amortiser, amortised_latents
from .checkpoint import content_hash
from .checkpoint import save as save_checkpoint
from .config import MAX_STEPS, ConfigError, ModelConfig, has_whole_map_level, level_shapes, weight_shapes
from .energy import (
    constrain_weights,
    infer_loop,
    initial_latents,
    latent_gradients,
    level_errors,
    make_result,
    weight_gradients,
)
from .energy import energy as energy_of
from .engines import Choice, EngineState
from .images import preprocess as preprocess_images
from .levels import Level
from .parameters import as_params, level_weights, params_key
from .results import InferenceResult
from .solvers import DEFAULT_MOMENTUM, DEFAULT_WINDOW, Solver, solver_for


@functools.lru_cache(maxsize=64)
def _levels(config: ModelConfig, hw: tuple[int, ...]) -> tuple[Level, ...]:
    """Levels are pure geometry of (config, size): made once per size."""
    return tuple(Level(lc, g) for lc, g in zip(config.levels, level_shapes(config, hw)))


class UnstableStepError(ValueError):
    """k1 is above the largest step for which inference is stable."""


class PCModel:
    """A predictive-coding hierarchy with its weights. Create with `pcmodel.create` or `pcmodel.load`."""

    def __init__(
        self,
        config: ModelConfig,
        params: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
        *,
        allow_unstable: bool = False,
        device: torch.device | str | None = None,
        provenance: dict[str, Any] | None = None,
        amortiser: Amortiser | None = None,
    ) -> None:
        self.config = config
        self.provenance = dict(provenance or {})
        named = as_params(config, params)
        device = torch.device(device) if device is not None else next(iter(named.values())).device
        # The parameters by name (pcmodel.parameters); `weights` is the per-level U view of them.
        self.params = {k: t.detach().to(device=device, dtype=torch.float32).clone() for k, t in named.items()}
        if not all(torch.isfinite(t).all() for t in self.params.values()):
            raise ConfigError("parameters contain NaN or Inf")
        self.amortiser = amortiser
        self.engines = EngineState(config)
        self.allow_unstable = allow_unstable
        # The plain step's largest stable k1 at the native size per set of level steps (() the gradient's),
        # each computed when first needed and dropped at the next stability check.
        self.plain_bounds: dict[tuple[float, ...], float] = {}
        self.check_stability(allow_unstable=allow_unstable)

    # ---- structure -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def weights(self) -> list[torch.Tensor]:
        """Each level's U (causes, C_below, kh, kw), level 1 first: the same tensors as in `params`."""
        return level_weights(self.config, self.params)

    @weights.setter
    def weights(self, values: Sequence[torch.Tensor]) -> None:
        self.params = {**self.params, **as_params(self.config, values)}

    @property
    def amortiser(self) -> Amortiser | None:
        """The amortised start (pcmodel.amortiser), or None: a model may have one or not. Not in the hash."""
        return self._amortiser

    @amortiser.setter
    def amortiser(self, value: Amortiser | None) -> None:
        if value is None:
            if self.config.initial_latents == "amortised":
                raise ConfigError(
                    "this config starts inference from the amortised latents (initial_latents='amortised') but the "
                    "model has no amortiser: fit one (pc-train --amortise CHECKPOINT) or set initial_latents to zeros"
                )
            self._amortiser = None
            return
        checked = Amortiser.from_params(self.config, value.config, value.params)
        self._amortiser = checked.to(self.device)

    @property
    def num_levels(self) -> int:
        return len(self.config.levels)

    @staticmethod
    def weight_shapes(config: ModelConfig) -> list[tuple[int, int, int, int]]:
        """Shape of each U_l: (causes, C_below, kh, kw)."""
        return weight_shapes(config)

    def levels(self, input_hw: Sequence[int] | None = None) -> list[Level]:
        """The level maps at an input size (default: native)."""
        hw = tuple(int(v) for v in (self.config.input_shape[1:] if input_hw is None else input_hw))
        return list(_levels(self.config, hw))

    def latent_shapes(self, input_hw: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
        """(causes, H_l, W_l) per level for an input of this size (default: native)."""
        return [lv.geometry.latent for lv in self.levels(input_hw)]

    def to(self, device: torch.device | str) -> PCModel:
        """Move the weights to a device (in place) and return the model."""
        self.params = {k: t.to(device) for k, t in self.params.items()}
        if self._amortiser is not None:
            self._amortiser.to(device)
        return self

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[Level]]:
        """x on the model's device in float32 (float64 stays float64), the weights alike, and the levels."""
        x, levels = self._input(x)
        return x, [w.to(x.dtype) for w in self.weights], levels

    def _input(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Level]]:
        """`_inputs` without the weights (the backends other than the loop take the parameters by name)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a float tensor (B, C, H, W), got {shape}")
        if x.shape[1] != self.config.input_shape[0]:
            raise ValueError(f"x has {x.shape[1]} channel(s); this model takes {self.config.input_shape[0]}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(device=self.device, dtype=dtype)
        return x, self.levels(x.shape[-2:])

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def sha256(self) -> str:
        """Content hash over the config and the weights: identifies the model (not the provenance)."""
        return content_hash(self.config, self.params)

    def save(self, path: str | Path, provenance: dict[str, Any] | None = None) -> str:
        """Write a .safetensors checkpoint (weights, config, provenance); returns the content hash."""
        info = {**self.provenance, **(provenance or {})}
        return save_checkpoint(path, self.config, self.params, info, amortiser=self._amortiser)

    def preprocess(
        self, images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray], size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """PIL images or uint8 arrays -> x (B, C, H, W) on the model's device, prepared as in training."""
        return preprocess_images(images, self.config, size=size).to(self.device)

    # ---- the mathematics (pcmodel.energy) ----------------------------------------------------

    def energy(
        self, x: torch.Tensor, latents: Sequence[torch.Tensor], weights: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Energy per image (B,) of inputs x (B, C, H, W) with these latents; differentiable.

        Runs in float64 when x is float64, else float32. `weights` replaces the model's U_l
        (e.g. float64 tensors that require grad, to differentiate with respect to U).
        """
        x, own, levels = self._inputs(x)
        weights = own if weights is None else list(weights)
        latents = [r.to(x.dtype) for r in latents]
        return energy_of(self.config, weights, latents, level_errors(levels, weights, x, latents))

    def gradients(self, x: torch.Tensor, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """dE/dr_l per level (hand-derived), shaped like the latents."""
        x, weights, levels = self._inputs(x)
        latents = [r.to(x.dtype) for r in latents]
        errors = level_errors(levels, weights, x, latents)
        return latent_gradients(levels, weights, latents, errors)

    def weight_gradients(self, x: torch.Tensor, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """dE/dU_l as a batch mean (hand-derived), shaped like the weights (docs/MODEL.md section 3)."""
        x, weights, levels = self._inputs(x)
        latents = [r.to(x.dtype) for r in latents]
        errors = level_errors(levels, weights, x, latents)
        return weight_gradients(levels, weights, latents, errors)

    def apply_weight_gradients(self, grads: Sequence[torch.Tensor], k2: float) -> None:
        """U_l <- U_l - (k2 k2_scale_l / 2) grad_l, in place (grads may be averaged across processes first),
        then each column back to the level's column_norm where it has one."""
        with torch.inference_mode():
            for U, g, lc in zip(self.weights, grads, self.config.levels):
                U.sub_(g.to(U.dtype), alpha=k2 * lc.k2_scale / 2)
            constrain_weights(self.config, self.weights)

    def learn_step(self, x: torch.Tensor, latents: Sequence[torch.Tensor], k2: float | None = None) -> None:
        """One learning step U <- U - (k2/2) dE/dU (batch mean) at settled latents."""
        k2 = self.config.learning.k2 if k2 is None else k2
        with torch.inference_mode():
            self.apply_weight_gradients(self.weight_gradients(x, latents), k2)

    def initial_latents(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The config's deterministic start: zeros, feed-forward r_l = U_l^T t_l(r_{l-1}) bottom up, or amortised."""
        if self.config.initial_latents == "amortised":
            return self.amortised_latents(x)
        x, weights, levels = self._inputs(x)
        return initial_latents(self.config, levels, weights, x)

    def amortised_latents(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The amortiser's guess of the latents for x (B, C, H, W), one feed-forward pass per level
        (pcmodel.amortiser): where `infer(x, init="amortised")` starts. ValueError without an amortiser."""
        if self._amortiser is None:
            raise ValueError(
                f"model {self.name} has no amortiser, so it has no amortised start; use init='zero', or fit one "
                "with pc-train --amortise CHECKPOINT"
            )
        with torch.inference_mode():
            x, _, levels = self._inputs(x)
            if x.device.type != "cpu" or x.shape[0] == 1:
                return amortised_latents(levels, self._amortiser.params, x)
            # Row by row on a CPU, as the torch backend runs: a convolution's kernel (and so its rounding)
            # depends on the batch size, and an image must get the same bits alone and in a batch.
            rows = [amortised_latents(levels, self._amortiser.params, x[i : i + 1]) for i in range(x.shape[0])]
            return [torch.cat(level) for level in zip(*rows)]

    # ---- inference -------------------------------------------------------------------------

    @property
    def has_amortiser(self) -> bool:
        """Whether the model has a learned (amortised) start, `init="amortised"` (`model.amortiser`)."""
        return self._amortiser is not None

    def prepare(
        self,
        steps: Sequence[int] | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
        build: bool = True,
        solvers: Sequence[str | Solver] | None = None,
    ) -> None:
        """Say which step counts, input shapes (C, H, W) or (H, W) and solvers the fast backends serve.

        Replaces the prepared set (by default: the model's steps at its native shape, with its own solver;
        `solvers` e.g. ["nesterov", "gradient"], at most three). With `build`, the
        onnxruntime sessions are built now (CUDA graphs are captured per batch size on first use).
        Calls outside the set run on the torch backend, so memory stays bounded whatever callers ask for.
        """
        steps = [self.config.steps] if steps is None else [int(t) for t in steps]
        native = tuple(self.config.input_shape)
        full = [native] if shapes is None else [self._full_shape(s) for s in shapes]
        for shape in full:
            level_shapes(self.config, shape[1:])  # raises ConfigError for a size the hierarchy does not tile
        self.engines.set_prepared(steps, full, None if solvers is None else [self.solver(s) for s in solvers])
        if build and self.device.type == "cpu":
            amortiser = None if self._amortiser is None else self._amortiser.params
            self.engines.build(self.params, params_key(self.params), self.device, amortiser)

    def with_dynamics(
        self, steps: int | None = None, init: str | None = None, solver: str | Solver | None = None
    ) -> PCModel:
        """The same model served with other dynamics: a twin sharing the parameters and the amortiser whose
        config says `steps`, `init` ("zero" or "amortised") and `solver` (and its momentum, window and level
        steps) where given.

        E.g. the paper's dynamics of a model served faster:
        `model.with_dynamics(steps=100, init="zero", solver="gradient")`. The twin has its own prepared
        programs; its content hash differs where the config does (the weights are the same).
        """
        changes: dict[str, Any] = {}
        if steps is not None:
            if isinstance(steps, bool) or int(steps) < 1:
                raise ValueError(f"steps must be a positive int, got {steps!r}")
            changes["steps"] = int(steps)
        if init is not None:
            if init not in ("zero", "zeros", "amortised"):
                raise ValueError(f"init must be 'zero' or 'amortised', got {init!r}")
            if init == "amortised" and not self.has_amortiser:
                raise ValueError(f"model {self.name} has no amortiser: fit one with pc-train --amortise CHECKPOINT")
            changes["initial_latents"] = "zeros" if init in ("zero", "zeros") else "amortised"
        if solver is not None:
            chosen = self.solver(solver)  # refuses an unstable one
            changes["solver"] = chosen.name
            # A solver without momentum or window leaves the neutral value, so that the paper's dynamics of
            # a model served faster give back the config (and the content hash) it had before.
            changes["momentum"] = chosen.momentum if chosen.name in ("momentum", "nesterov") else DEFAULT_MOMENTUM
            changes["window"] = chosen.window or DEFAULT_WINDOW
            changes["level_steps"] = chosen.level_steps
        twin = copy.copy(self)
        twin.config = self.config.replace(**changes)
        twin.engines = EngineState(twin.config)
        twin.provenance = dict(self.provenance)
        return twin

    def _full_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        dims = tuple(int(v) for v in shape)
        if len(dims) == 2:
            return (self.config.input_shape[0], *dims)
        if len(dims) != 3 or dims[0] != self.config.input_shape[0]:
            raise ValueError(f"a prepared shape is (H, W) or ({self.config.input_shape[0]}, H, W), got {shape}")
        return dims  # type: ignore[return-value]

    def infer(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        tol: float | None = None,
        backend: str | None = None,
        init: str | Sequence[torch.Tensor] | None = None,
        solver: str | Solver | None = None,
    ) -> InferenceResult:
        """Settle the latents for x (B, C, H, W), already preprocessed: `steps` fixed steps.

        `init`: where the latents start. None: the config's start (`initial_latents`: zeros,
        feed-forward or amortised); "zero": zeros; "amortised": the amortiser's guess
        (`amortised_latents`, handed to the backend as its start; computed in onnxruntime where a backend
        that builds programs serves the call on a CPU, equal to torch's within float32 rounding, else in
        torch; ValueError for a model without an amortiser); or a list of tensors shaped like `result.latents` (one per
        level, level 1 first, batch first: e.g. a previous result's latents, a warm start).

        `solver`: the dynamics (pcmodel.solvers). None: the config's (`config.solver`); "gradient": the
        paper's plain gradient steps; "momentum" (heavy ball) or "nesterov" with the config's momentum;
        "anderson" with the config's window; or a `Solver("nesterov", 0.8)`, `Solver("anderson", window=3)`.
        Every solver settles to the same fixed point; a solver whose
        largest stable step is below the model's k1 is refused (UnstableStepError).

        With `tol`, an image stops as soon as the norm of its gradient dE/dr (all levels) falls
        below tol; it keeps its latents and `result.steps` reports the steps it used. Images that
        never stop get exactly the fixed-step result. Deterministic, no autograd.

        `backend`: None or "auto" picks by the fixed rule of pcmodel.engines.select; "loop" runs the
        definition (pcmodel.energy.infer_loop); "torch", "onnxruntime", "numba", "cuda-graph" ask for one.
        `result.backend` names the backend that ran, `result.reason` why, where it is not the rule's first pick.
        """
        steps = self.config.steps if steps is None else int(steps)
        if not 0 <= steps <= MAX_STEPS:  # each step's energy is kept: an unbounded count grows memory without end
            raise ValueError(f"steps must be from 0 to {MAX_STEPS}, got {steps}")
        if tol is not None and not (tol >= 0 and math.isfinite(tol)):
            raise ValueError(f"tol must be a finite number >= 0, got {tol}")
        dynamics = self.solver(solver)
        with torch.inference_mode():
            x, levels = self._input(x)
            key = params_key(self.params)
            choice = self.engines.choose(
                backend,
                device=self.device,
                float64=x.dtype == torch.float64,
                steps=steps,
                tol=tol,
                shape=tuple(x.shape[1:]),
                key=key,
                solver=dynamics,
            )
            r0 = self._start(init, x, levels, choice)
            if choice.backend == "loop":
                weights = [w.to(x.dtype) for w in self.weights]
                result = infer_loop(self.config, levels, weights, x, steps, tol, init=r0, solver=dynamics)
                result.reason = choice.reason
                if tol is not None and backend in (None, "auto"):
                    self._fixed_where_unstopped(result, x, steps, init, dynamics)
                return result
            params = {k: t.to(x.dtype) for k, t in self.params.items()}
            run = self.engines.run(choice, params, key, x, steps, r0, dynamics)
            used = torch.full((x.shape[0],), steps, dtype=torch.int64, device=x.device)
            return make_result(
                levels,
                x,
                run.latents,
                run.predictions,
                run.energy,
                used,
                errors=run.errors,
                reconstruction=run.reconstruction,
                backend=choice.backend,
                reason=choice.reason,
            )

    def _start(
        self,
        init: str | Sequence[torch.Tensor] | None,
        x: torch.Tensor,
        levels: Sequence[Level],
        choice: Choice | None = None,
    ) -> list[torch.Tensor] | None:
        """The starting latents a call gives (None: the config's own start), checked and in x's dtype. The
        amortised one comes from the engines where the `choice`'s backend has them compute it (onnxruntime
        on a CPU: EngineState.guess), else from torch (`amortised_latents`)."""
        if init is None and self.config.initial_latents == "amortised":
            init = "amortised"
        if init is None or (init in ("zero", "zeros") and self.config.initial_latents == "zeros"):
            return None  # the config's own start is zeros: the programs built without r0 inputs serve it
        shapes = [(x.shape[0], *lv.geometry.latent) for lv in levels]
        if isinstance(init, str):
            if init == "amortised":
                guessed = None
                if choice is not None and self._amortiser is not None:
                    guessed = self.engines.guess(choice, levels, self._amortiser.params, x)
                return self.amortised_latents(x) if guessed is None else guessed
            if init not in ("zero", "zeros"):
                raise ValueError(f"init must be 'zero', 'amortised', a list of latents or None, got {init!r}")
            return [x.new_zeros(s) for s in shapes]
        starts = list(init)
        got = [tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__ for r in starts]
        if got != shapes:
            raise ValueError(f"init must be one tensor per level shaped {shapes} (like result.latents), got {got}")
        starts = [r.to(device=x.device, dtype=x.dtype) for r in starts]
        if not all(bool(torch.isfinite(r).all()) for r in starts):
            raise ValueError("init contains NaN or Inf")
        return starts

    def _fixed_where_unstopped(
        self,
        result: InferenceResult,
        x: torch.Tensor,
        steps: int,
        init: str | Sequence[torch.Tensor] | None,
        solver: Solver,
    ) -> None:
        """Early stop: images that never stopped take the fixed-step result.

        `infer` promises that such images get exactly what the call without `tol` returns; that call runs
        on another backend, whose rounding differs from the loop's. Costs a second, fixed-step run; early
        stop is not the service's path.
        """
        never = result.steps == steps
        if not bool(never.any()) or result.energy.shape[0] != steps + 1:
            return
        fixed = self.infer(x, steps=steps, init=init, solver=solver)
        keep = never.view(-1, 1, 1, 1)
        result.latents = [torch.where(keep, f, r) for f, r in zip(fixed.latents, result.latents)]
        result.energy = torch.where(never[None, :], fixed.energy, result.energy)
        for name in ("reconstruction", "error"):
            setattr(result, name, torch.where(keep, getattr(fixed, name), getattr(result, name)))
        for field in ("predictions", "errors"):
            mine, theirs = getattr(result, field), getattr(fixed, field)
            for i, (a, b) in enumerate(zip(mine, theirs)):
                mine[i] = torch.where(never.view(-1, *[1] * (a.dim() - 1)), b, a)
        result.reason = f"early stop; images that never stopped: {fixed.backend}"

    # ---- stability -------------------------------------------------------------------------

    def solver(self, solver: str | Solver | None = None) -> Solver:
        """The dynamics a call runs (`infer`'s `solver`), refused when the model's k1 is at or above its
        largest stable step (the plain step's bound at the native size with the solver's level steps, times
        its factor: pcmodel.solvers) unless the model was loaded with allow_unstable."""
        chosen = self._solver_for(solver)
        bound = self._plain_bound(chosen.level_steps) * chosen.bound_factor
        if self.config.k1 >= bound and not self.allow_unstable:
            raise UnstableStepError(
                f"k1 = {self.config.k1:g} is at or above the largest stable step {bound:.4g} of solver "
                f"{chosen.label}: inference would diverge. Use a smaller momentum or the gradient solver."
            )
        return chosen

    def _solver_for(self, solver: str | Solver | None) -> Solver:
        config = self.config
        chosen = solver_for(solver, config.served_solver, config.momentum, config.window, config.level_steps)
        if chosen.level_steps and len(chosen.level_steps) != self.num_levels:
            raise ValueError(
                f"level_steps needs one multiplier per level ({self.num_levels}), got {chosen.level_steps}"
            )
        return chosen

    @property
    def gradient_bound(self) -> float:
        """The gradient solver's largest stable k1 at the native size (as of the last stability check)."""
        return self._plain_bound(())

    def _plain_bound(self, level_steps: tuple[float, ...]) -> float:
        """The plain step's largest stable k1 at the native size with each level's step multiplied by
        level_steps (the gradient solver's where empty): one eigenvalue problem the first time it is asked
        (~60 ms for conv-rgb), kept until the next stability check."""
        if level_steps not in self.plain_bounds:
            hw = tuple(self.config.input_shape[1:])
            self.plain_bounds[level_steps] = 4.0 / self._top_curvature(hw, "auto", level_steps)
        return self.plain_bounds[level_steps]

    def stability_bound(
        self, input_hw: Sequence[int] | None = None, method: str = "auto", solver: str | Solver | None = None
    ) -> float:
        """Largest stable k1 (docs/MODEL.md section 2), from the top eigenvalue of the Hessian in float64.

        For `solver` (None: the config's own, pcmodel.solvers): the plain step's bound, with each level's step
        times the solver's level steps where it has them, times the solver's factor (1 + beta for heavy ball,
        (1 + beta) / (1 + 2 beta) for Nesterov).

        For linear f and a Gaussian prior E is quadratic in r with Hessian H = 2A, and the step
        r <- r - (k1/2) S H r (S: the per-level k1_scale) is stable iff k1 < 4 / lambda_max(S^1/2 H S^1/2).
        For tanh (f' <= 1) and the Cauchy prior (curvature <= 2 alpha) this linear Gaussian network with
        the same U, sigma^2 and alpha is the first-order worst case, so its bound is used. At the input of zeros the
        hand-derived gradient of that quadratic energy at r = v is exactly H v.

        method: "power" (power iteration on H v), "exact" (H built column by column, eigvalsh),
        "lanczos" (60 Lanczos steps on H v: the largest eigenvalue to ~1e-4 in a fraction of power
        iteration's steps, e.g. 12 s instead of 260 s for conv-rgb at 256x256 on 2 cores), or "auto"
        (exact up to 1024 latents, else power iteration).
        """
        hw = tuple(self.config.input_shape[1:] if input_hw is None else input_hw)
        if method not in ("auto", "exact", "power", "lanczos"):
            raise ValueError(f"unknown method {method!r}; choose auto, exact, power or lanczos")
        chosen = self._solver_for(solver)
        # With level steps the curvature each level's step sees grows with its multiplier.
        plain = 4.0 / self._top_curvature(hw, method, chosen.level_steps)
        if input_hw is None:  # a fresh check at the native size: the other solvers' bounds follow when asked
            self.plain_bounds = {chosen.level_steps: plain}
        return plain * chosen.bound_factor

    def _top_curvature(self, hw: tuple[int, ...], method: str, level_steps: tuple[float, ...]) -> float:
        """lambda_max(S^1/2 H S^1/2) of the linear Gaussian twin at input size hw (stability_bound), S the
        per-level k1_scale times level_steps (1 where empty)."""
        levels = self.levels(hw)
        weights = [w.detach().to(device=self.device, dtype=torch.float64) for w in self.weights]
        shapes = [lv.geometry.latent for lv in levels]
        sizes = [math.prod(s) for s in shapes]
        multipliers = level_steps or (1.0,) * len(levels)

        # The preconditioned step r <- r - (k1/2) S H r (S = diag(k1_scale_l m_l)) is stable iff
        # k1 < 4 / lambda_max(S^1/2 H S^1/2): the symmetric form has the same spectrum as S H.
        roots = [math.sqrt(lc.k1_scale * m) for lc, m in zip(self.config.levels, multipliers)]

        def hessian_times(v: torch.Tensor) -> torch.Tensor:  # (N, n) -> (N, n), rows are vectors
            parts = [
                (p * root).reshape(v.shape[0], *s) for p, s, root in zip(torch.split(v, sizes, dim=1), shapes, roots)
            ]
            zero = v.new_zeros((v.shape[0], self.config.input_shape[0], *hw))
            errors = level_errors(levels, weights, zero, parts, linear=True)
            grads = latent_gradients(levels, weights, parts, errors, gaussian_prior=True)
            return torch.cat([g.flatten(1) * root for g, root in zip(grads, roots)], dim=1)

        n = sum(sizes)
        with torch.inference_mode():
            if method == "exact" or (method == "auto" and n <= 1024):
                eye = torch.eye(n, dtype=torch.float64, device=self.device)
                hessian = hessian_times(eye)
                return float(torch.linalg.eigvalsh((hessian + hessian.T) / 2)[-1])
            if method == "lanczos":
                return _lanczos(hessian_times, n, self.device)
            return _power_iteration(hessian_times, n, self.device)

    def check_stability(self, allow_unstable: bool = False) -> float:
        """Raise UnstableStepError when k1 is at or above the stability bound at the native size."""
        bound = self.stability_bound()
        if self.config.k1 >= bound and not allow_unstable:
            c, h, w = self.config.input_shape
            raise UnstableStepError(
                f"k1 = {self.config.k1:g} is at or above the largest stable inference step {bound:.4g} for this "
                f"model (solver {self.config.served_solver.label}) at its native input size {c}x{h}x{w}: "
                f"inference would diverge. Lower k1 below "
                f"{bound:.4g} (e.g. {0.8 * bound:.3g}), or pass allow_unstable=True to load it anyway."
            )
        return bound

    # ---- views -----------------------------------------------------------------------------

    def receptive_fields(self, level: int) -> torch.Tensor:
        """Basis functions of `level` (1-based) in image space: (causes, C, h, w).

        Level 1: each cause's column of U_1 as an image patch. Higher levels: one cause of level l
        active alone on a minimal map, predicted down through the levels below with f linearised
        at 0 (f'(0) = 1) and module predictions shown as in the reconstruction.
        """
        if not 1 <= level <= self.num_levels:
            raise ValueError(f"level must be in 1..{self.num_levels}, got {level}")
        with torch.inference_mode():
            if level == 1:
                return self.weights[0].clone()
            hw = self._minimal_input(level)
            levels = self.levels(hw)
            causes = self.config.levels[level - 1].causes
            shape = levels[level - 1].geometry.latent
            r = torch.zeros((causes, *shape), device=self.device)
            centre = (shape[1] // 2, shape[2] // 2)
            r[torch.arange(causes), torch.arange(causes), centre[0], centre[1]] = 1.0
            for index in range(level - 1, -1, -1):
                lv = levels[index]
                r = lv.to_lower_map(lv.predict(r, self.weights[index]), average=False)
            return r

    def _minimal_input(self, level: int) -> tuple[int, int]:
        """The smallest input the hierarchy tiles on which `level` has a single position (native if dense)."""
        if has_whole_map_level(self.config):
            return tuple(self.config.input_shape[1:])  # type: ignore[return-value]
        size = [1, 1]
        for lc in reversed(self.config.levels[:level]):
            size = [(n - 1) * s + k for n, k, s in zip(size, lc.kernel, lc.stride)]  # type: ignore[arg-type]
        return size[0], size[1]


def _lanczos(apply, n: int, device: torch.device, iterations: int = 60) -> float:
    """Largest eigenvalue of a symmetric operator: Lanczos with full reorthogonalisation, from a seeded start.

    The largest eigenvalue of the tridiagonal matrix T (the operator on the Krylov space) approaches the
    operator's from below, much faster than power iteration's Rayleigh quotient.
    """
    generator = torch.Generator().manual_seed(0)
    q = torch.randn((1, n), generator=generator, dtype=torch.float64).to(device)
    basis = [q / q.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    for _ in range(min(iterations, n)):
        w = apply(basis[-1])  # (1, n)
        alphas.append(float((w * basis[-1]).sum()))
        q_all = torch.cat(basis)  # (k, n)
        for _ in range(2):  # twice is enough (Kahan): rounding would bring back converged directions
            w = w - (w @ q_all.T) @ q_all
        beta = float(w.norm())
        if beta <= 1e-12 * max(abs(a) for a in alphas):  # an invariant subspace: T is exact
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    off = torch.tensor(betas[: k - 1], dtype=torch.float64)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(tridiagonal)[-1])


def _power_iteration(apply, n: int, device: torch.device, iterations: int = 5000, rtol: float = 1e-10) -> float:
    """Largest eigenvalue of a symmetric positive semi-definite operator (Rayleigh quotient)."""
    generator = torch.Generator().manual_seed(0)
    v = torch.randn((1, n), generator=generator, dtype=torch.float64).to(device)
    v = v / v.norm()
    eigenvalue = 0.0
    for _ in range(iterations):
        hv = apply(v)
        rayleigh = float((v * hv).sum())
        v = hv / hv.norm()
        if abs(rayleigh - eigenvalue) <= rtol * abs(rayleigh):
            return rayleigh
        eigenvalue = rayleigh
    return eigenvalue
