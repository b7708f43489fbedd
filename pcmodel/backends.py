"""Inference backends behind one interface: the plain loop, a torch engine, onnxruntime and CUDA graphs.

`PCModel.infer(x, steps, tol, backend)` lands in `run_inference`. Every backend computes the fixed-step
inference that `PCModel._infer_loop` defines (r_l <- r_l - (k1/2) dE/dr_l for every level from the same
state, the energy per image before and after every step); only the arithmetic is arranged differently,
so results agree to float rounding (tests: latents within 1e-4 of the loop in float32).

A *plan* is that arrangement, derived once per (weights, input size) from the definition itself:

- `QuadraticPlan`, for networks whose f is the identity at every level and whose latents are few (the
  paper's rao-ballard-1999): the data terms are quadratic in r = (r_1, ..., r_L) stacked, so
  dE/dr = H r - b(x) + g'(r) with a fixed symmetric H (Gaussian priors folded in) and b linear in x.
  One step is r <- r M + c - kappa r / (1 + r^2) with M = I - (k1/2) H, c = (k1/2) b(x) and kappa =
  k1 alpha on Cauchy entries. Scaling each Cauchy entry by k = sqrt(kappa) (r = k s) turns that into
  three fused operations per step: q = 1/kappa + s^2; z = c_s + s M_s; s <- z - s / q.
  The energy of every step comes afterwards from the kept (s, z) history without another matmul:
  E = E(0) + (1/k1) sum_i k_i^2 s_i (s_i - z_i - c_i) + sum_Cauchy alpha log(1 + r^2).
- `LevelwisePlan`, for everything else (tanh, large maps): level by level as in the definition, with
  the step size and 2/sigma^2 folded into the adjoint weights and a convolutional first level in
  *phase layout*: x is split once into its stride x stride sub-pixel phases, so the transposed
  convolution U r becomes an ordinary small convolution (kernel ceil(k/stride)) and U^T e another one,
  both stride 1, with no ConvTranspose and no shuffling inside the loop.

Backends (names in `BACKENDS`; `result.backend` starts with the one that ran, a reason may follow):

- "loop": the definition (`PCModel._infer_loop`), kept plain.
- "torch": the torch engine: a plan run eagerly with buffers allocated once per call and in-place,
  fused updates. Any dtype, device, step count and `tol`: it is the fallback of the others.
- "onnxruntime": the plan's T steps unrolled into one ONNX graph (`pcmodel.export.build_graph`, the
  graph pc-export writes), run by a CPU session cached per (model, T, input size) with a dynamic batch
  axis. The weights are baked into the graph (onnxruntime prepacks constants: several times faster at
  batch 1 than weights fed as inputs), so the cache is keyed on the weights' version: a session is
  never used with stale weights. While the weights keep changing (learning: U changes after every
  batch) calls run on the torch engine; once they have stayed the same for two calls the session is
  rebuilt (~0.1-0.5 s). float32 only. A batch of B > 1 is split into min(threads, B) shards that run
  at once on one single-threaded session (`ort_shards`): images are independent, so results are the
  same per image, and no thread waits at a barrier after every small kernel.
- "cuda-graph": the torch engine's whole T-step loop captured once per (batch-size bucket, input size)
  into static buffers and replayed; optional TF32 or bf16 operands with r kept in float32.

The automatic rule (`select_backend`) is fixed, never timed at start-up, so results are deterministic:
float64 -> torch; CUDA -> cuda-graph; CPU -> onnxruntime (fastest in pc-bench for both plan kinds at
batch 1 and 32, see docs/PERFORMANCE.md). The fast backends only serve *prepared* step counts: the
model's default and the first `Engine.max_step_counts - 1` other counts that are asked for (the
service's warm-up asks for its configured set first), at most `Engine.max_shapes` input sizes each;
every other call runs on the torch engine, so memory stays bounded. With `tol` the torch engine runs;
where a fast program is prepared for the same steps and size, images that never stop take its
results, so they equal the fixed-step call bit for bit as `infer` promises.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .levels import Level

if TYPE_CHECKING:
    from .model import InferenceResult, PCModel

log = logging.getLogger(__name__)

BACKENDS = ("loop", "torch", "onnxruntime", "cuda-graph")
FULL_OUTPUTS = ("latents", "energy", "reconstruction", "predictions", "errors")  # what the backend's graph gives
CUDA_PRECISIONS = ("float32", "tf32", "bf16")
QUADRATIC_MAX_LATENTS = 2048  # H is n x n: beyond this the levelwise plan is cheaper
QUADRATIC_MAX_ENTRIES = 1 << 23  # cap on inputs x latents for the dense map b(x) (32 MiB in float32)
CUDA_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch sizes a CUDA graph is captured for


# ---- plans: the mathematics rearranged for speed, derived from the definition --------------------------


def _prod(shape: Sequence[int]) -> int:
    return math.prod(int(v) for v in shape)


@dataclass
class QuadraticPlan:
    """All f linear, few latents: one matmul and two fused elementwise operations per step (module docstring)."""

    shapes: list[tuple[int, int, int]]  # latent shape per level
    input_shape: tuple[int, int, int]
    eta: float  # k1 / 2
    step: torch.Tensor  # M_s (n, n): s <- s M_s + c_s - s / q
    drive: torch.Tensor  # B_s (n_x, n): c_s = x_flat B_s
    start: torch.Tensor | None  # (n_x, n): s_0 = x_flat start (feed-forward initial latents), None for zeros
    qinv: torch.Tensor  # (n,) 1/kappa on Cauchy entries, +inf elsewhere (then s / q = 0)
    scale: torch.Tensor  # k (n,): r = k s
    cauchy_alpha: torch.Tensor  # (n,) alpha on Cauchy entries, 0 elsewhere (energy)
    omega: torch.Tensor  # (n_x,) E(r = 0) = sum omega x^2 + const
    const: torch.Tensor  # () sum_l lam_l ||U_l||^2 (a tensor: a captured CUDA graph reads it in place)
    reconstruct: torch.Tensor  # (n, n_x): reconstruction = s reconstruct (f linear: the level-1 map)
    has_cauchy: bool
    predict_maps: list[torch.Tensor] = field(default_factory=list)  # P_l (n_l, n_t): prediction = r_l P_l
    target_maps: list[torch.Tensor] = field(default_factory=list)  # T_l (n_{l-1} or n_x, n_t): target = lower T_l
    target_shapes: list[tuple[int, ...]] = field(default_factory=list)  # target space per level, without batch
    kind: str = "quadratic"

    @property
    def size(self) -> int:
        return int(self.step.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weight-derived tensors by name (a CUDA graph reads them in place; ONNX graphs embed them)."""
        out = {"step": self.step, "drive": self.drive, "qinv": self.qinv, "scale": self.scale, "const": self.const}
        out.update({"cauchy_alpha": self.cauchy_alpha, "omega": self.omega, "reconstruct": self.reconstruct})
        if self.start is not None:
            out["start"] = self.start
        for i, (P, T) in enumerate(zip(self.predict_maps, self.target_maps)):
            out[f"predict_map{i}"], out[f"target_map{i}"] = P, T
        return out


