"""The JAX peer to beat: the same network, weights and energy written independently in JAX, four ways.

Nothing here comes from pcmodel's hand-derived updates or plans: the energy is built from the config
the way benchmarks/reference.py builds it in torch (convolutional levels through a transposed
convolution, module and dense levels through patches with the optional Gaussian window, tanh or
identity f, Gaussian or Cauchy priors, lam weight decay). Every variant runs the T steps
r_l <- r_l - eta_l dE/dr_l, eta_l = k1 k1_scale_l / 2 (MODEL.md section 2), from the config's initial
latents, as `lax.fori_loop` inside one `jax.jit`, in float32, and returns the latents and the energy
trace (T + 1, B), which is what `model.infer` returns too.

The variants (`VARIANTS`), each a formulation a JAX user could reasonably write:

- "grad": the energy summed over the batch (batched einsums over the modules) and differentiated by
  `jax.grad`, the autodiff way;
- "hand": the hand-derived gradient of docs/MODEL.md section 2 (pcmodel.energy.latent_gradients'
  formula) in einsum / convolution form; the energy comes from the errors the gradient needs anyway;
- "vmap": the energy of ONE image (no batch axis), its `jax.grad` vmapped over the batch, the way
  equinox / pcx code is written;
- "quadratic": for networks whose every f is the identity, E is quadratic in r apart from the Cauchy
  priors, so dE/dr = H r - b(x) + g'(r) with the Hessian H precomputed (float64, then float32): one
  (B, n) x (n, n) product per step. A peer that knows the network is linear may do this; pcmodel does
  (pcmodel/engines/plans.py, QuadraticPlan). H and b's map come from the torch reference energy by
  autograd in float64, not from pcmodel's plans.
- "hybrid": where "quadratic" applies and there are levels above the first: level 1's data term (and its
  Gaussian prior) as its Gram block, block by block where its positions do not interact (an einsum over
  the three 32 x 32 module blocks of rao-ballard-1999), the levels above through their own maps by hand
  (e_l = t_l(r_{l-1}) - U_l r_l and its adjoints: for rao-ballard-1999 2 x 96 x 128 multiply-adds a row
  instead of level 2's 224-wide rows of H, whose level-2 block has rank 96). The fewest multiply-adds a
  step of the five.

`jax_runner` compiles the applicable variants, times them interleaved and keeps the fastest
(`info["variant"]`): "the strongest JAX" of a cell is the fastest variant at that batch and thread count.

Threads: XLA sizes its CPU thread pools when jax is imported, so the thread count is a property of
the process. `configure_threads(n)` must run before the first `import jax`; it sets
XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" for n = 1 (XLA then
runs every op on the calling thread) and "--xla_cpu_multi_thread_eigen=true
intra_op_parallelism_threads=n" otherwise. To compare thread counts, run separate processes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from benchmarks.reference import reference_energy
from benchmarks.timing import time_call
from pcmodel.config import ModelConfig, level_shapes

VARIANTS = ("grad", "hand", "vmap", "quadratic", "hybrid")
QUADRATIC_MAX_SIZE = 4096  # latents + inputs: above this the dense Hessian (and its float64 build) costs too much

JaxFn = Callable[[Any], tuple[list[Any], Any]]


PEER_PRIORS = ("gaussian", "cauchy")  # the paper's; the peer is written independently of pcmodel.priors


def configure_threads(threads: int) -> str:
    """Set XLA_FLAGS for `threads` intra-op threads; must be called before jax is imported. Returns the flags."""
    if "jax" in sys.modules:
        raise RuntimeError("jax is already imported: XLA's thread pools are fixed; call configure_threads first")
    if threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    else:
        flags = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return flags


def quadratic_applies(config: ModelConfig, input_hw: Sequence[int]) -> bool:
    """Whether the "quadratic" variant can run: every f the identity and a Hessian small enough to hold."""
    if any(lc.f != "identity" for lc in config.levels):
        return False
    geoms = level_shapes(config, (int(input_hw[0]), int(input_hw[1])))
    inputs = config.input_shape[0] * int(input_hw[0]) * int(input_hw[1])
    return inputs + sum(int(np.prod(g.latent)) for g in geoms) <= QUADRATIC_MAX_SIZE


def hybrid_applies(config: ModelConfig, input_hw: Sequence[int]) -> bool:
    """Whether the "hybrid" variant can run: the quadratic one can and there are levels above the first."""
    return len(config.levels) > 1 and quadratic_applies(config, input_hw)


def variants_for(config: ModelConfig, input_hw: Sequence[int]) -> tuple[str, ...]:
    """The variants that apply to this network at this size."""
    checks = {"quadratic": quadratic_applies, "hybrid": hybrid_applies}
    return tuple(v for v in VARIANTS if v not in checks or checks[v](config, input_hw))


def _window(kernel: Sequence[int], sigma: float, channels: int) -> np.ndarray:
    """The Gaussian window per patch entry, channel-major like F.unfold: (D,)."""
    ys = np.arange(kernel[0], dtype=np.float64) - (kernel[0] - 1) / 2
    xs = np.arange(kernel[1], dtype=np.float64) - (kernel[1] - 1) / 2
    w = np.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))
    return np.tile(w.ravel(), channels).astype(np.float32)


def build_inference(
    config: ModelConfig,
    weights: Sequence[torch.Tensor],
    input_hw: Sequence[int],
    steps: int,
    variant: str,
    unroll: int = 1,
) -> JaxFn:
    """A jitted function x (B, C, H, W) -> (latents [(B, causes, H_l, W_l)], energy (steps + 1, B)).

    `unroll`: lax.fori_loop's unroll factor (several steps per loop iteration in the compiled code).
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    hw = (int(input_hw[0]), int(input_hw[1]))
    if variant == "quadratic" and not quadratic_applies(config, hw):
        raise ValueError("the quadratic variant needs every f the identity and a small network")
    if variant == "hybrid" and not hybrid_applies(config, hw):
        raise ValueError("the hybrid variant needs every f the identity, a small network and two levels or more")
    unknown = sorted({lc.prior for lc in config.levels} - set(PEER_PRIORS))
    if unknown:
        raise ValueError(f"the JAX peer writes the {' and '.join(PEER_PRIORS)} priors only, not {', '.join(unknown)}")
    batched = variant != "vmap"  # every function below takes a batch axis except in the vmap variant
    geoms = level_shapes(config, hw)
    Us = [jnp.asarray(w.detach().cpu().numpy().astype(np.float32)) for w in weights]
    mats = [U.reshape(U.shape[0], -1) for U in Us]  # (C, D): module / dense levels
    windows = [
        None if lc.window_sigma is None else jnp.asarray(_window(g.kernel, lc.window_sigma, g.lower[0]))
        for lc, g in zip(config.levels, geoms)
    ]
    decay = sum(lc.lam * float((w.double() ** 2).sum()) for lc, w in zip(config.levels, weights))
    rates = [config.k1 * lc.k1_scale / 2 for lc in config.levels]  # each level's own step
    dims = ("NCHW", "OIHW", "NCHW")

    def patches(i: int, lower: Any) -> Any:
        """t_l: the (windowed) patches of the map below, (B, D, L) batched or (D, L) for one image."""
        g = geoms[i]
        if tuple(g.kernel) == tuple(g.lower[1:]):  # one patch covering the whole map: a reshape
            p = lower.reshape((lower.shape[0], -1, 1) if batched else (-1, 1))
        else:
            lhs = lower if batched else lower[None]
            p = lax.conv_general_dilated_patches(lhs, tuple(g.kernel), tuple(g.stride), "VALID", dimension_numbers=dims)
            p = p.reshape(p.shape[0], p.shape[1], -1)  # (B, D, L), channel-major as F.unfold
            p = p if batched else p[0]
        w = windows[i]
        return p if w is None else p * w[:, None]

    def target(i: int, lower: Any) -> Any:
        return lower if config.levels[i].kind == "convolutional" else patches(i, lower)

    def target_adjoint(i: int, error: Any, lower_shape: tuple[int, ...]) -> Any:
        """t_l^T: level l's target-space error back onto the map below (window, then fold the patches)."""
        if config.levels[i].kind == "convolutional":
            return error
        # t_l is linear: its exact transpose (summing overlapping patches), not a derivative of the energy.
        (folded,) = jax.linear_transpose(lambda m: target(i, m), jnp.zeros(lower_shape, jnp.float32))(error)
        return folded

    def predict(i: int, r: Any) -> Any:
        """U_l r_l before f, in the level's target space."""
        g = geoms[i]
        if config.levels[i].kind == "convolutional":
            lhs = r if batched else r[None]
            a = lax.conv_transpose(lhs, Us[i], tuple(g.stride), "VALID", dimension_numbers=dims, transpose_kernel=True)
            return a if batched else a[0]
        if batched:
            return jnp.einsum("cd,bcm->bdm", mats[i], r.reshape(r.shape[0], r.shape[1], -1))
        return mats[i].T @ r.reshape(r.shape[0], -1)  # (D, C) @ (C, M)

    def adjoint(i: int, driven: Any) -> Any:
        """U_l^T: the adjoint of `predict` (batched), onto r_l's shape."""
        g = geoms[i]
        if config.levels[i].kind == "convolutional":
            return lax.conv_general_dilated(driven, Us[i], tuple(g.stride), "VALID", dimension_numbers=dims)
        return jnp.einsum("cd,bdm->bcm", mats[i], driven).reshape(driven.shape[0], *g.latent)

    def prior_energy(lc: Any, r: Any, axes: Any) -> Any:
        return lc.alpha * jnp.sum(r * r if lc.prior == "gaussian" else jnp.log1p(r * r), axis=axes)

    def energy(first_target: Any, latents: Sequence[Any]) -> Any:
        """E per image: (B,) batched, () for one image."""
        axes = tuple(range(1, latents[0].ndim)) if batched else None
        total = 0.0
        lower = None
        for i, (lc, r) in enumerate(zip(config.levels, latents)):
            t = first_target if i == 0 else target(i, lower)
            a = predict(i, r)
            p = jnp.tanh(a) if lc.f == "tanh" else a
            e = t - p
            data_axes = tuple(range(1, e.ndim)) if batched else None
            total = total + jnp.sum(e * e, axis=data_axes) / lc.sigma2 + prior_energy(lc, r, axes)
            lower = r
        return total + decay

    def hand_gradient(first_target: Any, latents: Sequence[Any]) -> tuple[Any, list[Any]]:
        """(E per image, dE/dr_l) by MODEL.md section 2's formula:
        dE/dr_l = -(2/sigma_l^2) U_l^T (f' * e_{l-1}) + g_l'(r_l) + (2/sigma_{l+1}^2) t_{l+1}^T(e_l)."""
        axes = tuple(range(1, latents[0].ndim))
        errors, total, lower = [], 0.0, None
        for i, (lc, r) in enumerate(zip(config.levels, latents)):
            t = first_target if i == 0 else target(i, lower)
            a = predict(i, r)
            p = jnp.tanh(a) if lc.f == "tanh" else a
            e = t - p
            errors.append((e, e * (1 - p * p) if lc.f == "tanh" else e))  # (error, f' * error)
            total = total + jnp.sum(e * e, axis=tuple(range(1, e.ndim))) / lc.sigma2 + prior_energy(lc, r, axes)
            lower = r
        grads = []
        for i, (lc, r) in enumerate(zip(config.levels, latents)):
            grad = adjoint(i, errors[i][1]) * (-2 / lc.sigma2)
            if lc.alpha:
                grad = grad + (2 * lc.alpha) * (r if lc.prior == "gaussian" else r / (1 + r * r))
            if i + 1 < len(config.levels):
                above = 2 / config.levels[i + 1].sigma2
                grad = grad + above * target_adjoint(i + 1, errors[i + 1][0], r.shape)
            grads.append(grad)
        return total + decay, grads

    def initial(x: Any, first_target: Any) -> list[Any]:
        """The config's start: zeros, or feed-forward r_l = U_l^T t_l(r_{l-1}) bottom up (same layout as x)."""
        out = []
        lower = x
        for i, (lc, g) in enumerate(zip(config.levels, geoms)):
            shape = (x.shape[0], *g.latent) if batched else tuple(g.latent)
            if config.initial_latents == "zeros":
                r = jnp.zeros(shape, dtype=jnp.float32)
            elif lc.kind == "convolutional":
                lhs = lower if batched else lower[None]
                r = lax.conv_general_dilated(lhs, Us[i], tuple(g.stride), "VALID", dimension_numbers=dims)
                r = r if batched else r[0]
            else:
                t = first_target if i == 0 else target(i, lower)
                r = jnp.matmul(mats[i], t).reshape(shape)
            out.append(r)
            lower = r
        return out

    if variant == "quadratic":
        return _quadratic_inference(config, weights, hw, steps, unroll, initial, target, decay, rates)

    if variant == "hybrid":
        return _hybrid_inference(config, weights, hw, steps, unroll, initial, target, predict, decay, rates)

    if variant == "grad":

        def value_grad(first_target: Any, latents: list[Any]) -> tuple[Any, list[Any]]:
            def summed(rs: list[Any]) -> tuple[Any, Any]:
                e = energy(first_target, rs)
                return jnp.sum(e), e

            (_, per_image), grads = jax.value_and_grad(summed, has_aux=True)(latents)
            return per_image, grads

        energies = energy
    elif variant == "hand":
        value_grad = hand_gradient
        energies = energy
    else:
        value_grad = jax.vmap(jax.value_and_grad(energy, argnums=1))
        energies = jax.vmap(energy)

    @jax.jit
    def run(x: Any) -> tuple[list[Any], Any]:
        if batched:
            first_target = target(0, x)
            latents = initial(x, first_target)
        else:
            first_target = jax.vmap(lambda xi: target(0, xi))(x)
            latents = jax.vmap(initial)(x, first_target)
        trace = jnp.zeros((steps + 1, x.shape[0]), dtype=jnp.float32)

        def body(t: Any, carry: tuple[list[Any], Any]) -> tuple[list[Any], Any]:
            rs, tr = carry
            e, grads = value_grad(first_target, rs)
            return [r - rate * g for r, g, rate in zip(rs, grads, rates)], tr.at[t].set(e)

        latents, trace = lax.fori_loop(0, steps, body, (latents, trace), unroll=unroll)
        return latents, trace.at[steps].set(energies(first_target, latents))

    return run


