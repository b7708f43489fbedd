"""The numba backend: the quadratic program's T steps for each image in one compiled call (CPU).

For the quadratic plan with the Cauchy prior (or none), a step is s <- s M_s + c_s - s / (qinv + s^2)
(pcmodel.priors.Cauchy.quadratic_step, run by pcmodel.engines.program), written again in the kernel: one
small matrix-vector product and a few elementwise operations, so as separate kernels (onnxruntime:
~6 per step) the per-kernel overhead dominates. Here the whole program (the drive, the steps, the
energy of each, the outputs) runs as one numba-compiled call per thread (`program_rows`), with M
(n x n, ~200 KB) in cache and every buffer on a 64-byte boundary (`aligned`). It is the same recurrence
as the program, held to the plain loop by the tests; the plan it reads is derived from the definition
as for the others.

The energy of every step needs each step's state and drive; they are kept for one chunk of steps at a
time (`run`: ~256 KB per buffer, in cache), so memory does not grow with T (the full history of
1,000 images x 5,000 steps was ~18 GB) and a chunk's energy is computed while it is in cache.

Bit-for-bit batch invariance: each element of a step's product is fma(s_k, M_kj, acc) for k = 0, 1, ...
in order from acc = 0 (explicit FMAs, numba_kernels), then z = c + acc and the next state from z. Eight
images are computed together (`_rows8`: an 8 x 32 block of the product held in registers over all k,
each row of M loaded once for the eight), the rest one at a time (`_row128`, `_row64`, `_row32`), every
element with exactly the operations it gets alone, so an image's result never depends on its neighbours,
the batch size or the thread that runs it. The energy sums its quadratic terms in 16 lanes and the lanes
in a fixed order, and the prior's as the log of per-lane float64 products, the same for every image. The
latents are padded to a multiple of 32 (zero columns of M; for n = 224 none). With several threads the
batch is split into row ranges (multiples of 8 where the batch allows), each thread running its rows
through the whole program on its own.

numba is in the core install (it used to be the `fast` extra): nothing needs a compiler at build or
install time (numba ships LLVM in its llvmlite wheel). It is imported only when this backend first runs,
and the kernels compile then (~7 s; cached on disk afterwards, in NUMBA_CACHE_DIR where it is set).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import threading
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
def _kernels() -> tuple[Any, Any, Any]:
    """The compiled kernels (numba imported lazily, on first use; compiled once and cached on disk)."""
    from .numba_kernels import matmul_rows, program_rows, steps_rows

    return matmul_rows, steps_rows, program_rows


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
    edges = [min(batch, align * round(i * batch / parts / align)) for i in range(parts)] + [batch]
    ranges = [(lo, hi) for lo, hi in itertools.pairwise(edges) if hi > lo]
    if len(ranges) == 1:
        fn(*args, 0, batch)
        return
    pending = [_pool(len(ranges) - 1).submit(fn, *args, lo, hi) for lo, hi in ranges[1:]]
    fn(*args, *ranges[0])
    for f in pending:
        f.result()


def aligned(shape: tuple[int, ...], fill: float | None = 0.0) -> np.ndarray:
    """A float32 C array whose first element is on a 64-byte boundary (numpy's are on 16): the kernels load
    64 bytes at a time, and rows of M or of the states (multiples of 32 floats) then never straddle two
    cache lines. Measured: M 16 bytes off a line makes a batch of one 1.4x slower (0.28 vs 0.20 ms, T = 100)."""
    (out,) = aligned_many(shape)
    if fill is not None:
        out.fill(fill)
    return out


def aligned_many(*shapes: tuple[int, ...]) -> list[np.ndarray]:
    """Uninitialised float32 C arrays, each on a 64-byte boundary, carved from one allocation (a call's
    buffers: one allocation instead of one each)."""
    sizes = [math.prod(shape) * 4 for shape in shapes]
    raw = np.empty(sum(-(-size // 64) * 64 for size in sizes) + 64, np.uint8)
    start = -raw.__array_interface__["data"][0] % 64
    out = []
    for shape, size in zip(shapes, sizes):
        out.append(raw[start : start + size].view(np.float32).reshape(shape))
        start += -(-size // 64) * 64
    return out


_THREAD = threading.local()


def _work(use: str, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """Work buffers for one `use`, `aligned_many`, kept per thread for the next call of the same shapes (only
    the last shapes of each use: memory stays that of one call; the uses keep a call with another solver from
    making the program's buffers again). Outputs are never kept: the caller owns them."""
    kept = _THREAD.__dict__.setdefault("work", {})
    if use not in kept or kept[use][0] != shapes:
        kept[use] = (shapes, aligned_many(*shapes))
    return kept[use][1]


def matmul_spans(m: np.ndarray) -> np.ndarray:
    """The matmul kernels' spans of m (k x w): per pass of four rows (the last pass the rows left), the
    columns [first, last + 1) where any of those rows is nonzero, (0, 0) where none is. The maps around
    the steps are block-sparse (a module's causes predict only its own patch; level 1's drive comes only
    from its patch): at batch 32 the outputs took 0.33 ms of 3.9 computed densely."""
    groups = -(-m.shape[0] // 4)
    spans = np.zeros((groups, 2), np.int64)
    nonzero = m != 0
    for g in range(groups):
        columns = np.flatnonzero(nonzero[4 * g : 4 * g + 4].any(axis=0))
        if columns.size:
            spans[g] = columns[0], columns[-1] + 1
    return spans


def matmul(a: np.ndarray, m: np.ndarray, threads: int = 1) -> np.ndarray:
    """a @ m, every row of the result computed on its own in a fixed order (batch-invariant)."""
    a = np.ascontiguousarray(a, dtype=m.dtype)
    m = np.ascontiguousarray(m)
    out = np.empty((a.shape[0], m.shape[1]), dtype=m.dtype)
    _parallel(_kernels()[0], a.shape[0], threads, a, m, matmul_spans(m), out)
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
    metric: np.ndarray | None = None,
    sizes: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`steps` steps of the recurrence: (states (T+1, B, n), drives (T+1, B, n)); s0 None starts at zeros;
    `metric`: Anderson's per-latent inner-product weights (None: all ones); `sizes`: the levels' latent
    counts, where the solver lengthens the step per level (None: one level).

    The whole history, for the tests; `run` keeps one chunk of steps at a time.
    """
    m, cp, qp = _step_args(step, c, qinv)
    batch, n = c.shape
    states = aligned((steps + 1, batch, m.shape[1]))
    drives = aligned((steps + 1, batch, m.shape[1]), None)
    if s0 is not None:
        states[0, :, :n] = s0
    moves = _solver_args(solver, batch, m.shape[1], [n] if sizes is None else sizes)
    structure = step_runs(m)
    weights = aligned((m.shape[1],))  # Anderson's inner product: the plain one where none is given
    weights[:n] = 1.0 if metric is None else metric
    args = (m, *structure, cp, qp, steps + 1, True, states, drives, *moves, weights, 0)
    _parallel(_kernels()[1], batch, threads, *args, align=8)
    return states[..., :n], drives[..., :n]


def step_runs(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The step kernels' view of M's zeros (`steps_rows`): runs (first row, end) of rows of M not all zero
    in a span of columns; blocks: (first run, runs) per block of BLOCK columns (the eight-row kernel);
    singles: the one-row kernels' spans (blocks wide, first column, first run, runs), each as wide as it
    can be without reading more rows than its blocks one by one would (a single row is bound by reading M).
    """
    block = 32  # numba_kernels.BLOCK
    nonzero = np.abs(m).reshape(m.shape[0], -1, block).max(axis=2) != 0  # (rows, blocks)
    runs: list[tuple[int, int]] = []

    def add(rows: np.ndarray) -> tuple[int, int]:
        first = len(runs)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], rows.astype(np.int8), [0]])))
        runs.extend(zip(edges[::2].tolist(), edges[1::2].tolist()))
        return first, len(runs) - first

    count = nonzero.shape[1]
    blocks = np.array([add(nonzero[:, jb]) for jb in range(count)], np.int64).reshape(-1, 2)
    singles, jb = [], 0
    while jb < count:
        for width in (4, 2, 1):
            union = nonzero[:, jb : jb + width].any(axis=1)
            alone = nonzero[:, jb : jb + width].sum()
            if jb + width <= count and (width == 1 or union.sum() * width <= alone):
                singles.append((width, jb * block, *add(union)))
                jb += width
                break
    return np.array(runs, np.int64).reshape(-1, 2), blocks, np.array(singles, np.int64)


