"""docs/MODEL.md section 5 B and C: the stability bound, monotone energy, batch invariance, determinism, early stop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pcmodel
from pcmodel import PCModel, UnstableStepError

from .conftest import KINDS, tiny_config


def model_at(config, generator, std=0.5, k1_factor=None) -> PCModel:
    weights = [torch.randn(s, generator=generator) * std for s in PCModel.weight_shapes(config)]
    model = PCModel(config, weights, allow_unstable=True)
    if k1_factor is not None:
        bound = model.stability_bound()
        model = PCModel(config.replace(k1=k1_factor * bound), model.weights, allow_unstable=True)
    return model


def energies(model, x, steps):
    trace = model.infer(x, steps=steps).energy  # (steps + 1, B)
    return trace


@pytest.mark.parametrize("kind", KINDS)
def test_bound_matches_the_closed_form_hessian(kind, generator):
    """The bound is 4 / lambda_max of the Hessian, here built independently with autograd."""
    model = model_at(tiny_config(kind), generator)
    x = torch.zeros((1, *model.config.input_shape), dtype=torch.float64)
    shapes = model.latent_shapes()
    sizes = [int(torch.tensor(s).prod()) for s in shapes]

    def energy(flat):
        parts = [p.reshape(1, *s) for p, s in zip(torch.split(flat, sizes), shapes)]
        return model.energy(x, parts).sum()

    hessian = torch.autograd.functional.hessian(energy, torch.zeros(sum(sizes), dtype=torch.float64))
    # The step is r <- r - (k1/2) S H r with S = diag(k1_scale per latent): stable iff k1 < 4 / lambda_max(S H).
    scale = torch.cat([torch.full((n,), lc.k1_scale, dtype=torch.float64) for n, lc in zip(sizes, model.config.levels)])
    assert len(set(scale.tolist())) > 1  # the tiny configs give level 2 its own step
    expected = 4 / float(torch.linalg.eigvals(scale[:, None] * hessian).real.max())
    assert model.stability_bound(method="exact") == pytest.approx(expected, rel=1e-9)
    assert model.stability_bound(method="power") == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_energy_never_rises_below_the_bound_and_diverges_above(kind, generator):
    """Linear f, Gaussian prior: 0.9 x bound is monotone over 1,000 steps (float64); 1.2 x diverges."""
    config = tiny_config(kind)
    x = torch.randn((2, *config.input_shape), generator=generator, dtype=torch.float64)
    stable = model_at(config, generator, k1_factor=0.9)
    trace = energies(stable, x, 1000)
    rises = trace[1:] - trace[:-1]
    assert (rises <= 1e-9 * trace[:-1].abs()).all()
    assert (trace[-1] < trace[0]).all()
    unstable = PCModel(config.replace(k1=1.2 * stable.config.k1 / 0.9), stable.weights, allow_unstable=True)
    trace = energies(unstable, x, 1000)
    assert (~torch.isfinite(trace[-1]) | (trace[-1] > 1e6 * trace[0])).all()


@pytest.mark.parametrize(
    ("kind", "f", "prior"),
    [(k, "tanh", "cauchy") for k in KINDS] + [("modules", "identity", "cauchy"), ("dense", "tanh", "smooth-laplace")],
)
def test_nonlinear_worst_case_bound_keeps_energy_monotone(kind, f, prior, generator):
    """tanh and the non-Gaussian priors: the linearised bound is a worst case, so 0.9 x it is monotone too."""
    config = tiny_config(kind, f, prior)
    model = model_at(config, generator, k1_factor=0.9)
    x = torch.randn((3, *config.input_shape), generator=generator, dtype=torch.float64)
    trace = energies(model, x, 1000)
    assert ((trace[1:] - trace[:-1]) <= 1e-9 * trace[:-1].abs()).all()


@pytest.mark.parametrize("preset", sorted(pcmodel.PRESETS))
def test_presets_are_monotone_at_their_own_k1(preset):
    """The paper's dynamics descend at every step at the preset's k1; the served ones (accelerated: not
    monotone step by step) end lower than they start."""
    model = pcmodel.load(preset)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn((4, *model.config.input_shape), generator=generator, dtype=torch.float64)
    trace = model.with_dynamics(steps=100, init="zero", solver="gradient").infer(x).energy
    assert trace.shape == (101, 4)
    assert ((trace[1:] - trace[:-1]) <= 1e-9 * trace[:-1].abs()).all()
    assert (trace[-1] < trace[0]).all()
    served = model.infer(x).energy
    assert served.shape == (model.config.steps + 1, 4) and (served[-1] < served[0]).all()


def test_building_above_the_bound_raises_unless_allowed(generator):
    config = tiny_config("convolutional")
    model = model_at(config, generator)
    bound = model.stability_bound()
    with pytest.raises(UnstableStepError, match=r"Lower k1 below"):
        PCModel(config.replace(k1=1.05 * bound), model.weights)
    PCModel(config.replace(k1=1.05 * bound), model.weights, allow_unstable=True)
    PCModel(config.replace(k1=0.95 * bound), model.weights)


@pytest.mark.parametrize("preset", sorted(pcmodel.PRESETS))
def test_batch_invariance_and_determinism(preset):
    """An image alone and inside a batch of 8 settle to the same latents; repeats are bit-identical."""
    model = pcmodel.load(preset)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((8, *model.config.input_shape), generator=generator)
    batch = model.infer(x)
    for i in (0, 5):
        alone = model.infer(x[i : i + 1])
        for a, b in zip(alone.latents, batch.latents):
            assert float((a[0] - b[i]).abs().max()) <= 1e-5
        assert float((alone.reconstruction[0] - batch.reconstruction[i]).abs().max()) <= 1e-5
    again = model.infer(x)
    for a, b in zip(
        [*batch.latents, batch.reconstruction, batch.energy], [*again.latents, again.reconstruction, again.energy]
    ):
        assert a.numpy().tobytes() == b.numpy().tobytes()


def test_early_stop_reports_steps_and_matches_fixed_steps(generator):
    model = model_at(tiny_config("convolutional", "tanh", "cauchy"), generator, std=0.3, k1_factor=0.8)
    x = torch.randn((4, *model.config.input_shape), generator=generator)
    x[1] *= 1e-3  # a nearly blank image: its gradient is tiny from the start
    x[3] *= 0.05
    fixed = model.infer(x, steps=60)
    norms = [torch.sqrt(sum(g.square().flatten(1).sum(1) for g in model.gradients(x, fixed.latents)))]
    tol = float(norms[0][[0, 2]].min()) * 0.5  # the two full images never get this low in 60 steps
    early = model.infer(x, steps=60, tol=tol)
    assert early.steps.tolist()[0] == 60 and early.steps.tolist()[2] == 60
    assert early.steps[1] < 60 and early.steps[3] < 60
    for i in (0, 2):
        for a, b in zip(early.latents, fixed.latents):
            assert a[i].numpy().tobytes() == b[i].numpy().tobytes()
    # A stopped image's gradient is below tol where it stopped, and its energy stays put afterwards.
    for i in (1, 3):
        grads = model.gradients(x[i : i + 1], [r[i : i + 1] for r in early.latents])
        assert float(torch.sqrt(sum(g.square().sum() for g in grads))) < tol
        n = int(early.steps[i])
        assert torch.all(early.energy[n:, i] == early.energy[n, i])
    assert early.energy.shape[0] == 61


def test_early_stop_with_every_image_stopped_ends_the_loop(generator):
    model = model_at(tiny_config("modules"), generator, k1_factor=0.5)
    x = torch.zeros((2, *model.config.input_shape))
    result = model.infer(x, steps=50, tol=1e-3)
    assert result.steps.tolist() == [0, 0]
    assert result.energy.shape == (1, 2)


def test_result_shapes_for_the_paper_preset():
    model = pcmodel.load("rao-ballard-1999")
    x = torch.randn((2, 1, 16, 26))
    result = model.infer(x, steps=5)
    assert [tuple(r.shape) for r in result.latents] == [(2, 32, 1, 3), (2, 128, 1, 1)]
    assert tuple(result.predictions[0].shape) == (2, 3, 1, 16, 16)  # per module: its own patch
    assert tuple(result.predictions[1].shape) == (2, 1, 32, 1, 3)  # level 2 predicts all 96 causes
    assert tuple(result.reconstruction.shape) == (2, 1, 16, 26)
    torch.testing.assert_close(result.error, x - result.reconstruction, rtol=0, atol=0)
    assert result.steps.tolist() == [5, 5]
    assert tuple(result.energy.shape) == (6, 2)
    # Level 2's prediction error is r_1 minus its prediction, per module grid position.
    r1 = result.latents[0].reshape(2, 1, 32, 1, 3)
    torch.testing.assert_close(result.errors[1], r1 - result.predictions[1])


def test_result_for_the_convolutional_preset_at_another_size():
    model = pcmodel.load("conv-rgb")
    x = torch.rand((1, 3, 64, 48)) * 2 - 1
    result = model.infer(x, steps=3)
    assert [tuple(r.shape) for r in result.latents] == [(1, 8, 15, 11), (1, 10, 7, 5)]
    assert tuple(result.reconstruction.shape) == (1, 3, 64, 48)
    torch.testing.assert_close(result.errors[0], result.error, rtol=0, atol=0)
    for backend in ("loop", "torch", "onnxruntime"):  # level 1's error is the input minus the reconstruction
        run = model.infer(x, steps=3, backend=backend)
        assert run.error.numpy().tobytes() == (x - run.reconstruction).numpy().tobytes()
        assert run.errors[0].numpy().tobytes() == run.error.numpy().tobytes()
    # The reconstruction is f(U_1 r_1), computed here independently.
    expected = torch.tanh(torch.nn.functional.conv_transpose2d(result.latents[0], model.weights[0], stride=4))
    torch.testing.assert_close(result.reconstruction, expected)


def test_feedforward_initial_latents(generator):
    config = tiny_config("convolutional", initial_latents="feedforward")
    model = model_at(config, generator, std=0.3)
    x = torch.randn((2, *config.input_shape), generator=generator)
    r1, r2 = model.initial_latents(x)
    torch.testing.assert_close(r1, torch.nn.functional.conv2d(x, model.weights[0], stride=2))
    torch.testing.assert_close(r2, torch.nn.functional.conv2d(r1, model.weights[1], stride=2))
    assert model.infer(x, steps=0).latents[0].equal(r1)


def test_receptive_fields():
    paper = pcmodel.load("rao-ballard-1999")
    assert paper.receptive_fields(1).equal(paper.weights[0])
    level2 = paper.receptive_fields(2)
    assert tuple(level2.shape) == (128, 1, 16, 26)
    # Level-2 field of cause c: the three modules' patches U_1 r_1 summed over the 16x26 region.
    u1, u2 = paper.weights
    c = 5
    r1 = u2[c].reshape(32, 3)  # the 96 level-1 causes cause c predicts, per module
    expected = torch.zeros(16, 26)
    for m in range(3):
        expected[:, 5 * m : 5 * m + 16] += torch.einsum("k,khw->hw", r1[:, m], u1[:, 0])
    torch.testing.assert_close(level2[c, 0], expected)
    conv = pcmodel.load("conv-rgb")
    assert tuple(conv.receptive_fields(2).shape) == (10, 3, 16, 16)
    with pytest.raises(ValueError, match=r"level must be in 1\.\.2"):
        conv.receptive_fields(3)


def test_learn_step_lowers_the_energy_at_fixed_latents(generator):
    model = model_at(tiny_config("dense", "tanh", "cauchy"), generator, std=0.3, k1_factor=0.5)
    x = torch.randn((6, *model.config.input_shape), generator=generator)
    latents = model.infer(x, steps=30).latents
    before = model.energy(x, latents).mean()
    model.learn_step(x, latents, k2=0.01)
    assert model.energy(x, latents).mean() < before


def test_learning_rate_scales_per_level(generator):
    """U_l moves by (k2 k2_scale_l / 2) dE/dU_l: level 2's step is k2_scale times its unscaled one."""
    model = model_at(tiny_config("dense"), generator, std=0.3, k1_factor=0.5)
    x = torch.randn((4, *model.config.input_shape), generator=generator)
    latents = model.infer(x, steps=20).latents
    grads = model.weight_gradients(x, latents)
    before = [w.clone() for w in model.weights]
    model.apply_weight_gradients(grads, k2=0.01)
    for lc, g, old, new in zip(model.config.levels, grads, before, model.weights):
        torch.testing.assert_close(old - new, g * (0.01 * lc.k2_scale / 2))
    assert model.config.levels[1].k2_scale != 1.0


