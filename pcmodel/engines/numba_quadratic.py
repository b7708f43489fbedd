"""The numba backend: the quadratic program's T steps for each image in one compiled loop (CPU, optional).

For the quadratic plan with the Cauchy prior (or none), a step is s <- s M_s + c_s - s / (qinv + s^2)
(pcmodel.priors.Cauchy.quadratic_step, run by pcmodel.engines.program), written again in the kernel: one
small matrix-vector product and a few elementwise operations, so as separate kernels (onnxruntime:
~6 per step) the per-kernel overhead dominates. Here the steps of every image run in one
numba-compiled call per chunk of steps, with M (n x n, ~200 KB) in cache. It is the same recurrence
as the program, held to the plain loop by the tests; the plan it reads is derived from the definition
as for the others.

The energy of every step needs each step's state and drive; they are kept for one chunk of steps at a
time (`settle`: ~256 KB per buffer, in cache), so memory does not grow with T (the full history of
1,000 images x 5,000 steps was ~18 GB) and a chunk's energy is computed while it is in cache.

Bit-for-bit batch invariance: each element of a step's product is fma(s_k, M_kj, acc) for k = 0, 1, ...
in order from acc = 0 (explicit FMAs, numba_kernels), then z = c + acc and the next state from z. Eight
images are computed together (`_rows8`: an 8 x 32 block of the product held in registers over all k,
each row of M loaded once for the eight), the rest one at a time (`_row64`, `_row32`), every element
with exactly the operations it gets alone, so an image's result never depends on its neighbours, the
batch size or the thread that runs it. The energy sums its terms in 16 lanes and the lanes in a fixed
order, the same for every image. The latents are padded to a multiple of 32 (zero columns of M; for
n = 224 none). With several threads the batch is split into row ranges (multiples of 8 where the batch
allows), each thread running its rows through every chunk of steps on its own.

numba is optional (the `fast` extra): nothing needs a compiler at build or install time (numba ships
LLVM in its llvmlite wheel). The kernels compile on first use (~4 s; cached on disk afterwards).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..results import EngineRun
from ..solvers import GRADIENT, Solver
from .base import BackendSpec
from .plans import Plan, QuadraticPlan


@functools.cache
def available() -> bool:
    """Whether numba is installed (the backend can run); does not import it (that takes ~0.5 s)."""
    return importlib.util.find_spec("numba") is not None


@functools.cache
def _kernels() -> tuple[Any, Any, Any, Any]:
    """The compiled kernels (numba imported lazily, on first use; compiled once and cached on disk)."""
    from .numba_kernels import energy_rows, gather_rows, matmul_rows, steps_rows

    return matmul_rows, steps_rows, energy_rows, gather_rows


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="pcmodel-numba")


def _parallel(fn: Any, batch: int, threads: int, *args: Any, align: int = 1) -> None:
    """fn(*args, lo, hi) over contiguous row ranges, one per thread (the kernels release the GIL); the
    ranges start at multiples of `align` where the batch has that many rows per thread."""
    if threads <= 1 or batch <= 1:
        fn(*args, 0, batch)
        return
    parts = min(threads, batch)
    align = align if batch >= align * parts else 1
    edges = [min(batch, align * round(i * batch / parts / align)) for i in range(parts + 1)]
    ranges = [(lo, hi) for lo, hi in itertools.pairwise(edges) if hi > lo]
    if len(ranges) == 1:
        fn(*args, 0, batch)
        return
    pending = [_pool(len(ranges) - 1).submit(fn, *args, lo, hi) for lo, hi in ranges[1:]]
    fn(*args, *ranges[0])
    for f in pending:
        f.result()


def matmul(a: np.ndarray, m: np.ndarray, threads: int = 1) -> np.ndarray:
    """a @ m, every row of the result computed on its own in a fixed order (batch-invariant)."""
    a = np.ascontiguousarray(a, dtype=m.dtype)
    out = np.empty((a.shape[0], m.shape[1]), dtype=m.dtype)
    _parallel(_kernels()[0], a.shape[0], threads, a, np.ascontiguousarray(m), out)
    return out


CHUNK_ENTRIES = 1 << 16  # steps x images x latents kept at a time (256 KB per float32 buffer, in cache)


def chunk_steps(batch: int, n: int) -> int:
    """Steps per chunk: memory bounded whatever T, and few enough chunks that their calls cost nothing."""
    return max(8, CHUNK_ENTRIES // max(batch * n, 1))


def quadratic_steps(
    step: np.ndarray,
    c: np.ndarray,
    s0: np.ndarray | None,
    qinv: np.ndarray,
    steps: int,
    threads: int = 1,
    solver: Solver = GRADIENT,
) -> tuple[np.ndarray, np.ndarray]:
    """`steps` steps of the recurrence: (states (T+1, B, n), drives (T+1, B, n)); s0 None starts at zeros.

    The whole history, for the tests and the compile in `prepare`; `settle` (what `run` uses) keeps one
    chunk of steps at a time.
    """
    m, cp, qp = _step_args(step, c, qinv)
    batch, n = c.shape
    states = np.zeros((steps + 1, batch, m.shape[1]), dtype=m.dtype)
    drives = np.empty((steps + 1, batch, m.shape[1]), dtype=m.dtype)
    if s0 is not None:
        states[0, :, :n] = s0
    moves = _solver_args(solver, batch, m.shape[1], m.dtype)
    _parallel(_kernels()[1], batch, threads, m, cp, qp, steps + 1, True, states, drives, *moves, align=8)
    return states[..., :n], drives[..., :n]


def _solver_args(solver: Solver, batch: int, width: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """The step kernel's solver arguments: the velocity (zeros, rows like the states), beta in 16 lanes, the mode."""
    return np.zeros((batch, width), dtype=dtype), np.full(16, solver.momentum, dtype=dtype), solver.kernel_mode


