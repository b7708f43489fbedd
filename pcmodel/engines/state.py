"""A model's engine state: what it is prepared for, its plans and its backends' programs.

Owned by one PCModel (`model.engines`); nothing is kept at module level. Plans and programs are keyed
on the weights they were made from (`weights_key`), so learning never runs on stale weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import ModelConfig
from .base import EngineRun
from .cuda_graph import CudaGraphBackend
from .numba_quadratic import NumbaBackend
from .numba_quadratic import available as numba_available
from .onnxruntime import OrtBackend
from .plans import Plan, make_plan, plan_kind
from .select import Choice
from .torch_engine import TorchBackend

MAX_PREPARED_STEPS = 8  # step counts with fast programs: memory stays bounded
MAX_PREPARED_SHAPES = 4  # input shapes per step count


def weights_key(weights: Sequence[torch.Tensor]) -> tuple:
    """Identifies the weights' current values: tensor identity, storage and in-place version counter.

    learn_step changes the weights in place (the version counter moves); assigning new tensors changes
    their identity. Either makes every derived plan and program stale.
    """
    return tuple((id(w), w.data_ptr(), w._version, str(w.device)) for w in weights)


class EngineState:
    def __init__(self, config: ModelConfig) -> None:
        self.prepared: dict[int, list[tuple[int, ...]]] = {config.steps: [tuple(config.input_shape)]}
        self.plans: dict[tuple, tuple[tuple, Plan, list[torch.Tensor]]] = {}
        self.torch = TorchBackend()
        self.onnxruntime = OrtBackend()
        self.cuda_graph = CudaGraphBackend()
        self.numba = NumbaBackend()
        self.quadratic: dict[tuple[int, int], bool] = {}  # plan kind by input size
        self.last_key: tuple | None = None  # the weights key of the previous call

    def set_prepared(self, steps: Sequence[int], shapes: Sequence[tuple[int, ...]]) -> None:
        steps, shapes = sorted(set(steps)), list(dict.fromkeys(shapes))
        if not steps or not shapes:
            raise ValueError("prepare needs at least one step count and one shape")
        if len(steps) > MAX_PREPARED_STEPS or len(shapes) > MAX_PREPARED_SHAPES:
            raise ValueError(
                f"prepare takes at most {MAX_PREPARED_STEPS} step counts and {MAX_PREPARED_SHAPES} shapes "
                f"(memory stays bounded); got {len(steps)} and {len(shapes)}"
            )
        if min(steps) < 1:
            raise ValueError(f"prepared step counts must be >= 1, got {min(steps)}")
        self.prepared = {t: list(shapes) for t in steps}

    def is_prepared(self, steps: int, shape: tuple[int, ...]) -> bool:
        return shape in self.prepared.get(steps, [])

    def backend(self, name: str) -> TorchBackend | OrtBackend | NumbaBackend | CudaGraphBackend:
        named = {"torch": self.torch, "onnxruntime": self.onnxruntime, "numba": self.numba}
        return self.cuda_graph if name == "cuda-graph" else named[name]

    def is_quadratic(self, config: ModelConfig, hw: tuple[int, int]) -> bool:
        if hw not in self.quadratic:
            self.quadratic[hw] = plan_kind(config, hw) == "quadratic"
        return self.quadratic[hw]

    @staticmethod
    def numba_available() -> bool:
        return numba_available()

    def fast_backend(self, config: ModelConfig, hw: tuple[int, int], device: torch.device) -> str:
        """The backend the automatic rule prefers for prepared calls at this size on this device."""
        if device.type == "cuda":
            return "cuda-graph"
        return "numba" if self.is_quadratic(config, hw) and self.numba_available() else "onnxruntime"

    def plan(
        self,
        config: ModelConfig,
        weights: list[torch.Tensor],
        key: tuple,
        hw: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Plan:
        """The plan for the weights whose `weights_key` is `key` (rebuilt when they changed)."""
        index = (hw, dtype, str(device))
        cached = self.plans.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = make_plan(config, weights, hw, dtype, device)
        # Holding the weight tensors keeps their ids and storages from being reused while the key lives.
        self.plans[index] = (key, plan, list(weights))
        return plan

    def run(
        self, choice: Choice, config: ModelConfig, weights: list[torch.Tensor], key: tuple, x: torch.Tensor, steps: int
    ) -> EngineRun:
        """Run a chosen backend (not the loop) on x with weights (in x's dtype) whose key is `key`."""
        plan = self.plan(config, weights, key, (int(x.shape[-2]), int(x.shape[-1])), x.dtype, x.device)
        if choice.backend == "torch":
            return self.torch.run(plan, x, steps, key, rowwise=choice.rowwise)
        return self.backend(choice.backend).run(plan, x, steps, key)

    def build(self, config: ModelConfig, weights: list[torch.Tensor], device: torch.device) -> None:
        """Build the fast programs of the prepared set now (sessions; CUDA graphs capture on first use)."""
        key = weights_key(weights)
        for steps, shapes in self.prepared.items():
            for shape in shapes:
                hw = (shape[1], shape[2])
                plan = self.plan(config, weights, key, hw, torch.float32, device)
                self.backend(self.fast_backend(config, hw, device)).prepare(plan, steps, shape, key)


__all__ = ["EngineRun", "EngineState", "weights_key"]
