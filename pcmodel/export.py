"""ONNX export of fixed-T inference (pc-export), and the graph the onnxruntime backend runs.

The graph is built node by node from a backend plan (pcmodel.backends: quadratic or levelwise), with
the T steps unrolled: PyTorch's exporter unrolls Python loops anyway and cannot export while_loop, and
building the graph directly takes milliseconds instead of seconds and avoids ConvTranspose on the hot
path (a convolutional first level runs in phase layout: two small stride-1 convolutions per step).

Inputs and outputs of an exported file (batch axis dynamic, everything float32):

- input  `x`: (batch, C, H, W), preprocessed as `model.preprocess` does (the size the file was made for);
- output `latent_1` ... `latent_L`: (batch, causes_l, H_l, W_l), the settled latents r_l;
- output `energy`: (T + 1, batch), the energy of each image before the first step and after each step;
- output `reconstruction`: (batch, C, H, W), f(U_1 r_1) on the input grid (module levels: overlaps averaged).

The metadata (`model`, `sha256`, `steps`, `input_size`) says what the file computes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .backends import LevelwisePlan, Plan, PlanLevel, QuadraticPlan

log = logging.getLogger(__name__)

OPSET = 17
OUTPUTS = ("latents", "energy", "reconstruction")  # a pc-export file's outputs
EXTRA_OUTPUTS = ("predictions", "errors")  # the backend also takes each level's final prediction and error


class _Graph:
    """Appends ONNX nodes; weight tensors become initializers or, for the backend, graph inputs."""

    def __init__(self, weights_as_inputs: bool) -> None:
        self.weights_as_inputs = weights_as_inputs
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.count = 0
        self.constants: dict[tuple, str] = {}

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        """A weight-derived plan tensor: a graph input `w_NAME` (backend) or an initializer (file)."""
        array = tensor.detach().cpu().to(torch.float32).numpy()
        key = f"w_{name}"
        if self.weights_as_inputs:
            self.inputs.append(helper.make_tensor_value_info(key, TensorProto.FLOAT, list(array.shape)))
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), key))
        return key

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """A constant that does not depend on the weights (shapes, scalars, masks)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            name = f"c_{len(self.constants)}"
            self.initializers.append(numpy_helper.from_array(array, name))
            self.constants[key] = name
        return self.constants[key]

    def shape(self, *dims: int) -> str:
        return self.const(list(dims), np.int64)