def quadratic_forms(
    config: ModelConfig, weights: Sequence[torch.Tensor], input_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(H, Hzz): the Hessian of E's quadratic part, float64, from the torch reference energy by autograd.

    With every f the identity and the Cauchy priors left out, E - decay is a quadratic form in
    z = (r flattened level by level, x flattened): E = 1/2 z^T Hzz z. H = Hzz's latent block (Gaussian
    priors included); dE/dr = H r + Hzx x + g_cauchy'(r), i.e. b(x) = -Hzx x.
    """
    quadratic = dataclasses.replace(
        config,
        levels=tuple(
            dataclasses.replace(lc, alpha=0.0, lam=0.0) if lc.prior == "cauchy" else dataclasses.replace(lc, lam=0.0)
            for lc in config.levels
        ),
    )
    geoms = level_shapes(config, input_hw)
    sizes = [int(np.prod(g.latent)) for g in geoms]
    n = sum(sizes)
    w64 = [w.detach().cpu().double() for w in weights]
    x_shape = (1, config.input_shape[0], *input_hw)

    def e_of(z: torch.Tensor) -> torch.Tensor:
        parts = torch.split(z[:n], sizes)
        latents = [p.reshape(1, *g.latent) for p, g in zip(parts, geoms)]
        return reference_energy(quadratic, w64, z[n:].reshape(x_shape), latents)[0]

    z0 = torch.zeros(n + int(np.prod(x_shape)), dtype=torch.float64)
    hzz = torch.autograd.functional.hessian(e_of, z0, vectorize=True).numpy()  # one vmapped pass, not n
    return hzz[:n, :n], hzz


def _hybrid_inference(
    config: ModelConfig,
    weights: Sequence[torch.Tensor],
    hw: tuple[int, int],
    steps: int,
    unroll: int,
    initial: Callable[[Any, Any], list[Any]],
    target: Callable[[int, Any], Any],
    predict: Callable[[int, Any], Any],
    decay: float,
    rates: Sequence[float],
) -> JaxFn:
    """The "hybrid" variant, on flat latents (B, n_l): level 1's data term as 1/2 r1 H1 r1 - b1 r1 + E(0) (its
    Gram block, `_first_level_gram`), each level above through its own maps as matrices, P_l (n_l, n_t) and
    t_l as a per-entry weight where it is a weighted identity (a dense level over the whole map below) or a
    matrix T_l: e_l = r_{l-1} T_l - r_l P_l, dE/dr_l -= (2/sigma_l^2) e_l P_l^T, dE/dr_{l-1} += (2/sigma_l^2)
    e_l T_l^T. The Cauchy priors' gradients per step, as in "quadratic"."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    gram, to_b, half_xx = _first_level_gram(config, weights, hw)
    geoms = level_shapes(config, hw)
    shapes = [tuple(g.latent) for g in geoms]
    sizes = [int(np.prod(sh)) for sh in shapes]
    maps = []  # per level above the first: (P_l, t_l as a vector or None, T_l or None, 2 / sigma_l^2)
    for i in range(1, len(shapes)):
        P = np.asarray(predict(i, jnp.eye(sizes[i], dtype=jnp.float32).reshape(sizes[i], *shapes[i])))
        T = np.asarray(target(i, jnp.eye(sizes[i - 1], dtype=jnp.float32).reshape(sizes[i - 1], *shapes[i - 1])))
        P, T = P.reshape(sizes[i], -1), T.reshape(sizes[i - 1], -1)
        weighted_identity = T.shape[0] == T.shape[1] and not (T - np.diag(np.diag(T))).any()
        tvec = jnp.asarray(np.diag(T).copy()) if weighted_identity else None
        maps.append((jnp.asarray(P), tvec, None if weighted_identity else jnp.asarray(T), 2 / config.levels[i].sigma2))
    cauchy = [lc.alpha if lc.prior == "cauchy" else 0.0 for lc in config.levels]
    gaussian = [lc.alpha if lc.prior == "gaussian" and i > 0 else 0.0 for i, lc in enumerate(config.levels)]

    def value_grad(b1: Any, base: Any, rs: Sequence[Any]) -> tuple[Any, list[Any]]:
        h1 = gram(rs[0])
        grads = [h1 - b1, *(jnp.zeros_like(r) for r in rs[1:])]
        total = base + jnp.sum(rs[0] * (0.5 * h1 - b1), axis=1)
        for i, (P, tvec, T, w) in enumerate(maps, 1):
            lower = rs[i - 1] * tvec if T is None else rs[i - 1] @ T
            e = lower - rs[i] @ P
            grads[i] = grads[i] - w * (e @ P.T)
            grads[i - 1] = grads[i - 1] + w * (e * tvec if T is None else e @ T.T)
            total = total + 0.5 * w * jnp.sum(e * e, axis=1)
        for i, r in enumerate(rs):
            if cauchy[i]:
                grads[i] = grads[i] + (2 * cauchy[i]) * r / (1 + r * r)
                total = total + cauchy[i] * jnp.sum(jnp.log1p(r * r), axis=1)
            if gaussian[i]:  # level 1's is in H1
                grads[i] = grads[i] + (2 * gaussian[i]) * r
                total = total + gaussian[i] * jnp.sum(r * r, axis=1)
        return total + decay, grads

    @jax.jit
    def run(x: Any) -> tuple[list[Any], Any]:
        batch = x.shape[0]
        xf = x.reshape(batch, -1)
        b1 = xf @ to_b
        base = jnp.sum((xf @ half_xx) * xf, axis=1)
        rs = [r.reshape(batch, -1) for r in initial(x, target(0, x))]
        trace = jnp.zeros((steps + 1, batch), dtype=jnp.float32)

        def body(t: Any, carry: tuple[list[Any], Any]) -> tuple[list[Any], Any]:
            rs, tr = carry
            e, grads = value_grad(b1, base, rs)
            return [r - rate * g for r, rate, g in zip(rs, rates, grads)], tr.at[t].set(e)

        rs, trace = lax.fori_loop(0, steps, body, (rs, trace), unroll=unroll)
        last, _ = value_grad(b1, base, rs)
        return [r.reshape(batch, *sh) for r, sh in zip(rs, shapes)], trace.at[steps].set(last)

    return run


