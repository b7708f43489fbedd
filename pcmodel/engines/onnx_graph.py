"""The inference program as one ONNX graph: `OnnxOps` appends a node where `TorchOps` computes.

`build_graph(plan, steps)` runs pcmodel.engines.program with these ops, so the graph is the program
with its T steps unrolled (PyTorch's exporter unrolls Python loops anyway and cannot export a while
loop; building nodes directly takes milliseconds, not seconds). The onnxruntime backend runs it, and
pc-export (pcmodel.export) writes it.

Inputs and outputs (batch axis dynamic, float32): input `x` (batch, C, H, W), preprocessed, and, in a
graph built with `init`, the starting latents `r0_1` ... `r0_L` (batch, causes_l, H_l, W_l); outputs
`latent_1` ... `latent_L` (batch, causes_l, H_l, W_l), `energy` (T + 1, batch), `reconstruction`
(batch, C, H, W) and, when asked for, `prediction_l` and `error_l` at the final state (target layout).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..amortiser import amortised_latents
from ..levels import Level
from ..solvers import GRADIENT, Solver
from .plans import Plan, PlanLevel
from .program import run_program

OPSET = 17
OUTPUTS = ("latents", "energy", "reconstruction")  # a pc-export file's outputs
EXTRA_OUTPUTS = ("predictions", "errors")  # the backend also takes each level's final prediction and error
FULL_OUTPUTS = OUTPUTS + EXTRA_OUTPUTS


class OnnxExpr:
    """A graph value that takes +, -, *, / with other values and numbers (pcmodel.priors' formulas)."""

    def __init__(self, ops: OnnxOps, name: str) -> None:
        self.ops, self.name = ops, name

    def _other(self, other: OnnxExpr | float) -> str:
        return other.name if isinstance(other, OnnxExpr) else self.ops.const(float(other))

    def _op(self, op_type: str, a: str, b: str) -> OnnxExpr:
        return OnnxExpr(self.ops, self.ops.op(op_type, a, b))

    def __add__(self, other: OnnxExpr | float) -> OnnxExpr:
        return self._op("Add", self.name, self._other(other))

    def __radd__(self, other: float) -> OnnxExpr:
        return self._op("Add", self._other(other), self.name)

    def __sub__(self, other: OnnxExpr | float) -> OnnxExpr:
        return self._op("Sub", self.name, self._other(other))

    def __rsub__(self, other: float) -> OnnxExpr:
        return self._op("Sub", self._other(other), self.name)

    def __mul__(self, other: OnnxExpr | float) -> OnnxExpr:
        return self._op("Mul", self.name, self._other(other))

    def __rmul__(self, other: float) -> OnnxExpr:
        return self._op("Mul", self._other(other), self.name)

    def __truediv__(self, other: OnnxExpr | float) -> OnnxExpr:
        return self._op("Div", self.name, self._other(other))

    def __rtruediv__(self, other: float) -> OnnxExpr:
        return self._op("Div", self._other(other), self.name)


class OnnxMath:
    """The functions pcmodel.priors' formulas call, on OnnxExpr values."""

    @staticmethod
    def log1p(a: OnnxExpr) -> OnnxExpr:
        return OnnxExpr(a.ops, a.ops.op("Log", a.ops.op("Add", a.name, a.ops.one())))

    @staticmethod
    def sqrt(a: OnnxExpr) -> OnnxExpr:
        return OnnxExpr(a.ops, a.ops.op("Sqrt", a.name))


class OnnxOps:
    """Ops that append ONNX nodes; weight tensors become initializers. Values are node output names."""

    exact = True
    math = OnnxMath

    def __init__(self, portable: bool = True) -> None:
        self.portable = portable  # False: onnxruntime's own ops where they are faster (com.microsoft)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0
        self.constants: dict[tuple, str] = {}
        self.weights: dict[str, str] = {}
        self.swapped: dict[str, str] = {}
        self.gram_rows: dict[str, int] = {}  # k of each Gram matrix built (the unrolled solve's size)

    # ---- graph building --------------------------------------------------------------------------

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """A constant that does not depend on the weights (shapes, scalars, masks), shared by value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            name = f"c_{len(self.constants)}"
            self.initializers.append(numpy_helper.from_array(array, name))
            self.constants[key] = name
        return self.constants[key]

    def shape(self, *dims: int) -> str:
        return self.const(list(dims), np.int64)

    def _row_sum(self, value: str) -> str:
        """Sum over every axis but the batch (dynamic rank: flatten first)."""
        return self.op("ReduceSum", self.op("Flatten", value, axis=1), self.shape(1), keepdims=0)

    # ---- the Ops protocol ------------------------------------------------------------------------

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        # Baked in as initializers: onnxruntime prepacks constant matrices (docs/PERFORMANCE.md).
        if name not in self.weights:
            array = tensor.detach().cpu().to(torch.float32).numpy()
            key = f"w_{name}"
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), key))
            self.weights[name] = key
        return self.weights[name]

    def one(self) -> str:
        return self.const(1.0)

    # ---- pcmodel.amortiser.GuessOps: the amortised start inside the graph ------------------------

    def param(self, name: str, tensor: torch.Tensor) -> str:
        return self.weight(name, tensor)

    def conv_bias(self, x: str, weight: str, bias: str, stride: tuple[int, int], pad: tuple[int, int]) -> str:
        return self.op("Conv", x, weight, bias, strides=list(stride), pads=[pad[0], pad[1], pad[0], pad[1]])

    def expr(self, value: str) -> OnnxExpr:
        return OnnxExpr(self, value)

    def value(self, expr: OnnxExpr) -> str:
        return expr.name

    def sum_rows(self, a: str) -> str:
        return self._row_sum(a)

    def concat_rows(self, values: Sequence[str]) -> str:
        return self.op("Concat", *values, axis=1)

    def flatten(self, x: str) -> str:
        return self.op("Flatten", x, axis=1)

    def reshape_rows(self, x: str, shape: Sequence[int]) -> str:
        return self.op("Reshape", x, self.shape(0, *shape))

    def split_latents(self, flat: str, shapes: Sequence[Sequence[int]]) -> list[str]:
        out, offset = [], 0
        for lat in shapes:
            size = int(np.prod(lat))
            part = self.op("Slice", flat, self.shape(offset), self.shape(offset + size), self.shape(1))
            out.append(self.op("Reshape", part, self.shape(0, *lat)))
            offset += size
        return out

    def _zeros(self, dims: str) -> str:
        return self.op("ConstantOfShape", dims, value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))

    def zeros_like_rows(self, x: str) -> str:
        return self._zeros(self.op("Shape", x))

    def zeros_latents(self, x: str, shape: Sequence[int]) -> str:
        batch = self.op("Slice", self.op("Shape", x), self.shape(0), self.shape(1))
        return self._zeros(self.op("Concat", batch, self.shape(*shape), axis=0))

    def stack(self, values: Sequence[str]) -> str:
        # Concat along the batch axis, then split it: (T+1) x (B, ...) -> (T+1, B, ...) with no per-step node.
        first = values[0]
        joined = self.op("Concat", *values, axis=0)
        tail = self.op("Slice", self.op("Shape", first), self.shape(1), self.shape(2**62))
        return self.op("Reshape", joined, self.op("Concat", self.shape(len(values), -1), tail, axis=0))

    def matmul(self, a: str, b: str) -> str:
        return self.op("MatMul", a, b)

    def matvec(self, a: str, v: str) -> str:
        return self.op("MatMul", a, v)

    def affine(self, s: str, m: str, c: str) -> str:
        return self.op("Add", self.op("MatMul", s, m), c)

    def exact_affine(self, s: str, m: str, c: str) -> str:
        return self.affine(s, m, c)

    def add(self, a: str, b: str) -> str:
        return self.op("Add", a, b)

    def sub(self, a: str, b: str) -> str:
        return self.op("Sub", a, b)

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", a, b)

    def scale(self, a: str, factor: float) -> str:
        return self.op("Mul", a, self.const(factor))

    def log1p(self, a: str) -> str:
        return self.op("Log", self.op("Add", a, self.one()))

    def addcmul(self, a: str, b: str, c: str) -> str:
        return self.op("Add", a, self.op("Mul", b, c))

    def addcdiv(self, a: str, b: str, c: str, value: float) -> str:
        quotient = self.op("Div", b, c)
        if value == -1.0:
            return self.op("Sub", a, quotient)
        return self.op("Add", a, self.op("Mul", quotient, self.const(value)))

    def add_(self, a: str, b: str) -> str:
        return self.op("Add", a, b)

    def add_scaled_(self, a: str, b: str, alpha: float) -> str:
        if alpha == 1.0:
            return self.op("Add", a, b)
        if alpha == -1.0:
            return self.op("Sub", a, b)
        return self.op("Add", a, self.op("Mul", b, self.const(alpha)))

    def addcdiv_(self, a: str, b: str, c: str, value: float) -> str:
        return self.addcdiv(a, b, c, value)

    def tanh_(self, a: str) -> str:
        return self.op("Tanh", a)

    def slope_error_(self, p: str, e: str) -> str:
        return self.op("Mul", e, self.op("Sub", self.one(), self.op("Mul", p, p)))

    def sum_squares(self, a: str) -> str:
        # Mul then ReduceSum: onnxruntime's ReduceSumSquare took 2.2x as long (169 against 77 us for a
        # 3 x 256 x 256 error; the energy of every step: ~10% of conv-rgb's 20 steps) and rounds worse.
        return self._row_sum(self.op("Mul", a, a))

    def sum_log(self, a: str) -> str:
        return self._row_sum(self.op("Log", a))

    def _stack_rows(self, rows: Sequence[str]) -> str:  # k x (B, n) -> (B, k, n)
        return self.op("Concat", *(self.op("Unsqueeze", r, self.shape(1)) for r in rows), axis=1)

    def gram(self, rows: Sequence[str], metric: str | None) -> str:
        stacked = self._stack_rows(rows)
        weighted = stacked if metric is None else self.op("Mul", stacked, metric)
        out = self.op("MatMul", weighted, self.op("Transpose", stacked, perm=[0, 2, 1]))
        self.gram_rows[out] = len(rows)
        return out

    def ridge_solve(self, g: str, ridge: float, tiny: float) -> str:
        """pcmodel.solvers.ridge_solve. ONNX has no solve: unrolled as Gauss-Jordan elimination of
        [A + lambda I | b] without pivoting (A + lambda I is symmetric positive definite; k is known when the
        graph is built), or, in a graph only onnxruntime runs (not `portable`), onnxruntime's Inverse op
        (com.microsoft) and a MatMul: 5 nodes a step instead of 40, conv-rgb's Anderson steps 13% faster."""
        k = self.gram_rows[g] - 1
        eye = np.eye(k, dtype=np.float32)
        a = self.op("Slice", g, self.shape(0, 0), self.shape(k, k), self.shape(1, 2))
        b = self.op("Slice", g, self.shape(0, k), self.shape(k, k + 1), self.shape(1, 2))  # (B, k, 1)
        trace = self.op("ReduceSum", self.op("Mul", a, self.const(eye)), self.shape(1, 2), keepdims=1)  # (B, 1, 1)
        lam = self.op("Add", self.op("Mul", trace, self.const(ridge)), self.const(tiny))
        system = self.op("Add", a, self.op("Mul", lam, self.const(eye)))
        if not self.portable:
            inverse = self.op("Inverse", system, domain="com.microsoft")
            return self.op("Squeeze", self.op("MatMul", inverse, b), self.shape(2))
        system = self.op("Concat", system, b, axis=2)
        for j in range(k):
            row = self.op("Gather", system, self.const([j], np.int64), axis=1)  # (B, 1, k + 1)
            row = self.op("Div", row, self.op("Gather", row, self.const([j], np.int64), axis=2))
            column = self.op("Gather", system, self.const([j], np.int64), axis=2)  # (B, k, 1)
            column = self.op("Sub", column, self.const(eye[:, j : j + 1]))  # so that row j becomes the scaled row
            system = self.op("Sub", system, self.op("Mul", column, row))
        return self.op("Squeeze", self.op("Gather", system, self.const([k], np.int64), axis=2), self.shape(2))

    def sub_combination(self, base: str, coefficients: str, rows: Sequence[str]) -> str:
        mixed = self.op("MatMul", self.op("Unsqueeze", coefficients, self.shape(1)), self._stack_rows(rows))
        return self.op("Sub", base, self.op("Squeeze", mixed, self.shape(1)))  # base - sum_j c_j rows_j

    def conv(
        self,
        x: str,
        weight: str,
        stride: tuple[int, int] = (1, 1),
        pads: tuple[int, int] = (0, 0),
        taps: tuple[int, int] | None = None,
    ) -> str:
        if taps is not None and stride == (1, 1) and pads == (0, 0):
            # conv2d(g, A) as a ConvTranspose of g with A's channel axes swapped and its taps reversed, padded
            # by taps - 1: the same sums, and onnxruntime's ConvTranspose runs these shapes (48 -> 8 channels,
            # 2 x 2 taps) faster than its Conv (measured in docs/PERFORMANCE.md). Folded once as a constant.
            mh, mw = taps
            return self.op("ConvTranspose", x, self._swap_and_reverse(weight), pads=[mh - 1, mw - 1, mh - 1, mw - 1])
        attrs: dict[str, Any] = {}
        if stride != (1, 1):
            attrs["strides"] = list(stride)
        if pads != (0, 0):
            attrs["pads"] = [pads[0], pads[1], pads[0], pads[1]]
        return self.op("Conv", x, weight, **attrs)

    def conv_transpose(self, x: str, weight: str, stride: tuple[int, int]) -> str:
        return self.op("ConvTranspose", x, weight, strides=list(stride))

    def _swap_and_reverse(self, weight: str) -> str:  # (C, C0 s^2, mh, mw) -> (C0 s^2, C, mh, mw), taps reversed
        if weight not in self.swapped:
            swapped = self.op("Transpose", weight, perm=[1, 0, 2, 3])
            end = -(2**63)  # Slice with step -1 to the start of the axis
            self.swapped[weight] = self.op(
                "Slice", swapped, self.shape(-1, -1), self.shape(end, end), self.shape(2, 3), self.shape(-1, -1)
            )
        return self.swapped[weight]

    def _unfold(self, lv: PlanLevel) -> str:
        assert lv.unfold is not None
        geometry = (*lv.level.geometry.lower, *lv.level.geometry.kernel, *lv.stride)
        return self.weight("unfold_" + "x".join(map(str, geometry)), lv.unfold)

    def patches(self, lower: str, lv: PlanLevel) -> str:
        patches = self.op("Conv", lower, self._unfold(lv), strides=list(lv.stride))  # windowed patches
        return self.op("Reshape", patches, self.shape(0, lv.level.geometry.patch_size, -1))  # (B, D, M)

    def fold_patches(self, e: str, lv: PlanLevel) -> str:
        grid = lv.level.geometry.latent[1:]
        e4 = self.op("Reshape", e, self.shape(0, lv.level.geometry.patch_size, *grid))
        return self.op("ConvTranspose", e4, self._unfold(lv), strides=list(lv.stride))

    def phase_split(self, x: str, lv: PlanLevel) -> str:
        c0, h, w = lv.level.geometry.lower
        sh, sw = lv.stride
        padded = x if lv.pad == (0, 0) else self.op("Pad", x, self.shape(0, 0, 0, 0, 0, 0, lv.pad[0], lv.pad[1]))
        ph, pw = (h + lv.pad[0]) // sh, (w + lv.pad[1]) // sw
        if sh == sw:
            # onnxruntime's 6-d Transpose took 0.7 ms for a 256 x 256 photo, SpaceToDepth 0.1 (measured); it
            # orders the channels (phase, channel), so a Gather puts them in the plan's (channel, phase).
            order = [(a * sw + b) * c0 + c for c in range(c0) for a in range(sh) for b in range(sw)]
            depth = self.op("SpaceToDepth", padded, blocksize=sh)
            return self.op("Gather", depth, self.const(order, np.int64), axis=1)
        split = self.op("Reshape", padded, self.shape(0, c0, ph, sh, pw, sw))
        split = self.op("Transpose", split, perm=[0, 1, 3, 5, 2, 4])
        return self.op("Reshape", split, self.shape(0, c0 * sh * sw, ph, pw))

    def phase_merge(self, phases: str, lv: PlanLevel) -> str:
        c0, h, w = lv.level.geometry.lower
        sh, sw = lv.stride
        ph, pw = (h + lv.pad[0]) // sh, (w + lv.pad[1]) // sw
        if sh == sw:  # the same layout (CRD: channel, then phase), 4x faster than the Transpose (measured)
            merged = self.op("DepthToSpace", phases, blocksize=sh, mode="CRD")
        else:
            merged = self.op("Reshape", phases, self.shape(0, c0, sh, sw, ph, pw))
            merged = self.op("Transpose", merged, perm=[0, 1, 4, 2, 5, 3])
            merged = self.op("Reshape", merged, self.shape(0, c0, ph * sh, pw * sw))
        if (ph * sh, pw * sw) == (h, w):
            return merged  # nothing to crop (a Slice would still copy)
        return self.op("Slice", merged, self.shape(0, 0), self.shape(h, w), self.shape(2, 3))

    def patches_to_map(self, patches: str, lv: PlanLevel) -> str:
        # The least-squares average of the overlapping (windowed) module predictions: t^T(p) / t^T(t(1)).
        ones = torch.ones((1, *lv.level.geometry.lower), dtype=torch.float64)
        weight = lv.level.target_adjoint(lv.level.target(ones)).to(torch.float32).numpy()
        return self.op("Div", self.fold_patches(patches, lv), self.const(weight))


def _name_outputs(ops: OnnxOps, named: Sequence[tuple[str, str, list | None]]) -> list[onnx.ValueInfoProto]:
    """The graph's outputs (value, name, dims): a value a node makes takes the output's name (an Identity
    would copy it: 30 us for a 256 x 256 map), a value named twice or not made by a node gets an Identity."""
    made = {out for node in ops.nodes for out in node.output}
    renamed: dict[str, str] = {}
    for value, name, _ in named:
        if value in made and value not in renamed:
            renamed[value] = name
        else:
            ops.nodes.append(helper.make_node("Identity", [renamed.get(value, value)], [name]))
    for node in ops.nodes:
        node.input[:] = [renamed.get(v, v) for v in node.input]
        node.output[:] = [renamed.get(v, v) for v in node.output]
    return [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for _, name, dims in named]


def build_guess_graph(levels: Sequence[Level], params: Mapping[str, torch.Tensor]) -> onnx.ModelProto:
    """The amortised start alone (pcmodel.amortiser, the same definition as in torch): input `x` (batch,
    C, H, W) at the levels' size, outputs `guess_1` ... `guess_L` (batch, causes_l, H_l, W_l)."""
    ops = OnnxOps(portable=True)
    guesses = amortised_latents(levels, params, "x", ops)
    named = [
        (value, f"guess_{i}", ["batch", *lv.geometry.latent]) for i, (value, lv) in enumerate(zip(guesses, levels), 1)
    ]
    outputs = _name_outputs(ops, named)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *levels[0].geometry.lower])]
    graph = helper.make_graph(ops.nodes, "pcmodel-amortised-start", inputs, outputs, ops.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pcmodel")
    model.ir_version = 8
    return model


def build_graph(
    plan: Plan,
    steps: int,
    *,
    outputs: Sequence[str] = OUTPUTS,
    init: bool = False,
    solver: Solver = GRADIENT,
    amortiser: tuple[Sequence[Level], Mapping[str, torch.Tensor]] | None = None,
    portable: bool = True,
) -> onnx.ModelProto:
    """The fixed-`steps` inference program of a plan as one ONNX model (inputs, outputs: the module docstring).

    `init`: the graph takes the starting latents as inputs `r0_1`..`r0_L`; without, it starts where the
    config says (zeros or feed-forward) and its only input is `x`, or, given an `amortiser` (the levels at
    the plan's size and the amortiser's parameters), from the amortised guess computed in the graph
    (pcmodel.amortiser, the same definition as in torch).
    `solver`: the dynamics unrolled (pcmodel.solvers; the paper's gradient steps by default).
    `portable`: standard ONNX only (pc-export); False lets the graph use onnxruntime's own ops (OnnxOps).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 to build a graph, got {steps}")
    unknown = set(outputs) - set(FULL_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {', '.join(FULL_OUTPUTS)}")
    if init and amortiser is not None:
        raise ValueError("a graph takes its starting latents as inputs or computes the amortised ones, not both")
    ops = OnnxOps(portable)
    inputs_r0 = [f"r0_{i}" for i in range(1, len(plan.shapes) + 1)] if init else None
    starts = inputs_r0
    if amortiser is not None:
        starts = amortised_latents(*amortiser, "x", ops)
    out = run_program(ops, plan, "x", steps, starts, solver)
    named: list[tuple[str, str, list | None]] = []
    if "latents" in outputs:
        named += [(r, f"latent_{i}", ["batch", *s]) for i, (r, s) in enumerate(zip(out.latents, plan.shapes), 1)]
    if "energy" in outputs:
        named.append((out.energy, "energy", [steps + 1, "batch"]))
    if "reconstruction" in outputs:
        named.append((out.reconstruction, "reconstruction", ["batch", *plan.input_shape]))
    if "predictions" in outputs:
        named += [(p, f"prediction_{i}", None) for i, p in enumerate(out.predictions, 1)]
    if "errors" in outputs:
        named += [(e, f"error_{i}", None) for i, e in enumerate(out.errors, 1)]
    graph_outputs = _name_outputs(ops, named)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *plan.input_shape])]
    for name, shape in zip(inputs_r0 or (), plan.shapes):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *shape]))
    graph = helper.make_graph(ops.nodes, f"pcmodel-{plan.kind}-T{steps}", inputs, graph_outputs, ops.initializers)
    opsets = [helper.make_opsetid("", OPSET)] + ([] if portable else [helper.make_opsetid("com.microsoft", 1)])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="pcmodel")
    model.ir_version = 8  # readable by onnxruntime releases from 1.14 on
    return model
