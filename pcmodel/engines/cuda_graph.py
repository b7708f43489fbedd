"""The CUDA-graph backend: the torch backend's T-step program captured once per (batch bucket, shape).

Inputs are copied into a static buffer and the graph replayed; the plan's weight tensors are read in
place, so new weights (learning) are copied into them without a new capture. Optional TF32 or bf16
operands (`precision`) with r and the sums kept in float32.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..results import EngineRun, join, rows
from ..solvers import GRADIENT, Solver
from .base import BackendSpec
from .plans import Plan
from .torch_engine import TorchBackend

CUDA_PRECISIONS = ("float32", "tf32", "bf16")
CUDA_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch sizes a CUDA graph is captured for


class CudaGraphProgram:
    """The torch backend's fixed-T loop captured as one CUDA graph for a (batch bucket, input size).

    Inputs are copied into a static buffer and the graph replayed; the plan's weight tensors are read in
    place, so new weights are copied into them (`refresh`) without a new capture. `precision`: float32
    (TF32 off), tf32 (TF32 matmuls and convolutions), bf16 (bf16 operands, r and sums in float32).
    """

    def __init__(
        self,
        plan: Plan,
        steps: int,
        bucket: int,
        input_shape: Sequence[int],
        precision: str,
        init: bool = False,
        solver: Solver = GRADIENT,
    ) -> None:
        if precision not in CUDA_PRECISIONS:
            raise ValueError(f"unknown CUDA precision {precision!r}; choose one of {', '.join(CUDA_PRECISIONS)}")
        self.plan, self.steps, self.bucket, self.precision = plan, steps, bucket, precision
        device = next(iter(plan.tensors().values())).device
        self.static_x = torch.zeros((bucket, *input_shape), device=device)
        # With `init`, the starting latents are static inputs too (copied in before each replay).
        self.static_r0 = [torch.zeros((bucket, *s), device=device) for s in plan.shapes] if init else None
        operand = torch.bfloat16 if precision == "bf16" else None
        with _tf32(precision == "tf32"):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up: library handles and autotuning happen outside the capture
                for _ in range(2):
                    TorchBackend().run(plan, self.static_x, steps, r0=self.static_r0, operand=operand, solver=solver)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = TorchBackend().run(
                    plan, self.static_x, steps, r0=self.static_r0, operand=operand, solver=solver
                )
        torch.cuda.synchronize(device)

    def refresh(self, plan: Plan) -> None:
        """Copy a new plan's weight tensors into the captured ones (same shapes): new weights, same graph."""
        mine = self.plan.tensors()
        for name, tensor in plan.tensors().items():
            mine[name].copy_(tensor)

    def run(self, x: torch.Tensor, r0: Sequence[torch.Tensor] | None = None) -> EngineRun:
        batch = x.shape[0]
        for static, value in zip([self.static_x, *(self.static_r0 or ())], [x, *(r0 or ())]):
            static[:batch].copy_(value)
            if batch < self.bucket:
                static[batch:].zero_()
        self.graph.replay()
        out = rows(self.out, 0, batch)
        return EngineRun(
            latents=[r.clone() for r in out.latents],
            energy=out.energy.clone(),
            predictions=[p.clone() for p in out.predictions],
            errors=[e.clone() for e in out.errors],
            reconstruction=out.reconstruction.clone(),
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


def cuda_bucket(batch: int) -> int:
    """The smallest captured batch size that holds `batch` (larger batches are split into the largest)."""
    for size in CUDA_BUCKETS:
        if batch <= size:
            return size
    return CUDA_BUCKETS[-1]


class CudaGraphBackend:
    """Captured programs by (steps, input shape, bucket, precision, r0 or not, solver), each with its weights key."""

    name = "cuda-graph"

    def __init__(self) -> None:
        self.precision = "float32"
        self.programs: dict[tuple, tuple[tuple, CudaGraphProgram]] = {}
        self.prepare_seconds: dict[str, float] = {}

    def prepare(
        self, plan: Plan, steps: int, shape: tuple[int, ...], key: tuple, init: bool = False, solver: Solver = GRADIENT
    ) -> None:
        """Capture lazily, per batch bucket, on first use (a capture needs the batch size)."""

    def run(
        self,
        plan: Plan,
        x: torch.Tensor,
        steps: int,
        key: tuple,
        r0: Sequence[torch.Tensor] | None = None,
        solver: Solver = GRADIENT,
    ) -> EngineRun:
        largest = CUDA_BUCKETS[-1]
        if x.shape[0] > largest:  # split into the largest bucket; images are independent
            return join(
                [
                    self.run(
                        plan,
                        x[a : a + largest],
                        steps,
                        key,
                        None if r0 is None else [r[a : a + largest] for r in r0],
                        solver,
                    )
                    for a in range(0, x.shape[0], largest)
                ]
            )
        bucket = cuda_bucket(x.shape[0])
        shape = tuple(x.shape[1:])
        index = (steps, shape, bucket, self.precision, r0 is not None, solver)
        cached = self.programs.get(index)
        if cached is None:
            start = time.perf_counter()
            program = CudaGraphProgram(plan, steps, bucket, shape, self.precision, init=r0 is not None, solver=solver)
            self.prepare_seconds[f"cuda-graph T={steps} B={bucket} {'x'.join(map(str, shape))}"] = (
                time.perf_counter() - start
            )
            self.programs[index] = (key, program)
        else:
            seen, program = cached
            if seen != key:  # learning changed U: new weights into the captured buffers, no new capture
                program.refresh(plan)
                self.programs[index] = (key, program)
        return program.run(x, r0)


def available() -> bool:
    return torch.cuda.is_available()


SPEC = BackendSpec(
    name="cuda-graph",
    factory=CudaGraphBackend,
    devices=("cuda",),
    plans=("quadratic", "levelwise"),
    builds=True,
    available=available,
    takes_new_weights=True,  # new weights are copied into the captured buffers (`refresh`)
    install="a CUDA device and a CUDA build of torch",
)
