"""Plans: the definition's step rearranged for speed, derived once per (weights, input size).

A plan holds the tensors an engine needs; the step itself is written once, in pcmodel.engines.program,
and every backend runs that program (eagerly, captured in a CUDA graph, or as an ONNX graph).

- `QuadraticPlan`, for networks whose f is the identity at every level and whose latents are few (the
  paper's rao-ballard-1999): the data terms are quadratic in r = (r_1, ..., r_L) stacked, so
  dE/dr = H r - b(x) + g'(r) with a fixed symmetric H (Gaussian priors folded in) and b linear in x.
  One step is r <- r M + c - kappa phi(r) with M = I - H diag(eta), c = eta b(x) and kappa = 2 eta alpha
  on the entries of the one non-quadratic prior the plan allows (pcmodel.priors; eta: each latent's step
  size, pcmodel.energy.step_rates). The prior may rescale its entries (r = k s): the Cauchy prior's
  k = sqrt(kappa) turns its step into three fused operations, q = 1/kappa + s^2; z = c_s + s M_s;
  s <- z - s / q. The energy of every step comes afterwards from the kept (s, z) history without
  another matmul: E = E(0) + sum_i k_i^2 s_i (s_i - z_i - c_i) / (2 eta_i) + sum alpha psi(r).
  H and b are built by applying the definition's level maps (pcmodel.levels) to unit vectors.
- `LevelwisePlan`, for everything else (tanh, large maps): level by level as in the definition, with
  the step size and 2/sigma^2 folded into the adjoint weights, and a convolutional first level in
  *phase layout*: x is split once into its stride x stride sub-pixel phases, so the transposed
  convolution U r becomes an ordinary small convolution (kernel ceil(k/stride)) and U^T e another one,
  both stride 1, with no ConvTranspose and no shuffling inside the loop.

What a level of a levelwise plan holds comes from its kind (pcmodel.kinds: `plan_maps`); `phase` marks
a convolutional level 1 in phase layout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig, level_shapes
from ..energy import LevelRates, step_rates
from ..kinds import LevelKind
from ..levels import Level
from ..parameters import Params, level_weights
from ..priors import PRIORS, Prior

QUADRATIC_MAX_LATENTS = 2048  # H is n x n: beyond this the levelwise plan is cheaper
QUADRATIC_MAX_ENTRIES = 1 << 23  # cap on inputs x latents for the dense map b(x) (32 MiB in float32)


def geometry(config: ModelConfig, input_hw: Sequence[int]) -> list[Level]:
    """The definition's levels at one input size."""
    return [Level(lc, g) for lc, g in zip(config.levels, level_shapes(config, (int(input_hw[0]), int(input_hw[1]))))]


def _prod(shape: Sequence[int]) -> int:
    return math.prod(int(v) for v in shape)


