"""The torch backend: the inference program run eagerly, on any device, dtype and step count.

It is every other backend's fallback. `rowwise` runs one image at a time: torch picks other kernels
for other batch sizes (a matrix-vector product at batch 1), so only then is an image's result
independent of its batch, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..results import EngineRun, join
from ..solvers import GRADIENT, Solver
from .base import BackendSpec
from .ops import TorchOps
from .plans import Plan
from .program import run_program


class TorchBackend:
    name = "torch"

    def prepare(
        self, plan: Plan, steps: int, shape: tuple[int, ...], key: tuple, init: bool = False, solver: Solver = GRADIENT
    ) -> None:
        """Nothing to build: the plan is the program's only input."""

    def run(
        self,
        plan: Plan,
        x: torch.Tensor,
        steps: int,
        key: tuple = (),
        r0: Sequence[torch.Tensor] | None = None,
        rowwise: bool = False,
        operand: torch.dtype | None = None,
        solver: Solver = GRADIENT,
    ) -> EngineRun:
        if rowwise and x.shape[0] > 1:
            return join(
                [
                    self.run(
                        plan, x[i : i + 1], steps, r0=None if r0 is None else [r[i : i + 1] for r in r0], solver=solver
                    )
                    for i in range(x.shape[0])
                ]
            )
        return run_program(TorchOps(x, operand), plan, x, steps, r0, solver)


SPEC = BackendSpec(
    name="torch", factory=TorchBackend, devices=("cpu", "cuda"), plans=("quadratic", "levelwise"), builds=False
)
