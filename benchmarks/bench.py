"""pc-bench: fixed-T inference of every backend side by side, on the same weights, inputs and steps.

Cases (a) the notebook-style reference (benchmarks.reference: eager PyTorch, autograd of the energy at
every step), (b) the torch backend, (c) onnxruntime, (d) CUDA graphs (when CUDA is available: float32,
TF32 and bf16 operands, and the eager torch backend on the GPU for comparison) and (e) pcx, the same
network written in pcx's idioms (when the optional `pcx` extra is importable), (f) an independent
jax.jit of the network (benchmarks.jax_peer) and (g) the numba backend (quadratic plans, where the
`fast` extra is installed). For each it prints the
largest latent difference from (a), ms per batch, images/s, the speed-up over (a), the model's FLOPs per
step (docs/MODEL.md section 6), the achieved GFLOP/s and its share of this machine's matmul peak (measured
first, in the same run), and the one-off costs (graph build, session, capture, compile) apart. Where
onnxruntime splits the batch into single-threaded shards (`ort_shards`), the whole batch on one
session with all threads runs beside it as "onnxruntime-unsharded".

Timing: every backend of a case is timed once per round, round after round (interleaved, so a busy
machine slows all alike); a sample is the mean over calls filling `--min-time`; the best round counts
and the spread (worst / best - 1) is reported. This is a benchmark, never a test: no target is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import pcmodel
from pcmodel.cliargs import ArgumentParser, fail, model_source, nonnegative_float, positive_int, size_error
from pcmodel.engines import cuda_graph, numba_quadratic, ops, plans
from pcmodel.engines import onnxruntime as ort_engine
from pcmodel.engines.onnx_graph import build_graph

from .reference import reference_infer
from .timing import time_call

log = logging.getLogger(__name__)

DEFAULT_CASES = (
    "conv-rgb:32x32:1",
    "conv-rgb:32x32:32",
    "conv-rgb:128x128:1",
    "conv-rgb:128x128:32",
    "rao-ballard-1999:16x26:1",
    "rao-ballard-1999:16x26:32",
)
LETTERS = {"reference": "a", "torch": "b", "onnxruntime": "c", "cuda-graph": "d", "pcx": "e", "jax": "f", "numba": "g"}


@dataclass(frozen=True)
class Case:
    """One benchmark case: a model (name or checkpoint), an input size and a batch size."""

    model: str
    size: tuple[int, int]
    batch: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.size[0]}x{self.size[1]} B={self.batch}"

    @property
    def text(self) -> str:
        """As --case writes it."""
        return f"{self.model}:{self.size[0]}x{self.size[1]}:{self.batch}"


def check_cases(cases: list[Case]) -> str | None:
    """Why a case cannot run (its model does not load, or its size does not tile the model), else None.

    Loading a checkpoint takes milliseconds: every case is checked before the first is timed.
    """
    for case in cases:
        try:
            model = pcmodel.load(case.model)
        except (OSError, ValueError) as exc:
            return f"--case {case.text}: {exc}"
        if problem := size_error(model.config, case.size):
            return f"--case {case.text}: {problem}"
    return None


def parse_case(text: str) -> Case:
    """MODEL:HxW:B, e.g. conv-rgb:32x32:1 (MODEL: a preset name or a checkpoint path)."""
    try:
        model, size, batch = text.rsplit(":", 2)
        h, w = (int(v) for v in size.lower().split("x"))
        case = Case(model, (h, w), int(batch))
    except ValueError:
        raise argparse.ArgumentTypeError(f"case {text!r} is not MODEL:HxW:B, e.g. conv-rgb:32x32:1") from None
    if min(h, w, case.batch) < 1:
        raise argparse.ArgumentTypeError(f"case {text!r}: sizes and batch must be positive")
    try:
        model_source(model)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"case {text!r}: {exc}") from None
    return case


# ---- the machine ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, library versions and the GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    with contextlib.suppress(ValueError, OSError, AttributeError):  # not every OS names these
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("onnxruntime", "onnx", "numpy", "jax", "pcx", "equinox", "optax"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # not installed
            continue
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": ort_engine.available_cores(),
        "memory_gib": memory,
        "os": platform.platform(),
        "versions": versions,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return info


def matmul_peak(size: int = 2048, repeats: int = 10) -> dict[str, float]:
    """This machine's float32 matmul rate (GFLOP/s): a size x size torch matmul, best and median of `repeats`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return {"best_gflops": max(rates), "median_gflops": statistics.median(rates), "size": size}


