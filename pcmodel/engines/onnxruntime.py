"""The onnxruntime backend: the inference program as one ONNX graph (T steps unrolled), on the CPU.

A program is built per (weights, T, input shape) with a dynamic batch axis. The weights are baked into
the graph (onnxruntime prepacks constants; docs/PERFORMANCE.md measures the gain), so a program is
keyed on the weights it was made from and never runs with other weights. float32 only.
A batch of B > 1 is split into min(threads, B) shards that run at once on one single-threaded session
(`ort_shards`): images are independent, so results are the same per image, bit for bit, and no thread
waits at a barrier after every small kernel. The amortised start of the calls a built backend serves (this
one or numba) is a graph of its own (`OrtGuess`), keyed on the amortiser's parameters the same way.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..levels import Level
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


class OrtSessions:
    """One graph's onnxruntime sessions, made on first use (at most two: all threads, one thread), and its
    run on a batch: on the session with all threads, or split into `ort_shards` shards that run at once,
    each on one thread, through the single-threaded session (its run() is thread-safe and releases the
    GIL). Images are independent, so every image gets the same arithmetic either way."""

    def __init__(self, graph: bytes, optimization: Any, threads: int, spinning: bool = True) -> None:
        self.graph = graph
        self.optimization = optimization
        self.threads = threads
        self.spinning = spinning  # False: the threads sleep as soon as a run ends (OrtGuess)
        self.sessions: dict[int, Any] = {}  # intra-op threads -> InferenceSession

    def session(self, threads: int) -> Any:
        """The session with `threads` intra-op threads (made on first use)."""
        found = self.sessions.get(threads)
        if found is None:
            ort = import_onnxruntime()

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = self.optimization
            options.log_severity_level = 3  # no warnings about initializers folded away
            if not self.spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            found = ort.InferenceSession(self.graph, options, providers=["CPUExecutionProvider"])
            self.sessions[threads] = found
        return found

    def run(self, outputs: Sequence[str], feed: dict[str, Any], shard: bool = True) -> list[list[Any]]:
        """Each shard's output arrays (one shard: the whole batch), in batch order."""
        batch = next(iter(feed.values())).shape[0]
        shards = ort_shards(batch, self.threads) if shard else 1
        if shards == 1:
            return [self.session(self.threads).run(outputs, feed)]
        edges = [round(i * batch / shards) for i in range(shards + 1)]
        parts = [{k: v[a:b] for k, v in feed.items()} for a, b in itertools.pairwise(edges)]
        session = self.session(1)
        pending = [_shard_pool(shards - 1).submit(session.run, outputs, p) for p in parts[1:]]
        return [session.run(outputs, parts[0]), *(f.result() for f in pending)]  # first shard here


class OrtProgram:
    """The inference program for (model weights, T, input size) with a dynamic batch axis (OrtSessions).

    The weights are baked into the graph as initializers, as in a pc-export file: onnxruntime prepacks
    constant matrices (the measured gain at batch 1: docs/PERFORMANCE.md).
    """

    def __init__(
        self, plan: Plan, steps: int, threads: int | None = None, init: bool = False, solver: Solver = GRADIENT
    ) -> None:
        from .onnx_graph import FULL_OUTPUTS, build_graph  # onnx is imported when a graph is first built

        self.steps = steps
        self.init = init  # the graph takes r0_1..r0_L
        graph = build_graph(plan, steps, outputs=FULL_OUTPUTS, init=init, solver=solver, portable=False)
        self.outputs = [o.name for o in graph.graph.output]
        threads = threads or torch.get_num_threads()
        self.sessions = OrtSessions(graph.SerializeToString(), ort_optimization(plan.kind), threads)

    @property
    def threads(self) -> int:
        return self.sessions.threads

    def run(self, x: torch.Tensor, r0: Sequence[torch.Tensor] | None = None, shard: bool = True) -> EngineRun:
        """Run the T steps on x (B, C, H, W) from r0, sharded by `ort_shards` unless `shard` is False."""
        assert (r0 is not None) == self.init, "a program takes r0 exactly when it was built for it"
        feed = {"x": x.detach().contiguous().numpy()}
        for i, r in enumerate(r0 or (), 1):
            feed[f"r0_{i}"] = r.detach().to(torch.float32).contiguous().numpy()
        return join([self._result(d) for d in self.sessions.run(self.outputs, feed, shard)])

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