@dataclass(eq=False)  # identity: holds tensors, cached per plan object
class QuadraticPlan:
    """All f linear, few latents: one matmul and two fused elementwise operations per step (module docstring)."""

    shapes: list[tuple[int, int, int]]  # latent shape per level
    input_shape: tuple[int, int, int]
    step: torch.Tensor  # M_s (n, n): s <- s M_s + c_s - s / q
    drive: torch.Tensor  # B_s (n_x, n): c_s = x_flat B_s
    start: torch.Tensor | None  # (n_x, n): s_0 = x_flat start (feed-forward initial latents), None for zeros
    prior: Prior | None  # the one non-quadratic prior (alpha > 0), or None: the energy is quadratic
    coefficients: dict[str, torch.Tensor]  # (n,) each: what prior.quadratic_step reads (0-effect elsewhere)
    scale: torch.Tensor  # k (n,): r = k s
    unscale: torch.Tensor  # 1 / k (n,): s_0 = r_0 / k for a given start
    prior_alpha: torch.Tensor  # (n,) alpha on the prior's entries, 0 elsewhere (energy)
    energy_weight: torch.Tensor  # (n,) k^2 / (2 eta): E = E(0) + sum energy_weight s (s - z - c) + prior terms
    omega: torch.Tensor  # (n_x,) E(r = 0) = sum omega x^2 + const
    const: torch.Tensor  # () sum_l lam_l ||U_l||^2 (a tensor: a captured CUDA graph reads it in place)
    reconstruct: torch.Tensor  # (n, n_x): reconstruction = s reconstruct (f linear: the level-1 map)
    predict_maps: list[torch.Tensor] = field(default_factory=list)  # P_l (n_l, n_t): prediction = r_l P_l
    target_maps: list[torch.Tensor] = field(default_factory=list)  # T_l (n_{l-1} or n_x, n_t): target = lower T_l
    target_shapes: list[tuple[int, ...]] = field(default_factory=list)  # target space per level, without batch
    data_weights: list[float] = field(default_factory=list)  # 2 / sigma_l^2: level l's term of H is w V V^T
    # Levels whose t_l is a weighted identity: their term w V V^T (V = [t_l; -P_l]) can go through their own
    # maps instead of M (the numba kernel does where it is less work); step_rest is M - I without those terms.
    factored_levels: list[int] = field(default_factory=list)
    step_rest: torch.Tensor | None = None
    kind: str = "quadratic"

    @property
    def size(self) -> int:
        return int(self.step.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weight-derived tensors by name (a CUDA graph reads them in place; ONNX graphs embed them)."""
        out = {"step": self.step, "drive": self.drive, "scale": self.scale, "unscale": self.unscale}
        out.update({"prior_alpha": self.prior_alpha, "omega": self.omega, "reconstruct": self.reconstruct})
        out.update({"energy_weight": self.energy_weight, "const": self.const})
        out.update({f"prior_{k}": v for k, v in self.coefficients.items()})
        if self.start is not None:
            out["start"] = self.start
        for i, (P, T) in enumerate(zip(self.predict_maps, self.target_maps)):
            out[f"predict_map{i}"], out[f"target_map{i}"] = P, T
        return out


@dataclass
class PlanLevel:
    """One level of a levelwise plan: its linear maps with the step size folded in, and its scalars."""

    kind: LevelKind  # its maps in the program (pcmodel.kinds)
    phase: bool  # a convolutional level 1 in phase layout (its target is x split into sub-pixel phases)
    level: Level  # the definition's geometry (targets and adjoints of module levels)
    predict: torch.Tensor  # phase: W (C0 s^2, C, mh, mw); convolutional: U; modules, dense: U^T (D, C)
    adjoint: torch.Tensor  # U^T scaled by rates.adjoint (= eta 2/sigma^2): conv kernels or (C, D)
    feedforward: torch.Tensor | None  # unscaled adjoint for feed-forward initial latents, else None
    unfold: torch.Tensor | None  # patch kinds: one-hot x window kernel (D, C_low, kh, kw) for ONNX
    tanh: bool
    sigma2: float
    prior: Prior
    alpha: float
    rates: LevelRates  # the step's coefficients (pcmodel.energy.step_rates)
    lam_energy: float  # lam ||U||^2
    stride: tuple[int, int] = (1, 1)  # (sh, sw): the level's stride, also the phase split's
    taps: tuple[int, int] = (1, 1)  # (mh, mw) = ceil(k / s) (phase layout)
    pad: tuple[int, int] = (0, 0)  # zeros added below / right of x before the phase split

    @property
    def patchwise(self) -> bool:
        return self.kind.patchwise


@dataclass
class LevelwisePlan:
    """Any network: the definition's level loop, fused and in phase layout at a convolutional level 1."""

    levels: list[PlanLevel]
    shapes: list[tuple[int, int, int]]
    input_shape: tuple[int, int, int]
    const: torch.Tensor  # () sum_l lam_l ||U_l||^2
    kind: str = "levelwise"

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"const": self.const}
        for i, lv in enumerate(self.levels):
            out[f"predict{i}"] = lv.predict
            out[f"adjoint{i}"] = lv.adjoint
            if lv.feedforward is not None:
                out[f"feedforward{i}"] = lv.feedforward
            if lv.unfold is not None:
                out[f"unfold{i}"] = lv.unfold
        return out


Plan = QuadraticPlan | LevelwisePlan


def nonquadratic_priors(config: ModelConfig) -> set[str]:
    """The priors (with alpha > 0) that make the energy non-quadratic in r."""
    return {lc.prior for lc in config.levels if lc.alpha > 0 and not PRIORS[lc.prior].quadratic}


def plan_kind(config: ModelConfig, input_hw: Sequence[int] | None = None) -> str:
    """Which plan a model gets at this input size: "quadratic" or "levelwise"."""
    hw = tuple(config.input_shape[1:] if input_hw is None else input_hw)
    if any(lc.f != "identity" for lc in config.levels) or len(nonquadratic_priors(config)) > 1:
        return "levelwise"
    n = sum(_prod(lv.geometry.latent) for lv in geometry(config, hw))
    n_x = config.input_shape[0] * _prod(hw)
    if n > QUADRATIC_MAX_LATENTS or n * n_x > QUADRATIC_MAX_ENTRIES:
        return "levelwise"
    return "quadratic"