def _first_level_gram(
    config: ModelConfig, weights: Sequence[torch.Tensor], hw: tuple[int, int]
) -> tuple[Callable[[Any], Any], Any, Any]:
    """(r1 -> r1 H1 on flat r1, b's map (n_x, n1), E(0)'s form (n_x, n_x)) for level 1's data term and Gaussian prior
    alone, H1 by autograd from the torch reference energy of the one-level network (`quadratic_forms`).
    Where H1 couples no two positions of level 1's map (modules that do not overlap in what they predict),
    the product runs block by block: an einsum over positions of (causes x causes) blocks."""
    import jax.numpy as jnp

    first = dataclasses.replace(config, levels=config.levels[:1])
    H64, hzz = quadratic_forms(first, weights[:1], hw)
    n1 = H64.shape[0]
    causes, *grid = level_shapes(config, hw)[0].latent
    positions = int(np.prod(grid))
    blocks = H64.reshape(causes, positions, causes, positions)  # the latents are cause-major
    across = blocks.copy()
    for p in range(positions):
        across[:, p, :, p] = 0
    to_b = jnp.asarray((-hzz[n1:, :n1]).astype(np.float32))
    half_xx = jnp.asarray((0.5 * hzz[n1:, n1:]).astype(np.float32))
    if positions > 1 and not across.any():
        per_position = jnp.asarray(np.stack([blocks[:, p, :, p] for p in range(positions)]).astype(np.float32))

        def gram(r1: Any) -> Any:  # r1 flat (B, n1), cause-major
            blocked = r1.reshape(r1.shape[0], causes, positions)
            return jnp.einsum("bcp,pcd->bdp", blocked, per_position).reshape(r1.shape)

    else:
        dense = jnp.asarray(H64.astype(np.float32))

        def gram(r1: Any) -> Any:
            return r1 @ dense

    return gram, to_b, half_xx


