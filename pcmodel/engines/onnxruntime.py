"""The onnxruntime backend: the inference program as one ONNX graph (T steps unrolled), on the CPU.

A program is built per (weights, T, input shape) with a dynamic batch axis. The weights are baked into
the graph (onnxruntime prepacks constants; docs/PERFORMANCE.md measures the gain), so a program is
keyed on the weights it was made from and never runs with other weights. float32 only.
A batch of B > 1 is split into min(threads, B) shards that run at once on one single-threaded session
(`ort_shards`): images are independent, so results are the same per image, bit for bit, and no thread
waits at a barrier after every small kernel.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..results import EngineRun, join
from ..solvers import GRADIENT, Solver
from .base import BackendSpec
from .plans import Plan

MAX_PROGRAMS = 16  # programs kept; the prepared ones plus explicitly requested others, oldest out first


def available_cores() -> int:
    """CPU cores this process may use (affinity), the thread count given to torch and onnxruntime."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class OrtProgram:
    """onnxruntime sessions for (model weights, T, input size) with a dynamic batch axis.

    The weights are baked into the graph as initializers, as in a pc-export file: onnxruntime prepacks
    constant matrices (the measured gain at batch 1: docs/PERFORMANCE.md).
    A batch runs on one session with all threads, or split into `ort_shards` shards that run at once,
    each on one thread, through one single-threaded session (its run() is thread-safe and releases the
    GIL). Images are independent, so every image gets the same arithmetic either way. Sessions are made
    on first use: at most two (all threads, one thread) per program.
    """

    def __init__(
        self, plan: Plan, steps: int, threads: int | None = None, init: bool = False, solver: Solver = GRADIENT
    ) -> None:
        from .onnx_graph import FULL_OUTPUTS, build_graph  # onnx is imported when a graph is first built

        self.steps = steps
        self.threads = threads or torch.get_num_threads()
        self.optimization = ort_optimization(plan.kind)
        self.init = init  # the graph takes r0_1..r0_L
        graph = build_graph(plan, steps, outputs=FULL_OUTPUTS, init=init, solver=solver, portable=False)
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

    def run(self, x: torch.Tensor, r0: Sequence[torch.Tensor] | None = None, shard: bool = True) -> EngineRun:
        """Run the T steps on x (B, C, H, W) from r0, sharded by `ort_shards` unless `shard` is False."""
        assert (r0 is not None) == self.init, "a program takes r0 exactly when it was built for it"
        feed = {"x": x.detach().contiguous().numpy()}
        for i, r in enumerate(r0 or (), 1):
            feed[f"r0_{i}"] = r.detach().to(torch.float32).contiguous().numpy()
        shards = ort_shards(x.shape[0], self.threads) if shard else 1
        if shards == 1:
            return self._result(self.session(self.threads).run(self.outputs, feed))
        edges = [round(i * x.shape[0] / shards) for i in range(shards + 1)]
        parts = [{k: v[a:b] for k, v in feed.items()} for a, b in itertools.pairwise(edges)]
        session = self.session(1)
        pending = [_shard_pool(shards - 1).submit(session.run, self.outputs, p) for p in parts[1:]]
        done = [session.run(self.outputs, parts[0]), *(f.result() for f in pending)]  # first shard here
        return join([self._result(d) for d in done])

    def _result(self, values: list[Any]) -> EngineRun:
        named = {k: torch.from_numpy(v) for k, v in zip(self.outputs, values)}
        count = sum(name.startswith("latent_") for name in named)
        return EngineRun(
            latents=[named[f"latent_{i + 1}"] for i in range(count)],
            energy=named["energy"],
            predictions=[named[f"prediction_{i + 1}"] for i in range(count)],
            errors=[named[f"error_{i + 1}"] for i in range(count)],
            reconstruction=named["reconstruction"],
        )


def ort_shards(batch: int, threads: int) -> int:
    """How many single-threaded shards onnxruntime splits a batch into (1: one session with all threads).

    One shard per thread, as many as there are images: a multi-threaded session waits at a barrier after
    each of these small kernels (far longer on a shared machine), a shard on its own thread waits for
    nothing. Fixed, never timed at start-up. Measured on 2 cores (docs/PERFORMANCE.md, item 12): batches
    B > 1 ran faster sharded; batch 1 stays on the session with all threads, which was as
    fast as one thread or faster.
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


class OrtBackend:
    """Programs by (steps, input shape, r0 or not, solver), each with the weights key it was built for."""

    name = "onnxruntime"

    def __init__(self) -> None:
        self.programs: dict[tuple, tuple[tuple, OrtProgram]] = {}
        self.sharding = True  # False: every batch on one session with all threads (pc-bench's "unsharded")
        self.prepare_seconds: dict[str, float] = {}  # one-off costs, for pc-bench

    def program(
        self,
        plan: Plan,
        steps: int,
        shape: tuple[int, ...],
        key: tuple,
        init: bool = False,
        solver: Solver = GRADIENT,
    ) -> OrtProgram:
        """The program for these weights (built, or rebuilt after the weights changed); `init`: it takes r0."""
        index = (steps, shape, init, solver)
        cached = self.programs.get(index)
        if cached is not None and cached[0] == key and cached[1].threads == torch.get_num_threads():
            return cached[1]
        start = time.perf_counter()
        program = OrtProgram(plan, steps, init=init, solver=solver)
        self.prepare_seconds[f"onnxruntime T={steps} {'x'.join(map(str, shape))}"] = time.perf_counter() - start
        self.programs.pop(index, None)
        self.programs[index] = (key, program)
        while len(self.programs) > MAX_PROGRAMS:
            del self.programs[next(iter(self.programs))]
        return program

    def prepare(
        self, plan: Plan, steps: int, shape: tuple[int, ...], key: tuple, init: bool = False, solver: Solver = GRADIENT
    ) -> None:
        self.program(plan, steps, shape, key, init, solver)

    def run(
        self,
        plan: Plan,
        x: torch.Tensor,
        steps: int,
        key: tuple,
        r0: Sequence[torch.Tensor] | None = None,
        solver: Solver = GRADIENT,
    ) -> EngineRun:
        program = self.program(plan, steps, tuple(x.shape[1:]), key, init=r0 is not None, solver=solver)
        return program.run(x, r0, shard=self.sharding)


@functools.cache
def available() -> bool:
    """Whether onnx and onnxruntime are installed (found without importing them: that costs ~0.7 s)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


SPEC = BackendSpec(
    name="onnxruntime",
    factory=OrtBackend,
    devices=("cpu",),
    plans=("quadratic", "levelwise"),
    builds=True,
    available=available,
    install="onnx and onnxruntime (pip install predictive-coding)",
)
