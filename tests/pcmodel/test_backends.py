"""Backends against the definition: every fast path equals the plain loop on fresh random inputs.

Oracle: pcmodel.energy.infer_loop (backend="loop"), itself held against autograd in test_math.py.
Tolerance: latents within 1e-4 in float32 (measured differences are ~1e-6). docs/MODEL.md section 7.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import pcmodel
from pcmodel import PCModel, kinds
from pcmodel.engines import SPECS, plans
from pcmodel.engines import onnxruntime as ort_engine
from pcmodel.solvers import float32_tolerance

from .conftest import KINDS, tiny_config

CASES = list(itertools.product(KINDS, ("identity", "tanh"), tuple(pcmodel.PRIORS)))  # every registered prior
FAST = ("torch", "onnxruntime")


def fast_backends(model: PCModel, hw=None) -> tuple[str, ...]:
    """The named backends that apply on a CPU: the numba one for quadratic plans with the Cauchy prior (or
    none) where numba is installed."""
    kind, priors = plans.plan_kind(model.config, hw), frozenset(plans.nonquadratic_priors(model.config))
    numba = SPECS["numba"].unfit("cpu", kind, priors) is None
    return FAST + (("numba",) if numba else ())


def automatic(model: PCModel, hw=None) -> str:
    """What the automatic rule picks on a CPU for prepared calls (docs/PERFORMANCE.md)."""
    return "numba" if "numba" in fast_backends(model, hw) else "onnxruntime"


def stable_model(config, generator, std=0.4, factor=0.8) -> PCModel:
    """Random weights, k1 at `factor` x the stability bound (so 20 steps move the latents a lot)."""
    weights = [torch.randn(s, generator=generator) * std for s in PCModel.weight_shapes(config)]
    model = PCModel(config, weights, allow_unstable=True)
    return PCModel(config.replace(k1=factor * model.stability_bound()), model.weights, allow_unstable=True)


def assert_same_inference(result, expected, atol=1e-4, energy_rtol=1e-4):
    assert result.steps.tolist() == expected.steps.tolist()
    for a, b in zip(result.latents, expected.latents):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert float((a - b).abs().max()) <= atol
    assert float((result.reconstruction - expected.reconstruction).abs().max()) <= atol
    torch.testing.assert_close(result.error, expected.error, rtol=0, atol=atol)
    for a, b in zip(result.predictions, expected.predictions):
        assert a.shape == b.shape
    assert result.energy.shape == expected.energy.shape
    torch.testing.assert_close(result.energy, expected.energy, rtol=energy_rtol, atol=energy_rtol)


@pytest.mark.parametrize(("kind", "f", "prior"), CASES)
def test_fast_paths_equal_the_loop_on_every_tiny_config(kind, f, prior, generator):
    model = stable_model(tiny_config(kind, f, prior), generator)
    x = torch.randn((3, *model.config.input_shape), generator=generator)
    expected = model.infer(x, backend="loop")
    moved = max(float(r.abs().max()) for r in expected.latents)
    assert moved > 1e-2  # the comparison is not between two sets of zeros
    for backend in fast_backends(model):
        result = model.infer(x, backend=backend)
        assert (result.backend, result.reason) == (backend, "requested")
        assert_same_inference(result, expected)


@pytest.mark.parametrize("preset", sorted(pcmodel.PRESETS))
def test_fast_paths_equal_the_loop_on_the_presets(preset, generator):
    model = pcmodel.load(preset)
    x = torch.rand((5, *model.config.input_shape), generator=generator) * 2 - 1
    expected = model.infer(x, backend="loop")
    tolerance = float32_tolerance(model.solver(), max(float(r.abs().max()) for r in expected.latents))
    for backend in fast_backends(model):  # at the served dynamics (rao-ballard-1999: Anderson)
        assert_same_inference(model.infer(x, backend=backend), expected, atol=tolerance)
    model.prepare(shapes=[x.shape[1:]])
    auto = model.infer(x)  # the automatic rule on a CPU, float32, default steps, prepared shape
    assert (auto.backend, auto.reason) == (automatic(model), "")


def test_plan_kinds_follow_the_mathematics():
    assert plans.plan_kind(pcmodel.get_preset("rao-ballard-1999")) == "quadratic"  # f linear: dE/dr = Hr - b + g'
    assert plans.plan_kind(pcmodel.get_preset("conv-rgb")) == "levelwise"  # tanh
    linear = tiny_config("convolutional")
    assert plans.plan_kind(linear) == "quadratic"
    assert plans.plan_kind(linear, (12 + 8 * 40, 12 + 8 * 40)) == "levelwise"  # too many latents for a dense H


def test_conv_preset_at_another_size_and_feedforward_start(generator):
    model = pcmodel.load("conv-rgb")
    x = torch.rand((2, 3, 64, 48), generator=generator) * 2 - 1
    expected = model.infer(x, steps=30, backend="loop")
    for backend in FAST:
        assert_same_inference(model.infer(x, steps=30, backend=backend), expected)
    for kind, f in (("convolutional", "tanh"), ("dense", "identity"), ("modules", "tanh")):
        fed = stable_model(tiny_config(kind, f, "cauchy", initial_latents="feedforward"), generator, std=0.3)
        x = torch.randn((2, *fed.config.input_shape), generator=generator)
        expected = fed.infer(x, backend="loop")
        for backend in fast_backends(fed):
            assert_same_inference(fed.infer(x, backend=backend), expected)


@pytest.mark.parametrize(("kernel", "stride", "size"), [((8, 8), (4, 4), (32, 32)), ((3, 5), (2, 3), (9, 14))])
def test_phase_layout_equals_the_strided_convolutions(kernel, stride, size, generator):
    """conv_transpose2d(r, U, s) and conv2d(e, U, s) as stride-1 convolutions of the sub-pixel phases."""
    U = torch.randn((4, 3, *kernel), generator=generator, dtype=torch.float64)
    latent = [(n - k) // s + 1 for n, k, s in zip(size, kernel, stride)]
    r = torch.randn((2, 4, *latent), generator=generator, dtype=torch.float64)
    e = torch.randn((2, 3, *size), generator=generator, dtype=torch.float64)
    predict, adjoint, taps = kinds.phase_kernels(U, stride)
    pad = tuple(s * (n + m - 1) - h for s, n, m, h in zip(stride, latent, taps, size))
    phases = F.conv2d(r, predict, padding=(taps[0] - 1, taps[1] - 1))
    merged = kinds.phase_merge(phases, 3, stride, size)
    torch.testing.assert_close(merged, F.conv_transpose2d(r, U, stride=stride), rtol=1e-12, atol=1e-12)
    split = kinds.phase_split(e, stride, pad)
    torch.testing.assert_close(F.conv2d(split, adjoint), F.conv2d(e, U, stride=stride), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kinds.phase_merge(split, 3, stride, size), e, rtol=0, atol=0)


def test_automatic_rule_and_its_fallbacks(generator):
    model = pcmodel.load("rao-ballard-1999")
    x = torch.randn((2, *model.config.input_shape), generator=generator)

    def chosen(**kwargs) -> tuple[str, str]:
        result = model.infer(x, **kwargs)
        return result.backend, result.reason

    assert chosen() == (automatic(model), "")
    double = model.infer(x.double())
    assert (double.backend, double.reason) == ("torch", "float64 input")
    assert double.latents[0].dtype == torch.float64
    assert chosen(steps=0) == ("loop", "no steps")
    assert chosen(backend="onnxruntime", tol=1e-3) == ("loop", "early stop")
    assert chosen(backend="loop") == ("loop", "requested")
    assert chosen(steps=7) == ("torch", f"{automatic(model)}: not prepared for these steps and shape")
    with pytest.raises(ValueError, match=r"unknown backend 'jax'; choose auto or one of"):
        model.infer(x, backend="jax")
    with pytest.raises(ValueError, match=r"unknown backend \['numba'\]; choose auto or one of"):
        model.infer(x, backend=["numba"])  # not a name (and not hashable: the rule is memoised)
    with pytest.raises(ValueError, match=r"needs the model on a CUDA device"):
        model.infer(x, backend="cuda-graph")


def test_step_counts_and_sizes_beyond_the_prepared_set_run_on_the_torch_engine(generator):
    """Only prepared (steps, shape) pairs get fast programs; everything else runs on the torch backend."""
    model = pcmodel.create(tiny_config("dense", "tanh", "cauchy"))
    x = torch.randn((2, *model.config.input_shape), generator=generator)
    warm = [model.config.steps, 3, 4, 5]
    model.prepare(steps=warm)
    assert {key[0] for key in model.engines.backend("onnxruntime").programs} == set(warm)  # built by prepare
    assert [model.infer(x, steps=t).backend for t in warm] == ["onnxruntime"] * 4
    late = model.infer(x, steps=6)
    assert (late.backend, late.reason) == ("torch", "onnxruntime: not prepared for these steps and shape")
    assert model.infer(x, steps=3).backend == "onnxruntime"  # prepared counts stay fast
    assert {key[0] for key in model.engines.backend("onnxruntime").programs} == set(warm)  # nothing built on demand
    assert_same_inference(late, model.infer(x, steps=6, backend="loop"))
    conv = pcmodel.create(tiny_config("convolutional", "tanh"))
    sizes = [(12, 12), (16, 16), (20, 20), (24, 24), (28, 28)]
    conv.prepare(steps=[2], shapes=sizes[:4])
    chosen = [conv.infer(torch.randn((1, 3, *s), generator=generator), steps=2).backend for s in sizes]
    assert chosen == ["onnxruntime"] * 4 + ["torch"]
    with pytest.raises(ValueError, match="at most 8 step counts and 4 shapes"):
        conv.prepare(steps=[2], shapes=sizes)
    with pytest.raises(pcmodel.ConfigError, match="does not tile"):
        conv.prepare(steps=[2], shapes=[(13, 12)])


@pytest.mark.parametrize("preset", sorted(pcmodel.PRESETS))
@pytest.mark.parametrize("steps", [None, 60, 150])
def test_an_image_gets_the_same_bits_alone_and_in_a_batch_at_any_step_count(preset, steps, generator):
    """On a CPU a row's result never depends on its neighbours: prepared counts (onnxruntime, sharded or
    not) and unprepared ones (the torch backend, row by row) alike."""
    model = pcmodel.load(preset)
    x = torch.rand((5, *model.config.input_shape), generator=generator) * 2 - 1
    batch = model.infer(x, steps=steps)
    assert batch.backend == (automatic(model) if steps is None else "torch")
    for i in (0, 3):
        alone = model.infer(x[i : i + 1], steps=steps)
        for a, b in zip(alone.latents, batch.latents):
            assert a[0].numpy().tobytes() == b[i].numpy().tobytes()
        assert alone.energy[:, 0].numpy().tobytes() == batch.energy[:, i].numpy().tobytes()
        assert alone.reconstruction[0].numpy().tobytes() == batch.reconstruction[i].numpy().tobytes()


def test_learning_never_runs_on_stale_weights(generator):
    """learn_step then infer uses the new U; a session is rebuilt once the weights stop changing."""
    model = pcmodel.load("conv-rgb")
    x = torch.rand((4, *model.config.input_shape), generator=generator) * 2 - 1
    first = model.infer(x)
    assert first.backend == "onnxruntime"
    for _ in range(2):  # learning: U changes after every batch
        model.learn_step(x, first.latents, k2=0.02)  # k2 lam_1 = 0.2: a large, stable step
        during = model.infer(x)
        assert (during.backend, during.reason) == ("torch", "the weights changed since the previous call (learning)")
        assert_same_inference(during, model.infer(x, backend="loop"))
    explicit = model.infer(x, backend="onnxruntime")  # an explicit request rebuilds at once
    assert_same_inference(explicit, model.infer(x, backend="loop"))
    assert float((explicit.latents[0] - first.latents[0]).abs().max()) > 1e-3  # the new U changed the result
    model.weights = [w * 1.01 for w in model.weights]  # new tensors, not an in-place change
    model.infer(x)
    settled = model.infer(x)  # the weights stayed the same for two calls: the session is rebuilt
    assert settled.backend == "onnxruntime"
    assert_same_inference(settled, model.infer(x, backend="loop"))
    rao = pcmodel.load("rao-ballard-1999")  # a quadratic plan: whatever the backend, it follows the new U
    x = torch.rand((3, *rao.config.input_shape), generator=generator) * 2 - 1
    before = rao.infer(x)
    rao.learn_step(x, before.latents)  # its own k2 (x k2_scale 1e5 at level 2: a larger one blows U2 up)
    after = rao.infer(x)
    assert (after.backend, after.reason) == ("torch", "the weights changed since the previous call (learning)")
    expected = rao.infer(x, backend="loop")
    scale = max(float(r.abs().max()) for r in expected.latents)
    assert_same_inference(after, expected, atol=float32_tolerance(rao.solver(), scale))  # served: Anderson
    assert rao.infer(x).backend == automatic(rao)  # unchanged since the previous call: the fast backend again
    assert float((after.latents[0] - before.latents[0]).abs().max()) > 1e-4


def test_early_stop_next_to_a_prepared_program_matches_the_fixed_call_bit_for_bit(generator):
    model = pcmodel.load("conv-rgb")
    x = torch.rand((3, *model.config.input_shape), generator=generator) * 2 - 1
    x[1] *= 1e-4  # stops almost at once
    model.prepare(steps=[40])
    fixed = model.infer(x, steps=40)
    assert fixed.backend == "onnxruntime"
    early = model.infer(x, steps=40, tol=1e-3)
    assert (early.backend, early.reason) == ("loop", "early stop; images that never stopped: onnxruntime")
    assert early.steps[1] < 40 and early.steps[0] == early.steps[2] == 40
    for i in (0, 2):
        for a, b in zip(early.latents, fixed.latents):
            assert a[i].numpy().tobytes() == b[i].numpy().tobytes()
        assert early.energy[:, i].numpy().tobytes() == fixed.energy[:, i].numpy().tobytes()


def test_torch_engine_is_deterministic_and_batch_invariant(generator):
    model = pcmodel.load("conv-rgb")
    x = torch.rand((6, *model.config.input_shape), generator=generator) * 2 - 1
    batch = model.infer(x, backend="torch")
    again = model.infer(x, backend="torch")
    for a, b in zip(batch.latents, again.latents):
        assert a.numpy().tobytes() == b.numpy().tobytes()
    alone = model.infer(x[2:3], backend="torch")
    for a, b in zip(alone.latents, batch.latents):
        assert float((a[0] - b[2]).abs().max()) <= 1e-5


def test_onnxruntime_shard_rule():
    """One shard per thread, at most one per image; a single shard is the session with all threads."""
    assert [ort_engine.ort_shards(b, 2) for b in (1, 2, 3, 32)] == [1, 2, 2, 2]
    assert ort_engine.ort_shards(7, 3) == 3 and ort_engine.ort_shards(5, 16) == 5 and ort_engine.ort_shards(32, 1) == 1


@pytest.mark.parametrize(("kind", "f"), list(itertools.product(KINDS, ("identity", "tanh"))))
def test_sharded_onnxruntime_equals_the_loop_and_each_image_alone(kind, f, generator):
    """Shards of (3, 2, 2) images on a single-threaded session, against the loop and against batch 1."""
    model = stable_model(tiny_config(kind, f, "cauchy"), generator)
    x = torch.randn((7, *model.config.input_shape), generator=generator)
    plan = plans.make_plan(model.config, model.weights, x.shape[-2:], torch.float32, x.device)
    assert plan.kind == ("quadratic" if f == "identity" else "levelwise")  # both graph builders
    program = ort_engine.OrtProgram(plan, model.config.steps, threads=3)
    sharded = program.run(x)
    assert set(program.sessions.sessions) == {1}  # the sharded path ran, and only it
    expected = model.infer(x, backend="loop")
    for a, b in zip(sharded.latents, expected.latents):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-4
    torch.testing.assert_close(sharded.energy, expected.energy, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sharded.reconstruction, expected.reconstruction, rtol=0, atol=1e-4)
    for i in range(x.shape[0]):
        alone = program.run(x[i : i + 1])  # batch 1: one session with all threads
        for a, b in zip(alone.latents, sharded.latents):
            assert float((a[0] - b[i]).abs().max()) <= 1e-4
        torch.testing.assert_close(alone.energy[:, 0], sharded.energy[:, i], rtol=1e-4, atol=1e-4)
        for a, b in zip(alone.errors, sharded.errors):
            assert float((a[0] - b[i]).abs().max()) <= 1e-4
    assert set(program.sessions.sessions) == {1, 3}


def test_automatic_rule_shards_large_batches_and_reports_onnxruntime(generator):
    model = stable_model(tiny_config("convolutional", "tanh", "gaussian"), generator)
    x = torch.randn((4, *model.config.input_shape), generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the session is made with torch's thread count: two shards of two images
    try:
        result = model.infer(x)
    finally:
        torch.set_num_threads(threads)
    assert result.backend == "onnxruntime"
    index = (model.config.steps, tuple(x.shape[1:]), False, pcmodel.Solver())
    program = model.engines.backend("onnxruntime").programs[index][1]
    assert program.threads == 2 and set(program.sessions.sessions) == {1}
    assert_same_inference(result, model.infer(x, backend="loop"))
    model.engines.backend("onnxruntime").sharding = False  # pc-bench's "onnxruntime-unsharded"
    whole = model.infer(x)
    assert whole.backend == "onnxruntime" and set(program.sessions.sessions) == {1, 2}
    assert_same_inference(whole, result, atol=1e-5, energy_rtol=1e-5)


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", sorted(pcmodel.PRESETS))
def test_cuda_graph_equals_the_loop(preset, generator):
    model = pcmodel.load(preset, device="cuda")
    for batch in (1, 3, 5):  # buckets 1, 4 and 8: inputs padded into the static buffer
        x = (torch.rand((batch, *model.config.input_shape), generator=generator) * 2 - 1).cuda()
        result = model.infer(x)
        assert result.backend == "cuda-graph"
        expected = model.infer(x, backend="loop")  # the served dynamics (rao-ballard-1999: Anderson's solve_ex)
        tolerance = float32_tolerance(model.solver(), max(float(r.abs().max()) for r in expected.latents))
        assert_same_inference(result, expected, atol=tolerance)
    assert {key[2] for key in model.engines.backend("cuda-graph").programs} == {1, 4, 8}


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_follows_learning_without_a_new_capture(generator):
    model = pcmodel.load("conv-rgb", device="cuda")
    x = (torch.rand((4, *model.config.input_shape), generator=generator) * 2 - 1).cuda()
    first = model.infer(x)
    captured = dict(model.engines.backend("cuda-graph").programs)
    model.learn_step(x, first.latents, k2=0.5)
    after = model.infer(x)
    assert_same_inference(after, model.infer(x, backend="loop"))
    assert {k: v[1] for k, v in model.engines.backend("cuda-graph").programs.items()} == {
        k: v[1] for k, v in captured.items()
    }


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cuda_reduced_precision_runs_and_stays_close(precision, generator):
    """TF32 / bf16 operands with r in float32: finite and near the float32 result (the cost pc-bench reports)."""
    model = pcmodel.load("conv-rgb", device="cuda")
    model.engines.backend("cuda-graph").precision = precision
    x = (torch.rand((8, *model.config.input_shape), generator=generator) * 2 - 1).cuda()
    result = model.infer(x)
    expected = model.infer(x, backend="loop")
    worst = max(float((a - b).abs().max()) for a, b in zip(result.latents, expected.latents))
    assert worst < 5e-2


_ORT_RUN = """
import torch, pcmodel
model = pcmodel.load("default")
model.infer(torch.zeros(1, *model.config.input_shape), steps=2, backend="onnxruntime")
"""


@pytest.mark.parametrize("telemetry", [None, "0"])
def test_onnxruntime_writes_nothing_under_home_unless_telemetry_is_asked_for(tmp_path, telemetry):
    """onnxruntime's telemetry, on by default, writes a device id and an event database under ~/.cache (a
    read-only root in the container) and sends usage events: pcmodel turns it off unless the environment asks."""
    import os
    import subprocess
    import sys

    # onnxruntime keeps quiet by itself where CI is set (as in .ci/run): without it, as on a user's machine
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME", "CI")}
    env |= {"HOME": str(tmp_path), **({"ORT_DISABLE_TELEMETRY": telemetry} if telemetry else {})}
    subprocess.run([sys.executable, "-c", _ORT_RUN], env=env, check=True, timeout=300, capture_output=True)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    if telemetry is None:
        assert written == [], written
    else:  # the check can fail: asked for, onnxruntime writes its files
        assert any("onnxruntime" in p for p in written), written