def _quadratic_inference(
    config: ModelConfig,
    weights: Sequence[torch.Tensor],
    hw: tuple[int, int],
    steps: int,
    unroll: int,
    initial: Callable[[Any, Any], list[Any]],
    target: Callable[[int, Any], Any],
    decay: float,
    rates: Sequence[float],
) -> JaxFn:
    """The "quadratic" variant: r <- r - eta (r H - b(x) + g_cauchy'(r)), E = 1/2 z^T Hzz z + priors + decay."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    H64, hzz = quadratic_forms(config, weights, hw)
    geoms = level_shapes(config, hw)
    sizes = [int(np.prod(g.latent)) for g in geoms]
    n = sum(sizes)
    eta = np.concatenate([np.full(s, rate) for s, rate in zip(sizes, rates)])
    cauchy = np.concatenate(
        [np.full(s, lc.alpha if lc.prior == "cauchy" else 0.0) for s, lc in zip(sizes, config.levels)]
    )
    H = jnp.asarray(H64.astype(np.float32))  # symmetric: r H is (H r^T)^T
    to_b = jnp.asarray((-hzz[n:, :n]).astype(np.float32))  # (n_x, n): b = x_flat @ to_b
    half_xx = jnp.asarray((0.5 * hzz[n:, n:]).astype(np.float32))  # E(0, x) = x^T half_xx x
    eta_j, alpha_j = jnp.asarray(eta.astype(np.float32)), jnp.asarray(cauchy.astype(np.float32))
    has_cauchy = bool(cauchy.any())

    def prior(r: Any) -> Any:
        return jnp.sum(alpha_j * jnp.log1p(r * r), axis=1) if has_cauchy else 0.0

    @jax.jit
    def run(x: Any) -> tuple[list[Any], Any]:
        batch = x.shape[0]
        xf = x.reshape(batch, -1)
        b = xf @ to_b
        base = jnp.sum((xf @ half_xx) * xf, axis=1) + decay  # E at r = 0
        start = initial(x, target(0, x))
        r = jnp.concatenate([s.reshape(batch, -1) for s in start], axis=1)
        trace = jnp.zeros((steps + 1, batch), dtype=jnp.float32)

        def body(t: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            r, tr = carry
            h = r @ H
            e = base + jnp.sum(r * (0.5 * h - b), axis=1) + prior(r)
            grad = h - b
            if has_cauchy:
                grad = grad + 2 * alpha_j * r / (1 + r * r)
            return r - eta_j * grad, tr.at[t].set(e)

        r, trace = lax.fori_loop(0, steps, body, (r, trace), unroll=unroll)
        last = base + jnp.sum(r * (0.5 * (r @ H) - b), axis=1) + prior(r)
        parts = jnp.split(r, np.cumsum(sizes)[:-1].tolist(), axis=1)
        return [p.reshape(batch, *g.latent) for p, g in zip(parts, geoms)], trace.at[steps].set(last)

    return run


def _to_torch(values: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(values))


def jax_infer(
    model: Any, x: torch.Tensor, steps: int, variant: str = "grad"
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One inference with one JAX variant: (latents as torch tensors, energy (steps + 1, B))."""
    fn = build_inference(model.config, model.weights, x.shape[-2:], steps, variant)
    latents, trace = fn(x.detach().cpu().numpy().astype(np.float32))
    return [_to_torch(r) for r in latents], _to_torch(trace)


