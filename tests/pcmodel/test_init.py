"""The starting state is an input: `model.infer(x, init=...)` from given latents (or zeros) on every backend
equals the plain loop from the same latents, and stays batch-invariant bit for bit on a CPU."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import pcmodel
from pcmodel.export import main as export_main
from pcmodel.solvers import float32_tolerance

from .conftest import KINDS, tiny_config
from .test_backends import assert_same_inference, fast_backends, stable_model


def random_start(model, x, generator, scale=0.5):
    return [torch.randn((x.shape[0], *s), generator=generator) * scale for s in model.latent_shapes(x.shape[-2:])]


@pytest.mark.parametrize(("kind", "f", "prior"), list(itertools.product(KINDS, ("identity", "tanh"), ("cauchy",))))
def test_a_given_start_matches_the_loop_from_it_on_every_backend(kind, f, prior, generator):
    model = stable_model(tiny_config(kind, f, prior), generator)
    x = torch.randn((3, *model.config.input_shape), generator=generator)
    r0 = random_start(model, x, generator)
    expected = model.infer(x, backend="loop", init=r0)
    cold = model.infer(x, backend="loop")
    assert max(float((a - b).abs().max()) for a, b in zip(expected.latents, cold.latents)) > 1e-3  # r0 matters
    for backend in fast_backends(model):
        assert_same_inference(model.infer(x, backend=backend, init=r0), expected)


@pytest.mark.parametrize("preset", sorted(pcmodel.PRESETS))
def test_a_warm_start_on_the_presets_and_the_automatic_rule(preset, generator):
    model = pcmodel.load(preset)
    x = torch.rand((4, *model.config.input_shape), generator=generator) * 2 - 1
    settled = model.infer(x, backend="loop", steps=300)
    expected = model.infer(x, backend="loop", init=settled.latents)
    for backend in fast_backends(model):
        assert_same_inference(model.infer(x, backend=backend, init=settled.latents), expected)
    model.prepare(shapes=[x.shape[1:]])
    auto = model.infer(x, init=settled.latents)
    assert auto.reason == "" and auto.backend != "torch"  # the prepared fast backend takes r0 as well
    assert_same_inference(auto, expected)
    # From the settled state the energy starts where 300 steps left it, far below a cold start's.
    assert (expected.energy[0] < model.infer(x).energy[0]).all()
    torch.testing.assert_close(expected.energy[0], settled.energy[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", sorted(pcmodel.PRESETS))
def test_an_image_gets_the_same_bits_alone_and_in_a_batch_from_a_given_start(preset, generator):
    model = pcmodel.load(preset)
    x = torch.rand((5, *model.config.input_shape), generator=generator) * 2 - 1
    r0 = random_start(model, x, generator, scale=0.1)
    for steps in (None, 37):  # prepared (the fast backend) and not (the torch backend, row by row)
        batch = model.infer(x, steps=steps, init=r0)
        for i in (0, 3):
            alone = model.infer(x[i : i + 1], steps=steps, init=[r[i : i + 1] for r in r0])
            assert alone.backend == batch.backend
            for a, b in zip(alone.latents, batch.latents):
                assert a[0].numpy().tobytes() == b[i].numpy().tobytes()
            assert alone.energy[:, 0].numpy().tobytes() == batch.energy[:, i].numpy().tobytes()


def test_init_zero_starts_at_zeros_whatever_the_config_says(generator):
    model = stable_model(tiny_config("convolutional", "tanh", "cauchy", initial_latents="feedforward"), generator)
    x = torch.randn((2, *model.config.input_shape), generator=generator)
    zeros = model.infer(x, backend="loop", steps=0, init="zero")
    assert all(float(r.abs().max()) == 0 for r in zeros.latents)
    assert max(float(r.abs().max()) for r in model.infer(x, backend="loop", steps=0).latents) > 0  # feed-forward
    expected = model.infer(x, backend="loop", init="zero")
    for backend in fast_backends(model):
        assert_same_inference(model.infer(x, backend=backend, init="zero"), expected)


def test_early_stop_from_a_given_start(generator):
    model = pcmodel.load("conv-rgb")
    x = torch.rand((2, *model.config.input_shape), generator=generator) * 2 - 1
    settled = model.infer(x, steps=400, backend="loop")
    early = model.infer(x, steps=50, tol=1e-2, init=settled.latents)
    assert (early.steps < 50).all()  # started near the fixed point: stops at once


def test_bad_starts_are_clear_errors(generator):
    model = pcmodel.load("rao-ballard-1999")
    x = torch.rand((2, *model.config.input_shape), generator=generator)
    good = model.infer(x, steps=1).latents
    with pytest.raises(ValueError, match=r"init must be one tensor per level shaped"):
        model.infer(x, init=good[:1])
    with pytest.raises(ValueError, match=r"init must be one tensor per level shaped"):
        model.infer(x, init=[r[:1] for r in good])
    with pytest.raises(ValueError, match="init must be 'zero', 'amortised', a list of latents or None"):
        model.infer(x, init="random")
    with pytest.raises(ValueError, match="init contains NaN or Inf"):
        model.infer(x, init=[r * float("nan") for r in good])


@pytest.mark.parametrize("preset", sorted(pcmodel.PRESETS))
def test_pc_export_with_init_inputs(preset, tmp_path, capsys, generator):
    path = tmp_path / "warm.onnx"
    assert export_main([preset, "--steps", "20", "--init-inputs", "-o", str(path)]) == 0
    model = pcmodel.load(preset)
    graph = onnx.load(str(path))
    levels = len(model.config.levels)
    assert [i.name for i in graph.graph.input] == ["x", *(f"r0_{i}" for i in range(1, levels + 1))]
    assert {p.key: p.value for p in graph.metadata_props}["parameters"] == ",".join(model.params)
    x = torch.rand((2, *model.config.input_shape), generator=generator) * 2 - 1
    r0 = random_start(model, x, generator, scale=0.1)
    feed = {"x": x.numpy(), **{f"r0_{i}": r.numpy() for i, r in enumerate(r0, 1)}}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    expected = model.infer(x, steps=20, backend="loop", init=r0)
    tolerance = float32_tolerance(model.solver(), max(float(r.abs().max()) for r in expected.latents))
    for i, r in enumerate(expected.latents, 1):
        np.testing.assert_allclose(values[f"latent_{i}"], r.numpy(), rtol=0, atol=tolerance)
