"""The tiny ops layer the inference program (pcmodel.engines.program) is written against.

Two implementations: `TorchOps` computes eagerly (the torch backend, and what a CUDA graph captures);
`pcmodel.engines.onnx_graph.OnnxOps` appends ONNX nodes. Besides elementwise algebra and per-image
reductions, the layer has the primitives the level kinds write their maps with (pcmodel.kinds):
matmul, convolutions, a level's windowed patches and their fold, the phase split of a convolutional
level 1. Methods ending in `_` may overwrite their first argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..kinds import phase_merge, phase_split
from ..solvers import TensorOps
from .plans import PlanLevel


class Ops(Protocol):
    exact: bool  # False where matmuls run in reduced precision (CUDA TF32 / bf16 operands)
    math: Any  # log1p and sqrt on `expr` values (pcmodel.priors writes psi and phi with them)

    def expr(self, value: Any) -> Any: ...  # a value that takes +, -, *, / (pcmodel.priors)
    def value(self, expr: Any) -> Any: ...  # back from `expr`
    def sum_rows(self, a: Any) -> Any: ...
    def concat_rows(self, values: Sequence[Any]) -> Any: ...

    def weight(self, name: str, tensor: torch.Tensor) -> Any: ...
    def one(self) -> Any: ...
    def flatten(self, x: Any) -> Any: ...
    def reshape_rows(self, x: Any, shape: Sequence[int]) -> Any: ...
    def split_latents(self, flat: Any, shapes: Sequence[Sequence[int]]) -> list[Any]: ...
    def zeros_like_rows(self, x: Any) -> Any: ...
    def zeros_latents(self, x: Any, shape: Sequence[int]) -> Any: ...
    def stack(self, values: Sequence[Any]) -> Any: ...
    def matmul(self, a: Any, b: Any) -> Any: ...
    def matvec(self, a: Any, v: Any) -> Any: ...
    def affine(self, s: Any, m: Any, c: Any) -> Any: ...
    def exact_affine(self, s: Any, m: Any, c: Any) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def sub(self, a: Any, b: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def scale(self, a: Any, factor: float) -> Any: ...
    def log1p(self, a: Any) -> Any: ...
    def addcmul(self, a: Any, b: Any, c: Any) -> Any: ...
    def addcdiv(self, a: Any, b: Any, c: Any, value: float) -> Any: ...
    def add_(self, a: Any, b: Any) -> Any: ...
    def add_scaled_(self, a: Any, b: Any, alpha: float) -> Any: ...
    def addcdiv_(self, a: Any, b: Any, c: Any, value: float) -> Any: ...
    def tanh_(self, a: Any) -> Any: ...
    def slope_error_(self, p: Any, e: Any) -> Any: ...
    def sum_squares(self, a: Any) -> Any: ...
    def sum_log(self, a: Any) -> Any: ...
    # Anderson's small linear algebra (pcmodel.solvers: the definitions, and the torch implementation).
    def gram(self, rows: Sequence[Any], metric: Any | None) -> Any: ...
    def ridge_solve(self, g: Any, ridge: float, tiny: float) -> Any: ...
    def sub_combination(self, base: Any, coefficients: Any, rows: Sequence[Any]) -> Any: ...
    # The primitives the level kinds' maps are written with (pcmodel.kinds: run_predict, ...).
    def conv(
        self, x: Any, weight: Any, stride: tuple[int, int] = ..., pads: tuple[int, int] = ..., taps: Any = ...
    ) -> Any: ...
    def conv_transpose(self, x: Any, weight: Any, stride: tuple[int, int]) -> Any: ...
    def patches(self, lower: Any, lv: PlanLevel) -> Any: ...
    def fold_patches(self, e: Any, lv: PlanLevel) -> Any: ...
    def phase_split(self, x: Any, lv: PlanLevel) -> Any: ...
    def phase_merge(self, phases: Any, lv: PlanLevel) -> Any: ...
    def patches_to_map(self, patches: Any, lv: PlanLevel) -> Any: ...


class TorchOps(TensorOps):
    """Eager torch. `operand` (CUDA only): the dtype of matmul and convolution operands (bf16). The
    elementwise algebra, the rows' reshaping and Anderson's linear algebra are the plain loop's own
    (pcmodel.solvers.TensorOps), written once."""

    math = torch

    def __init__(self, x: torch.Tensor, operand: torch.dtype | None = None) -> None:
        self.operand = operand
        self.exact = operand is None and not (x.is_cuda and bool(torch.backends.cuda.matmul.allow_tf32))
        self._one = x.new_ones(())

    def _op(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.operand is None else t.to(self.operand)

    def _back(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t if self.operand is None else t.to(like.dtype)

    def weight(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def expr(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def value(self, expr: torch.Tensor) -> torch.Tensor:
        return expr

    def sum_rows(self, a: torch.Tensor) -> torch.Tensor:
        return a.reshape(a.shape[0], -1).sum(1)

    def one(self) -> torch.Tensor:
        return self._one

    def reshape_rows(self, x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return x.reshape(x.shape[0], *shape)

    def zeros_like_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def zeros_latents(self, x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return x.new_zeros((x.shape[0], *shape))

    def stack(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(values))

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._back(self._op(a) @ self._op(b), a)

    def matvec(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return a @ v

    def affine(self, s: torch.Tensor, m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.operand is None:
            return torch.addmm(c, s, m)
        return c + (s.to(self.operand) @ m.to(self.operand)).to(s.dtype)

    def exact_affine(self, s: torch.Tensor, m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """s M + c in full float32 (the energy needs z exactly, whatever the loop's operands were)."""
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            return torch.matmul(s, m) + c
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def mul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b

    def log1p(self, a: torch.Tensor) -> torch.Tensor:
        return torch.log1p(a)

    def addcmul(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(a, b, c)

    def addcdiv(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, value: float) -> torch.Tensor:
        return torch.addcdiv(a, b, c, value=value)

    def add_(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.add_(b)

    def addcdiv_(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, value: float) -> torch.Tensor:
        return a.addcdiv_(b, c, value=value)

    def tanh_(self, a: torch.Tensor) -> torch.Tensor:
        return a.tanh_()

    def slope_error_(self, p: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(e, e, p.square_(), value=-1)  # e (1 - p^2)

    def sum_squares(self, a: torch.Tensor) -> torch.Tensor:
        flat = a.reshape(a.shape[0], -1)
        return torch.linalg.vecdot(flat, flat)

    def sum_log(self, a: torch.Tensor) -> torch.Tensor:
        return torch.log(a).reshape(a.shape[0], -1).sum(1)

    def conv(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: tuple[int, int] = (1, 1),
        pads: tuple[int, int] = (0, 0),
        taps: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        return self._back(F.conv2d(self._op(x), self._op(weight), stride=stride, padding=pads), x)

    def conv_transpose(self, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
        return self._back(F.conv_transpose2d(self._op(x), self._op(weight), stride=stride), x)

    def patches(self, lower: torch.Tensor, lv: PlanLevel) -> torch.Tensor:
        return lv.level.target(lower).contiguous()

    def fold_patches(self, e: torch.Tensor, lv: PlanLevel) -> torch.Tensor:
        return lv.level.target_adjoint(e)

    def phase_split(self, x: torch.Tensor, lv: PlanLevel) -> torch.Tensor:
        return phase_split(x, lv.stride, lv.pad).contiguous()

    def phase_merge(self, phases: torch.Tensor, lv: PlanLevel) -> torch.Tensor:
        return phase_merge(phases, lv.level.geometry.lower[0], lv.stride, lv.level.geometry.lower[1:])

    def patches_to_map(self, patches: torch.Tensor, lv: PlanLevel) -> torch.Tensor:
        return lv.level.to_lower_map(patches)
