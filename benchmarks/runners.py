"""The backends pc-bench times: for each, a call returning the final latents and its one-off costs apart.

Cases (a) reference, (b) torch, (c) onnxruntime, (d) CUDA graphs, (e) pcx (benchmarks.pcx_port),
(f) the strongest JAX peer (benchmarks.jax_peer) and (g) numba; `--ideas` adds the alternatives recorded
in docs/PERFORMANCE.md. Every change of an engine's settings goes through `configure_engine`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import pcmodel
from pcmodel.engines import cuda_graph, numba_quadratic, plans
from pcmodel.engines import onnxruntime as ort_engine
from pcmodel.engines.onnx_graph import build_graph

from .reference import reference_infer

log = logging.getLogger(__name__)

LETTERS = {"reference": "a", "torch": "b", "onnxruntime": "c", "cuda-graph": "d", "pcx": "e", "jax": "f", "numba": "g"}


def configure_engine(model: pcmodel.PCModel, backend: str, **settings: Any) -> None:
    """Set one backend's settings on one model (e.g. onnxruntime sharding, CUDA-graph precision).

    This is the ONLY place pc-bench writes into pcmodel's engines: their API is being reworked (a backend
    registry replaces the per-model engine attributes), so a merge adapts this function and nothing else.
    An unknown setting raises instead of silently adding an attribute the engine never reads.
    """
    engine = model.engines.backend(backend)
    for key, value in settings.items():
        if not hasattr(engine, key):
            raise AttributeError(f"the {backend} engine has no setting {key!r}")
        setattr(engine, key, value)


@dataclass
class Runner:
    """One backend of one case: a call returning the final latents, and its one-off costs (seconds)."""

    name: str
    call: Callable[[], list[torch.Tensor]]
    one_off: dict[str, float]
    note: str = ""


def to_cpu(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Latents as float32 CPU tensors (waiting for the GPU first, so a timed call includes its work)."""
    if tensors and tensors[0].is_cuda:
        torch.cuda.synchronize()
    return [t.detach().float().cpu() for t in tensors]


def runners(model: pcmodel.PCModel, x: torch.Tensor, steps: int, names: list[str], ideas: bool) -> list[Runner]:
    """The backends to time for one case (those that cannot run here are skipped with a log line)."""
    out = []
    config, weights = model.config, model.weights
    for name in names:
        if name == "reference":
            out.append(Runner(name, lambda: reference_infer(config, weights, x, steps)[0], {}))
        elif name == "torch":
            out.append(
                Runner(name, lambda: model.infer(x, steps=steps, backend="torch", solver="gradient").latents, {})
            )
        elif name == "onnxruntime":
            out.append(_ort_runner(model, x, steps, name))
            if ort_engine.ort_shards(x.shape[0], torch.get_num_threads()) > 1:
                out.append(_unsharded_runner(model, x, steps))
            if ideas:
                other = "all" if plans.plan_kind(model.config, x.shape[-2:]) == "levelwise" else "extended"
                out.append(_ort_runner(model, x, steps, f"onnxruntime-{other}", level=other))
        elif name == "cuda-graph":
            if not torch.cuda.is_available():
                log.info("cuda-graph: no CUDA device here, skipped")
                continue
            out.extend(_cuda_runners(model, x, steps))
        elif name == "pcx":
            runner = _pcx_runner(model, x, steps)
            if runner is not None:
                out.append(runner)
        elif name == "numba":
            if plans.plan_kind(model.config, x.shape[-2:]) != "quadratic" or not numba_quadratic.available():
                log.info("numba: not a quadratic plan here, or numba not installed; skipped")
                continue
            model.infer(x, steps=steps, backend="numba", solver="gradient")  # compiles (or loads the cached kernels)
            out.append(
                Runner(name, lambda: model.infer(x, steps=steps, backend="numba", solver="gradient").latents, {})
            )
        elif name == "jax":
            runner = _jax_runner(model, x, steps)
            if runner is not None:
                out.append(runner)
        else:
            raise ValueError(f"unknown backend {name!r}")
    if ideas:
        out.extend(_idea_runners(model, x, steps))
    return out


def _ort_runner(model: pcmodel.PCModel, x: torch.Tensor, steps: int, name: str, level: str | None = None) -> Runner:
    """onnxruntime with its one-off costs measured apart: plan, graph build ("export"), session."""
    ort = ort_engine.import_onnxruntime()
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    start = time.perf_counter()
    plan = plans.make_plan(model.config, model.params, hw, torch.float32, torch.device("cpu"))
    planned = time.perf_counter()
    graph = build_graph(plan, steps, outputs=("latents", "energy"))
    built = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }
    options.graph_optimization_level = levels[level] if level else ort_engine.ort_optimization(plan.kind)
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ready = time.perf_counter()
    count = len(plan.shapes)
    one_off = {"plan": planned - start, "export": built - planned, "session": ready - built}

    if name == "onnxruntime":  # the backend itself, through model.infer, exactly as users call it
        model.infer(x, steps=steps, backend="onnxruntime", solver="gradient")

        def call() -> list[torch.Tensor]:
            return model.infer(x, steps=steps, backend="onnxruntime", solver="gradient").latents
    else:

        def call() -> list[torch.Tensor]:
            values = session.run([f"latent_{i + 1}" for i in range(count)], {"x": x.numpy()})
            return [torch.from_numpy(v) for v in values]

    note = f"{len(graph.graph.node)} nodes"
    return Runner(name, call, one_off, note)