class OrtGuess:
    """The amortised start (pcmodel.amortiser) for one input size as an onnxruntime graph (OrtSessions).

    torch's convolutions round differently with the batch size, so `PCModel.amortised_latents` runs them
    row by row on a CPU (0.22 ms a row for rao-ballard-1999's maps, 2.3 ms for a 256 x 256 photo of
    conv-rgb); onnxruntime's with every optimisation on (its blocked NCHWc convolutions) give each image
    the same bits alone, in a batch and on one or two threads (tested), and take 0.02 ms and 1.8 ms (one
    thread; 1.2 on two).
    Its threads do not spin after a run: the program runs next, on other threads, and a session's
    spinning threads took the cores from it (256 x 256: the program 12.5 ms after a guess that sleeps,
    25-29 ms after one that spins; measured).
    """

    def __init__(self, levels: Sequence[Level], params: Mapping[str, torch.Tensor], threads: int) -> None:
        ort = import_onnxruntime()

        from .onnx_graph import build_guess_graph

        graph = build_guess_graph(levels, {k: t.detach().cpu() for k, t in params.items()})
        self.outputs = [o.name for o in graph.graph.output]
        optimization = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = OrtSessions(graph.SerializeToString(), optimization, threads, spinning=False)

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        done = self.sessions.run(self.outputs, {"x": x.detach().contiguous().numpy()})
        return [torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0]) for parts in zip(*done)]


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


def import_onnxruntime() -> Any:
    """The onnxruntime module, imported with its telemetry off unless the environment says otherwise
    (ORT_DISABLE_TELEMETRY): it would write a device id and an event database under ~/.cache (read-only in the
    container) and log a warning at every session where it cannot. Read when onnxruntime is first imported."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    return ort


def ort_optimization(kind: str) -> Any:
    """The graph optimisation level per plan kind (measured in pc-bench, docs/PERFORMANCE.md)."""
    ort = import_onnxruntime()

    level = ort.GraphOptimizationLevel
    # The NCHWc layout pass of ORT_ENABLE_ALL wraps every small convolution in layout reorders, which
    # costs more than it gains at these channel counts; the matmul-only quadratic graph has none.
    return level.ORT_ENABLE_ALL if kind == "quadratic" else level.ORT_ENABLE_EXTENDED


class OrtBackend:
    """Programs by (steps, input shape, r0 or not, solver), each with the weights key it was built for."""

    name = "onnxruntime"

    def __init__(self) -> None:
        self.programs: dict[tuple, tuple[tuple, OrtProgram]] = {}
        self.guesses: dict[tuple, tuple[tuple, OrtGuess]] = {}  # by input shape: (amortiser key, guess)
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

    def guess(
        self, levels: Sequence[Level], params: Mapping[str, torch.Tensor], key: tuple, x: torch.Tensor
    ) -> list[torch.Tensor]:
        """The amortised start for x (B, C, H, W) from the amortiser's `params`, whose key is `key` (OrtGuess,
        built for x's size on first use and rebuilt after the parameters changed)."""
        shape = tuple(x.shape[1:])
        cached = self.guesses.get(shape)
        if cached is None or cached[0] != key or cached[1].sessions.threads != torch.get_num_threads():
            start = time.perf_counter()
            cached = (key, OrtGuess(levels, params, torch.get_num_threads()))
            self.prepare_seconds[f"onnxruntime amortised start {'x'.join(map(str, shape))}"] = (
                time.perf_counter() - start
            )
            self.guesses.pop(shape, None)
            self.guesses[shape] = cached
            while len(self.guesses) > MAX_PROGRAMS:
                del self.guesses[next(iter(self.guesses))]
        return cached[1].run(x)

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