def compile_variants(
    model: Any, x: torch.Tensor, steps: int, variants: Sequence[str] | None = None
) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:
    """Every applicable variant jitted and run once on x: ({variant: call() -> (latents, trace)}, compile s)."""
    import jax

    xj = jax.device_put(np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32)))
    names = variants_for(model.config, x.shape[-2:]) if variants is None else tuple(variants)
    calls: dict[str, Callable[[], Any]] = {}
    compile_s: dict[str, float] = {}
    for name in names:
        start = time.perf_counter()
        fn = build_inference(model.config, model.weights, x.shape[-2:], steps, name)
        jax.block_until_ready(fn(xj))
        compile_s[name] = time.perf_counter() - start

        def call(fn: JaxFn = fn) -> Any:
            return jax.block_until_ready(fn(xj))

        calls[name] = call
    return calls, compile_s


def latents_of(call: Callable[[], Any]) -> Callable[[], list[torch.Tensor]]:
    """A variant's call returning only its latents, as torch tensors (what the benchmarks compare)."""

    def latents() -> list[torch.Tensor]:
        rs, _ = call()
        return [_to_torch(r) for r in rs]

    return latents


def jax_runner(
    model: Any, x: torch.Tensor, steps: int, variant: str | None = None, rounds: int = 3, min_time: float = 0.1
) -> tuple[Callable[[], list[torch.Tensor]], dict[str, Any]]:
    """The strongest JAX as a timed case: (call() -> latents as torch tensors, info).

    With variant None every applicable variant is compiled and timed (median of `rounds` interleaved
    samples) and the fastest is kept; info has the winner, every variant's ms, the compile times and XLA_FLAGS.
    """
    import jax

    calls, compile_s = compile_variants(model, x, steps, None if variant is None else [variant])
    info: dict[str, Any] = {
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compile_s": compile_s,
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    if len(calls) > 1:
        for _ in range(rounds):
            for name, call in calls.items():
                samples[name].append(time_call(call, min_time))
    ms = {n: 1e3 * float(np.median(s)) for n, s in samples.items() if s}
    best = min(calls, key=lambda n: ms.get(n, 0.0))
    info["variant"] = best
    info["prepare_ms"] = ms
    return latents_of(calls[best]), info