def build_graph(
    plan: Plan, steps: int, *, weights_as_inputs: bool = False, outputs: Sequence[str] = OUTPUTS
) -> onnx.ModelProto:
    """The fixed-`steps` inference of a plan as one ONNX model (outputs: see the module docstring)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 to export, got {steps}")
    unknown = set(outputs) - set(OUTPUTS) - set(EXTRA_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {', '.join(OUTPUTS + EXTRA_OUTPUTS)}")
    g = _Graph(weights_as_inputs)
    shape = plan.input_shape
    x = "x"
    if isinstance(plan, QuadraticPlan):
        latents, energy, reconstruction, finals = _quadratic(g, plan, x, steps, shape)
    else:
        latents, energy, reconstruction, finals = _levelwise(g, plan, x, steps)
    graph_outputs = []
    if "latents" in outputs:
        for i, (name, lat) in enumerate(zip(latents, plan.shapes), 1):
            g.nodes.append(helper.make_node("Identity", [name], [f"latent_{i}"]))
            graph_outputs.append(helper.make_tensor_value_info(f"latent_{i}", TensorProto.FLOAT, ["batch", *lat]))
    if "energy" in outputs:
        g.nodes.append(helper.make_node("Identity", [energy], ["energy"]))
        graph_outputs.append(helper.make_tensor_value_info("energy", TensorProto.FLOAT, [steps + 1, "batch"]))
    if "reconstruction" in outputs:
        g.nodes.append(helper.make_node("Identity", [reconstruction()], ["reconstruction"]))
        graph_outputs.append(helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, ["batch", *shape]))
    if "predictions" in outputs or "errors" in outputs:
        predictions, errors = finals()
        for key, names in (("prediction", predictions), ("error", errors)):
            if f"{key}s" not in outputs:
                continue
            for i, name in enumerate(names, 1):
                g.nodes.append(helper.make_node("Identity", [name], [f"{key}_{i}"]))
                graph_outputs.append(helper.make_tensor_value_info(f"{key}_{i}", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *shape]), *g.inputs]
    graph = helper.make_graph(g.nodes, f"pcmodel-{plan.kind}-T{steps}", inputs, graph_outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pcmodel")
    model.ir_version = 8  # readable by onnxruntime releases from 1.14 on
    return model


def _quadratic(g: _Graph, plan: QuadraticPlan, x: str, steps: int, shape: tuple[int, int, int]):
    """s <- s M_s + c_s - s / (1/kappa + s^2): MatMul + Add + four elementwise nodes per step."""
    n = plan.size
    flat = g.op("Flatten", x, axis=1)  # (B, n_x)
    step, drive = g.weight("step", plan.step), g.weight("drive", plan.drive)
    c = g.op("MatMul", flat, drive)  # (B, n)
    if plan.start is None:
        s = g.op("ConstantOfShape", g.op("Shape", c), value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    else:
        s = g.op("MatMul", flat, g.weight("start", plan.start))
    qinv = g.weight("qinv", plan.qinv) if plan.has_cauchy else ""
    states, drives = [s], []
    for t in range(steps + 1):
        z = g.op("Add", g.op("MatMul", s, step), c)
        drives.append(z)
        if t == steps:
            break
        if plan.has_cauchy:
            q = g.op("Add", g.op("Mul", s, s), qinv)
            s = g.op("Sub", z, g.op("Div", s, q))
        else:
            s = z
        states.append(s)
    history = g.op("Reshape", g.op("Concat", *states, axis=1), g.shape(0, steps + 1, n))  # (B, T+1, n)
    zs = g.op("Reshape", g.op("Concat", *drives, axis=1), g.shape(0, steps + 1, n))
    scale = g.weight("scale", plan.scale)
    scale2 = g.op("Mul", scale, scale)
    gap = g.op("Sub", g.op("Sub", history, zs), g.op("Unsqueeze", c, g.shape(1)))
    quad = g.op("MatMul", g.op("Mul", history, gap), g.op("Mul", scale2, g.const(0.5 / plan.eta)))  # (B, T+1)
    base = g.op("MatMul", g.op("Mul", flat, flat), g.weight("omega", plan.omega))  # (B,)
    energy = g.op("Add", quad, g.op("Add", g.op("Unsqueeze", base, g.shape(1)), g.weight("const", plan.const)))
    if plan.has_cauchy:
        logs = g.op("Log", g.op("Add", g.op("Mul", g.op("Mul", history, history), scale2), g.const(1.0)))
        energy = g.op("Add", energy, g.op("MatMul", logs, g.weight("cauchy_alpha", plan.cauchy_alpha)))
    energy = g.op("Transpose", energy, perm=[1, 0])
    final = g.op("Mul", s, scale)
    latents, offset = [], 0
    for lat in plan.shapes:
        size = int(np.prod(lat))
        part = g.op("Slice", final, g.shape(offset), g.shape(offset + size), g.shape(1))
        latents.append(g.op("Reshape", part, g.shape(0, *lat)))
        offset += size

    def reconstruction() -> str:
        return g.op("Reshape", g.op("MatMul", s, g.weight("reconstruct", plan.reconstruct)), g.shape(0, *shape))

    def finals() -> tuple[list[str], list[str]]:  # each level's prediction and error at the final state
        predictions, errors = [], []
        lowers = [flat] + [g.op("Flatten", r, axis=1) for r in latents[:-1]]
        for i, (r, lower) in enumerate(zip(latents, lowers)):
            dims = g.shape(0, *plan.target_shapes[i])
            p = g.op("MatMul", g.op("Flatten", r, axis=1), g.weight(f"predict_map{i}", plan.predict_maps[i]))
            t = g.op("MatMul", lower, g.weight(f"target_map{i}", plan.target_maps[i]))
            predictions.append(g.op("Reshape", p, dims))
            errors.append(g.op("Reshape", g.op("Sub", t, p), dims))
        return predictions, errors

    return latents, energy, reconstruction, finals


def _reduce_all(g: _Graph, op_type: str, value: str, rank: int) -> str:
    axes = list(range(1, rank))
    if op_type == "ReduceSum":  # axes are an input from opset 13
        return g.op("ReduceSum", value, g.shape(*axes), keepdims=0)
    return g.op(op_type, value, axes=axes, keepdims=0)


def _levelwise(g: _Graph, plan: LevelwisePlan, x: str, steps: int):
    """The torch engine's level loop (backends.run_levelwise) as nodes, level 1 in phase layout."""
    levels = plan.levels
    count = len(levels)
    eta = plan.eta
    first = levels[0]
    predict = [g.weight(f"predict{i}", lv.predict) for i, lv in enumerate(levels)]
    adjoint = [g.weight(f"adjoint{i}", lv.adjoint) for i, lv in enumerate(levels)]
    unfold = [g.weight(f"unfold{i}", lv.unfold) if lv.unfold is not None else "" for i, lv in enumerate(levels)]
    one = g.const(1.0)

    def rank(lv: PlanLevel) -> int:
        return 3 if lv.kind == "patch" else 4

    def patches(i: int, lower: str) -> str:  # t_l(lower): windowed patches (B, D, M)
        lv = levels[i]
        d = lv.level.geometry.patch_size
        return g.op(
            "Reshape", g.op("Conv", lower, unfold[i], strides=list(lv.level.geometry.stride)), g.shape(0, d, -1)
        )

    def target_of(i: int, lower: str) -> str:
        return patches(i, lower) if levels[i].kind == "patch" else lower

    def predict_of(i: int, r: str) -> str:
        lv = levels[i]
        if lv.kind == "phase":
            mh, mw = lv.taps
            return g.op("Conv", r, predict[i], pads=[mh - 1, mw - 1, mh - 1, mw - 1])
        if lv.kind == "conv":
            return g.op("ConvTranspose", r, predict[i], strides=list(lv.level.geometry.stride))
        causes = lv.level.geometry.latent[0]
        return g.op("MatMul", predict[i], g.op("Reshape", r, g.shape(0, causes, -1)))  # (D, C) @ (B, C, M)

    reversed_taps: dict[str, str] = {}

    def swap_and_reverse(weight: str) -> str:  # (C, C0 s^2, mh, mw) -> (C0 s^2, C, mh, mw), taps reversed
        if weight not in reversed_taps:
            swapped = g.op("Transpose", weight, perm=[1, 0, 2, 3])
            end = -(2**63)  # Slice with step -1 to the start of the axis
            reversed_taps[weight] = g.op(
                "Slice", swapped, g.shape(-1, -1), g.shape(end, end), g.shape(2, 3), g.shape(-1, -1)
            )
        return reversed_taps[weight]

    def adjoint_of(i: int, d: str, weight: str) -> str:
        lv = levels[i]
        if lv.kind == "phase":
            # conv2d(d, A) as a ConvTranspose of d with A's channel axes swapped and its taps reversed, padded
            # by taps - 1: the same sums, and onnxruntime's ConvTranspose runs these shapes (48 -> 8 channels,
            # 2 x 2 taps) 1.5-3x faster than its Conv (docs/PERFORMANCE.md). Folded once as a constant.
            mh, mw = lv.taps
            return g.op("ConvTranspose", d, swap_and_reverse(weight), pads=[mh - 1, mw - 1, mh - 1, mw - 1])
        if lv.kind == "conv":
            return g.op("Conv", d, weight, strides=list(lv.level.geometry.stride))
        return g.op("Reshape", g.op("MatMul", weight, d), g.shape(0, *lv.level.geometry.latent))

    def pull(i: int, e: str) -> str:  # t_l^T(e): an error in level i's target space back onto the map below
        lv = levels[i]
        if lv.kind != "patch":
            return e
        grid = lv.level.geometry.latent[1:]
        e4 = g.op("Reshape", e, g.shape(0, lv.level.geometry.patch_size, *grid))
        return g.op("ConvTranspose", e4, unfold[i], strides=list(lv.level.geometry.stride))

    if first.kind == "phase":
        c0, h, w = first.level.geometry.lower
        sh, sw = first.phase
        padded = x
        if first.pad != (0, 0):
            padded = g.op("Pad", x, g.shape(0, 0, 0, 0, 0, 0, first.pad[0], first.pad[1]))
        ph, pw = (h + first.pad[0]) // sh, (w + first.pad[1]) // sw
        split = g.op("Reshape", padded, g.shape(0, c0, ph, sh, pw, sw))
        split = g.op("Transpose", split, perm=[0, 1, 3, 5, 2, 4])
        first_target = g.op("Reshape", split, g.shape(0, c0 * sh * sw, ph, pw))
    else:
        first_target = target_of(0, x)

    latents: list[str] = []
    lower = x
    for i, lv in enumerate(levels):
        if lv.feedforward is None:
            batch = g.op("Slice", g.op("Shape", x), g.shape(0), g.shape(1))
            dims = g.op("Concat", batch, g.shape(*lv.level.geometry.latent), axis=0)
            r = g.op("ConstantOfShape", dims, value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
        else:
            target = first_target if i == 0 else target_of(i, lower)
            r = adjoint_of(i, target, g.weight(f"feedforward{i}", lv.feedforward))
        latents.append(r)
        lower = r

    squared = [[] for _ in levels]  # |e_l|^2 per step
    priors = [[] for _ in levels]  # sum log(1 + r^2) or |r|^2 per step
    errors: list[str] = []
    predictions: list[str] = []
    for t in range(steps + 1):
        errors, predictions, squares = [], [], []
        for i, lv in enumerate(levels):
            a = predict_of(i, latents[i])
            p = g.op("Tanh", a) if lv.tanh else a
            target = first_target if i == 0 else target_of(i, latents[i - 1])
            e = g.op("Sub", target, p)
            squared[i].append(_reduce_all(g, "ReduceSumSquare", e, rank(lv)))
            q = ""
            if lv.alpha > 0 and lv.prior == "cauchy":
                q = g.op("Add", g.op("Mul", latents[i], latents[i]), one)
                priors[i].append(_reduce_all(g, "ReduceSum", g.op("Log", q), 4))
            elif lv.alpha > 0:
                priors[i].append(_reduce_all(g, "ReduceSumSquare", latents[i], 4))
            errors.append(e)
            predictions.append(p)
            squares.append(q)
        if t == steps:
            break
        fresh = []
        for i, lv in enumerate(levels):
            e, p, r = errors[i], predictions[i], latents[i]
            d = g.op("Mul", e, g.op("Sub", one, g.op("Mul", p, p))) if lv.tanh else e
            u = adjoint_of(i, d, adjoint[i])
            if lv.alpha > 0 and lv.prior == "cauchy":
                base = g.op(
                    "Sub", g.op("Add", u, r), g.op("Mul", g.op("Div", r, squares[i]), g.const(2 * eta * lv.alpha))
                )
            elif lv.alpha > 0:
                base = g.op("Add", u, g.op("Mul", r, g.const(1 - 2 * eta * lv.alpha)))
            else:
                base = g.op("Add", u, r)
            if i + 1 < count:
                base = g.op("Sub", base, g.op("Mul", pull(i + 1, errors[i + 1]), g.const(lv.above)))
            fresh.append(base)
        latents = fresh

    total = g.weight("const", plan.const)
    for i, lv in enumerate(levels):
        per_step = g.op("Reshape", g.op("Concat", *squared[i], axis=0), g.shape(steps + 1, -1))
        total = g.op("Add", total, g.op("Mul", per_step, g.const(1 / lv.sigma2)))
        if priors[i]:
            per_step = g.op("Reshape", g.op("Concat", *priors[i], axis=0), g.shape(steps + 1, -1))
            total = g.op("Add", total, g.op("Mul", per_step, g.const(lv.alpha)))
    final_predictions, final_errors = predictions, errors  # the last iteration: the final state

    def merge(phases: str) -> str:  # phase layout -> the input grid
        c0, h, w = first.level.geometry.lower
        sh, sw = first.phase
        ph, pw = (h + first.pad[0]) // sh, (w + first.pad[1]) // sw
        merged = g.op("Reshape", phases, g.shape(0, c0, sh, sw, ph, pw))
        merged = g.op("Transpose", merged, perm=[0, 1, 4, 2, 5, 3])
        merged = g.op("Reshape", merged, g.shape(0, c0, ph * sh, pw * sw))
        return g.op("Slice", merged, g.shape(0, 0), g.shape(h, w), g.shape(2, 3))

    def reconstruction() -> str:
        p = final_predictions[0]
        if first.kind == "phase":
            return merge(p)
        if first.kind == "conv":
            return p
        # Modules: the least-squares average of the overlapping (windowed) module predictions.
        ones = torch.ones((1, *first.level.geometry.lower), dtype=torch.float64)
        weight = first.level.target_adjoint(first.level.target(ones)).to(torch.float32).numpy()
        return g.op("Div", pull(0, p), g.const(weight))

    def finals() -> tuple[list[str], list[str]]:
        if first.kind != "phase":
            return list(final_predictions), list(final_errors)
        return [merge(final_predictions[0]), *final_predictions[1:]], [merge(final_errors[0]), *final_errors[1:]]

    return latents, total, reconstruction, finals


# ---- pc-export -------------------------------------------------------------------------------------


def export(
    model: Any, steps: int, path: str | Path, input_hw: Sequence[int] | None = None, check: bool = True
) -> dict[str, Any]:
    """Write the fixed-`steps` inference of `model` at one input size to an ONNX file; returns a summary.

    With `check`, onnxruntime runs the file on a random batch and its latents must match the torch
    engine's within 1e-4 (raises ValueError otherwise).
    """
    from .backends import make_plan

    hw = tuple(model.config.input_shape[1:] if input_hw is None else input_hw)
    start = time.perf_counter()
    plan = make_plan(model, hw, torch.float32, torch.device("cpu"))
    graph = build_graph(plan, steps)
    for key, value in {
        "model": model.name,
        "sha256": model.sha256,
        "steps": str(steps),
        "input_size": "x".join(str(v) for v in (model.config.input_shape[0], *hw)),
        "outputs": "latent_1..latent_L (batch, causes, H_l, W_l); energy (steps+1, batch); reconstruction",
    }.items():
        graph.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(graph)
    Path(path).write_bytes(graph.SerializeToString())
    seconds = time.perf_counter() - start
    summary: dict[str, Any] = {
        "path": str(path),
        "model": model.name,
        "sha256": model.sha256,
        "steps": steps,
        "plan": plan.kind,
        "input": ["batch", model.config.input_shape[0], *hw],
        "nodes": len(graph.graph.node),
        "bytes": Path(path).stat().st_size,
        "export_seconds": round(seconds, 3),
        "outputs": [o.name for o in graph.graph.output],
    }
    if check:
        summary["max_abs_difference"] = check_file(model, path, steps, hw)
    return summary


def check_file(model: Any, path: str | Path, steps: int, hw: Sequence[int], batch: int = 3, seed: int = 0) -> float:
    """Largest |latent difference| between the ONNX file (onnxruntime) and the torch engine on random input."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, model.config.input_shape[0], *hw), generator=generator)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x.numpy()})))
    expected = model.infer(x, steps=steps, backend="torch")
    worst = max(float(np.abs(values[f"latent_{i + 1}"] - r.numpy()).max()) for i, r in enumerate(expected.latents))
    if not worst <= 1e-4:
        raise ValueError(f"{path}: onnxruntime's latents differ from the torch engine's by {worst:.3g} (> 1e-4)")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pc-export",
        description="Write fixed-T inference as an ONNX file (input x; outputs latent_1..L, energy, reconstruction).",
    )
    parser.add_argument("model", help="checkpoint path or model name (default, conv-rgb, rao-ballard-1999)")
    parser.add_argument("--steps", type=int, default=None, help="inference steps T (default: the model's)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: native)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-torch check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import pcmodel

    try:
        model = pcmodel.load(args.model)
        steps = model.config.steps if args.steps is None else args.steps
        summary = export(model, steps, args.output, args.size, check=not args.no_check)
    except (OSError, ValueError) as exc:
        print(f"pc-export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
