"""The amortised start (pcmodel/amortiser.py): every backend refines it as the loop does, it is stored by name
beside U without touching the model's hash, old checkpoints load without one, and its fit is local."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import pcmodel
from pcmodel import Amortiser, AmortiserConfig, CheckpointError, ConfigError
from pcmodel.amortiser import amortised_latents, fitting_losses
from pcmodel.parameters import amortiser_specs

from .conftest import KINDS, tiny_config
from .test_backends import assert_same_inference, fast_backends, stable_model


def with_amortiser(model, generator, hidden=5):
    """A random amortiser whose every parameter is away from zero (a fresh one guesses r = 0)."""
    params = {s.name: torch.randn(s.shape, generator=generator) * 0.3 for s in amortiser_specs(model.config, hidden)}
    model.amortiser = Amortiser(AmortiserConfig(hidden=hidden), params)
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("f", ["identity", "tanh"])
def test_the_amortised_start_on_every_backend_equals_the_loop_from_it(kind, f, generator):
    model = with_amortiser(stable_model(tiny_config(kind, f, "cauchy"), generator), generator)
    x = torch.randn((3, *model.config.input_shape), generator=generator)
    r0 = model.amortised_latents(x)
    assert [tuple(r.shape) for r in r0] == [(3, *s) for s in model.latent_shapes()]
    assert min(float(r.abs().max()) for r in r0) > 1e-2  # a start away from zero at every level
    expected = model.infer(x, backend="loop", init=r0)
    assert_same_inference(model.infer(x, backend="loop", init="amortised"), expected, atol=0, energy_rtol=0)
    assert float((expected.latents[0] - model.infer(x, backend="loop", init="zero").latents[0]).abs().max()) > 1e-3
    for backend in fast_backends(model):
        assert_same_inference(model.infer(x, backend=backend, init="amortised"), expected)


def test_each_level_guesses_from_the_amortised_level_below(generator):
    """r_1 = A_1(x), r_2 = A_2(r_1): level 2's guess changes with level 1's parameters only through r_1."""
    model = with_amortiser(stable_model(tiny_config("convolutional", "tanh"), generator), generator)
    x = torch.randn((2, *model.config.input_shape), generator=generator)
    levels = model.levels()
    r1, r2 = amortised_latents(levels, model.amortiser.params, x)
    again = amortised_latents(levels[1:], {k.replace("level2.", "level1."): v for k, v in model.amortiser.params.items()
                                           if k.startswith("level2.")}, r1)  # fmt: skip
    torch.testing.assert_close(again[0], r2, rtol=0, atol=0)


def test_a_fresh_amortiser_starts_at_zero_and_its_draw_is_seeded():
    model = pcmodel.load("conv-rgb")
    model.amortiser = Amortiser.create(model.config, seed=3)
    x = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert all(float(r.abs().max()) == 0 for r in model.amortised_latents(x))
    other = Amortiser.create(model.config, seed=3)
    assert all(torch.equal(other.params[k], v) for k, v in model.amortiser.params.items())
    assert not torch.equal(
        Amortiser.create(model.config, seed=4).params["level1.A.in.weight"], other.params["level1.A.in.weight"]
    )


def test_the_fitting_loss_is_local_and_is_each_images_relative_squared_error(generator):
    model = with_amortiser(stable_model(tiny_config("modules", "identity"), generator), generator)
    x = torch.randn((4, *model.config.input_shape), generator=generator, dtype=torch.float64)
    settled = [r.double() for r in model.infer(x, steps=30).latents]
    params = {k: v.double().requires_grad_(True) for k, v in model.amortiser.params.items()}
    levels = model.levels()
    losses = fitting_losses(levels, params, x, settled)
    guesses = amortised_latents(levels, {k: v.detach() for k, v in params.items()}, x)
    for fraction in (1e-3, 1.0):  # the default floor, and pc-train --amortise-floor 1's
        chosen = losses if fraction == 1e-3 else fitting_losses(levels, params, x, settled, floor=fraction)
        for loss, guess, target in zip(chosen, guesses, settled):  # the closed form, image by image
            sizes = [float(t.square().sum()) for t in target]
            floor = fraction * sum(sizes) / len(sizes)
            each = [float((g - t).square().sum()) / (size + floor) for g, t, size in zip(guess, target, sizes)]
            assert float(loss.detach()) == pytest.approx(sum(each) / len(each), rel=1e-12)
    first, second = params["level1.A.in.weight"], params["level2.A.in.weight"]
    grads = torch.autograd.grad(losses[1], [first, second], allow_unused=True)
    assert grads[0] is None  # level 2's error never reaches level 1's map (local learning)
    assert float(grads[1].abs().max()) > 0


def test_a_model_with_an_amortiser_keeps_its_hash_and_round_trips(tmp_path, generator):
    model = pcmodel.load("rao-ballard-1999")
    sha = model.sha256
    model.amortiser = Amortiser.create(model.config, seed=1)
    model.amortiser.params["level1.A.out.weight"].normal_(generator=generator)
    assert model.sha256 == sha  # the content hash covers the config and U only
    path = tmp_path / "with.safetensors"
    assert model.save(path) == sha
    loaded = pcmodel.load(path)
    assert loaded.sha256 == sha and loaded.amortiser is not None
    for name, t in model.amortiser.params.items():
        assert loaded.amortiser.params[name].numpy().tobytes() == t.numpy().tobytes()
    header = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert header["__metadata__"]["format_version"] == "4"
    assert json.loads(header["__metadata__"]["amortiser"]) == {"hidden": 32}
    assert {k for k in header if ".A." in k} == {s.name for s in amortiser_specs(model.config, 32)}


def test_a_changed_amortiser_tensor_fails_its_hash(tmp_path):
    model = pcmodel.load("conv-rgb")
    model.amortiser = Amortiser.create(model.config, seed=1)
    path = tmp_path / "m.safetensors"
    model.save(path)
    data = path.read_bytes()
    metadata = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]
    tensors = load_file(str(path))
    tensors["level2.A.mid.bias"] = tensors["level2.A.mid.bias"] + 1e-3
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="fails its amortiser's hash"):
        pcmodel.load(path)


def test_a_format_3_checkpoint_loads_without_an_amortiser(tmp_path):
    """The shipped files before this change (format 3, U only) load as they were; "amortised" is then an error."""
    model = pcmodel.load("conv-rgb").with_dynamics(steps=100, init="zero", solver="gradient")  # as it was then
    tensors = {name: t.contiguous() for name, t in model.params.items()}
    metadata = {"format": "pcmodel-checkpoint", "format_version": "3", "config": model.config.to_json(),
                "provenance": "{}", "sha256": model.sha256}  # fmt: skip
    path = tmp_path / "v3.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    old = pcmodel.load(path)
    assert old.amortiser is None and old.sha256 == model.sha256 and old.sha256.startswith("c11f80838d11")
    x = torch.rand((1, 3, 32, 32))
    with pytest.raises(ValueError, match="has no amortiser"):
        old.infer(x, init="amortised")
    assert torch.equal(old.infer(x, steps=3).latents[0], model.infer(x, steps=3, init="zero").latents[0])


def test_the_config_may_start_from_the_amortiser(generator):
    model = with_amortiser(stable_model(tiny_config("dense", "tanh", "cauchy"), generator), generator)
    config = model.config.replace(initial_latents="amortised")
    with pytest.raises(ConfigError, match="has no amortiser"):
        pcmodel.PCModel(config, model.params, allow_unstable=True)
    own = pcmodel.PCModel(config, model.params, allow_unstable=True, amortiser=model.amortiser)
    x = torch.randn((2, *model.config.input_shape), generator=generator)
    assert_same_inference(own.infer(x, backend="loop"), model.infer(x, backend="loop", init="amortised"), atol=0)
    for r, a in zip(own.initial_latents(x), model.amortised_latents(x)):
        assert torch.equal(r, a)


def test_amortiser_parameters_are_checked():
    model = pcmodel.load("conv-rgb")
    fresh = Amortiser.create(model.config)
    with pytest.raises(ConfigError, match=r"missing level2\.A\.out\.bias"):
        model.amortiser = Amortiser(fresh.config, {k: v for k, v in fresh.params.items() if k != "level2.A.out.bias"})
    with pytest.raises(ConfigError, match="shapes"):
        model.amortiser = Amortiser(AmortiserConfig(hidden=8), fresh.params)
    bad = dict(fresh.params, **{"level1.A.in.bias": torch.full((32,), float("nan"))})
    with pytest.raises(ConfigError, match="NaN"):
        model.amortiser = Amortiser(fresh.config, bad)
    with pytest.raises(ConfigError, match="hidden must be a positive int"):
        AmortiserConfig(hidden=0)


@pytest.mark.parametrize("preset", sorted(pcmodel.PRESETS))
def test_an_image_gets_the_same_bits_alone_and_in_a_batch_from_the_amortised_start(preset, generator):
    model = pcmodel.load(preset)
    model.amortiser = Amortiser.create(model.config, seed=2)
    for t in model.amortiser.params.values():
        t.normal_(std=0.2, generator=generator)
    x = torch.rand((5, *model.config.input_shape), generator=generator) * 2 - 1
    guess, batch = model.amortised_latents(x), model.infer(x, init="amortised")
    for i in (0, 3):
        alone = model.infer(x[i : i + 1], init="amortised")
        for a, b, g, h in zip(alone.latents, batch.latents, model.amortised_latents(x[i : i + 1]), guess):
            assert a[0].numpy().tobytes() == b[i].numpy().tobytes()
            assert g[0].numpy().tobytes() == h[i].numpy().tobytes()


def _model_with_amortiser(name, generator):
    if name in pcmodel.PRESETS:
        model = pcmodel.load(name)
        model.amortiser = Amortiser.create(model.config, seed=2)
        for t in model.amortiser.params.values():
            t.normal_(std=0.2, generator=generator)
        return model
    return with_amortiser(stable_model(tiny_config(name, "tanh", "cauchy"), generator), generator)


@pytest.mark.parametrize("name", [*KINDS, *sorted(pcmodel.PRESETS)])
def test_onnxruntime_computes_the_amortised_start_as_torch_does_with_the_same_bits_alone_and_in_a_batch(
    name, generator
):
    """A call a built backend serves takes its amortised start from onnxruntime (EngineState.guess): torch's
    guess within float32 rounding, and each image's bits the same alone, in any batch, on one or two threads."""
    model = _model_with_amortiser(name, generator)
    x = torch.rand((7, *model.config.input_shape), generator=generator) * 2 - 1
    choice = pcmodel.engines.Choice(fast_backends(model)[-1])
    levels = model.levels()
    threads = torch.get_num_threads()
    try:
        runs = {}
        for count in (1, 2):
            torch.set_num_threads(count)
            runs[count] = [
                model.engines.guess(choice, levels, model.amortiser.params, x[a:b]) for a, b in ((0, 7), (0, 4), (4, 7))
            ]
            alone = [model.engines.guess(choice, levels, model.amortiser.params, x[i : i + 1]) for i in range(7)]
            runs[count].append(alone)
    finally:
        torch.set_num_threads(threads)
    torch_guess = model.amortised_latents(x)
    for level, expected in enumerate(torch_guess):
        whole = runs[1][0][level]
        assert whole.shape == expected.shape
        assert float((whole - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
        for count in (1, 2):
            batch, first, last, alone = runs[count]
            assert torch.cat([first[level], last[level]]).numpy().tobytes() == whole.numpy().tobytes()
            assert batch[level].numpy().tobytes() == whole.numpy().tobytes()
            assert torch.cat([a[level] for a in alone]).numpy().tobytes() == whole.numpy().tobytes()


def test_the_onnxruntime_start_follows_the_amortiser_and_serves_prepared_calls(generator):
    model = _model_with_amortiser("convolutional", generator)
    x = torch.rand((3, *model.config.input_shape), generator=generator) * 2 - 1
    result = model.infer(x, backend="onnxruntime", init="amortised")
    guesses = model.engines.backend("onnxruntime").guesses
    assert list(guesses) == [tuple(x.shape[1:])]  # the call's start came from onnxruntime
    assert not guesses[tuple(x.shape[1:])][1].sessions.spinning  # its threads would take the program's cores
    assert_same_inference(result, model.infer(x, backend="loop", init=model.amortised_latents(x)))
    for t in model.amortiser.params.values():
        t.mul_(0.5)  # fitting the amortiser changes its parameters in place: the session is rebuilt
    again = model.infer(x, backend="onnxruntime", init="amortised")
    assert_same_inference(again, model.infer(x, backend="loop", init=model.amortised_latents(x)))
    assert float((again.latents[0] - result.latents[0]).abs().max()) > 1e-3
    assert model.infer(x, backend="torch", init="amortised").backend == "torch"  # torch computes its own
