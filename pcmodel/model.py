"""The predictive-coding network of Rao & Ballard (1999): energy, hand-derived updates, inference, learning.

Energy of ONE image (MODEL.md section 1), level 0 being the input x:

    E = sum_l (1/sigma_l^2) ||t_l(r_{l-1}) - f(U_l r_l)||^2  +  sum_l g_l(r_l)  +  sum_l lam_l ||U_l||^2

where t_l is the identity for convolutional levels and the (windowed) patches for module levels,
g is alpha*sum r^2 (Gaussian) or alpha*sum log(1 + r^2) (Cauchy). Sums everywhere, never means,
so an image's result does not depend on its batch or on the map size.

Inference (fast timescale), all levels from the same state:   r_l <- r_l - (k1/2) dE/dr_l
Learning (slow timescale), batch mean:                        U_l <- U_l - (k2/2) dE/dU_l
Both gradients are derived by hand below and checked against autograd in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import ConfigError, ModelConfig, level_shapes
from .levels import Level


class UnstableStepError(ValueError):
    """k1 is above the largest step for which inference is stable."""


@dataclass
class LevelErrors:
    """One level's prediction of the level below, at one latent state."""

    prediction: torch.Tensor  # f(U_l r_l), in the level's target space
    error: torch.Tensor  # t_l(r_{l-1}) - prediction
    slope: torch.Tensor | None  # f'(U_l r_l); None where f is the identity


@dataclass
class InferenceResult:
    """What inference returns. Maps are (B, C, H, W); `energy` is (steps + 1, B)."""

    latents: list[torch.Tensor]  # r_l, level 1 first: (B, causes, H_l, W_l); modules: the module grid
    predictions: list[torch.Tensor]  # level l's prediction of level l-1, level 1 first
    errors: list[torch.Tensor]  # level l-1 minus that prediction (what the energy sums), same layout
    reconstruction: torch.Tensor  # f(U_1 r_1) on the input grid (module levels: overlaps averaged)
    error: torch.Tensor  # x - reconstruction
    energy: torch.Tensor  # energy per image before the first step and after each step
    steps: torch.Tensor  # (B,) int64: steps each image used (< the budget where it stopped early)
    backend: str = "torch"


def prior_energy(r: torch.Tensor, prior: str, alpha: float) -> torch.Tensor:
    """g(r) summed per image: alpha*sum r^2 or alpha*sum log(1 + r^2)."""
    if alpha == 0:
        return r.new_zeros(r.shape[0])
    terms = r.square() if prior == "gaussian" else torch.log1p(r.square())
    return alpha * terms.flatten(1).sum(1)


def prior_gradient(r: torch.Tensor, prior: str, alpha: float) -> torch.Tensor | None:
    """g'(r): 2*alpha*r or 2*alpha*r / (1 + r^2); None when alpha = 0."""
    if alpha == 0:
        return None
    if prior == "gaussian":
        return (2 * alpha) * r
    return (2 * alpha) * r / (1 + r.square())


