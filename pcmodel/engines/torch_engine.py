"""The torch backend: the inference program run eagerly, on any device, dtype and step count.

It is every other backend's fallback. `rowwise` runs one image at a time: torch picks other kernels
for other batch sizes (a matrix-vector product at batch 1), so only then is an image's result
independent of its batch, bit for bit.
"""

from __future__ import annotations

import torch

from .base import EngineRun
from .ops import TorchOps
from .plans import Plan
from .program import run_program


class TorchBackend:
    name = "torch"

    def prepare(self, plan: Plan, steps: int, shape: tuple[int, ...], key: tuple) -> None:
        """Nothing to build: the plan is the program's only input."""

    def run(
        self, plan: Plan, x: torch.Tensor, steps: int, key: tuple = (), rowwise: bool = False, operand=None
    ) -> EngineRun:
        if rowwise and x.shape[0] > 1:
            return EngineRun.cat([self.run(plan, row, steps) for row in torch.split(x, 1)])
        return EngineRun.of(run_program(TorchOps(x, operand), plan, x, steps))
