"""The JAX-jit peer: the same network, weights and energy written independently in jax.numpy.

Nothing here comes from pcmodel's hand-derived updates or plans: the energy is built from the config
the way pcmodel/reference.py builds it in torch (convolutional levels through a transposed
convolution, module and dense levels through patches with the optional Gaussian window, tanh or
identity f, Gaussian or Cauchy priors, lam weight decay), and inference is `lax.fori_loop` over
r_l <- r_l - (k1 k1_scale_l / 2) jax.grad(E)(r)_l from the config's initial latents, all inside one `jax.jit`.

Two formulations of the same mathematics:

- "batched": E summed over the batch, differentiated once (jax.value_and_grad of the sum);
- "vmap": the energy of ONE image (no batch axis: module levels are U^T r matrix products), its
  gradient `jax.vmap`'d over the batch, the way equinox / pcx code is written.

`jax_runner` compiles both, times them and keeps the faster one (`info["formulation"]`).

Threads: XLA sizes its CPU thread pools when jax is imported, so the thread count is a property of
the process. `configure_threads(n)` must run before the first `import jax`; it sets
XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" for n = 1 (XLA then
runs every op on the calling thread) and "--xla_cpu_multi_thread_eigen=true
intra_op_parallelism_threads=n" otherwise. To compare thread counts, run separate processes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from benchmarks.timing import time_call
from pcmodel.config import ModelConfig, level_shapes

FORMULATIONS = ("batched", "vmap")


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


def _window(kernel: Sequence[int], sigma: float, channels: int) -> np.ndarray:
    """The Gaussian window per patch entry, channel-major like F.unfold: (D,)."""
    ys = np.arange(kernel[0], dtype=np.float64) - (kernel[0] - 1) / 2
    xs = np.arange(kernel[1], dtype=np.float64) - (kernel[1] - 1) / 2
    w = np.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))
    return np.tile(w.ravel(), channels).astype(np.float32)


def build_inference(
    config: ModelConfig, weights: Sequence[torch.Tensor], input_hw: Sequence[int], steps: int, formulation: str
) -> Callable[[Any], tuple[list[Any], Any]]:
    """A jitted function x (B, C, H, W) -> (latents [(B, causes, H_l, W_l)], energy (steps + 1, B))."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; choose one of {FORMULATIONS}")
    batched = formulation == "batched"
    geoms = level_shapes(config, (int(input_hw[0]), int(input_hw[1])))
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

    def predict(i: int, r: Any) -> Any:
        """U_l r_l before f, in the level's target space."""
        g = geoms[i]
        if config.levels[i].kind == "convolutional":
            lhs = r if batched else r[None]
            a = lax.conv_transpose(lhs, Us[i], tuple(g.stride), "VALID", dimension_numbers=dims, transpose_kernel=True)
            return a if batched else a[0]
        if batched:
            return jnp.matmul(mats[i].T, r.reshape(r.shape[0], r.shape[1], -1))  # (D, C) @ (B, C, M)
        return mats[i].T @ r.reshape(r.shape[0], -1)  # (D, C) @ (C, M)

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
            total = total + jnp.sum(e * e, axis=data_axes) / lc.sigma2
            prior = r * r if lc.prior == "gaussian" else jnp.log1p(r * r)
            total = total + lc.alpha * jnp.sum(prior, axis=axes)
            lower = r
        return total + decay

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

    if batched:

        def value_grad(first_target: Any, latents: list[Any]) -> tuple[Any, list[Any]]:
            def summed(rs: list[Any]) -> tuple[Any, Any]:
                e = energy(first_target, rs)
                return jnp.sum(e), e

            (_, per_image), grads = jax.value_and_grad(summed, has_aux=True)(latents)
            return per_image, grads

        def energies(first_target: Any, latents: list[Any]) -> Any:
            return energy(first_target, latents)
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

        latents, trace = lax.fori_loop(0, steps, body, (latents, trace))
        return latents, trace.at[steps].set(energies(first_target, latents))

    return run


def _to_torch(values: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(values))


def jax_infer(
    model: Any, x: torch.Tensor, steps: int, formulation: str = "batched"
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One inference with the JAX peer: (latents as torch tensors, energy (steps + 1, B))."""
    fn = build_inference(model.config, model.weights, x.shape[-2:], steps, formulation)
    latents, trace = fn(x.detach().cpu().numpy().astype(np.float32))
    return [_to_torch(r) for r in latents], _to_torch(trace)


def jax_runner(
    model: Any, x: torch.Tensor, steps: int, formulation: str | None = None, rounds: int = 3
) -> tuple[Callable[[], list[torch.Tensor]], dict[str, Any]]:
    """The peer as a timed case: (call() -> latents as torch tensors, info).

    With formulation None both are compiled and timed (best of `rounds` interleaved samples) and the
    faster one is kept; info has the choice, both timings, the compile times and XLA_FLAGS.
    """
    import jax

    xj = jax.device_put(np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32)))
    names = FORMULATIONS if formulation is None else (formulation,)
    compiled: dict[str, Callable[[], Any]] = {}
    info: dict[str, Any] = {"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "compile_s": {}}
    for name in names:
        fn = build_inference(model.config, model.weights, x.shape[-2:], steps, name)
        start = time.perf_counter()
        jax.block_until_ready(fn(xj))
        info["compile_s"][name] = time.perf_counter() - start

        def call(fn: Callable[[Any], Any] = fn) -> Any:
            return jax.block_until_ready(fn(xj))

        compiled[name] = call
    samples: dict[str, list[float]] = {name: [] for name in names}
    if len(names) > 1:
        for _ in range(rounds):
            for name in names:
                samples[name].append(time_call(compiled[name], 0.1))
    best = min(names, key=lambda n: min(samples[n]) if samples[n] else 0.0)
    info["formulation"] = best
    info["prepare_ms"] = {n: 1e3 * min(s) for n, s in samples.items() if s}
    chosen = compiled[best]

    def latents() -> list[torch.Tensor]:
        rs, _ = chosen()
        return [_to_torch(r) for r in rs]

    return latents, info
