"""The numba backend: the quadratic program's T steps for each image in one compiled loop (CPU, optional).

For the quadratic plan a step is s <- s M_s + c_s - s / (qinv + s^2) (pcmodel.engines.program): one
small matrix-vector product and a few elementwise operations, so as separate kernels (onnxruntime:
~6 per step) the per-kernel overhead dominates. Here every step of every image runs in one
numba-compiled function with M (n x n, ~200 KB) in cache. It is the same recurrence as the program,
held to the plain loop by the tests; the plan it reads is derived from the definition as for the others.

Bit-for-bit batch invariance: each output element is summed over i in order, four i per pass,
(((o + v0 m0) + v1 m1) + v2 m2) + v3 m3, vectorised over j, with no reassociation (LLVM may only
contract a*b + c into one FMA). Four images are processed together to reuse each loaded row of M, each
with exactly the expression it gets alone, so an image's result never depends on its neighbours, the
batch size or the thread that runs it. With several threads the batch is split into row ranges.

numba is optional (the `fast` extra): nothing needs a compiler at build or install time (numba ships
LLVM in its llvmlite wheel). The kernels compile on first use (~4 s; cached on disk afterwards).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .base import EngineRun
from .plans import Plan, QuadraticPlan


@functools.cache
def available() -> bool:
    """Whether numba is installed (the backend can run); does not import it (that takes ~0.5 s)."""
    return importlib.util.find_spec("numba") is not None


@functools.cache
def _kernels() -> tuple[Any, Any, Any]:
    """The compiled kernels (numba imported lazily, on first use; compiled once and cached on disk)."""
    from . import numba_kernels

    return numba_kernels.matmul_rows, numba_kernels.steps_rows, numba_kernels.energy_rows


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="pcmodel-numba")


def _parallel(fn: Any, batch: int, threads: int, *args: Any) -> None:
    """fn(*args, lo, hi) over contiguous row ranges, one per thread (the kernels release the GIL)."""
    if threads <= 1 or batch <= 1:
        fn(*args, 0, batch)
        return
    parts = min(threads, batch)
    edges = [round(i * batch / parts) for i in range(parts + 1)]
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


def quadratic_steps(
    step: np.ndarray, c: np.ndarray, s0: np.ndarray | None, qinv: np.ndarray, steps: int, threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """`steps` steps of the recurrence: (states (T+1, B, n), drives (T+1, B, n)); s0 None starts at zeros."""
    dtype = step.dtype
    batch, n = c.shape
    states = np.empty((steps + 1, batch, n), dtype=dtype)
    drives = np.empty((steps + 1, batch, n), dtype=dtype)
    states[0] = 0 if s0 is None else s0
    has_cauchy = bool(np.isfinite(qinv).any())
    args = (np.ascontiguousarray(step), np.ascontiguousarray(c, dtype=dtype), np.ascontiguousarray(qinv, dtype=dtype))
    _parallel(_kernels()[1], batch, threads, *args, int(steps), has_cauchy, states, drives)
    return states, drives


def arrays(plan: QuadraticPlan) -> dict[str, np.ndarray]:
    """The plan's tensors as numpy arrays, once per plan, with the final products joined into two maps.

    `finals`: the last state s -> [every level's prediction r_l P_l (r = k s) | the reconstruction];
    `targets`: [x | r_1 .. r_{L-1}] -> every level's target lower_l T_l. Block-diagonal: two kernel
    calls instead of one per level and product.
    """
    t = {name: np.ascontiguousarray(v.detach().cpu().numpy()) for name, v in plan.tensors().items()}
    levels = range(len(plan.shapes))
    scale = t["scale"]
    sizes = [math.prod(s) for s in plan.shapes]
    offsets = np.cumsum([0, *sizes])
    widths = [t[f"predict_map{i}"].shape[1] for i in levels]
    columns = np.cumsum([0, *widths])
    finals = np.zeros((offsets[-1], columns[-1] + t["reconstruct"].shape[1]), dtype=scale.dtype)
    lowers = [t["drive"].shape[0], *sizes[:-1]]
    rows = np.cumsum([0, *lowers])
    targets = np.zeros((rows[-1], columns[-1]), dtype=scale.dtype)
    for i in levels:
        lo, hi = offsets[i], offsets[i + 1]
        finals[lo:hi, columns[i] : columns[i + 1]] = scale[lo:hi, None] * t[f"predict_map{i}"]
        target = t[f"target_map{i}"]
        if i > 0:  # the level below is r_{i} = k s: its scale folded in
            target = scale[offsets[i - 1] : offsets[i], None] * target
        targets[rows[i] : rows[i + 1], columns[i] : columns[i + 1]] = target
    finals[:, columns[-1] :] = t["reconstruct"]
    t["finals"], t["targets"], t["columns"] = finals, targets, columns
    t["inputs"] = np.ascontiguousarray(
        t["drive"] if plan.start is None else np.concatenate([t["drive"], t["start"]], axis=1)
    )
    return t


def run(plan: QuadraticPlan, x: torch.Tensor, steps: int, threads: int, t: dict | None = None) -> EngineRun:
    """The quadratic program (latents, energy, final predictions and errors) on the compiled kernels.

    `t`: the plan's `arrays` where the caller keeps them (made here otherwise).
    """
    batch = x.shape[0]
    xf = x.detach().reshape(batch, -1).contiguous().numpy()
    t = arrays(plan) if t is None else t
    n = t["step"].shape[0]
    driven = matmul(xf, t["inputs"], threads)  # c (and s_0 for feed-forward starts)
    c = np.ascontiguousarray(driven[:, :n])
    s0 = None if plan.start is None else driven[:, n:]
    states, drives = quadratic_steps(t["step"], c, s0, t["qinv"], steps, threads)
    # Energy from the (s, z) history (the program's formula), per image in a fixed order; numpy's
    # elementwise log1p is one code path for every entry.
    scale = t["scale"]
    base = matmul(np.square(xf), np.ascontiguousarray(t["omega"][:, None]), threads)[:, 0] + t["const"]
    logs = np.log1p(np.square(states) * np.square(scale)) if plan.has_cauchy else states
    energy = np.empty((steps + 1, batch), dtype=states.dtype)
    args = (states, drives, c, t["energy_weight"], logs, t["cauchy_alpha"], base, plan.has_cauchy)
    _parallel(_kernels()[2], batch, threads, *args, energy)
    last = states[steps]
    final = matmul(last, t["finals"], threads)  # predictions | reconstruction
    below = np.concatenate([xf, last[:, : n - math.prod(plan.shapes[-1])]], axis=1)
    target = matmul(below, t["targets"], threads)
    columns = t["columns"]
    predictions, errors = [], []
    for i, shape in enumerate(plan.target_shapes):
        p = final[:, columns[i] : columns[i + 1]]
        e = target[:, columns[i] : columns[i + 1]] - p
        predictions.append(torch.from_numpy(np.ascontiguousarray(p).reshape(batch, *shape)))
        errors.append(torch.from_numpy(e.reshape(batch, *shape)))
    latent = last * scale
    sizes = [math.prod(s) for s in plan.shapes]
    flats = np.split(latent, np.cumsum(sizes)[:-1], axis=1)
    return EngineRun(
        latents=[torch.from_numpy(np.ascontiguousarray(r).reshape(batch, *s)) for r, s in zip(flats, plan.shapes)],
        energy=torch.from_numpy(energy),
        predictions=predictions,
        errors=errors,
        reconstruction=torch.from_numpy(
            np.ascontiguousarray(final[:, columns[-1] :]).reshape(batch, *plan.input_shape)
        ),
    )


class NumbaBackend:
    name = "numba"

    def __init__(self) -> None:
        self.prepare_seconds: dict[str, float] = {}
        self.arrays: tuple[Plan, dict[str, np.ndarray]] | None = None  # the last plan's arrays

    def prepare(self, plan: Plan, steps: int, shape: tuple[int, ...], key: tuple) -> None:
        """Compile the kernels (once per process; from the disk cache after the first time)."""
        start = time.perf_counter()
        _kernels()
        m = np.eye(5, dtype=np.float32)
        quadratic_steps(m, np.ones((5, 5), np.float32), None, np.full(5, 4.0, np.float32), 1)
        self.prepare_seconds.setdefault("numba compile", time.perf_counter() - start)

    def run(self, plan: Plan, x: torch.Tensor, steps: int, key: tuple) -> EngineRun:
        assert isinstance(plan, QuadraticPlan), "the numba backend runs quadratic plans only"
        if self.arrays is None or self.arrays[0] is not plan:
            self.arrays = (plan, arrays(plan))  # a new plan: new weights or another input size
        return run(plan, x, steps, torch.get_num_threads(), self.arrays[1])
