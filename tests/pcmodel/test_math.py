"""docs/MODEL.md section 5 A: the hand-derived updates equal autograd in float64; the level maps are adjoint."""

from __future__ import annotations

import itertools

import pytest
import torch

from pcmodel import PRIORS, PCModel
from pcmodel.levels import Level

from .conftest import KINDS, tiny_config

CASES = list(itertools.product(KINDS, ("identity", "tanh"), tuple(PRIORS)))  # every registered prior


def random_model(config, generator, std=0.4) -> PCModel:
    weights = [torch.randn(s, generator=generator) * std for s in PCModel.weight_shapes(config)]
    return PCModel(config, weights, allow_unstable=True)


def random_state(model, generator, batch=3):
    x = torch.randn((batch, *model.config.input_shape), generator=generator, dtype=torch.float64)
    latents = [torch.randn((batch, *s), generator=generator, dtype=torch.float64) * 0.7 for s in model.latent_shapes()]
    return x, latents


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("kind", "f", "prior"), CASES)
def test_latent_update_equals_autograd(kind, f, prior, generator):
    model = random_model(tiny_config(kind, f, prior), generator)
    x, latents = random_state(model, generator)
    leaves = [r.clone().requires_grad_(True) for r in latents]
    energy = model.energy(x, leaves).sum()
    autograd = torch.autograd.grad(energy, leaves)
    hand = model.gradients(x, latents)
    k1 = model.config.k1
    for level, (a, h) in enumerate(zip(autograd, hand), 1):
        assert h.dtype == torch.float64
        # The update the loop applies is -(k1/2) * hand; compare it with -(k1/2) * autograd.
        assert relative_error(-(k1 / 2) * h, -(k1 / 2) * a) < 1e-6, f"level {level}"


@pytest.mark.parametrize(("kind", "f", "prior"), CASES)
def test_weight_update_equals_autograd(kind, f, prior, generator):
    model = random_model(tiny_config(kind, f, prior), generator)
    x, latents = random_state(model, generator)
    weights = [w.to(torch.float64).requires_grad_(True) for w in model.weights]
    energy = model.energy(x, latents, weights=weights).mean()  # learning uses the batch mean
    autograd = torch.autograd.grad(energy, weights)
    hand = model.weight_gradients(x, latents)
    for level, (a, h) in enumerate(zip(autograd, hand), 1):
        assert h.shape == a.shape
        assert relative_error(h, a) < 1e-6, f"level {level}"


@pytest.mark.parametrize(("kind", "f", "prior"), CASES)
def test_energy_is_a_sum_per_image(kind, f, prior, generator):
    """Energy of an image does not depend on its batch: a batch's energies are the singles' energies."""
    model = random_model(tiny_config(kind, f, prior), generator)
    x, latents = random_state(model, generator, batch=4)
    together = model.energy(x, latents)
    alone = torch.cat([model.energy(x[i : i + 1], [r[i : i + 1] for r in latents]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=0)


def test_energy_formula_by_hand(generator):
    """The energy of a one-level dense model written out independently with matrices."""
    config = tiny_config("convolutional", "tanh", "cauchy")
    model = random_model(config, generator)
    x, latents = random_state(model, generator, batch=2)
    (u1, u2), (r1, r2) = [w.double() for w in model.weights], latents
    l1, l2 = config.levels
    pred1 = torch.tanh(torch.nn.functional.conv_transpose2d(r1, u1, stride=2))
    pred2 = torch.tanh(torch.nn.functional.conv_transpose2d(r2, u2, stride=2))
    expected = (
        ((x - pred1) ** 2).sum((1, 2, 3)) / l1.sigma2
        + ((r1 - pred2) ** 2).sum((1, 2, 3)) / l2.sigma2
        + l1.alpha * torch.log1p(r1**2).sum((1, 2, 3))
        + l2.alpha * torch.log1p(r2**2).sum((1, 2, 3))
        + l1.lam * (u1**2).sum()
        + l2.lam * (u2**2).sum()
    )
    torch.testing.assert_close(model.energy(x, latents), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_level_maps_are_adjoint(kind, generator):
    """<U r, e> = <r, U^T e> and <t(lower), e> = <lower, t^T e> for every level kind."""
    config = tiny_config(kind)
    model = random_model(config, generator)
    for level, weight in zip(model.levels(config.input_shape[1:]), model.weights):
        U = weight.double()
        batch = 2
        r = torch.randn((batch, *level.geometry.latent), generator=generator, dtype=torch.float64)
        lower = torch.randn((batch, *level.geometry.lower), generator=generator, dtype=torch.float64)
        prediction = level.predict(r, U)
        e = torch.randn(prediction.shape, generator=generator, dtype=torch.float64)
        lhs, rhs = (prediction * e).sum(), (r * level.adjoint(e, U)).sum()
        assert abs(float(lhs - rhs)) <= 1e-10 * abs(float(lhs))
        t = level.target(lower)
        lhs, rhs = (t * e).sum(), (lower * level.target_adjoint(e)).sum()
        assert abs(float(lhs - rhs)) <= 1e-10 * abs(float(lhs))


def test_modules_predict_each_patch_with_the_shared_basis(generator):
    """A module's prediction is U times its own causes, on its own windowed patch (the paper's modules)."""
    config = tiny_config("dense")
    model = random_model(config, generator)
    level = Level(config.levels[0], model.levels(config.input_shape[1:])[0].geometry)
    U = model.weights[0].double()
    r = torch.randn((1, *level.geometry.latent), generator=generator, dtype=torch.float64)
    patches = level.as_patches(level.predict(r, U))  # (1, M, C, kh, kw)
    for m in range(level.geometry.latent[2]):
        expected = torch.einsum("c,cdhw->dhw", r[0, :, 0, m], U)
        torch.testing.assert_close(patches[0, m], expected)
