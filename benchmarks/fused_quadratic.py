"""A fused CPU kernel for the quadratic plan: all T steps of one image in one compiled loop (prototype).

The quadratic program (pcmodel.engines.program) runs s <- s M_s + c_s - s / (qinv + s^2) as a few
torch operations per step, and as ~6 onnxruntime kernels per step; with n ~ 200 latents the per-operation overhead
dominates. Here the whole recurrence, for every image, is one numba-compiled function over numpy
arrays:

    z_t = c + s_t M                                (drives)
    s_{t+1} = z_t - s_t / (qinv + s_t^2)           (has_cauchy; otherwise s_{t+1} = z_t)

The matmul is written as a row loop, z[j] += s[i] * M[i, j] for i = 0..n-1 in order (four i per pass
over z, the same order), vectorised over j, with no reassociation (fast-math off except, by default,
FMA contraction), so every image's arithmetic is the same sequence of IEEE operations whatever the
batch, the image's neighbours or the thread that runs it: results are batch-invariant bit for bit.
Each image runs through all T steps at once with M (n x n, ~200 KB) in L2; with `threads` > 1 the batch
is split into contiguous row ranges run at once (the kernel releases the GIL).

numba is optional: `available()` says whether it imports; nothing here needs a compiler at build or
install time (numba ships LLVM in its llvmlite wheel). The first call per dtype compiles (`warm_up`).
`run_fused_quadratic(plan, x, steps)` is the engine-facing adapter: an `EngineRun` like
the quadratic program, the energy trace computed from the history as there.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from pcmodel.engines.plans import QuadraticPlan

FMA = True  # the default: LLVM may contract a*b + c into one FMA (still batch-invariant; see _kernels)


@functools.cache
def _kernels(fma: bool) -> Any:
    """The compiled kernels (numba imported and the functions compiled lazily, on first use).

    fma=False: no fast-math at all (every product rounded, then added). fma=True: only LLVM's
    `contract` flag, so a*b + c may become one fused multiply-add (one rounding): still the same
    operations for every image, hence just as batch-invariant and deterministic, and about twice as fast.
    """
    from numba import njit

    flags: Any = {"contract"} if fma else False

    @njit(cache=False, fastmath=flags, nogil=True, boundscheck=False)
    def row_times(v, m, o):  # pragma: no cover - compiled
        """o = v @ m for one row, summed over k in order; 4 rows of m per pass (same order, fewer stores)."""
        n, k_total = m.shape[1], m.shape[0]
        for j in range(n):
            o[j] = 0.0
        k = 0
        while k + 4 <= k_total:
            v0, v1, v2, v3 = v[k], v[k + 1], v[k + 2], v[k + 3]
            m0, m1, m2, m3 = m[k], m[k + 1], m[k + 2], m[k + 3]
            for j in range(n):
                o[j] = (((o[j] + v0 * m0[j]) + v1 * m1[j]) + v2 * m2[j]) + v3 * m3[j]
            k += 4
        while k < k_total:
            v0, m0 = v[k], m[k]
            for j in range(n):
                o[j] = o[j] + v0 * m0[j]
            k += 1

    @njit(cache=False, fastmath=flags, nogil=True, boundscheck=False)
    def rowwise_matmul(a, m, out, lo, hi):  # pragma: no cover - compiled
        """out[b] = a[b] @ m for rows lo..hi-1 (batch-invariant)."""
        for b in range(lo, hi):
            row_times(a[b], m, out[b])

    @njit(cache=False, fastmath=flags, nogil=True, boundscheck=False)
    def steps_rows(m, c, qinv, steps, has_cauchy, states, drives, lo, hi):  # pragma: no cover - compiled
        """The recurrence for rows lo..hi-1, one row at a time through all steps; states[0] holds s_0."""
        n = m.shape[0]
        for b in range(lo, hi):
            cb = c[b]
            for t in range(steps + 1):
                s = states[t, b]
                z = drives[t, b]
                row_times(s, m, z)
                for j in range(n):
                    z[j] = cb[j] + z[j]
                if t == steps:
                    break
                nxt = states[t + 1, b]
                if has_cauchy:
                    for j in range(n):
                        nxt[j] = z[j] - s[j] / (qinv[j] + s[j] * s[j])
                else:
                    for j in range(n):
                        nxt[j] = z[j]

    @njit(cache=False, fastmath=flags, nogil=True, boundscheck=False)
    def energy_rows(states, drives, c, weight, logs, alpha, base, has_cauchy, out, lo, hi):  # pragma: no cover
        """out[t, b] = base[b] + sum_i weight_i s_i (s_i - z_i - c_i) [+ sum_i alpha_i logs_i].

        Sums in 8 interleaved partial sums (i mod 8), then added in a fixed order: same order for every image.
        """
        n = states.shape[2]
        part = np.empty(8, dtype=states.dtype)
        for b in range(lo, hi):
            cb = c[b]
            for t in range(states.shape[0]):
                s = states[t, b]
                z = drives[t, b]
                part[:] = 0.0
                for i in range(n):
                    term = weight[i] * (s[i] * (s[i] - z[i] - cb[i]))
                    if has_cauchy:
                        term = term + alpha[i] * logs[t, b, i]
                    part[i % 8] += term
                total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))
                out[t, b] = base[b] + total

    return rowwise_matmul, steps_rows, energy_rows


def available() -> bool:
    """Whether numba imports (the fused kernel can run)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="pcmodel-fused")