def make_plan(
    config: ModelConfig,
    params: Params,
    input_hw: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
) -> Plan:
    """Derive the plan for these parameters (by name, or the per-level U list) at one input size, in
    float64, then cast."""
    hw = (int(input_hw[0]), int(input_hw[1]))
    weights = level_weights(config, params)
    with torch.inference_mode():
        if plan_kind(config, hw) == "quadratic":
            return _quadratic_plan(config, weights, hw, dtype, device)
        return _levelwise_plan(config, weights, hw, dtype, device)


def _quadratic_plan(
    config: ModelConfig, weights: Sequence[torch.Tensor], hw: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> QuadraticPlan:
    """H, b(x) and the rest from each level's linear maps written as matrices (rows: unit inputs).

    With P_l = U_l (latents -> level l's target space) and T_l = t_l (the map below -> target space),
    E_data = sum_l (1/sigma_l^2) |lower T_l - r_l P_l|^2 in row form, so H has the blocks
    (2/sigma_l^2) P_l P_l^T, (2/sigma_l^2) T_l T_l^T (on level l-1) and -(2/sigma_l^2) P_l T_l^T, and
    b(x) = (2/sigma_1^2) x T_1 P_1^T. Everything comes from the definition's Level.predict and .target.
    """
    cpu = torch.device("cpu")
    levels = geometry(config, hw)
    weights = [w.detach().to(device=cpu, dtype=torch.float64) for w in weights]
    shapes = [lv.geometry.latent for lv in levels]
    sizes = [_prod(s) for s in shapes]
    n, channels = sum(sizes), config.input_shape[0]
    n_x = channels * hw[0] * hw[1]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    def basis(shape: Sequence[int]) -> torch.Tensor:
        size = _prod(shape)
        return torch.eye(size, dtype=torch.float64).reshape(size, *shape)

    predicts = [lv.predict(basis(s), U).flatten(1) for lv, s, U in zip(levels, shapes, weights)]  # P_l (n_l, n_t)
    lowers = [(channels, *hw), *shapes[:-1]]
    targets = [_target_matrix(lv, low) for lv, low in zip(levels, lowers)]  # T_l (n_{l-1}, n_t)
    hessian = torch.zeros((n, n), dtype=torch.float64)
    rest = torch.zeros((n, n), dtype=torch.float64)  # H without the terms that can go through their own maps
    factored = [i for i, T in enumerate(targets) if i > 0 and _weighted_identity(T)]
    for i, (lc, P, T) in enumerate(zip(config.levels, predicts, targets)):
        w = 2 / lc.sigma2
        a, b = offsets[i], offsets[i + 1]
        for h in (hessian,) if i in factored else (hessian, rest):
            h[a:b, a:b] += w * P @ P.T
            if i > 0:
                lo, hi = offsets[i - 1], offsets[i]
                h[lo:hi, lo:hi] += w * T @ T.T
                h[a:b, lo:hi] -= w * P @ T.T
                h[lo:hi, a:b] -= w * T @ P.T
    drive = torch.zeros((n_x, n), dtype=torch.float64)
    drive[:, : sizes[0]] = (2 / config.levels[0].sigma2) * targets[0] @ predicts[0].T

    def per_entry(values: Sequence[float]) -> torch.Tensor:
        return torch.cat([torch.full((s,), v, dtype=torch.float64) for s, v in zip(sizes, values)])

    quadratic = [PRIORS[lc.prior].quadratic for lc in config.levels]
    gaussian = torch.diag(per_entry([2 * lc.alpha if q else 0.0 for lc, q in zip(config.levels, quadratic)]))
    hessian, rest = hessian + gaussian, rest + gaussian
    alpha = per_entry([0.0 if q else lc.alpha for lc, q in zip(config.levels, quadratic)])
    eta = per_entry([lr.eta for lr in step_rates(config)])
    names = nonquadratic_priors(config)
    prior = PRIORS[names.pop()] if names else None
    coefficients = prior.quadratic_coefficients(2 * eta * alpha) if prior is not None else {}
    scale = coefficients.pop("scale", torch.ones_like(eta))
    step = torch.eye(n, dtype=torch.float64) - hessian * eta[None, :]  # r <- r M (+ c): r - (r H) diag(eta)
    step = scale[:, None] * step / scale[None, :]
    step_rest = -scale[:, None] * rest * (eta / scale)[None, :]  # M - I without the factored levels' terms
    start = None
    if config.initial_latents == "feedforward":  # r_l = U_l^T t_l(r_{l-1}): lower T_l P_l^T, bottom up
        start = torch.zeros((n_x, n), dtype=torch.float64)
        lower = torch.eye(n_x, dtype=torch.float64)
        for i, (P, T) in enumerate(zip(predicts, targets)):
            lower = lower @ T @ P.T
            start[:, offsets[i] : offsets[i + 1]] = lower
        start = start / scale[None, :]
    omega = targets[0].square().sum(1) / config.levels[0].sigma2  # |t_1(x)|^2 = sum omega x^2: t_1 has no overlap terms
    const = sum(lc.lam * float(w.square().sum()) for lc, w in zip(config.levels, weights))
    target_shapes = [tuple(lv.predict(basis(s)[:1], U).shape[1:]) for lv, s, U in zip(levels, shapes, weights)]
    recon = torch.zeros((n, n_x), dtype=torch.float64)  # f linear: f(U_1 r_1) on the input grid is r_1 R
    recon[: sizes[0]] = levels[0].to_lower_map(predicts[0].reshape(sizes[0], *target_shapes[0])).flatten(1)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    return QuadraticPlan(
        shapes=list(shapes),
        input_shape=(channels, *hw),
        step=cast(step),
        drive=cast(drive * (eta / scale)[None, :]),
        start=None if start is None else cast(start),
        prior=prior,
        coefficients={k: cast(v) for k, v in coefficients.items()},
        scale=cast(scale),
        unscale=cast(1 / scale),
        prior_alpha=cast(alpha),
        energy_weight=cast(scale.square() / (2 * eta)),
        omega=cast(omega),
        const=cast(torch.tensor(const)),
        reconstruct=cast(scale[:, None] * recon),
        predict_maps=[cast(P) for P in predicts],
        target_maps=[cast(T) for T in targets],
        target_shapes=target_shapes,
        data_weights=[2 / lc.sigma2 for lc in config.levels],
        factored_levels=factored,
        step_rest=cast(step_rest) if factored else None,
    )


def _weighted_identity(target: torch.Tensor) -> bool:
    """Whether t_l maps latent j below to target entry j alone (a dense level over the whole map below)."""
    square = target.shape[0] == target.shape[1]
    return square and not bool((target - torch.diag(torch.diagonal(target))).any())


@functools.lru_cache(maxsize=32)
def _target_matrix(level: Level, lower: tuple[int, ...]) -> torch.Tensor:
    """t_l as a matrix (rows: unit maps below). Geometry only, not weights: kept across learning steps."""
    size = _prod(lower)
    return level.target(torch.eye(size, dtype=torch.float64).reshape(size, *lower)).flatten(1)


def _levelwise_plan(
    config: ModelConfig, weights: Sequence[torch.Tensor], hw: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> LevelwisePlan:
    levels = geometry(config, hw)
    feedforward = config.initial_latents == "feedforward"

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    out = []
    for i, (level, U, rates) in enumerate(zip(levels, weights, step_rates(config))):
        lc = level.config
        U = U.detach().to(device="cpu", dtype=torch.float64)
        maps = level.kind.plan_maps(level, U, first=i == 0)
        out.append(
            PlanLevel(
                kind=level.kind,
                phase=maps.phase,
                level=level,
                predict=cast(maps.predict),
                adjoint=cast(maps.adjoint * rates.adjoint),
                feedforward=cast(maps.adjoint) if feedforward else None,
                unfold=None if maps.unfold is None else cast(maps.unfold),
                tanh=lc.f == "tanh",
                sigma2=lc.sigma2,
                prior=PRIORS[lc.prior],
                alpha=lc.alpha,
                rates=rates,
                lam_energy=lc.lam * float(U.square().sum()),
                stride=level.geometry.stride,
                **maps.extra,
            )
        )
    return LevelwisePlan(
        levels=out,
        shapes=[lv.geometry.latent for lv in levels],
        input_shape=(config.input_shape[0], *hw),
        const=torch.tensor(sum(lv.lam_energy for lv in out), dtype=dtype, device=device),
    )