def _unsharded_runner(model: pcmodel.PCModel, x: torch.Tensor, steps: int) -> Runner:
    """onnxruntime as before batches were sharded: the whole batch on one session with all threads."""
    # its own engine state
    whole = pcmodel.PCModel(model.config, model.params, allow_unstable=True, amortiser=model.amortiser)
    configure_engine(whole, "onnxruntime", sharding=False)
    whole.infer(x, steps=steps, backend="onnxruntime", solver="gradient")
    return Runner(
        "onnxruntime-unsharded",
        lambda: whole.infer(x, steps=steps, backend="onnxruntime", solver="gradient").latents,
        {},
    )


def _cuda_runners(model: pcmodel.PCModel, x: torch.Tensor, steps: int) -> list[Runner]:
    """CUDA graphs in float32 (TF32 off), TF32 and bf16 operands, and the eager torch backend on the GPU."""
    out = []
    gpu_x = x.cuda()
    eager = pcmodel.PCModel(model.config, model.params, allow_unstable=True, device="cuda", amortiser=model.amortiser)
    eager.infer(gpu_x, steps=1, backend="torch")
    out.append(
        Runner("torch-cuda", lambda: eager.infer(gpu_x, steps=steps, backend="torch", solver="gradient").latents, {})
    )
    for precision in cuda_graph.CUDA_PRECISIONS:
        gpu = pcmodel.PCModel(model.config, model.params, allow_unstable=True, device="cuda", amortiser=model.amortiser)
        configure_engine(gpu, "cuda-graph", precision=precision)
        start = time.perf_counter()
        gpu.infer(gpu_x, steps=steps, backend="cuda-graph", solver="gradient")
        seconds = time.perf_counter() - start
        name = "cuda-graph" if precision == "float32" else f"cuda-graph-{precision}"

        def call(gpu: pcmodel.PCModel = gpu) -> list[torch.Tensor]:
            return gpu.infer(gpu_x, steps=steps, backend="cuda-graph", solver="gradient").latents

        out.append(Runner(name, call, {"plan+capture+first run": seconds}))
    return out


def _idea_runners(model: pcmodel.PCModel, x: torch.Tensor, steps: int) -> list[Runner]:
    """Ideas measured for docs/PERFORMANCE.md: the plain hand-derived loop (no autograd, nothing else
    changed) and the torch backend with oneDNN off."""
    out = [
        Runner(
            "loop (hand-derived, plain)",
            lambda: model.infer(x, steps=steps, backend="loop", solver="gradient").latents,
            {},
        )
    ]

    def onednn_off() -> list[torch.Tensor]:
        with warnings.catch_warnings():  # the flag's context manager warns about Intel-GPU TF32 on every use
            warnings.simplefilter("ignore")
            with torch.backends.mkldnn.flags(enabled=False):
                return model.infer(x, steps=steps, backend="torch", solver="gradient").latents

    out.append(Runner("torch-onednn-off", onednn_off, {}))
    return out


def _jax_runner(model: pcmodel.PCModel, x: torch.Tensor, steps: int) -> Runner | None:
    """Case (f): the strongest JAX peer (benchmarks/jax_peer.py): the fastest of its variants on this case."""
    try:
        from .jax_peer import jax_runner
    except ImportError as exc:  # pragma: no cover - jax is in the bench extra
        log.info("jax: not importable (%s); install the bench extra", exc)
        return None
    start = time.perf_counter()
    call, info = jax_runner(model, x, steps)
    seconds = time.perf_counter() - start
    ms = ", ".join(f"{name} {v:.3g}" for name, v in info["prepare_ms"].items())
    note = f"jax {info['jax']}, {info['variant']} (variants, ms: {ms})"
    return Runner("jax", call, {"jit compile and choice": seconds}, note)


def _pcx_runner(model: pcmodel.PCModel, x: torch.Tensor, steps: int) -> Runner | None:
    """Case (e): the same network in pcx's idioms (benchmarks.pcx_port), when pcx is importable."""
    from .pcx_port import pcx_inference

    found = pcx_inference(model, x, steps)
    if found is None:
        return None
    call, seconds, note = found
    return Runner("pcx", call, {"jit compile (first call)": seconds}, note)
