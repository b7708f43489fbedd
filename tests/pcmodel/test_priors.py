"""The priors (pcmodel/priors.py): each one's formulas agree with each other and with autograd, and stay
within the stability bound's worst case. Every backend runs each prior: test_math.py and test_backends.py
take their cases from pcmodel.PRIORS."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import pcmodel
from pcmodel.priors import PRIORS

R = torch.linspace(-30, 30, 6001, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_phi_is_half_the_derivative_of_psi_and_psi_vanishes_at_zero(name):
    prior = PRIORS[name]
    r = R.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(prior.psi(r, torch).sum(), r)
    torch.testing.assert_close(prior.phi(R, torch), grad / 2, rtol=1e-12, atol=1e-12)
    assert float(prior.psi(torch.zeros(1, dtype=torch.float64), torch)) == 0.0
    alpha = 0.3
    batch = R[:6000].reshape(3, -1)
    torch.testing.assert_close(prior.energy(batch, alpha), alpha * prior.psi(batch, torch).sum(1))
    torch.testing.assert_close(prior.gradient(batch, alpha), 2 * alpha * prior.phi(batch, torch))
    assert prior.gradient(batch, 0.0) is None


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_curvature_is_at_most_the_declared_one_and_the_gaussians(name):
    """sup phi' = sup g'' / (2 alpha) <= curvature <= 1: the Gaussian worst case of the stability bound holds."""
    prior = PRIORS[name]
    r = R.clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(prior.phi(r, torch).sum(), r)
    assert float(slope.max()) <= prior.curvature + 1e-12
    assert prior.curvature <= 1.0
    assert float(slope.max()) >= 0.99 * prior.curvature  # the declared value is attained, not loose


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_the_formulas_run_on_numpy_as_on_torch(name):
    prior = PRIORS[name]
    for f in (prior.psi, prior.phi):
        np.testing.assert_allclose(f(R.numpy(), np), f(R, torch).numpy(), rtol=1e-12, atol=1e-12)


def test_an_unknown_prior_is_a_config_error_that_lists_the_registry():
    with pytest.raises(pcmodel.ConfigError, match="unknown prior 'student'; choose one of: " + ", ".join(PRIORS)):
        pcmodel.LevelConfig(causes=2, kernel=2, prior="student")


def test_two_non_quadratic_priors_take_the_levelwise_plan(generator):
    from pcmodel.engines import plans

    from .conftest import tiny_config

    config = tiny_config("dense", prior="cauchy")
    assert plans.plan_kind(config) == "quadratic"
    mixed = config.replace(levels=(config.levels[0], dataclasses.replace(config.levels[1], prior="smooth-laplace")))
    assert plans.plan_kind(mixed) == "levelwise"
    model = pcmodel.PCModel(mixed, pcmodel.create(config).weights, allow_unstable=True)
    x = torch.randn((2, *config.input_shape), generator=generator)
    expected = model.infer(x, backend="loop")
    result = model.infer(x, backend="onnxruntime")
    assert max(float((a - b).abs().max()) for a, b in zip(result.latents, expected.latents)) <= 1e-4