@pytest.mark.parametrize("kind", ["dense", "convolutional", "modules"])
def test_column_norm_holds_every_field_at_its_norm(kind, generator):
    """docs/MODEL.md section 3: on a level with column_norm, every cause's field has that norm from the
    start (create) and after each learning step, which is the plain step followed by the rescaling."""
    config = tiny_config(kind, prior="cauchy")
    levels = (dataclasses.replace(config.levels[0], column_norm=0.3, lam=0.0), config.levels[1])
    config = config.replace(levels=levels)
    model = pcmodel.create(config, seed=1, allow_unstable=True)
    model = PCModel(config.replace(k1=0.5 * model.stability_bound()), model.weights)

    def norms(U):
        return U.flatten(1).norm(dim=1)

    torch.testing.assert_close(norms(model.weights[0]), torch.full((config.levels[0].causes,), 0.3))
    x = torch.randn((4, *config.input_shape), generator=generator)
    latents = model.infer(x, steps=20).latents
    grads = model.weight_gradients(x, latents)
    before = [w.clone() for w in model.weights]
    model.apply_weight_gradients(grads, k2=0.5)
    stepped = before[0] - grads[0] * (0.5 * config.levels[0].k2_scale / 2)
    assert not torch.allclose(norms(stepped), norms(model.weights[0]))  # the step alone leaves the norm
    torch.testing.assert_close(model.weights[0], stepped * (0.3 / norms(stepped)).reshape(-1, 1, 1, 1))
    torch.testing.assert_close(model.weights[1], before[1] - grads[1] * (0.5 * config.levels[1].k2_scale / 2))