def flops_per_step(model: pcmodel.PCModel, size: tuple[int, int], batch: int) -> dict[str, Any]:
    """docs/MODEL.md section 6: sum_l 4 B C_l C_{l-1} kh kw H_l W_l (prediction and U^T e), plus ~10 per element.

    Module and dense levels fit the same formula with H_l W_l = the number of modules. `bytes_floor`:
    the memory traffic of one perfectly fused step (read the input and every latent, write every latent,
    float32): the bandwidth bound at large batch, where nothing stays in cache.
    """
    per_level = []
    elements = latents = 0
    for level in model.levels(size):
        g = level.geometry
        causes, rows, cols = g.latent
        per_level.append(4 * batch * causes * g.lower[0] * g.kernel[0] * g.kernel[1] * rows * cols)
        error_elements = g.patch_size * rows * cols if level.patchwise else math.prod(g.lower)
        elements += batch * (error_elements + causes * rows * cols)
        latents += batch * causes * rows * cols
    inputs = batch * model.config.input_shape[0] * size[0] * size[1]
    return {
        "matmul": sum(per_level),
        "per_level": per_level,
        "elementwise": 10 * elements,
        "bytes_floor": 4 * (inputs + 2 * latents),
    }


# ---- timing --------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """One backend of one case: a call returning the final latents, and its one-off costs (seconds)."""

    name: str
    call: Callable[[], list[torch.Tensor]]
    one_off: dict[str, float]
    note: str = ""


