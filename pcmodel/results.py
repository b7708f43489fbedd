"""What inference returns, and the one way a batch of results is split into rows and joined again.

`EngineRun` is what a backend hands the model (final state, in each level's target layout);
`InferenceResult` is what `model.infer` returns. Both are batches whose tensors have the batch on
axis 0, except `energy` (steps + 1, B) whose batch is axis 1: `rows` and `join` know that, so the
torch backend's row-by-row runs, the CUDA graph's buckets and the service's batcher all split and
join the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

BATCH_AXIS = {"energy": 1}  # fields whose batch axis is not 0; non-tensor fields are kept as they are

T = TypeVar("T")


def _rows(value: Any, axis: int, index: slice) -> Any:
    if isinstance(value, torch.Tensor):
        return value[(slice(None),) * axis + (index,)]
    if isinstance(value, list):
        return [_rows(v, axis, index) for v in value]
    return value


def _join(values: list[Any], axis: int) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values, dim=axis)
    if isinstance(first, list):
        return [_join(list(column), axis) for column in zip(*values)]
    return first


def rows(result: T, start: int, stop: int) -> T:
    """Rows start..stop-1 of a batch result (views, not copies)."""
    index = slice(start, stop)
    changes = {
        f.name: _rows(getattr(result, f.name), BATCH_AXIS.get(f.name, 0), index)
        for f in dataclasses.fields(result)  # type: ignore[arg-type]
    }
    return dataclasses.replace(result, **changes)  # type: ignore[type-var]


def join(parts: list[T]) -> T:
    """Results of consecutive slices of one batch, joined in order (one part is returned as it is)."""
    if len(parts) == 1:
        return parts[0]
    changes = {
        f.name: _join([getattr(p, f.name) for p in parts], BATCH_AXIS.get(f.name, 0))
        for f in dataclasses.fields(parts[0])  # type: ignore[arg-type]
    }
    return dataclasses.replace(parts[0], **changes)  # type: ignore[type-var]


@dataclass
class EngineRun:
    """A backend's output: final latents, the energy (steps + 1, B), each level's final prediction and
    error in the definition's target layout (module levels: (B, D, M) patches) and the reconstruction
    f(U_1 r_1) on the input grid. Values are tensors, or graph values while an ONNX graph is built."""

    latents: list[Any]
    energy: Any
    predictions: list[Any]
    errors: list[Any]
    reconstruction: Any


@dataclass
class InferenceResult:
    """What inference returns. Maps are (B, C, H, W); `energy` is (steps + 1, B), fewer rows with `tol` once
    every image has stopped."""

    latents: list[torch.Tensor]  # r_l, level 1 first: (B, causes, H_l, W_l); modules: the module grid
    predictions: list[torch.Tensor]  # level l's prediction of level l-1, level 1 first
    errors: list[torch.Tensor]  # level l-1 minus that prediction (what the energy sums), same layout
    reconstruction: torch.Tensor  # f(U_1 r_1) on the input grid (module levels: overlaps averaged)
    error: torch.Tensor  # x - reconstruction
    energy: torch.Tensor  # energy per image before the first step and after each step taken (early stop: fewer)
    steps: torch.Tensor  # (B,) int64: steps each image used (< the budget where it stopped early)
    backend: str = "loop"  # the backend that ran: loop | torch | onnxruntime | numba | cuda-graph
    reason: str = ""  # why that backend, where the automatic rule fell back or was overridden
