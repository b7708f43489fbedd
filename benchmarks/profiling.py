"""Where the time goes: `pc-bench --profile` (torch operators and onnxruntime nodes per step) and, with
`--ideas`, microbenchmarks of level 1's two maps (strided and phase layout, oneDNN on and off)."""

from __future__ import annotations

import collections
import json
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F

import pcmodel
from pcmodel import kinds
from pcmodel.engines import onnxruntime as ort_engine
from pcmodel.engines import plans
from pcmodel.engines.onnx_graph import build_graph

from .cases import Case
from .timing import time_call


def profile_case(case: Case, steps: int) -> dict[str, Any]:
    """Where the time goes: torch backend operators and onnxruntime nodes, per step."""
    from torch.profiler import ProfilerActivity, profile

    ort = ort_engine.import_onnxruntime()

    model = pcmodel.load(case.model).with_dynamics(init="zero", solver="gradient")  # the paper's, as peers run
    x = torch.rand((case.batch, model.config.input_shape[0], *case.size)) * 2 - 1
    model.infer(x, steps=steps, backend="torch", solver="gradient")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.infer(x, steps=steps, backend="torch", solver="gradient")
    aten = sorted(
        (e for e in prof.key_averages() if e.key.startswith("aten::") and e.self_cpu_time_total > 0),
        key=lambda e: -e.self_cpu_time_total,
    )
    torch_ops = [
        {"op": e.key, "calls_per_step": round(e.count / steps, 2), "self_us_total": round(e.self_cpu_time_total, 1)}
        for e in aten[:15]
    ]
    plan = plans.make_plan(model.config, model.params, case.size, torch.float32, torch.device("cpu"))
    graph = build_graph(plan, steps, outputs=("latents", "energy"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_profiling = True
    options.log_severity_level = 3
    options.graph_optimization_level = ort_engine.ort_optimization(plan.kind)
    options.profile_file_prefix = os.path.join(os.environ.get("TMPDIR", "/tmp"), "pc-bench-ort")
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {"x": x.numpy()})
    path = session.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.unlink(path)
    nodes: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            nodes[e["args"]["op_name"]].append(e["dur"])
    runs = 3
    ort_nodes = sorted(
        (
            {"op": op, "nodes_per_step": round(len(d) / runs / steps, 2), "us_per_run": round(sum(d) / runs, 1)}
            for op, d in nodes.items()
        ),
        key=lambda r: -r["us_per_run"],
    )
    return {
        "case": case.label,
        "torch_ops_per_step": round(sum(e.count for e in aten) / steps, 1),
        "torch": torch_ops,
        "onnx_nodes": len(graph.graph.node),
        "onnxruntime_kernels_per_step": round(sum(len(d) for d in nodes.values()) / runs / steps, 1),
        "onnxruntime": ort_nodes[:15],
    }


def op_timings(model: pcmodel.PCModel, x: torch.Tensor, min_time: float) -> dict[str, float]:
    """Microseconds per call of level 1's two maps, strided (oneDNN on and off) and in phase layout."""
    level = model.levels(x.shape[-2:])[0]
    if level.config.kind != "convolutional":
        return {}
    U, stride = model.weights[0], level.geometry.stride
    r = torch.randn((x.shape[0], *level.geometry.latent))
    predict, adjoint, taps = kinds.phase_kernels(U, stride)
    pad = tuple(s * (n + m - 1) - h for s, n, m, h in zip(stride, level.geometry.latent[1:], taps, x.shape[-2:]))
    phases = kinds.phase_split(x, stride, pad).contiguous()
    calls = {
        "conv_transpose2d": lambda: F.conv_transpose2d(r, U, stride=stride),
        "conv2d (stride)": lambda: F.conv2d(x, U, stride=stride),
        "phase: predict conv": lambda: F.conv2d(r, predict, padding=(taps[0] - 1, taps[1] - 1)),
        "phase: adjoint conv": lambda: F.conv2d(phases, adjoint),
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for enabled in (True, False):
            with torch.backends.mkldnn.flags(enabled=enabled):
                for name, call in calls.items():
                    call()
                    out[f"{name}, oneDNN {'on' if enabled else 'off'}"] = 1e6 * time_call(call, min_time)
    return out