def padded(n: int) -> int:
    """n rounded up to the step kernel's block of columns (32)."""
    return -(-n // 32) * 32


def _step_args(step: np.ndarray, c: np.ndarray, qinv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The step kernel's leading arguments (M, c, qinv), contiguous, their columns padded to `padded(n)`
    (M's and c's with zeros, qinv's with inf: the padding's states and drives stay 0)."""
    n = step.shape[1]
    width = padded(n)
    m = np.zeros((n, width), dtype=step.dtype)
    m[:, :n] = step
    cp = np.zeros((c.shape[0], width), dtype=step.dtype)
    cp[:, :n] = c
    qp = np.full(width, np.inf, dtype=step.dtype)
    qp[:n] = qinv
    return m, cp, qp


def settle(
    t: dict[str, np.ndarray],
    c: np.ndarray,
    s0: np.ndarray | None,
    base: np.ndarray,
    steps: int,
    threads: int,
    solver: Solver = GRADIENT,
) -> tuple[np.ndarray, np.ndarray]:
    """The recurrence's T steps and the energy of each: (s_T (B, n), energy (T+1, B)).

    Runs in chunks of steps, keeping only a chunk's states and drives (memory does not grow with T):
    per chunk the compiled steps, then the energy kernel; the last state
    carries over. Each step's arithmetic is the same whatever the chunking, so the result is too.
    """
    batch, n = c.shape
    p = _padded_arrays(t)
    width = p["step"].shape[1]
    dtype = p["step"].dtype
    cp = np.zeros((batch, width), dtype=dtype)
    cp[:, :n] = c
    chunk = min(steps + 1, chunk_steps(batch, width))
    states = np.zeros((chunk + 1, batch, width), dtype=dtype)  # s_t0 .. s_t0+chunk
    drives = np.empty((chunk, batch, width), dtype=dtype)
    energy = np.empty((steps + 1, batch), dtype=dtype)
    if s0 is not None:
        states[0, :, :n] = s0
    buffers = (cp, base, states, drives, energy, steps, chunk, _solver_args(solver, batch, width, dtype))
    _parallel(_settle_rows, batch, threads, p, *buffers, align=8)
    return states[(steps + 1 - 1) % chunk, :, :n].copy(), energy


def _settle_rows(
    p: dict[str, Any],
    c: np.ndarray,
    base: np.ndarray,
    states: np.ndarray,
    drives: np.ndarray,
    energy: np.ndarray,
    steps: int,
    chunk: int,
    moves: tuple[np.ndarray, np.ndarray, int],
    lo: int,
    hi: int,
) -> None:
    """`settle` for rows lo..hi-1 (one thread's rows; rows do not depend on each other, so the threads
    never wait for each other): per chunk the compiled steps, then the energy kernel."""
    step_kernel, energy_kernel = _kernels()[1:3]
    rows = slice(lo, hi)
    for t0 in range(0, steps + 1, chunk):
        count = min(chunk, steps + 1 - t0)
        last = t0 + count == steps + 1
        step_kernel(p["step"], c, p["qinv"], count, last, states, drives, *moves, lo, hi)
        history = (states[:count], drives[:count], c, p["energy_weight"], p["scale2"], p["segments"])
        energy_kernel(*history, base, energy[t0 : t0 + count], lo, hi)
        if not last:
            states[0, rows] = states[count, rows]


def _padded_arrays(t: dict[str, Any]) -> dict[str, Any]:
    """The step and energy kernels' arrays, their latents padded to `padded(n)` (made once per plan's arrays:
    M's columns and the weights with zeros, qinv with inf, as in `_step_args`)."""
    if "padded" not in t:
        m, _, qinv = _step_args(t["step"], t["step"][:0], t["qinv"])
        p: dict[str, Any] = {"step": m, "qinv": qinv}
        for name in ("scale2", "energy_weight"):
            p[name] = np.zeros(m.shape[1], dtype=m.dtype)
            p[name][: m.shape[0]] = t[name]
        p["segments"] = _segments(t["prior_alpha"]) if np.isfinite(t["qinv"]).any() else np.zeros((0, 3))
        t["padded"] = p
    return t["padded"]


def _segments(alpha: np.ndarray) -> np.ndarray:
    """The runs of latents sharing one nonzero prior weight alpha: rows (start, end, alpha), float64 (the
    energy kernel sums each run's log(1 + scale2 s^2) as one product)."""
    edges = [0, *(np.flatnonzero(np.diff(alpha)) + 1).tolist(), len(alpha)]
    runs = [(lo, hi, float(alpha[lo])) for lo, hi in itertools.pairwise(edges) if alpha[lo] != 0]
    return np.array(runs, dtype=np.float64).reshape(-1, 3)


def arrays(plan: QuadraticPlan) -> dict[str, np.ndarray]:
    """The plan's tensors as numpy arrays, once per plan.

    A level's target map t_l (rows: the map below, columns: the target space) has at most one entry per
    column for every level kind (the map itself, or its windowed patches): it is kept as a gather
    (`target_source{i}`, `target_weight{i}`) instead of a dense matmul where it has that form.
    """
    t = {name: np.ascontiguousarray(v.detach().cpu().numpy()) for name, v in plan.tensors().items()}
    # The kernel's step is the Cauchy prior's (module docstring); with no prior, 1/kappa = inf: s / q = 0.
    t["qinv"] = t.get("prior_qinv", np.full(plan.size, np.inf, dtype=t["step"].dtype))
    for i in range(len(plan.shapes)):
        target = t[f"target_map{i}"]
        if (np.count_nonzero(target, axis=0) <= 1).all():
            t[f"target_source{i}"] = np.ascontiguousarray(np.argmax(target != 0, axis=0).astype(np.int64))
            t[f"target_weight{i}"] = np.ascontiguousarray(target.max(axis=0) + target.min(axis=0))  # the entry
    t["inputs"] = np.ascontiguousarray(
        t["drive"] if plan.start is None else np.concatenate([t["drive"], t["start"]], axis=1)
    )
    n1 = math.prod(plan.shapes[0])
    t["reconstruct_1"] = np.ascontiguousarray(t["reconstruct"][:n1])  # only level 1 predicts the image
    t["scale2"] = np.square(t["scale"])
    return t


def _target(t: dict[str, np.ndarray], i: int, lower: np.ndarray, threads: int) -> np.ndarray:
    """lower_l t_l: a gather where the map has one entry per column, else a matmul."""
    if f"target_source{i}" not in t:
        return matmul(lower, t[f"target_map{i}"], threads)
    source = t[f"target_source{i}"]
    out = np.empty((lower.shape[0], source.shape[0]), dtype=lower.dtype)
    _parallel(_kernels()[3], lower.shape[0], threads, np.ascontiguousarray(lower), source, t[f"target_weight{i}"], out)
    return out


def run(
    plan: QuadraticPlan,
    x: torch.Tensor,
    steps: int,
    threads: int,
    t: dict | None = None,
    r0: Sequence[torch.Tensor] | None = None,
    solver: Solver = GRADIENT,
) -> EngineRun:
    """The quadratic program (latents, energy, final predictions and errors) on the compiled kernels,
    from r0 (or the config's start). `t`: the plan's `arrays` where the caller keeps them (made here otherwise).
    """
    batch = x.shape[0]
    xf = x.detach().reshape(batch, -1).contiguous().numpy()
    t = arrays(plan) if t is None else t
    n = t["step"].shape[0]
    driven = matmul(xf, t["inputs"], threads)  # c (and s_0 for feed-forward starts)
    c = np.ascontiguousarray(driven[:, :n])
    s0 = None if plan.start is None else driven[:, n:]
    if r0 is not None:  # s_0 = r_0 / k, as the program computes it
        flat = np.concatenate([r.detach().to(torch.float32).reshape(batch, -1).numpy() for r in r0], axis=1)
        s0 = np.ascontiguousarray(flat * t["unscale"])
    # The energy of every step (the program's formula), per image in a fixed order.
    base = matmul(np.square(xf), np.ascontiguousarray(t["omega"][:, None]), threads)[:, 0] + t["const"]
    last, energy = settle(t, c, s0, base, steps, threads, solver)
    latent = last * t["scale"]
    sizes = [math.prod(s) for s in plan.shapes]
    flats = np.split(latent, np.cumsum(sizes)[:-1], axis=1)
    lowers = [xf, *flats[:-1]]
    predictions, errors = [], []
    for i, (r, lower, shape) in enumerate(zip(flats, lowers, plan.target_shapes)):
        p = matmul(r, t[f"predict_map{i}"], threads)
        e = _target(t, i, lower, threads) - p
        predictions.append(torch.from_numpy(p.reshape(batch, *shape)))
        errors.append(torch.from_numpy(e.reshape(batch, *shape)))
    reconstruction = matmul(last[:, : sizes[0]], t["reconstruct_1"], threads).reshape(batch, *plan.input_shape)
    return EngineRun(
        latents=[torch.from_numpy(np.ascontiguousarray(r).reshape(batch, *s)) for r, s in zip(flats, plan.shapes)],
        energy=torch.from_numpy(energy),
        predictions=predictions,
        errors=errors,
        reconstruction=torch.from_numpy(reconstruction),
    )


class NumbaBackend:
    name = "numba"

    def __init__(self) -> None:
        self.prepare_seconds: dict[str, float] = {}
        self.arrays: tuple[Plan, dict[str, np.ndarray]] | None = None  # the last plan's arrays

    def prepare(
        self, plan: Plan, steps: int, shape: tuple[int, ...], key: tuple, init: bool = False, solver: Solver = GRADIENT
    ) -> None:
        """Compile the kernels (once per process; from the disk cache after the first time)."""
        start = time.perf_counter()
        _kernels()
        m = np.eye(5, dtype=np.float32)
        for rows in (1, 8):  # both kernels
            quadratic_steps(m, np.ones((rows, 5), np.float32), None, np.full(5, 4.0, np.float32), 1)
        self.prepare_seconds.setdefault("numba compile", time.perf_counter() - start)

    def run(
        self,
        plan: Plan,
        x: torch.Tensor,
        steps: int,
        key: tuple,
        r0: Sequence[torch.Tensor] | None = None,
        solver: Solver = GRADIENT,
    ) -> EngineRun:
        assert isinstance(plan, QuadraticPlan), "the numba backend runs quadratic plans only"
        if self.arrays is None or self.arrays[0] is not plan:
            self.arrays = (plan, arrays(plan))  # a new plan: new weights or another input size
        return run(plan, x, steps, torch.get_num_threads(), self.arrays[1], r0, solver)


SPEC = BackendSpec(
    name="numba",
    factory=NumbaBackend,
    devices=("cpu",),
    plans=("quadratic",),
    builds=True,
    available=available,
    priors=("cauchy",),  # the kernel writes the Cauchy prior's step (module docstring)
    install="numba installed (pip install 'predictive-coding[fast]')",
    plan_note="linear f, few latents",
)