def _cpu(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
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
            out.append(Runner(name, lambda: model.infer(x, steps=steps, backend="torch").latents, {}))
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
                log.info("numba: not a quadratic plan here, or numba not installed (the fast extra); skipped")
                continue
            model.infer(x, steps=steps, backend="numba")  # compiles (or loads the cached kernels)
            out.append(Runner(name, lambda: model.infer(x, steps=steps, backend="numba").latents, {}))
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
    import onnxruntime as ort

    hw = (int(x.shape[-2]), int(x.shape[-1]))
    start = time.perf_counter()
    plan = plans.make_plan(model.config, model.weights, hw, torch.float32, torch.device("cpu"))
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
        model.infer(x, steps=steps, backend="onnxruntime")

        def call() -> list[torch.Tensor]:
            return model.infer(x, steps=steps, backend="onnxruntime").latents
    else:

        def call() -> list[torch.Tensor]:
            values = session.run([f"latent_{i + 1}" for i in range(count)], {"x": x.numpy()})
            return [torch.from_numpy(v) for v in values]

    note = f"{len(graph.graph.node)} nodes"
    return Runner(name, call, one_off, note)


def _unsharded_runner(model: pcmodel.PCModel, x: torch.Tensor, steps: int) -> Runner:
    """onnxruntime as before batches were sharded: the whole batch on one session with all threads."""
    whole = pcmodel.PCModel(model.config, model.weights, allow_unstable=True)  # its own engine state
    whole.engines.onnxruntime.sharding = False
    whole.infer(x, steps=steps, backend="onnxruntime")
    return Runner("onnxruntime-unsharded", lambda: whole.infer(x, steps=steps, backend="onnxruntime").latents, {})


def _cuda_runners(model: pcmodel.PCModel, x: torch.Tensor, steps: int) -> list[Runner]:
    """CUDA graphs in float32 (TF32 off), TF32 and bf16 operands, and the eager torch backend on the GPU."""
    out = []
    gpu_x = x.cuda()
    eager = pcmodel.PCModel(model.config, model.weights, allow_unstable=True, device="cuda")
    eager.infer(gpu_x, steps=1, backend="torch")
    out.append(Runner("torch-cuda", lambda: eager.infer(gpu_x, steps=steps, backend="torch").latents, {}))
    for precision in cuda_graph.CUDA_PRECISIONS:
        gpu = pcmodel.PCModel(model.config, model.weights, allow_unstable=True, device="cuda")
        gpu.engines.cuda_graph.precision = precision
        start = time.perf_counter()
        gpu.infer(gpu_x, steps=steps, backend="cuda-graph")
        seconds = time.perf_counter() - start
        name = "cuda-graph" if precision == "float32" else f"cuda-graph-{precision}"

        def call(gpu: pcmodel.PCModel = gpu) -> list[torch.Tensor]:
            return gpu.infer(gpu_x, steps=steps, backend="cuda-graph").latents

        out.append(Runner(name, call, {"plan+capture+first run": seconds}))
    return out


def _idea_runners(model: pcmodel.PCModel, x: torch.Tensor, steps: int) -> list[Runner]:
    """Ideas measured for docs/PERFORMANCE.md: the plain hand-derived loop (no autograd, nothing else
    changed) and the torch backend with oneDNN off."""
    out = [Runner("loop (hand-derived, plain)", lambda: model.infer(x, steps=steps, backend="loop").latents, {})]

    def onednn_off() -> list[torch.Tensor]:
        with warnings.catch_warnings():  # the flag's context manager warns about Intel-GPU TF32 on every use
            warnings.simplefilter("ignore")
            with torch.backends.mkldnn.flags(enabled=False):
                return model.infer(x, steps=steps, backend="torch").latents

    out.append(Runner("torch-onednn-off", onednn_off, {}))
    return out


def op_timings(model: pcmodel.PCModel, x: torch.Tensor, min_time: float) -> dict[str, float]:
    """Microseconds per call of level 1's two maps, strided (oneDNN on and off) and in phase layout."""
    level = model.levels(x.shape[-2:])[0]
    if level.config.kind != "convolutional":
        return {}
    U, stride = model.weights[0], level.geometry.stride
    r = torch.randn((x.shape[0], *level.geometry.latent))
    predict, adjoint, taps = plans.phase_kernels(U, stride)
    pad = tuple(s * (n + m - 1) - h for s, n, m, h in zip(stride, level.geometry.latent[1:], taps, x.shape[-2:]))
    phases = plans.phase_split(x, stride, pad).contiguous()
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


# ---- pcx (case e) -------------------------------------------------------------------------------------


def _jax_runner(model: pcmodel.PCModel, x: torch.Tensor, steps: int) -> Runner | None:
    """Case (f): an independent jax.jit of the same network (benchmarks/jax_peer.py), the faster formulation."""
    try:
        from .jax_peer import jax_runner
    except ImportError as exc:  # pragma: no cover - jax is in the bench extra
        log.info("jax: not importable (%s); install the bench extra", exc)
        return None
    start = time.perf_counter()
    call, info = jax_runner(model, x, steps)
    seconds = time.perf_counter() - start
    note = f"jax {info['jax']}, {info['formulation']}"
    return Runner("jax", call, {"jit compile and choice": seconds}, note)


def _pcx_runner(model: pcmodel.PCModel, x: torch.Tensor, steps: int) -> Runner | None:
    """Case (e): the same network in pcx 0.6.3's idioms (Vodes, energy functions, optax SGD on h, scan, jit).

    Written as pcx's own decoder example writes a generative network: per-sample model code vmapped over
    the batch, zero-initialised Vodes through the STATUS.INIT rule, the observation Vode frozen at x, and
    `optax.sgd(k1/2)` on the Vodes' values so that h <- h - (k1/2) dE/dh, the same step as every backend.
    """
    try:
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax
        import pcx as px
        import pcx.functional as pxf
        import pcx.nn as pxnn
        import pcx.predictive_coding as pxc
        import pcx.utils as pxu
    except ImportError as exc:
        log.info("pcx: not importable (%s); install the optional extra: pip install -e '.[pcx]'", exc)
        return None
    config = model.config
    levels = model.levels(x.shape[-2:])
    kinds = [lc.kind for lc in config.levels]
    if any(lc.k1_scale != 1 for lc in config.levels):
        # pcx's idiom is one optax optimiser over every Vode: one step size for all levels.
        log.info(
            "pcx: the model steps each level at its own rate (k1_scale), which pcx's one optimiser cannot; skipped"
        )
        return None
    if len(kinds) != 2 or kinds not in (["convolutional", "convolutional"], ["modules", "dense"]):
        log.info("pcx: case (e) is written for the two presets' shapes, not %s", kinds)
        return None
    l1, l2 = config.levels
    (lat1, lat2) = [lv.geometry.latent for lv in levels]

    def energy_fn(inv_sigma2: float | None, prior: str | None, alpha: float) -> Callable:
        def fn(vode: Any, rkg: Any = None) -> Any:  # per element; pcx sums it per sample
            h = vode.get("h")
            out = 0.0
            if inv_sigma2 is not None:
                e = h - vode.get("u")
                out = inv_sigma2 * e * e
            if alpha:
                out = out + alpha * (h * h if prior == "gaussian" else jnp.log1p(h * h))
            return out

        return fn

    def zero_init(shape: tuple[int, ...]) -> dict[str, Any]:
        return {
            "ruleset": {pxc.STATUS.INIT: ("h, u <- u:to_zero",)},
            "tforms": {"to_zero": lambda n, k, v, rkg: jnp.zeros(shape)},
        }

    U1, U2 = (w.detach().cpu().numpy() for w in model.weights)

    class Network(pxc.EnergyModule):
        def __init__(self) -> None:
            super().__init__()
            key = jax.random.PRNGKey(0)
            if kinds[0] == "convolutional":
                # pcx 0.6.3's pxnn.ConvTranspose passes rkg= on to equinox (TypeError); pxnn.Layer wraps
                # equinox's layer the same way. Equinox takes the kernel (out, in, kh, kw), flipped.
                self.up2 = pxnn.Layer(
                    eqx.nn.ConvTranspose, 2, l2.causes, l1.causes, l2.kernel, l2.stride, use_bias=False, key=key
                )
                self.up1 = pxnn.Layer(
                    eqx.nn.ConvTranspose, 2, l1.causes, x.shape[1], l1.kernel, l1.stride,
                    use_bias=False, key=key,
                )  # fmt: skip
                self.up2.nn.weight.set(jnp.asarray(np.ascontiguousarray(U2.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])))
                self.up1.nn.weight.set(jnp.asarray(np.ascontiguousarray(U1.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])))
                mid_shape: tuple[int, ...] = lat1
                top_shape: tuple[int, ...] = lat2
            else:  # modules sharing U_1 (one Linear applied per module), a dense level 2 over all causes
                modules = lat1[1] * lat1[2]
                self.up2 = pxnn.Linear(l2.causes, l1.causes * modules, bias=False, rkg=px.RandomKeyGenerator(0))
                self.up1 = pxnn.Linear(l1.causes, U1[0].size, bias=False, rkg=px.RandomKeyGenerator(0))
                self.up2.nn.weight.set(jnp.asarray(U2.reshape(l2.causes, -1).T))
                self.up1.nn.weight.set(jnp.asarray(U1.reshape(l1.causes, -1).T))
                mid_shape, top_shape = (l1.causes * modules,), (l2.causes,)
            f1 = jnp.tanh if l1.f == "tanh" else (lambda a: a)
            f2 = jnp.tanh if l2.f == "tanh" else (lambda a: a)
            self.f = px.static((f1, f2))
            self.top = pxc.Vode(energy_fn=energy_fn(None, l2.prior, l2.alpha), **zero_init(top_shape))
            self.mid = pxc.Vode(energy_fn=energy_fn(1 / l2.sigma2, l1.prior, l1.alpha), **zero_init(mid_shape))
            self.obs = pxc.Vode(energy_fn=energy_fn(1 / l1.sigma2, None, 0.0))
            self.obs.h.frozen = True
            self.shapes = px.static((top_shape, lat1))

        def __call__(self, observation: Any) -> Any:
            (top_shape, lat1_shape), (f1, f2) = self.shapes.get(), self.f.get()
            r2 = self.top(jnp.zeros(top_shape))  # u's shape tells pcx the call is per sample
            r1 = self.mid(f2(self.up2(r2)))
            if kinds[0] == "convolutional":
                self.obs(f1(self.up1(r1)))
            else:  # each module predicts its own windowed patch
                self.obs(f1(jax.vmap(self.up1)(r1.reshape(lat1_shape[0], -1).T)))
            if observation is not None:
                self.obs.set("h", observation)
            return self.obs.get("u")

    per_sample = pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0))

    @pxf.vmap(per_sample, in_axes=0, out_axes=0)
    def forward(observation: Any, *, model: Network) -> Any:
        return model(observation)

    @pxf.vmap(per_sample, out_axes=(None, 0), axis_name="batch")
    def energy(*, model: Network) -> Any:
        y = model(None)
        return jax.lax.psum(model.energy(), "batch"), y

    @pxf.jit(static_argnums=0)
    def infer(T: int, observation: Any, *, model: Network, optim_h: Any) -> Any:
        grad = pxf.value_and_grad(pxu.M_hasnot(pxc.VodeParam, frozen=True).to([False, True]), has_aux=True)(energy)
        with pxu.step(model, (pxc.STATUS.INIT, pxc.STATUS.NONE), clear_params=pxc.VodeParam.Cache):
            forward(observation, model=model)
        optim_h.init(pxu.M_hasnot(pxc.VodeParam, frozen=True)(model))

        def body(_: Any, *, model: Network, optim_h: Any) -> Any:
            with pxu.step(model, clear_params=pxc.VodeParam.Cache):
                _, g = grad(model=model)
            optim_h.step(model, g["model"])
            return (), None

        pxf.scan(body, length=T)(model=model, optim_h=optim_h)
        optim_h.clear()
        return model.mid.h.get(), model.top.h.get()

    if kinds[0] == "convolutional":
        observation = jnp.asarray(x.numpy())
    else:  # the windowed patches are the observation, as a pcx user would prepare the data
        observation = jnp.asarray(levels[0].target(x).transpose(1, 2).contiguous().numpy())
    network = Network()
    optim_h = pxu.Optim(lambda: optax.sgd(config.k1 / 2))

    def call() -> list[torch.Tensor]:
        r1, r2 = infer(steps, observation, model=network, optim_h=optim_h)
        r1.block_until_ready()
        batch = x.shape[0]
        return [
            torch.from_numpy(np.array(r1)).reshape(batch, *lat1),
            torch.from_numpy(np.array(r2)).reshape(batch, *lat2),
        ]

    start = time.perf_counter()
    call()
    return Runner("pcx", call, {"jit compile (first call)": time.perf_counter() - start}, "jax " + jax.__version__)