@dataclass
class PlanLevel:
    """One level of a levelwise plan: its linear maps with the step size folded in, and its scalars."""

    kind: str  # phase (convolutional level 1) | conv | patch (modules, dense)
    level: Level  # the definition's geometry (targets and adjoints of patch levels)
    predict: torch.Tensor  # phase: W (C0 s^2, C, mh, mw); conv: U; patch: U^T (D, C)
    adjoint: torch.Tensor  # U^T scaled by k1/sigma^2 (= (k1/2) * 2/sigma^2): phase/conv kernels or (C, D)
    feedforward: torch.Tensor | None  # unscaled adjoint for feed-forward initial latents, else None
    unfold: torch.Tensor | None  # patch levels: one-hot x window kernel (D, C_low, kh, kw) for ONNX
    tanh: bool
    sigma2: float
    prior: str
    alpha: float
    lam_energy: float  # lam ||U||^2
    above: float  # k1 / sigma_{l+1}^2: weight of the error from above (0 at the top)
    phase: tuple[int, int] = (1, 1)  # stride (sh, sw) of the phase split (phase kind)
    taps: tuple[int, int] = (1, 1)  # (mh, mw) = ceil(k / s) (phase kind)
    pad: tuple[int, int] = (0, 0)  # zeros added below / right of x before the phase split


@dataclass
class LevelwisePlan:
    """Any network: the definition's level loop, fused and in phase layout at a convolutional level 1."""

    levels: list[PlanLevel]
    shapes: list[tuple[int, int, int]]
    eta: float
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


def plan_kind(model: PCModel, input_hw: Sequence[int] | None = None) -> str:
    """Which plan a model gets at this input size: "quadratic" or "levelwise"."""
    config = model.config
    hw = tuple(config.input_shape[1:] if input_hw is None else input_hw)
    if any(lc.f != "identity" for lc in config.levels):
        return "levelwise"
    n = sum(_prod(s) for s in model.latent_shapes(hw))
    n_x = config.input_shape[0] * _prod(hw)
    if n > QUADRATIC_MAX_LATENTS or n * n_x > QUADRATIC_MAX_ENTRIES:
        return "levelwise"
    return "quadratic"


def make_plan(model: PCModel, input_hw: Sequence[int], dtype: torch.dtype, device: torch.device) -> Plan:
    """Derive the plan for the model's current weights at one input size, in float64, then cast."""
    hw = (int(input_hw[0]), int(input_hw[1]))
    with torch.inference_mode():
        if plan_kind(model, hw) == "quadratic":
            return _quadratic_plan(model, hw, dtype, device)
        return _levelwise_plan(model, hw, dtype, device)


def _quadratic_plan(model: PCModel, hw: tuple[int, int], dtype: torch.dtype, device: torch.device) -> QuadraticPlan:
    """H, b(x) and the rest from each level's linear maps written as matrices (rows: unit inputs).

    With P_l = U_l (latents -> level l's target space) and T_l = t_l (the map below -> target space),
    E_data = sum_l (1/sigma_l^2) |lower T_l - r_l P_l|^2 in row form, so H has the blocks
    (2/sigma_l^2) P_l P_l^T, (2/sigma_l^2) T_l T_l^T (on level l-1) and -(2/sigma_l^2) P_l T_l^T, and
    b(x) = (2/sigma_1^2) x T_1 P_1^T. Everything comes from the definition's Level.predict and .target.
    """
    config = model.config
    cpu = torch.device("cpu")
    levels = model._levels(hw)
    weights = [w.detach().to(device=cpu, dtype=torch.float64) for w in model.weights]
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
    for i, (lc, P, T) in enumerate(zip(config.levels, predicts, targets)):
        w = 2 / lc.sigma2
        a, b = offsets[i], offsets[i + 1]
        hessian[a:b, a:b] += w * P @ P.T
        if i > 0:
            lo, hi = offsets[i - 1], offsets[i]
            hessian[lo:hi, lo:hi] += w * T @ T.T
            hessian[a:b, lo:hi] -= w * P @ T.T
            hessian[lo:hi, a:b] -= w * T @ P.T
    drive = torch.zeros((n_x, n), dtype=torch.float64)
    drive[:, : sizes[0]] = (2 / config.levels[0].sigma2) * targets[0] @ predicts[0].T
    gaussian = torch.cat(
        [torch.full((s,), 2 * lc.alpha if lc.prior == "gaussian" else 0.0, dtype=torch.float64)
         for s, lc in zip(sizes, config.levels)]
    )  # fmt: skip
    alpha = torch.cat(
        [torch.full((s,), lc.alpha if lc.prior == "cauchy" else 0.0, dtype=torch.float64)
         for s, lc in zip(sizes, config.levels)]
    )  # fmt: skip
    hessian = hessian + torch.diag(gaussian)
    eta = config.k1 / 2
    kappa = 2 * eta * alpha
    scale = torch.where(kappa > 0, kappa.sqrt(), torch.ones_like(kappa))
    qinv = torch.where(kappa > 0, 1 / kappa.clamp_min(1e-300), torch.full_like(kappa, math.inf))
    step = torch.eye(n, dtype=torch.float64) - eta * hessian  # r <- r M (+ c): M symmetric
    step = scale[:, None] * step / scale[None, :]
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
        eta=eta,
        step=cast(step),
        drive=cast(eta * drive / scale[None, :]),
        start=None if start is None else cast(start),
        qinv=cast(qinv),
        scale=cast(scale),
        cauchy_alpha=cast(alpha),
        omega=cast(omega),
        const=cast(torch.tensor(const)),
        reconstruct=cast(scale[:, None] * recon),
        has_cauchy=bool((kappa > 0).any()),
        predict_maps=[cast(P) for P in predicts],
        target_maps=[cast(T) for T in targets],
        target_shapes=target_shapes,
    )