def _split(batch: int, threads: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, one per thread (at most one per image)."""
    parts = max(1, min(threads, batch))
    edges = [round(i * batch / parts) for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in itertools.pairwise(edges) if hi > lo]


def _parallel(fn: Any, batch: int, threads: int, *args: Any) -> None:
    ranges = _split(batch, threads)
    if len(ranges) == 1:
        fn(*args, 0, batch)
        return
    pending = [_pool(len(ranges) - 1).submit(fn, *args, lo, hi) for lo, hi in ranges[1:]]
    fn(*args, *ranges[0])  # the first range on the calling thread
    for f in pending:
        f.result()


def rowwise_matmul(a: np.ndarray, m: np.ndarray, threads: int = 1, fma: bool = FMA) -> np.ndarray:
    """a @ m with every row of the result computed on its own, in a fixed order (batch-invariant)."""
    mm, _, _ = _kernels(fma)
    a = np.ascontiguousarray(a, dtype=m.dtype)
    out = np.empty((a.shape[0], m.shape[1]), dtype=m.dtype)
    _parallel(mm, a.shape[0], threads, a, np.ascontiguousarray(m), out)
    return out


def quadratic_steps(
    step: np.ndarray,
    c: np.ndarray,
    s0: np.ndarray | None,
    qinv: np.ndarray,
    steps: int,
    has_cauchy: bool | None = None,
    threads: int = 1,
    fma: bool = FMA,
) -> tuple[np.ndarray, np.ndarray]:
    """`steps` steps of the quadratic plan's recurrence: (states (T+1, B, n), drives (T+1, B, n)).

    step: M_s (n, n); c: c_s (B, n); s0: the start (B, n) or None for zeros; qinv: (n,) 1/kappa on
    Cauchy entries, +inf elsewhere. has_cauchy None: any finite qinv. All arrays take step's dtype.
    """
    _, run, _ = _kernels(fma)
    dtype = step.dtype
    step = np.ascontiguousarray(step)
    c = np.ascontiguousarray(c, dtype=dtype)
    qinv = np.ascontiguousarray(qinv, dtype=dtype)
    batch, n = c.shape
    if has_cauchy is None:
        has_cauchy = bool(np.isfinite(qinv).any())
    states = np.empty((steps + 1, batch, n), dtype=dtype)
    drives = np.empty((steps + 1, batch, n), dtype=dtype)
    if s0 is None:
        states[0] = 0
    else:
        states[0] = s0
    _parallel(run, batch, threads, step, c, qinv, int(steps), bool(has_cauchy), states, drives)
    return states, drives


def warm_up(dtype: Any = np.float32, fma: bool = FMA) -> float:
    """Compile the kernels for dtype now; returns the seconds it took (~0 after the first time)."""
    start = time.perf_counter()
    n = 3
    m = np.eye(n, dtype=dtype)
    quadratic_steps(m, np.ones((1, n), dtype), None, np.full(n, np.inf, dtype), 1, fma=fma)
    rowwise_matmul(np.ones((1, n), dtype), m, fma=fma)
    return time.perf_counter() - start


def run_fused_quadratic(
    plan: QuadraticPlan, x: torch.Tensor, steps: int, threads: int | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Latents and the energy trace (steps + 1, B) of the quadratic program, on the fused kernel.

    CPU, float32 or float64, fixed steps (no tol). c = x B_s, s_0 = x start and the energy trace (from the
    (s, z) history, the formula of run_quadratic, summed in order per image) are row-wise too, so an image's
    latents and energies do not depend on its batch. No torch operation runs (torch's thread pool is not used).
    """
    import torch

    if threads is None:
        threads = torch.get_num_threads()
    batch = x.shape[0]
    xf = x.detach().reshape(batch, -1).contiguous().numpy()
    step = plan.step.numpy()
    c = rowwise_matmul(xf, plan.drive.numpy(), threads)
    s0 = None if plan.start is None else rowwise_matmul(xf, plan.start.numpy(), threads)
    states_np, drives_np = quadratic_steps(step, c, s0, plan.qinv.numpy(), steps, plan.has_cauchy, threads)
    # Everything after the kernel in numpy (single-threaded): torch ops with 2 threads wait at a barrier
    # each, which on a loaded machine costs more than the kernel itself. log1p is numpy's SIMD loop (one
    # code path for every entry), the sums per image in the kernel.
    scale2 = plan.scale.square().numpy()
    weight = plan.energy_weight.numpy()
    omega = np.ascontiguousarray(plan.omega.numpy()[:, None])
    base = rowwise_matmul(np.square(xf), omega, threads)[:, 0] + plan.const.numpy()
    logs = np.log1p(np.square(states_np) * scale2) if plan.has_cauchy else states_np
    energy_np = np.empty((steps + 1, batch), dtype=step.dtype)
    _, _, energy_rows = _kernels(FMA)
    args = (states_np, drives_np, c, weight, logs, plan.cauchy_alpha.numpy(), base, plan.has_cauchy)
    _parallel(energy_rows, batch, threads, *args, energy_np)
    final_np = states_np[steps] * plan.scale.numpy()
    sizes = [math.prod(s) for s in plan.shapes]
    parts = np.split(final_np, np.cumsum(sizes)[:-1], axis=1)
    latents = [torch.from_numpy(np.ascontiguousarray(p).reshape(batch, *s)) for p, s in zip(parts, plan.shapes)]
    return latents, torch.from_numpy(energy_np)