# ---- one case ------------------------------------------------------------------------------------------


def bench_case(
    case: Case, steps: int, names: list[str], rounds: int, min_time: float, peak: float, ideas: bool, seed: int = 0
) -> dict[str, Any]:
    """Time every backend on one case, interleaved; agreement with (a) checked first."""
    model = pcmodel.load(case.model)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((case.batch, model.config.input_shape[0], *case.size), generator=generator) * 2 - 1
    flops = flops_per_step(model, case.size, case.batch)
    with torch.inference_mode(False):
        reference = reference_infer(model.config, model.weights, x, steps)[0]
    model.prepare(steps=[steps], shapes=[case.size], build=False)  # the benchmark prepares what it asks for
    todo = runners(model, x, steps, names, ideas)
    results: dict[str, dict[str, Any]] = {}
    for runner in todo:
        latents = _cpu(runner.call())
        diff = max(float((a - b).abs().max()) for a, b in zip(latents, reference))
        results[runner.name] = {
            "max_abs_diff": diff,
            "one_off_seconds": runner.one_off,
            "samples": [],
            "note": runner.note,
        }
    for _ in range(rounds):
        for runner in todo:
            results[runner.name]["samples"].append(time_call(lambda r=runner: _cpu(r.call()), min_time))
    reference_best = min(results["reference"]["samples"]) if "reference" in results else None
    reference_samples = list(results["reference"]["samples"]) if "reference" in results else None
    for name, r in results.items():
        best, worst = min(r["samples"]), max(r["samples"])
        r.update(
            ms=best * 1e3,
            ms_median=statistics.median(r["samples"]) * 1e3,
            spread=worst / best - 1,
            images_per_s=case.batch / best,
            gflops=steps * flops["matmul"] / best / 1e9,
            gbytes_per_s_floor=steps * flops["bytes_floor"] / best / 1e9,
        )
        r["peak_share"] = r["gflops"] / peak
        r["speedup"] = reference_best / best if reference_best else None
        if reference_samples:  # the ratio per round, measured side by side
            ratios = [a / b for a, b in zip(reference_samples, r["samples"])]
            r["speedup_rounds"] = [round(v, 3) for v in ratios]
        r["letter"] = LETTERS.get(name, "")
        r["samples"] = [round(s * 1e3, 4) for s in r["samples"]]
    ops = op_timings(model, x, min_time) if ideas else {}
    return {
        "ops_us": ops,
        "case": case.label,
        "model": model.name,
        "size": list(case.size),
        "batch": case.batch,
        "steps": steps,
        "plan": plans.plan_kind(model.config, case.size),
        "flops_per_step": flops,
        "results": results,
    }