@functools.lru_cache(maxsize=32)
def _target_matrix(level: Level, lower: tuple[int, ...]) -> torch.Tensor:
    """t_l as a matrix (rows: unit maps below). Geometry only, not weights: kept across learning steps."""
    size = _prod(lower)
    return level.target(torch.eye(size, dtype=torch.float64).reshape(size, *lower)).flatten(1)


def phase_split(x: torch.Tensor, stride: tuple[int, int], pad: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C sh sw, (H + pad_h) / sh, (W + pad_w) / sw): the sub-pixel phases as channels."""
    if pad != (0, 0):
        x = F.pad(x, (0, pad[1], 0, pad[0]))
    b, c, h, w = x.shape
    sh, sw = stride
    x = x.reshape(b, c, h // sh, sh, w // sw, sw).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * sh * sw, h // sh, w // sw)


def phase_merge(p: torch.Tensor, channels: int, stride: tuple[int, int], hw: Sequence[int]) -> torch.Tensor:
    """Inverse of `phase_split`, cropped to hw."""
    b, _, ph, pw = p.shape
    sh, sw = stride
    x = p.reshape(b, channels, sh, sw, ph, pw).permute(0, 1, 4, 2, 5, 3).reshape(b, channels, ph * sh, pw * sw)
    return x[:, :, : hw[0], : hw[1]]


def phase_kernels(U: torch.Tensor, stride: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Kernels of conv_transpose2d(r, U, stride) and conv2d(e, U, stride) in phase layout.

    Output pixel (s i + a) receives r[i - p] U[s p + a] for p < m = ceil(k / s): a stride-1 convolution
    of r (padded by m - 1) with the flipped taps gives every phase a as its own channel; the adjoint is
    the unflipped stride-1 convolution of the phases. U is zero-padded to s m taps.
    """
    c, c0, kh, kw = U.shape
    sh, sw = stride
    mh, mw = -(-kh // sh), -(-kw // sw)
    padded = F.pad(U, (0, sw * mw - kw, 0, sh * mh - kh)).reshape(c, c0, mh, sh, mw, sw)
    predict = padded.permute(1, 3, 5, 0, 2, 4).flip(-1, -2).reshape(c0 * sh * sw, c, mh, mw)
    adjoint = padded.permute(0, 1, 3, 5, 2, 4).reshape(c, c0 * sh * sw, mh, mw)
    return predict.contiguous(), adjoint.contiguous(), (mh, mw)


def _unfold_kernel(level: Level) -> torch.Tensor:
    """F.unfold (times the window) as a convolution kernel (D, C_low, kh, kw): what ONNX can run."""
    c0 = level.geometry.lower[0]
    kh, kw = level.geometry.kernel
    d = c0 * kh * kw
    kernel = torch.eye(d, dtype=torch.float64).reshape(d, c0, kh, kw)
    window = level.window(torch.float64, torch.device("cpu"))
    return kernel if window is None else kernel * window.reshape(d, 1, 1, 1)


def _levelwise_plan(model: PCModel, hw: tuple[int, int], dtype: torch.dtype, device: torch.device) -> LevelwisePlan:
    config = model.config
    levels = model._levels(hw)
    eta = config.k1 / 2
    feedforward = config.initial_latents == "feedforward"
    out = []
    for i, (level, U) in enumerate(zip(levels, model.weights)):
        lc = level.config
        U = U.detach().to(device="cpu", dtype=torch.float64)
        scale = 2 * eta / lc.sigma2
        above = 2 * eta / config.levels[i + 1].sigma2 if i + 1 < len(levels) else 0.0
        extra: dict[str, Any] = {}
        unfold = None
        if lc.kind == "convolutional" and i == 0:
            predict, adjoint, taps = phase_kernels(U, level.geometry.stride)
            stride = level.geometry.stride
            lower = level.geometry.lower
            pad = tuple(
                s * (n + m - 1) - size for s, n, m, size in zip(stride, level.geometry.latent[1:], taps, lower[1:])
            )
            kind, extra = "phase", dict(phase=stride, taps=taps, pad=pad)
        elif lc.kind == "convolutional":
            kind, predict, adjoint = "conv", U, U
        else:
            matrix = U.reshape(U.shape[0], -1)  # (C, D)
            kind, predict, adjoint = "patch", matrix.T, matrix
            unfold = _unfold_kernel(level)

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        out.append(
            PlanLevel(
                kind=kind,
                level=level,
                predict=cast(predict),
                adjoint=cast(adjoint * scale),
                feedforward=cast(adjoint) if feedforward else None,
                unfold=None if unfold is None else cast(unfold),
                tanh=lc.f == "tanh",
                sigma2=lc.sigma2,
                prior=lc.prior,
                alpha=lc.alpha,
                lam_energy=lc.lam * float(U.square().sum()),
                above=above,
                **extra,
            )
        )
    return LevelwisePlan(
        levels=out,
        shapes=[lv.geometry.latent for lv in levels],
        eta=eta,
        input_shape=(config.input_shape[0], *hw),
        const=torch.tensor(sum(lv.lam_energy for lv in out), dtype=dtype, device=device),
    )


# ---- the torch engine ---------------------------------------------------------------------------------


@dataclass
class EngineRun:
    """What an engine returns: final latents, energy (steps + 1, B), steps used (B,)."""

    latents: list[torch.Tensor]
    energy: torch.Tensor
    used: torch.Tensor
    # Final state, where the backend computed it (onnxruntime): target-space layout, as Level.predict gives.
    predictions: list[torch.Tensor] | None = None
    errors: list[torch.Tensor] | None = None
    reconstruction: torch.Tensor | None = None


def _operand(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def run_quadratic(
    plan: QuadraticPlan, x: torch.Tensor, steps: int, tol: float | None = None, operand: torch.dtype | None = None
) -> EngineRun:
    """T steps of s <- s M_s + c_s - s / (1/kappa + s^2), then the energy of every step from the history.

    `operand` (CUDA only): dtype of the matmul operands (bf16); s and the sums stay in x's dtype.
    """
    batch = x.shape[0]
    n = plan.size
    xf = x.reshape(batch, -1)
    c = xf @ plan.drive  # (B, n)
    states = x.new_empty((steps + 1, batch, n))  # s_t; kept for the energy trace
    drives = x.new_empty((steps + 1, batch, n))  # z_t = s_t M_s + c_s
    if plan.start is None:
        states[0].zero_()
    else:
        torch.mm(xf, plan.start, out=states[0])
    q = x.new_empty((batch, n))
    step = _operand(plan.step, operand)
    used = torch.full((batch,), steps, dtype=torch.int64, device=x.device)
    active = torch.ones(batch, dtype=torch.bool, device=x.device) if tol is not None else None
    fresh = x.new_empty((batch, n)) if tol is not None else None
    last = steps
    for t in range(steps + 1):
        s = states[t]
        if operand is None:
            z = torch.addmm(c, s, step, out=drives[t])
        else:
            z = torch.add(c, (s.to(operand) @ step).to(s.dtype), out=drives[t])
        if t == steps:
            break
        target = states[t + 1] if tol is None else fresh
        if plan.has_cauchy:
            torch.addcmul(plan.qinv, s, s, out=q)
            torch.addcdiv(z, s, q, value=-1, out=target)
        else:
            target.copy_(z)
        if tol is not None:
            assert active is not None and fresh is not None
            norm = ((s - fresh).square() @ plan.scale.square()).sqrt() / plan.eta  # |dE/dr| = |k (s - s')| / eta
            active &= norm >= tol
            if not bool(active.any()):
                last = t
                break
            torch.where(active[:, None], fresh, s, out=states[t + 1])
            used -= (~active).long()
    if tol is not None:
        used = _used_steps(used, steps, last)
    states, drives = states[: last + 1], drives[: last + 1]
    if operand is not None or _tf32_on(x):  # the energy needs z exactly: redo it in float32 over the history
        with _tf32(False):
            drives = torch.matmul(states, plan.step) + c
    scale2 = plan.scale.square()
    quad = (states * (states - drives - c)) @ (scale2 / (2 * plan.eta))  # (T+1, B): 1/2 r.Hr - b.r
    energy = quad + (x.reshape(batch, -1).square() @ plan.omega)[None, :] + plan.const
    if plan.has_cauchy:
        energy = energy + torch.log1p(states.square() * scale2) @ plan.cauchy_alpha
    final = states[last] * plan.scale
    latents = [
        p.reshape(batch, *s) for p, s in zip(torch.split(final, [_prod(s) for s in plan.shapes], 1), plan.shapes)
    ]
    return EngineRun([r.contiguous() for r in latents], energy, used)


def _used_steps(used: torch.Tensor, steps: int, last: int) -> torch.Tensor:
    """Steps each image took: `used` counted down once per inactive step; an all-stopped end cuts the rest."""
    if last < steps:  # every image stopped at step `last`: the remaining steps were never taken
        used = used - (steps - last)
    return used


def _target(lv: PlanLevel, lower: torch.Tensor) -> torch.Tensor:
    if lv.kind == "patch":
        return lv.level.target(lower)
    return lower


def _predict(lv: PlanLevel, r: torch.Tensor, operand: torch.dtype | None) -> torch.Tensor:
    if lv.kind == "phase":
        a = F.conv2d(_operand(r, operand), _operand(lv.predict, operand), padding=(lv.taps[0] - 1, lv.taps[1] - 1))
    elif lv.kind == "conv":
        a = F.conv_transpose2d(_operand(r, operand), _operand(lv.predict, operand), stride=lv.level.geometry.stride)
    else:
        a = _operand(lv.predict, operand) @ _operand(r, operand).flatten(2)  # (D, C) @ (B, C, M)
    return a if operand is None else a.to(r.dtype)


def _adjoint(lv: PlanLevel, weight: torch.Tensor, g: torch.Tensor, operand: torch.dtype | None) -> torch.Tensor:
    if lv.kind == "phase":
        u = F.conv2d(_operand(g, operand), _operand(weight, operand))
    elif lv.kind == "conv":
        u = F.conv2d(_operand(g, operand), _operand(weight, operand), stride=lv.level.geometry.stride)
    else:
        u = (_operand(weight, operand) @ _operand(g, operand)).reshape(g.shape[0], *lv.level.geometry.latent)
    return u if operand is None else u.to(g.dtype)


def _initial(plan: LevelwisePlan, x: torch.Tensor, first_target: torch.Tensor) -> list[torch.Tensor]:
    out = []
    lower = x
    for i, lv in enumerate(plan.levels):
        if lv.feedforward is None:
            r = x.new_zeros((x.shape[0], *lv.level.geometry.latent))
        else:
            target = first_target if i == 0 else _target(lv, lower)
            r = _adjoint(lv, lv.feedforward, target, None).contiguous()
        out.append(r)
        lower = r
    return out


def run_levelwise(
    plan: LevelwisePlan, x: torch.Tensor, steps: int, tol: float | None = None, operand: torch.dtype | None = None
) -> EngineRun:
    """The definition's level loop with buffers made once, in-place fused updates and phase layout at level 1.

    Per level and step: a = U r (one convolution or matmul), p = f(a) in place, e = t - p into a fixed
    buffer, d = e (1 - p^2) in one fused op, u = (k1/sigma^2) U^T d (one convolution or matmul), then
    r <- (1 - k1 alpha) r + u - (k1/sigma_above^2) t^T(e_above) in two ops, in place.
    """
    batch = x.shape[0]
    levels = plan.levels
    first = levels[0]
    first_target = (
        phase_split(x, first.phase, first.pad).contiguous() if first.kind == "phase" else _target(first, x).contiguous()
    )
    latents = _initial(plan, x, first_target)
    count = len(levels)
    norms = x.new_zeros((steps + 1, count, batch))  # |e_l| per step
    priors = x.new_zeros((steps + 1, count, batch))  # g_l(r_l) / alpha per step (Gaussian: |r_l|)
    errors: list[torch.Tensor | None] = [None] * count
    slopes: list[torch.Tensor | None] = [None] * count
    squares = [
        x.new_empty(r.shape) if lv.prior == "cauchy" and lv.alpha > 0 else None for lv, r in zip(levels, latents)
    ]
    fresh = [torch.empty_like(r) for r in latents] if tol is not None else None
    active = torch.ones(batch, dtype=torch.bool, device=x.device) if tol is not None else None
    used = torch.full((batch,), steps, dtype=torch.int64, device=x.device)
    one = x.new_ones(())
    last = steps
    for t in range(steps + 1):
        predictions = []
        for i, lv in enumerate(levels):
            a = _predict(lv, latents[i], operand)
            if lv.tanh:
                a.tanh_()
            target = first_target if i == 0 else _target(lv, latents[i - 1])
            if errors[i] is None:
                errors[i] = torch.empty_like(a)
            torch.sub(target, a, out=errors[i])
            torch.linalg.vector_norm(errors[i].flatten(1), dim=1, out=norms[t, i])
            predictions.append(a)
            r, q = latents[i], squares[i]
            if q is not None:
                torch.addcmul(one, r, r, out=q)  # 1 + r^2: the Cauchy prior and its gradient
                torch.sum(torch.log(q).flatten(1), dim=1, out=priors[t, i])
            elif lv.alpha > 0:
                torch.linalg.vector_norm(r.flatten(1), dim=1, out=priors[t, i])
        if t == steps:
            break
        updates = []
        for i, lv in enumerate(levels):
            e = errors[i]
            assert e is not None
            if lv.tanh:
                p = predictions[i].square_()
                if slopes[i] is None:
                    slopes[i] = torch.empty_like(e)
                d = torch.addcmul(e, e, p, value=-1, out=slopes[i])  # e (1 - p^2)
            else:
                d = e
            updates.append(_adjoint(lv, lv.adjoint, d, operand))
        for i, lv in enumerate(levels):
            u, r = updates[i], latents[i]
            out = r if tol is None else fresh[i]  # type: ignore[index]
            if lv.prior == "cauchy" and lv.alpha > 0:
                u.add_(r).addcdiv_(r, squares[i], value=-2 * plan.eta * lv.alpha)  # type: ignore[arg-type]
            else:
                u.add_(r, alpha=1 - 2 * plan.eta * lv.alpha)
            if i + 1 < count:
                above = levels[i + 1]
                e_above = errors[i + 1]
                assert e_above is not None
                pulled = above.level.target_adjoint(e_above) if above.kind == "patch" else e_above
                torch.add(u, pulled, alpha=-lv.above, out=out)
            else:
                out.copy_(u)
        if tol is not None:
            assert fresh is not None and active is not None
            total = sum((r - f).flatten(1).square().sum(1) for r, f in zip(latents, fresh))
            norm = torch.sqrt(total) / plan.eta  # |dE/dr| = |r - r'| / (k1/2)
            active &= norm >= tol
            if not bool(active.any()):
                last = t
                break
            keep = active.view(-1, 1, 1, 1)
            for r, f in zip(latents, fresh):
                torch.where(keep, f, r, out=r)
            used -= (~active).long()
    if tol is not None:
        used = _used_steps(used, steps, last)
    norms, priors = norms[: last + 1], priors[: last + 1]
    energy = plan.const.expand(last + 1, batch).clone()
    for i, lv in enumerate(levels):
        energy += norms[:, i].square() / lv.sigma2
        if lv.alpha > 0:
            energy += lv.alpha * (priors[:, i] if lv.prior == "cauchy" else priors[:, i].square())
    return EngineRun(latents, energy, used)


def run_plan(
    plan: Plan, x: torch.Tensor, steps: int, tol: float | None = None, operand: torch.dtype | None = None
) -> EngineRun:
    """The torch engine: run a plan eagerly."""
    if isinstance(plan, QuadraticPlan):
        return run_quadratic(plan, x, steps, tol, operand)
    return run_levelwise(plan, x, steps, tol, operand)


# ---- onnxruntime --------------------------------------------------------------------------------------


def available_cores() -> int:
    """CPU cores this process may use (affinity), the thread count given to torch and onnxruntime."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class OrtProgram:
    """onnxruntime sessions for (model weights, T, input size) with a dynamic batch axis.

    The weights are baked into the graph as initializers, as in a pc-export file: onnxruntime prepacks
    constant matrices, which measured several times faster than feeding them as inputs at batch 1.
    A batch runs on one session with all threads, or split into `ort_shards` shards that run at once,
    each on one thread, through one single-threaded session (its run() is thread-safe and releases the
    GIL). Images are independent, so every image gets the same arithmetic either way. Sessions are made
    on first use: at most two (all threads, one thread) per program.
    """

    def __init__(self, plan: Plan, steps: int, threads: int | None = None) -> None:
        from .export import build_graph

        self.steps = steps
        self.threads = threads or torch.get_num_threads()
        self.optimization = ort_optimization(plan.kind)
        graph = build_graph(plan, steps, outputs=FULL_OUTPUTS)
        self.graph = graph.SerializeToString()
        self.outputs = [o.name for o in graph.graph.output]
        self.sessions: dict[int, Any] = {}  # intra-op threads -> InferenceSession

    def session(self, threads: int) -> Any:
        """The session with `threads` intra-op threads (made on first use)."""
        found = self.sessions.get(threads)
        if found is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = self.optimization
            options.log_severity_level = 3  # no warnings about initializers folded away
            found = ort.InferenceSession(self.graph, options, providers=["CPUExecutionProvider"])
            self.sessions[threads] = found
        return found

    def run(self, x: torch.Tensor, shard: bool = True) -> EngineRun:
        """Run the T steps on x (B, C, H, W), sharded by `ort_shards` unless `shard` is False."""
        x = x.detach().contiguous()
        shards = ort_shards(x.shape[0], self.threads) if shard else 1
        if shards == 1:
            values = self.session(self.threads).run(self.outputs, {"x": x.numpy()})
            named = {k: torch.from_numpy(v) for k, v in zip(self.outputs, values)}
        else:
            named = self._run_shards(x, shards)
        count = sum(name.startswith("latent_") for name in named)
        return EngineRun(
            latents=[named[f"latent_{i + 1}"] for i in range(count)],
            energy=named["energy"],
            used=torch.full((x.shape[0],), self.steps, dtype=torch.int64),
            predictions=[named[f"prediction_{i + 1}"] for i in range(count)],
            errors=[named[f"error_{i + 1}"] for i in range(count)],
            reconstruction=named["reconstruction"],
        )

    def _run_shards(self, x: torch.Tensor, shards: int) -> dict[str, torch.Tensor]:
        session = self.session(1)
        parts = [p.numpy() for p in torch.tensor_split(x, shards)]
        pending = [_shard_pool(shards - 1).submit(session.run, self.outputs, {"x": p}) for p in parts[1:]]
        done = [session.run(self.outputs, {"x": parts[0]}), *(f.result() for f in pending)]  # first shard here
        return {
            name: torch.cat([torch.from_numpy(d[i]) for d in done], dim=1 if name == "energy" else 0)  # energy (T+1, B)
            for i, name in enumerate(self.outputs)
        }


def ort_shards(batch: int, threads: int) -> int:
    """How many single-threaded shards onnxruntime splits a batch into (1: one session with all threads).

    One shard per thread, as many as there are images: a multi-threaded session waits at a barrier after
    each of these small kernels (far longer on a shared machine), a shard on its own thread waits for
    nothing. Fixed, never timed at start-up. Measured on 2 cores (docs/PERFORMANCE.md): batch 32 ran
    1.25-1.4x faster sharded than on one 2-thread session (1.5-1.7x under load), batches 2-4 1.4-1.7x
    under load; batch 1 stays on the 2-thread session, which was as fast as one thread or faster.
    """
    return max(1, min(threads, batch))


@functools.cache
def _shard_pool(workers: int) -> ThreadPoolExecutor:
    """Threads for the shards after the first (one pool per worker count, threads started on demand)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="pcmodel-ort-shard")


def ort_optimization(kind: str) -> Any:
    """The graph optimisation level per plan kind (measured in pc-bench, docs/PERFORMANCE.md)."""
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel
    # The NCHWc layout pass of ORT_ENABLE_ALL wraps every small convolution in layout reorders, which
    # costs more than it gains at these channel counts; the matmul-only quadratic graph has none.
    return level.ORT_ENABLE_ALL if kind == "quadratic" else level.ORT_ENABLE_EXTENDED


# ---- CUDA graphs --------------------------------------------------------------------------------------


class CudaGraphProgram:
    """The torch engine's fixed-T loop captured as one CUDA graph for a (batch bucket, input size).

    Inputs are copied into a static buffer and the graph replayed; the plan's weight tensors are read in
    place, so new weights are copied into them (`refresh`) without a new capture. `precision`: float32
    (TF32 off), tf32 (TF32 matmuls and convolutions), bf16 (bf16 operands, r and sums in float32).
    """

    def __init__(self, plan: Plan, steps: int, bucket: int, input_shape: Sequence[int], precision: str) -> None:
        if precision not in CUDA_PRECISIONS:
            raise ValueError(f"unknown CUDA precision {precision!r}; choose one of {', '.join(CUDA_PRECISIONS)}")
        self.plan, self.steps, self.bucket, self.precision = plan, steps, bucket, precision
        device = next(iter(plan.tensors().values())).device
        self.static_x = torch.zeros((bucket, *input_shape), device=device)
        operand = torch.bfloat16 if precision == "bf16" else None
        with _tf32(precision == "tf32"):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up: library handles and autotuning happen outside the capture
                for _ in range(2):
                    run_plan(plan, self.static_x, steps, operand=operand)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = run_plan(plan, self.static_x, steps, operand=operand)
        torch.cuda.synchronize(device)

    def refresh(self, plan: Plan) -> None:
        """Copy a new plan's weight tensors into the captured ones (same shapes): new weights, same graph."""
        mine = self.plan.tensors()
        for name, tensor in plan.tensors().items():
            mine[name].copy_(tensor)

    def run(self, x: torch.Tensor) -> EngineRun:
        batch = x.shape[0]
        self.static_x[:batch].copy_(x)
        if batch < self.bucket:
            self.static_x[batch:].zero_()
        self.graph.replay()
        out = self.out
        return EngineRun(
            [r[:batch].clone() for r in out.latents], out.energy[:, :batch].clone(), out.used[:batch].clone()
        )


class _tf32:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = self.enabled
        torch.backends.cudnn.allow_tf32 = self.enabled

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _tf32_on(x: torch.Tensor) -> bool:
    return x.is_cuda and bool(torch.backends.cuda.matmul.allow_tf32)


def cuda_bucket(batch: int) -> int:
    """The smallest captured batch size that holds `batch` (larger batches are split into the largest)."""
    for size in CUDA_BUCKETS:
        if batch <= size:
            return size
    return CUDA_BUCKETS[-1]


# ---- the engine: caches, admission and the selection rule -----------------------------------------------


def weights_key(model: PCModel) -> tuple:
    """Identifies the weights' current values: tensor identity, storage and in-place version counter.

    apply_weight_gradients / learn_step change the weights in place (the version counter moves);
    assigning new tensors changes their identity. Either makes every derived plan stale.
    """
    return tuple((id(w), w.data_ptr(), w._version, str(w.device)) for w in model.weights)


@dataclass
class Engine:
    """Per-model state of the backends: plans, sessions and graphs, and which step counts are prepared."""

    max_step_counts: int = 4  # the default steps and the first 3 others asked for (the warm-up set)
    max_shapes: int = 4  # input sizes per step count
    cuda_precision: str = "float32"
    ort_sharding: bool = True  # False: every batch on one onnxruntime session with all threads (pc-bench's before)
    fast_steps: list[int] = field(default_factory=list)
    shapes: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)
    plans: dict[tuple, tuple[tuple, Plan, list[torch.Tensor]]] = field(default_factory=dict)
    # Each cache entry holds the weight tensors it was made from, so their ids cannot be reused meanwhile.
    ort: dict[tuple, tuple[tuple, OrtProgram, list[torch.Tensor]]] = field(default_factory=dict)
    last_weights: tuple | None = None  # the weights key seen by the previous call
    cuda: dict[tuple, tuple[tuple, CudaGraphProgram, list[torch.Tensor]]] = field(default_factory=dict)
    prepare_seconds: dict[str, float] = field(default_factory=dict)  # one-off costs, for pc-bench

    def plan(self, model: PCModel, hw: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Plan:
        """The plan for the current weights (rebuilt when they changed: learning never sees stale weights)."""
        key = (hw, dtype, str(device))
        wkey = weights_key(model)
        cached = self.plans.get(key)
        if cached is not None and cached[0] == wkey:
            return cached[1]
        plan = make_plan(model, hw, dtype, device)
        # Holding the weight tensors keeps their ids and storages from being reused while the key lives.
        self.plans[key] = (wkey, plan, list(model.weights))
        return plan

    def admit(self, model: PCModel, steps: int, shape: tuple[int, ...]) -> bool:
        """Whether (steps, input size) may have a fast program; admits it while there is room."""
        if steps not in self.fast_steps:
            others = [t for t in self.fast_steps if t != model.config.steps]
            if steps != model.config.steps and len(others) >= self.max_step_counts - 1:
                return False
            self.fast_steps.append(steps)
        shapes = self.shapes.setdefault(steps, [])
        if shape not in shapes:
            if len(shapes) >= self.max_shapes:
                return False
            shapes.append(shape)
        return True

    def prepared(self, steps: int, shape: tuple[int, ...]) -> bool:
        return steps in self.fast_steps and shape in self.shapes.get(steps, [])


_ENGINES: weakref.WeakKeyDictionary[Any, Engine] = weakref.WeakKeyDictionary()


def engine(model: PCModel) -> Engine:
    """The model's backend state (created on first use). Set `max_step_counts` etc. before warm-up."""
    found = _ENGINES.get(model)
    if found is None:
        found = _ENGINES[model] = Engine()
    return found


def select_backend(model: PCModel, x: torch.Tensor, steps: int, tol: float | None, backend: str | None) -> str:
    """The backend for this call, by the fixed rule of the module docstring; a reason follows a fallback.

    Returns e.g. "onnxruntime", "cuda-graph", "torch", "torch (float64 input)".
    """
    choice = "auto" if backend is None else backend
    if choice not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {backend!r}; choose auto or one of: {', '.join(BACKENDS)}")
    if choice in ("loop", "torch"):
        return choice
    on_cuda = model.device.type == "cuda"
    if choice == "cuda-graph" and not on_cuda:
        raise ValueError("backend 'cuda-graph' needs the model on a CUDA device: model.to('cuda') first")
    if choice == "onnxruntime" and on_cuda:
        raise ValueError("backend 'onnxruntime' runs on the CPU; move the model with model.to('cpu')")
    fast = choice if choice != "auto" else ("cuda-graph" if on_cuda else "onnxruntime")
    if steps == 0:
        return "loop (no steps)"
    if x.dtype == torch.float64:
        return "torch (float64 input)"
    if tol is not None:
        return "torch (early stop)"
    shape = tuple(x.shape[1:])
    eng = engine(model)
    if choice == "auto" and not eng.admit(model, steps, shape):
        return f"torch ({fast}: steps={steps} at {'x'.join(map(str, shape))} not prepared)"
    if choice != "auto":
        eng.admit(model, steps, shape)  # an explicit request prepares even beyond the limits
    elif fast == "onnxruntime" and _ort_is_stale(model, eng, steps, shape):
        return "torch (weights changed since the onnxruntime session was built)"
    return fast


def run_inference(
    model: PCModel, x: torch.Tensor, steps: int, tol: float | None, backend: str | None
) -> InferenceResult:
    """model.infer's body: choose a backend, run it, build the result from its final latents."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != model.config.input_shape[0]:
        model._prepare(x)  # raises the definition's error for a malformed x
    choice = select_backend(model, x, steps, tol, backend)
    engine(model).last_weights = weights_key(model)
    name = choice.split(" ")[0]
    if name == "loop":
        result = model._infer_loop(x, steps, tol)
        result.backend = choice
        return result
    with torch.inference_mode():
        x, weights, levels = model._prepare(x)
        eng = engine(model)
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        if name == "torch":
            run = run_plan(eng.plan(model, hw, x.dtype, x.device), x, steps, tol)
            auto = backend in (None, "auto")
            if tol is not None and auto and x.dtype == torch.float32 and eng.prepared(steps, tuple(x.shape[1:])):
                run, fast = _fixed_where_unstopped(model, eng, x, steps, run)
                if fast:
                    choice = f"torch (early stop; images that never stopped: {fast})"
        elif name == "onnxruntime":
            run = _run_ort(model, eng, x, hw, steps)
        else:
            run = _run_cuda(model, eng, x, hw, steps)
        if run.predictions is not None and run.errors is not None and run.reconstruction is not None:
            from .model import InferenceResult

            def layout(level: Level, t: torch.Tensor) -> torch.Tensor:
                return level.as_patches(t) if level.patchwise else t

            return InferenceResult(
                latents=run.latents,
                predictions=[layout(lv, p) for lv, p in zip(levels, run.predictions)],
                errors=[layout(lv, e) for lv, e in zip(levels, run.errors)],
                reconstruction=run.reconstruction,
                error=x - run.reconstruction,
                energy=run.energy,
                steps=run.used,
                backend=choice,
            )
        errors = model._errors(levels, weights, x, run.latents)
        return model._result(levels, x, run.latents, errors, run.energy, run.used, backend=choice)


def _fixed_where_unstopped(
    model: PCModel, eng: Engine, x: torch.Tensor, steps: int, run: EngineRun
) -> tuple[EngineRun, str]:
    """Early stop next to a prepared fast program: images that never stopped take the fixed-step result.

    `infer` promises that such images get exactly what the call without `tol` returns; that call runs the
    fast program, whose rounding differs from the torch engine's, so its results are used for them.
    Costs a second, fixed-step run; early stop is not the service's path.
    """
    never = run.used == steps
    if not bool(never.any()) or run.energy.shape[0] != steps + 1:
        return run, ""
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    fast = "cuda-graph" if x.is_cuda else "onnxruntime"
    fixed = _run_cuda(model, eng, x, hw, steps) if x.is_cuda else _run_ort(model, eng, x, hw, steps)
    keep = never.view(-1, 1, 1, 1)
    latents = [torch.where(keep, f, r) for f, r in zip(fixed.latents, run.latents)]
    energy = torch.where(never[None, :], fixed.energy, run.energy)
    return EngineRun(latents, energy, run.used), fast


def _ort_program(model: PCModel, eng: Engine, x: torch.Tensor, steps: int) -> OrtProgram:
    """The session for the current weights (built, or rebuilt after the weights changed)."""
    import time

    hw = (int(x.shape[-2]), int(x.shape[-1]))
    key = (steps, tuple(x.shape[1:]))
    wkey = weights_key(model)
    cached = eng.ort.get(key)
    if cached is not None and cached[0] == wkey:
        return cached[1]
    start = time.perf_counter()
    program = OrtProgram(eng.plan(model, hw, torch.float32, x.device), steps)
    eng.prepare_seconds[f"onnxruntime T={steps} {'x'.join(map(str, key[1]))}"] = time.perf_counter() - start
    eng.ort[key] = (wkey, program, list(model.weights))
    return program


def _ort_is_stale(model: PCModel, eng: Engine, steps: int, shape: tuple[int, ...]) -> bool:
    """True where a session exists for other weights and the weights are still changing (learning).

    A session bakes the weights in, so new weights need a new session (~0.1-0.5 s). During learning
    U changes after every batch: those calls run on the torch engine instead, and the session is
    rebuilt once the weights have stayed the same for two calls in a row (training over, model frozen).
    """
    cached = eng.ort.get((steps, shape))
    if cached is None or cached[0] == weights_key(model):
        return False
    return eng.last_weights != weights_key(model)


def _run_ort(model: PCModel, eng: Engine, x: torch.Tensor, hw: tuple[int, int], steps: int) -> EngineRun:
    return _ort_program(model, eng, x, steps).run(x, shard=eng.ort_sharding)


def _run_cuda(model: PCModel, eng: Engine, x: torch.Tensor, hw: tuple[int, int], steps: int) -> EngineRun:
    import time

    plan = eng.plan(model, hw, torch.float32, x.device)
    largest = CUDA_BUCKETS[-1]
    if x.shape[0] > largest:  # split into the largest bucket; images are independent
        parts = [_run_cuda(model, eng, chunk, hw, steps) for chunk in torch.split(x, largest)]
        return EngineRun(
            [torch.cat(p) for p in zip(*(r.latents for r in parts))],
            torch.cat([r.energy for r in parts], dim=1),
            torch.cat([r.used for r in parts]),
        )
    bucket = cuda_bucket(x.shape[0])
    key = (steps, tuple(x.shape[1:]), bucket, eng.cuda_precision)
    wkey = weights_key(model)
    cached = eng.cuda.get(key)
    if cached is None:
        start = time.perf_counter()
        program = CudaGraphProgram(plan, steps, bucket, tuple(x.shape[1:]), eng.cuda_precision)
        eng.prepare_seconds[f"cuda-graph T={steps} B={bucket} {'x'.join(map(str, key[1]))}"] = (
            time.perf_counter() - start
        )
        eng.cuda[key] = (wkey, program, list(model.weights))
    else:
        seen, program, _ = cached
        if seen != wkey:  # learning changed U: new weights into the captured buffers, no new capture
            program.refresh(plan)
            eng.cuda[key] = (wkey, program, list(model.weights))
    return program.run(x)