def _solver_args(
    solver: Solver, batch: int, width: int, sizes: Sequence[int], work: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """The step kernel's solver arguments (`steps_rows`): the velocity (zeros, rows like the states) or
    Anderson's history (per row the last u and f and m differences of each), beta in 16 lanes, the mode,
    Anderson's systems (float64), the plain step's multiplier per column (levels of `sizes` latents side by
    side, as in the kernels' order; padded with 1; empty where the solver has none). `work`: the velocity's or
    history's buffer (`_solver_rows` rows, `width` columns) where the caller keeps one (made here otherwise)."""
    beta, mode, mult = _solver_constants(solver, width, tuple(sizes))
    rows = _solver_rows(solver, batch)
    if rows == 0:
        return _NO_VELOCITY, beta, mode, _NO_SYSTEMS, mult
    history = aligned((rows, width), None) if work is None else work  # zeroed below where it must be
    if mode == 3:  # each entry of the history and the systems is written before it is read
        return history, beta, mode, np.empty((batch, solver.window, 2 * solver.window + 2)), mult
    history.fill(0.0)  # the velocity starts at 0
    return history, beta, mode, _NO_SYSTEMS, mult


def _solver_rows(solver: Solver, batch: int) -> int:
    """Rows of the solver's work buffer: the velocity's (rows like the states), Anderson's history, or none."""
    mode = solver.kernel_mode
    return (2 + 2 * solver.window) * batch if mode == 3 else batch if mode else 0


@functools.lru_cache(maxsize=64)
def _solver_constants(solver: Solver, width: int, sizes: tuple[int, ...]) -> tuple[np.ndarray, int, np.ndarray]:
    """beta in 16 lanes, the kernel's mode and the per-column multipliers (`_solver_args`; the kernels only
    read them, so calls share them)."""
    mode = solver.kernel_mode
    mult = _NO_MULTIPLIERS
    if solver.level_steps:
        mult = aligned((width,), 1.0)
        mult[: sum(sizes)] = solver.entry_steps(sizes).numpy()
    return _lanes(0.0 if mode == 3 else float(solver.momentum)), mode, mult


_NO_VELOCITY = np.zeros((1, 16), np.float32)
_NO_SYSTEMS = np.zeros((1, 1, 3))
_NO_MULTIPLIERS = np.zeros(0, np.float32)
_NO_MATRIX = (
    np.zeros((1, 32), np.float32),
    np.zeros((0, 2), np.int64),
    np.zeros((1, 2), np.int64),
    np.zeros((0, 4), np.int64),
)
_NO_WORK = (np.zeros((1, 32), np.float32), np.zeros((1, 32), np.float32))  # the factored step's t, zero
_NO_FACTORS = (0, *_NO_MATRIX, *_NO_MATRIX, np.zeros(32, np.float32), np.zeros(32, np.float32))


@functools.cache
def _lanes(value: float) -> np.ndarray:
    return np.full(16, value, np.float32)  # the kernels only read it


def padded(n: int) -> int:
    """n rounded up to the step kernel's block of columns (32)."""
    return -(-n // 32) * 32


def _step_args(step: np.ndarray, c: np.ndarray, qinv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The step kernel's leading arguments (M, c, qinv), contiguous, their columns padded to `padded(n)`
    (M's and c's with zeros, qinv's with inf: the padding's states and drives stay 0)."""
    n = step.shape[1]
    width = padded(n)
    m = aligned((n, width))
    m[:, :n] = step
    cp = aligned((c.shape[0], width))
    cp[:, :n] = c
    qp = aligned((width,), np.inf)
    qp[:n] = qinv
    return m, cp, qp


def _reads(structure: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
    """Rows of M the eight-row kernel reads for one block of rows, over all blocks of columns (its work)."""
    runs, blocks, _ = structure
    return sum(int((runs[f : f + c, 1] - runs[f : f + c, 0]).sum()) for f, c in blocks)


FACTORED_STEPS = True  # False: M dense in every plan made after (the tests and benchmarks compare the two)


def step_factors(t: dict[str, Any], plan: QuadraticPlan) -> dict[str, np.ndarray] | None:
    """M in the kernels' order as I + M1 + (diag(dL) + L)(diag(dR) + R), padded like M (`_step_args`); None
    where no level's term can be factored (`factored_step` uses it where it is less work than M).

    Level l's term of H is w_l V_l V_l^T with V_l = [t_l; -P_l] on levels l-1 and l (plans.py), so its part of
    M = I - diag(k) H diag(eta / k) is (diag(k) V_l)(-w_l V_l^T diag(eta / k)). Where t_l is a weighted
    identity (`plan.factored_levels`: target entry j is latent j below), that part goes through
    t = s (diag(dL) + L), one column per latent below (t's column is that latent's), L from level l's rows,
    and z gains t (diag(dR) + R), R onto level l's columns: 2 n_{l-1} n_l multiply-adds a row instead of M's
    (n_{l-1} + n_l)-wide rows there (level 2 of rao-ballard-1999: rank 96, not 128). M1 is the plan's
    `step_rest` (the other terms; exact zeros where only factored terms were).
    """
    if plan.step_rest is None:
        return None
    n = t["step"].shape[0]
    where = np.argsort(t["order"])  # the kernels' index of each plan index
    scale = t["scale"].astype(np.float64)
    eta = scale * scale / (2 * t["energy_weight"].astype(np.float64))
    offsets = np.cumsum([0, *(math.prod(shape) for shape in plan.shapes)])
    left, right = np.zeros((n, n)), np.zeros((n, n))
    d_left, d_right = np.zeros(n), np.zeros(n)
    for i in plan.factored_levels:
        tau = np.diag(t[f"target_map{i}"]).astype(np.float64)
        predict = t[f"predict_map{i}"].astype(np.float64)
        w = plan.data_weights[i]
        below, above = where[offsets[i - 1] : offsets[i]], where[offsets[i] : offsets[i + 1]]
        d_left[below] = scale[below] * tau
        d_right[below] = -w * tau * eta[below] / scale[below]
        left[np.ix_(above, below)] = -scale[above, None] * predict
        right[np.ix_(below, above)] = w * predict.T * (eta[above] / scale[above])[None, :]
    rest = plan.step_rest.detach().cpu().numpy()[np.ix_(t["order"], t["order"])]
    width = padded(n)
    out = {}
    for name, a in (("step", rest), ("left", left), ("right", right)):
        out[name] = aligned((n, width))
        out[name][:, :n] = a
    for name, d in (("d_left", d_left), ("d_right", d_right)):
        out[name] = aligned((width,))
        out[name][:n] = d
    return out


def factored_step(t: dict[str, Any], plan: QuadraticPlan, dense_runs: tuple) -> dict[str, np.ndarray] | None:
    """`step_factors` where reading them is at most 0.8x the rows of M the kernels read (M's `step_runs`:
    `dense_runs`), and FACTORED_STEPS is on; else None."""
    factors = step_factors(t, plan) if FACTORED_STEPS else None
    if factors is None:
        return None
    work = sum(_reads(step_runs(factors[k])) for k in ("step", "left", "right"))
    return factors if work <= 0.8 * _reads(dense_runs) else None


def _padded_arrays(t: dict[str, Any], plan: QuadraticPlan) -> dict[str, Any]:
    """The step and energy kernels' arrays, their latents padded to `padded(n)` (made once per plan's arrays:
    M's columns and the weights with zeros, qinv with inf, as in `_step_args`); M factored where that is less
    work (`factored_step`)."""
    if "padded" not in t:
        m, _, qinv = _step_args(t["step"], t["step"][:0], t["qinv"])
        dense_runs = step_runs(m)
        factors = factored_step(t, plan, dense_runs)
        p: dict[str, Any] = {"qinv": qinv}
        if factors is None:
            p["step"], p["factors"], p["structure"] = m, _NO_FACTORS, dense_runs
        else:
            left, right = factors["left"], factors["right"]
            p["step"], p["structure"] = factors["step"], step_runs(factors["step"])
            p["factors"] = (1, left, *step_runs(left), right, *step_runs(right), factors["d_left"], factors["d_right"])
        for name in ("scale2", "energy_weight"):
            p[name] = aligned((m.shape[1],))
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
    """The plan's tensors as numpy arrays, once per plan; the latents in the kernels' order (`kernel_order`)
    in everything the steps read (M, the drive, qinv, scale, the energy's weights, level 1's reconstruction
    rows), in the plan's in the predict and target maps and `unscale` (they meet the latents in plan order).

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
    # The kernels' order of the latents: level by level, a level's causes grouped by position (the plan's
    # is cause-major), so that M's zeros (positions whose fields do not meet) form blocks the kernels skip.
    order = kernel_order(plan.shapes)
    t["order"] = order
    t["step"] = np.ascontiguousarray(t["step"][np.ix_(order, order)])
    t["inputs"] = np.ascontiguousarray(
        t["inputs"][:, np.concatenate([order, order + plan.size])[: t["inputs"].shape[1]]]
    )
    t["drive"] = np.ascontiguousarray(t["drive"][:, order])
    for name in ("qinv", "scale", "energy_weight", "prior_alpha"):
        t[name] = np.ascontiguousarray(t[name][order])
    n1 = math.prod(plan.shapes[0])
    t["reconstruct_1"] = np.ascontiguousarray(t["reconstruct"][order[:n1]])  # only level 1 predicts the image
    t["scale2"] = np.square(t["scale"])
    return t


def kernel_order(shapes: Sequence[tuple[int, ...]]) -> np.ndarray:
    """The plan's index of each latent in the kernels' order: per level (C, H, W), position-major."""
    parts, offset = [], 0
    for causes, *where in shapes:
        positions = math.prod(where)
        index = np.arange(causes * positions).reshape(causes, positions)  # cause-major, as the plan
        parts.append(offset + index.T.ravel())
        offset += causes * positions
    return np.concatenate(parts).astype(np.int64)


def _program_arrays(t: dict[str, Any], plan: QuadraticPlan) -> dict[str, Any]:
    """`program_rows`' constant arguments, made once per plan's arrays: the levels' maps in flat arrays
    (pblob: predict maps; tblob: dense target maps or a gather's weights; sblob: a gather's sources and
    the maps' `matmul_spans`) and a table of where each level's are (`meta`, the kernel's docstring)."""
    if "program" not in t:
        sizes = [math.prod(s) for s in plan.shapes]
        widths = [math.prod(s) for s in plan.target_shapes]
        offsets, outputs = np.cumsum([0, *sizes]).tolist(), np.cumsum([0, *widths]).tolist()
        floats: dict[str, list[np.ndarray]] = {"p": [], "t": []}
        ints: list[np.ndarray] = []
        meta = []

        def add(blob: list[np.ndarray], a: np.ndarray) -> int:
            """a's start in the flat array the blob becomes."""
            start = sum(part.size for part in blob)
            blob.append(a.ravel())
            return start

        order = t["order"]
        for i, (size, width) in enumerate(zip(sizes, widths)):
            # Rows in the kernels' order, as program_rows' latents: a module's rows meet only its patch.
            own = order[offsets[i] : offsets[i] + size] - offsets[i]
            below = order[offsets[i - 1] : offsets[i]] - offsets[i - 1] if i else None
            predict = np.ascontiguousarray(t[f"predict_map{i}"][own])
            gather = f"target_source{i}" in t
            target = t[f"target_weight{i}"] if gather else t[f"target_map{i}"]
            if below is not None and not gather:
                target = np.ascontiguousarray(target[below])
            trows = 0 if gather else target.shape[0]
            pstart, tstart = add(floats["p"], predict), add(floats["t"], target)
            source = t[f"target_source{i}"] if gather else None
            if source is not None and below is not None:
                source = np.argsort(below)[source]  # the kernels' index of each plan index below
            sstart = add(ints, source) if source is not None else 0
            pspans = add(ints, matmul_spans(predict))
            tspans = 0 if gather else add(ints, matmul_spans(target))
            start = offsets[max(i - 1, 0)]
            meta.append([offsets[i], start, size, width, pstart, tstart, trows, sstart, outputs[i], pspans, tspans])
        omega = np.ascontiguousarray(t["omega"][:, None])
        t["program"] = {
            "meta": np.array(meta, np.int64),
            "pblob": np.ascontiguousarray(np.concatenate(floats["p"])),
            "tblob": np.ascontiguousarray(np.concatenate(floats["t"])),
            "sblob": np.ascontiguousarray(np.concatenate(ints).astype(np.int64)),
            "omega": omega,
            "spans": {name: matmul_spans(a) for name, a in (("drive", t["drive"]), ("inputs", t["inputs"]))}
            | {"omega": matmul_spans(omega), "reconstruct": matmul_spans(t["reconstruct_1"])},
            "widths": widths,
        }
    return t["program"]


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

    One compiled call per thread (`program_rows`): the drive, the steps in chunks with their energy, the
    outputs; here only the buffers are made and the results wrapped as tensors (views of them).
    """
    batch = x.shape[0]
    xf = x.detach().reshape(batch, -1).to(torch.float32).contiguous().numpy()
    t = arrays(plan) if t is None else t
    p = _padded_arrays(t, plan)
    q = _program_arrays(t, plan)
    inputs, ispans, widths = t["inputs"], q["spans"]["inputs"], q["widths"]
    n, width = t["step"].shape[0], p["step"].shape[1]
    s0 = np.zeros((0, n), np.float32)
    if r0 is not None:  # s_0 = r_0 / k, as the program computes it
        flat = np.concatenate([r.detach().to(torch.float32).reshape(batch, -1).numpy() for r in r0], axis=1)
        s0 = np.ascontiguousarray((flat * t["unscale"])[:, t["order"]])
        inputs, ispans = t["drive"], q["spans"]["drive"]  # a given start replaces a feed-forward one
    chunk = min(steps + 1, chunk_steps(batch, width))
    sizes = [math.prod(shape) for shape in plan.shapes]
    # driven, c, states s_t0 .. s_t0+chunk, drives, x^2, the energy's constant part (the kernel fills c's and
    # the first state's padding with zeros), the latents in the kernels' order, then the solver's velocity or
    # history and the factored step's t and zero rows where they have any: each kept for the next call of the
    # same shapes (`_work`). Then the outputs: energy, latents, predictions and errors (all levels side by side),
    # the reconstruction, each its own array (written once, by unaligned stores: `aligned_many`'s carving
    # cost 5 us a call, a fifth of the Python around a batch of one).
    shapes = [(batch, inputs.shape[1]), (batch, width), (chunk + 1, batch, width), (chunk, batch, width), xf.shape]
    work = _work("program", *shapes, (batch, 1), (batch, n))
    rows = _solver_rows(solver, batch)
    solver_args = _solver_args(solver, batch, width, sizes, _work("solver", (rows, width))[0] if rows else None)
    factor_work = _NO_WORK
    if p["factors"][0]:  # t's columns that no row of the left factor reaches stay 0, and zero is all zeros
        factor_work = tuple(_work("factors", (batch, width), (batch, width)))
        factor_work[0].fill(0.0)
        factor_work[1].fill(0.0)
    outputs = [(steps + 1, batch), (batch, n), (batch, sum(widths)), (batch, sum(widths)), xf.shape]
    out = [np.empty(shape, np.float32) for shape in outputs]
    buffers = (*work, *out)
    if "fixed" not in q:  # the arguments that do not change from call to call
        maps = (q["meta"], q["pblob"], q["tblob"], q["sblob"], t["reconstruct_1"], q["spans"]["omega"])
        steps_in = (p["step"], *p["structure"], t["order"], p["qinv"], p["energy_weight"], p["scale2"])
        q["fixed"] = (q["omega"], t["const"], *steps_in, p["segments"], t["scale"], *maps, q["spans"]["reconstruct"])
    factors = (*p["factors"], *factor_work)
    args = (*q["fixed"], xf, inputs, ispans, s0, steps, chunk, *solver_args, *factors, *buffers)
    _parallel(_kernels()[2], batch, threads, *args, align=8)
    energy, latent, predictions, errors, recon = out
    return EngineRun(
        latents=_split(latent, plan.shapes),
        energy=torch.from_numpy(energy),
        predictions=_split(predictions, plan.target_shapes),
        errors=_split(errors, plan.target_shapes),
        reconstruction=torch.from_numpy(recon.reshape(batch, *plan.input_shape)),
    )


def _split(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """(B, sum of sizes) -> one (B, *shape) tensor per level (numpy's views and copies: ~1 us each, a
    third of torch's split and reshape)."""
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(torch.from_numpy(np.ascontiguousarray(flat[:, start : start + size]).reshape(-1, *shape)))
        start += size
    return out


class NumbaBackend:
    name = "numba"

    def __init__(self) -> None:
        self.prepare_seconds: dict[str, float] = {}
        self.arrays: tuple[Plan, dict[str, np.ndarray]] | None = None  # the last plan's arrays

    def prepare(
        self, plan: Plan, steps: int, shape: tuple[int, ...], key: tuple, init: bool = False, solver: Solver = GRADIENT
    ) -> None:
        """Compile the program's kernel (once per process; from the disk cache after the first time) and make
        the plan's arrays: one step of a blank image, so that the first real call pays neither."""
        start = time.perf_counter()
        if isinstance(plan, QuadraticPlan):
            self.run(plan, torch.zeros((1, *plan.input_shape)), 1, key, None, solver)
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
    install="numba installed (a core dependency: pip install numba)",
    plan_note="linear f, few latents",
)