# ---- profiles ------------------------------------------------------------------------------------------


def profile_case(case: Case, steps: int) -> dict[str, Any]:
    """Where the time goes: torch backend operators and onnxruntime nodes, per step."""
    import collections
    import json as _json

    import onnxruntime as ort
    from torch.profiler import ProfilerActivity, profile

    model = pcmodel.load(case.model)
    x = torch.rand((case.batch, model.config.input_shape[0], *case.size)) * 2 - 1
    model.infer(x, steps=steps, backend="torch")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.infer(x, steps=steps, backend="torch")
    aten = sorted(
        (e for e in prof.key_averages() if e.key.startswith("aten::") and e.self_cpu_time_total > 0),
        key=lambda e: -e.self_cpu_time_total,
    )
    torch_ops = [
        {"op": e.key, "calls_per_step": round(e.count / steps, 2), "self_us_total": round(e.self_cpu_time_total, 1)}
        for e in aten[:15]
    ]
    plan = plans.make_plan(model.config, model.weights, case.size, torch.float32, torch.device("cpu"))
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
        events = _json.load(f)
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
        "torch_ops_per_step": round(sum(e.count for e in ops) / steps, 1),
        "torch": torch_ops,
        "onnx_nodes": len(graph.graph.node),
        "onnxruntime_kernels_per_step": round(sum(len(d) for d in nodes.values()) / runs / steps, 1),
        "onnxruntime": ort_nodes[:15],
    }