@pytest.mark.parametrize(("kind", "prior"), [("dense", "cauchy"), ("convolutional", "gaussian"), ("modules", "cauchy")])
def test_the_per_level_step_keeps_the_fixed_points(kind, prior, generator):
    """docs/MODEL.md section 2: preconditioning changes the path, not the fixed point. 300 steps with a
    per-level step (level 2 at 8x) reach where 5,000 plain steps (every level at the same k1) end."""
    config = tiny_config(kind, prior=prior)
    plain_levels = tuple(dataclasses.replace(lv, k1_scale=1.0) for lv in config.levels)
    weights = [torch.randn(s, generator=generator, dtype=torch.float64) * 0.4 for s in PCModel.weight_shapes(config)]
    plain = PCModel(config.replace(levels=plain_levels), weights, allow_unstable=True)
    plain = PCModel(plain.config.replace(k1=0.5 * plain.stability_bound()), weights, allow_unstable=True)
    fast_levels = (plain_levels[0], dataclasses.replace(plain_levels[1], k1_scale=8.0))
    fast = PCModel(plain.config.replace(levels=fast_levels), weights, allow_unstable=True)
    fast = PCModel(fast.config.replace(k1=0.5 * fast.stability_bound()), weights, allow_unstable=True)
    x = torch.randn((3, *config.input_shape), generator=generator, dtype=torch.float64)
    reference = plain.infer(x, steps=5000, backend="loop")
    quick = fast.infer(x, steps=300, backend="loop")
    slow = plain.infer(x, steps=300, backend="loop")
    for level, (a, b) in enumerate(zip(quick.latents, reference.latents)):
        gap = float((a - b).norm() / b.norm())
        assert gap < 1e-3, (level, gap)
    top_slow = float((slow.latents[1] - reference.latents[1]).norm() / reference.latents[1].norm())
    top_quick = float((quick.latents[1] - reference.latents[1]).norm() / reference.latents[1].norm())
    assert top_quick < 0.1 * top_slow  # the same 300 steps without the per-level step are much further away