class PCModel:
    """A predictive-coding hierarchy with its weights. Create with `pcmodel.create` or `pcmodel.load`."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Sequence[torch.Tensor],
        *,
        allow_unstable: bool = False,
        device: torch.device | str | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.provenance = dict(provenance or {})
        expected = self.weight_shapes(config)
        shapes = [tuple(w.shape) for w in weights]
        if shapes != expected:
            raise ConfigError(f"weights have shapes {shapes}; this config needs {expected}")
        device = torch.device(device) if device is not None else weights[0].device
        self.weights = [w.detach().to(device=device, dtype=torch.float32).clone() for w in weights]
        if not all(torch.isfinite(w).all() for w in self.weights):
            raise ConfigError("weights contain NaN or Inf")
        self.check_stability(allow_unstable=allow_unstable)

    # ---- structure -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    @property
    def num_levels(self) -> int:
        return len(self.config.levels)

    @staticmethod
    def weight_shapes(config: ModelConfig) -> list[tuple[int, int, int, int]]:
        """Shape of each U_l: (causes, C_below, kh, kw)."""
        return [(lc.causes, g.lower[0], *g.kernel) for lc, g in zip(config.levels, level_shapes(config))]

    def _levels(self, input_hw: Sequence[int]) -> list[Level]:
        return [Level(lc, g) for lc, g in zip(self.config.levels, level_shapes(self.config, tuple(input_hw)))]

    def latent_shapes(self, input_hw: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
        """(causes, H_l, W_l) per level for an input of this size (default: native)."""
        hw = self.config.input_shape[1:] if input_hw is None else input_hw
        return [lv.geometry.latent for lv in self._levels(hw)]

    def to(self, device: torch.device | str) -> PCModel:
        """Move the weights to a device (in place) and return the model."""
        self.weights = [w.to(device) for w in self.weights]
        return self

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[Level]]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a float tensor (B, C, H, W), got {shape}")
        if x.shape[1] != self.config.input_shape[0]:
            raise ValueError(f"x has {x.shape[1]} channel(s); this model takes {self.config.input_shape[0]}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(device=self.device, dtype=dtype)
        weights = [w.to(dtype) for w in self.weights]
        return x, weights, self._levels(x.shape[-2:])

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def sha256(self) -> str:
        """Content hash over the config and the weights: identifies the model (not the provenance)."""
        from .checkpoint import content_hash

        return content_hash(self.config, self.weights)

    def save(self, path: str | Path, provenance: dict[str, Any] | None = None) -> str:
        """Write a .safetensors checkpoint (weights, config, provenance); returns the content hash."""
        from .checkpoint import save

        info = {**self.provenance, **(provenance or {})}
        return save(path, self.config, self.weights, info)

    def preprocess(
        self, images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray], size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """PIL images or uint8 arrays -> x (B, C, H, W) on the model's device, prepared as in training."""
        from .images import preprocess

        return preprocess(images, self.config, size=size).to(self.device)

    # ---- the mathematics -------------------------------------------------------------------

    def _errors(
        self,
        levels: list[Level],
        weights: list[torch.Tensor],
        x: torch.Tensor,
        latents: Sequence[torch.Tensor],
        linear: bool = False,
    ) -> list[LevelErrors]:
        """Each level's prediction, error and f' at this state. linear=True treats f as the identity."""
        out = []
        lower = x
        for level, U, r in zip(levels, weights, latents):
            a = level.predict(r, U)
            if level.config.f == "tanh" and not linear:
                prediction = torch.tanh(a)
                slope = 1 - prediction.square()
            else:
                prediction, slope = a, None
            out.append(LevelErrors(prediction, level.target(lower) - prediction, slope))
            lower = r
        return out

    def _energy(
        self, weights: list[torch.Tensor], latents: Sequence[torch.Tensor], errors: list[LevelErrors]
    ) -> torch.Tensor:
        """The energy per image (B,) from a state's errors: the formula in the module docstring."""
        energy = 0
        for lc, U, r, le in zip(self.config.levels, weights, latents, errors):
            energy = energy + le.error.square().flatten(1).sum(1) / lc.sigma2
            energy = energy + prior_energy(r, lc.prior, lc.alpha)
            energy = energy + lc.lam * U.square().sum()
        return energy

    def _latent_gradients(
        self,
        levels: list[Level],
        weights: list[torch.Tensor],
        latents: Sequence[torch.Tensor],
        errors: list[LevelErrors],
        gaussian_prior: bool = False,
    ) -> list[torch.Tensor]:
        """dE/dr_l for every level, by hand:

        dE/dr_l = -(2/sigma_l^2) U_l^T (f' * e_{l-1}) + g_l'(r_l) + (2/sigma_{l+1}^2) t_{l+1}^T(e_l)
        (the last term is absent at the top level; f' multiplies the error before U^T).
        """
        grads = []
        for i, (level, U, r, le) in enumerate(zip(levels, weights, latents, errors)):
            lc = level.config
            bottom_up = le.error if le.slope is None else le.slope * le.error
            grad = level.adjoint(bottom_up, U) * (-2 / lc.sigma2)
            prior = prior_gradient(r, "gaussian" if gaussian_prior else lc.prior, lc.alpha)
            if prior is not None:
                grad = grad + prior
            if i + 1 < len(levels):
                above = levels[i + 1]
                grad = grad + above.target_adjoint(errors[i + 1].error) * (2 / above.config.sigma2)
            grads.append(grad)
        return grads

    def energy(
        self, x: torch.Tensor, latents: Sequence[torch.Tensor], weights: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Energy per image (B,) of inputs x (B, C, H, W) with these latents; differentiable.

        Runs in float64 when x is float64, else float32. `weights` replaces the model's U_l
        (e.g. float64 tensors that require grad, to differentiate with respect to U).
        """
        x, own, levels = self._prepare(x)
        weights = own if weights is None else list(weights)
        latents = [r.to(x.dtype) for r in latents]
        return self._energy(weights, latents, self._errors(levels, weights, x, latents))

    def gradients(self, x: torch.Tensor, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """dE/dr_l per level (hand-derived), shaped like the latents."""
        x, weights, levels = self._prepare(x)
        latents = [r.to(x.dtype) for r in latents]
        errors = self._errors(levels, weights, x, latents)
        return self._latent_gradients(levels, weights, latents, errors)

    def weight_gradients(self, x: torch.Tensor, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """dE/dU_l as a batch mean (hand-derived), shaped like the weights:

        dE/dU_l = -(2/sigma_l^2) mean_b (f' * e_{l-1}) r_l^T + 2 lam_l U_l
        """
        x, weights, levels = self._prepare(x)
        latents = [r.to(x.dtype) for r in latents]
        errors = self._errors(levels, weights, x, latents)
        grads = []
        for level, U, r, le in zip(levels, weights, latents, errors):
            lc = level.config
            bottom_up = le.error if le.slope is None else le.slope * le.error
            data = level.weight_gradient(bottom_up, r) * (-2 / (lc.sigma2 * x.shape[0]))
            grads.append(data + (2 * lc.lam) * U)
        return grads

    def apply_weight_gradients(self, grads: Sequence[torch.Tensor], k2: float) -> None:
        """U_l <- U_l - (k2/2) grad_l, in place (grads may be averaged across processes first)."""
        with torch.inference_mode():
            for U, g in zip(self.weights, grads):
                U.sub_(g.to(U.dtype), alpha=k2 / 2)

    def learn_step(self, x: torch.Tensor, latents: Sequence[torch.Tensor], k2: float | None = None) -> None:
        """One learning step U <- U - (k2/2) dE/dU (batch mean) at settled latents."""
        k2 = self.config.learning.k2 if k2 is None else k2
        with torch.inference_mode():
            self.apply_weight_gradients(self.weight_gradients(x, latents), k2)

    # ---- inference -------------------------------------------------------------------------

    def initial_latents(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The deterministic start: zeros, or feed-forward r_l = U_l^T t_l(r_{l-1}) bottom up."""
        x, weights, levels = self._prepare(x)
        out = []
        lower = x
        for level, U in zip(levels, weights):
            if self.config.initial_latents == "feedforward":
                r = level.adjoint(level.target(lower), U)
            else:
                r = x.new_zeros((x.shape[0], *level.geometry.latent))
            out.append(r)
            lower = r
        return out

    def infer(
        self, x: torch.Tensor, steps: int | None = None, tol: float | None = None, backend: str | None = None
    ) -> InferenceResult:
        """Settle the latents for x (B, C, H, W), already preprocessed: `steps` fixed gradient steps.

        With `tol`, an image stops as soon as the norm of its gradient dE/dr (all levels) falls
        below tol; it keeps its latents and `result.steps` reports the steps it used. Images that
        never stop get exactly the fixed-step result. Deterministic, no autograd.

        `backend` (pcmodel.backends): None or "auto" picks by a fixed rule (CUDA graph on a GPU,
        onnxruntime or the torch engine on a CPU); "loop" runs `_infer_loop`, the definition;
        "torch", "onnxruntime", "cuda-graph" ask for one. `result.backend` says which ran.
        """
        steps = self.config.steps if steps is None else int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if tol is not None and not (tol >= 0 and math.isfinite(tol)):
            raise ValueError(f"tol must be a finite number >= 0, got {tol}")
        from .backends import run_inference

        return run_inference(self, x, steps, tol, backend)

    def _infer_loop(self, x: torch.Tensor, steps: int, tol: float | None) -> InferenceResult:
        """The plain loop: the mathematical definition every backend is checked against."""
        with torch.inference_mode():
            x, weights, levels = self._prepare(x)
            latents = self.initial_latents(x)
            rate = self.config.k1 / 2
            batch = x.shape[0]
            used = torch.zeros(batch, dtype=torch.int64, device=x.device)
            active = torch.ones(batch, dtype=torch.bool, device=x.device)
            trace = []
            for step in range(steps + 1):
                errors = self._errors(levels, weights, x, latents)
                trace.append(self._energy(weights, latents, errors))
                if step == steps:
                    break
                grads = self._latent_gradients(levels, weights, latents, errors)
                if tol is None:
                    latents = [r - rate * g for r, g in zip(latents, grads)]
                    continue
                norm = torch.sqrt(sum(g.square().flatten(1).sum(1) for g in grads))
                active = active & (norm >= tol)
                if not active.any():
                    break
                keep = active.view(-1, 1, 1, 1)
                latents = [torch.where(keep, r - rate * g, r) for r, g in zip(latents, grads)]
                used += active
            if tol is None:
                used.fill_(steps)
            return self._result(levels, x, latents, errors, torch.stack(trace), used, backend="loop")

    def _result(
        self,
        levels: list[Level],
        x: torch.Tensor,
        latents: list[torch.Tensor],
        errors: list[LevelErrors],
        trace: torch.Tensor,
        used: torch.Tensor,
        backend: str = "torch",
    ) -> InferenceResult:
        def layout(level: Level, t: torch.Tensor) -> torch.Tensor:
            return level.as_patches(t) if level.patchwise else t

        reconstruction = levels[0].to_lower_map(errors[0].prediction)
        predictions = [layout(lv, le.prediction) for lv, le in zip(levels, errors)]
        level_errors = [layout(lv, le.error) for lv, le in zip(levels, errors)]
        return InferenceResult(
            latents=latents,
            predictions=predictions,
            errors=level_errors,
            reconstruction=reconstruction,
            error=x - reconstruction,
            energy=trace,
            steps=used,
            backend=backend,
        )

    # ---- stability -------------------------------------------------------------------------

    def stability_bound(self, input_hw: Sequence[int] | None = None, method: str = "auto") -> float:
        """Largest stable k1 (MODEL.md section 2), from the top eigenvalue of the Hessian in float64.

        For linear f and a Gaussian prior E is quadratic in r with Hessian H = 2A, and the step
        r <- r - (k1/2) H r is stable iff k1 < 4 / lambda_max(H). For tanh (f' <= 1) and the
        Cauchy prior (curvature <= 2 alpha) this linear Gaussian network with the same U, sigma^2
        and alpha is the first-order worst case, so its bound is used. At the input of zeros the
        hand-derived gradient of that quadratic energy at r = v is exactly H v.

        method: "power" (power iteration on H v), "exact" (H built column by column, eigvalsh),
        or "auto" (exact up to 1024 latents, else power iteration).
        """
        hw = tuple(self.config.input_shape[1:] if input_hw is None else input_hw)
        levels = self._levels(hw)
        weights = [w.detach().to(device=self.device, dtype=torch.float64) for w in self.weights]
        shapes = [lv.geometry.latent for lv in levels]
        sizes = [math.prod(s) for s in shapes]
        if method not in ("auto", "exact", "power"):
            raise ValueError(f"unknown method {method!r}; choose auto, exact or power")

        def hessian_times(v: torch.Tensor) -> torch.Tensor:  # (N, n) -> (N, n), rows are vectors
            parts = [p.reshape(v.shape[0], *s) for p, s in zip(torch.split(v, sizes, dim=1), shapes)]
            zero = v.new_zeros((v.shape[0], self.config.input_shape[0], *hw))
            errors = self._errors(levels, weights, zero, parts, linear=True)
            grads = self._latent_gradients(levels, weights, parts, errors, gaussian_prior=True)
            return torch.cat([g.flatten(1) for g in grads], dim=1)

        n = sum(sizes)
        with torch.inference_mode():
            if method == "exact" or (method == "auto" and n <= 1024):
                eye = torch.eye(n, dtype=torch.float64, device=self.device)
                hessian = hessian_times(eye)
                top = float(torch.linalg.eigvalsh((hessian + hessian.T) / 2)[-1])
            else:
                top = _power_iteration(hessian_times, n, self.device)
        return 4.0 / top

    def check_stability(self, allow_unstable: bool = False) -> float:
        """Raise UnstableStepError when k1 is at or above the stability bound at the native size."""
        bound = self.stability_bound()
        if self.config.k1 >= bound and not allow_unstable:
            c, h, w = self.config.input_shape
            raise UnstableStepError(
                f"k1 = {self.config.k1:g} is at or above the largest stable inference step {bound:.4g} for this "
                f"model at its native input size {c}x{h}x{w}: inference would diverge. Lower k1 below "
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
            levels = self._levels(hw)
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
        if any(lc.kind == "dense" for lc in self.config.levels):
            return tuple(self.config.input_shape[1:])  # type: ignore[return-value]
        size = [1, 1]
        for lc in reversed(self.config.levels[:level]):
            size = [(n - 1) * s + k for n, k, s in zip(size, lc.kernel, lc.stride)]  # type: ignore[arg-type]
        return size[0], size[1]


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