# ---- reporting -----------------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    """The results as a Markdown table (one row per case and backend)."""
    lines = [
        "| case | backend | ms/batch | spread | images/s | x (a) | max abs diff | GFLOP/s | % peak | one-off (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in report["cases"]:
        for name, r in case["results"].items():
            label = f"({r['letter']}) {name}" if r["letter"] else name
            one_off = ", ".join(f"{k} {v:.3g}" for k, v in r["one_off_seconds"].items()) or "-"
            speedup = f"{r['speedup']:.2f}" if r["speedup"] else "-"
            share = f"{100 * r['peak_share']:.1f}"
            lines.append(
                f"| {case['case']} | {label} | {r['ms']:.3f} | {100 * r['spread']:.0f}% | {r['images_per_s']:.0f} | "
                f"{speedup} | {r['max_abs_diff']:.1e} | {r['gflops']:.2f} | {share} | {one_off} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="pc-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--case",
        dest="cases",
        type=parse_case,
        action="append",
        help="MODEL:HxW:B (repeatable; default: the six cases)",
    )
    parser.add_argument("--steps", type=positive_int, default=100, help="inference steps T (default: %(default)s)")
    parser.add_argument(
        "--backends",
        default="reference,torch,onnxruntime,numba,cuda-graph,pcx,jax",
        help="comma-separated subset of reference,torch,onnxruntime,numba,cuda-graph,pcx,jax (default: all)",
    )
    parser.add_argument("--rounds", type=positive_int, default=5, help="timing rounds per case (default: %(default)s)")
    parser.add_argument(
        "--min-time", type=nonnegative_float, default=0.2, help="seconds per timing sample (default: %(default)s)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch and onnxruntime threads (default: all cores)"
    )
    parser.add_argument("--ideas", action="store_true", help="also time the alternatives recorded in PERFORMANCE.md")
    parser.add_argument("--profile", action="store_true", help="also profile the torch backend and onnxruntime")
    parser.add_argument(
        "--peak-size", type=positive_int, default=2048, help="matmul size for the peak (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="pc-bench: %(message)s")
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = set(names) - set(LETTERS)
    if unknown or not names:
        parser.error(f"argument --backends: unknown {sorted(unknown)}; choose from {', '.join(LETTERS)}")
    if problem := check_cases(args.cases or [parse_case(c) for c in DEFAULT_CASES]):
        return fail("pc-bench", problem)
    threads = args.threads or ort_engine.available_cores()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)  # onnxruntime sessions take torch's thread count
    if "jax" in names and "jax" not in sys.modules:
        from .jax_peer import configure_threads

        configure_threads(threads)  # XLA fixes its thread pools when jax is first imported
    try:
        return _run(args, names, threads)
    finally:
        torch.set_num_threads(saved)


def _run(args: argparse.Namespace, names: list[str], threads: int) -> int:
    cases = args.cases or [parse_case(c) for c in DEFAULT_CASES]
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "steps": args.steps,
            "rounds": args.rounds,
            "min_time_s": args.min_time,
            "threads": {"torch_intra_op": threads, "onnxruntime_intra_op": threads, "onnxruntime_inter_op": 1},
            "onnxruntime_shards": f"min({threads}, batch) with 1 intra-op thread each (ort_shards)",
            "input": "uniform in [-1, 1], seed 0; weights: the shipped checkpoint or the seed-0 preset",
        },
    }
    report["matmul_peak"] = matmul_peak(args.peak_size)  # first, in the same run as the cases
    peak = report["matmul_peak"]["best_gflops"]
    report["cases"] = []
    for case in cases:
        try:
            report["cases"].append(bench_case(case, args.steps, names, args.rounds, args.min_time, peak, args.ideas))
        except (OSError, ValueError) as exc:
            print(f"pc-bench: {case.label}: {exc}", file=sys.stderr)
            return 2
        if not args.json:
            print(f"done: {case.label}", file=sys.stderr)
    if args.profile:
        report["profiles"] = [profile_case(case, args.steps) for case in cases]
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; GPU: {m['gpu']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    print(f"threads: torch {threads}, onnxruntime intra-op {threads}, inter-op 1; T = {args.steps}")
    print(f"onnxruntime batches of B > 1: min({threads}, B) shards at once, 1 intra-op thread each (ort_shards)")
    p = report["matmul_peak"]
    print(f"matmul peak (float32 {p['size']}^2): best {p['best_gflops']:.1f} GFLOP/s, median {p['median_gflops']:.1f}")
    for case in report["cases"]:
        f = case["flops_per_step"]
        print(f"{case['case']}: {case['plan']} plan, {f['matmul']:,} FLOPs per step (levels {f['per_level']})")
    print(table(report))
    for case in report["cases"]:
        if case["ops_us"]:
            print(f"\nlevel-1 maps, {case['case']} (us per call):")
            for name, us in case["ops_us"].items():
                print(f"  {name}: {us:.1f}")
    for prof in report.get("profiles", []):
        print(f"\nprofile {prof['case']}: torch backend {prof['torch_ops_per_step']} ops/step; ", end="")
        print(f"onnxruntime {prof['onnx_nodes']} nodes, {prof['onnxruntime_kernels_per_step']} kernels/step")
        for row in prof["torch"][:8]:
            print(f"  torch {row['op']}: {row['calls_per_step']}/step, {row['self_us_total']} us")
        for row in prof["onnxruntime"][:8]:
            print(f"  ort {row['op']}: {row['nodes_per_step']}/step, {row['us_per_run']} us/run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
