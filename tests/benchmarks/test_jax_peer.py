"""The JAX-jit peer computes what the definition computes: latents within 1e-4 of the plain loop."""

from __future__ import annotations

import pytest
import torch

import pcmodel
from tests.pcmodel.conftest import KINDS, tiny_config

pytest.importorskip("jax")

from benchmarks.jax_peer import FORMULATIONS, jax_infer, jax_runner


def _check(model: pcmodel.PCModel, x: torch.Tensor, steps: int, formulation: str) -> None:
    expected = model.infer(x, steps=steps, backend="loop")
    latents, energy = jax_infer(model, x, steps, formulation)
    assert len(latents) == len(expected.latents)
    for got, want in zip(latents, expected.latents):
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-4
    assert energy.shape == (steps + 1, x.shape[0])
    torch.testing.assert_close(energy, expected.energy, rtol=1e-5, atol=1e-4)


VARIANTS = [("identity", "gaussian", "zeros"), ("tanh", "cauchy", "feedforward")]


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("f", "prior", "start"), VARIANTS)
def test_tiny_configs_match_the_loop(kind: str, f: str, prior: str, start: str, formulation: str) -> None:
    model = pcmodel.create(tiny_config(kind, f=f, prior=prior, initial_latents=start), seed=3)
    c, h, w = model.config.input_shape
    x = torch.randn((3, c, h, w), generator=torch.Generator().manual_seed(7))
    _check(model, x, 7, formulation)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("name", ["rao-ballard-1999", "conv-rgb"])
def test_presets_match_the_loop(name: str, formulation: str) -> None:
    model = pcmodel.load(name)
    c, h, w = model.config.input_shape
    x = torch.rand((2, c, h, w), generator=torch.Generator().manual_seed(0)) * 2 - 1
    _check(model, x, 5, formulation)


def test_runner_picks_a_formulation() -> None:
    model = pcmodel.load("rao-ballard-1999")
    x = torch.rand((2, *model.config.input_shape), generator=torch.Generator().manual_seed(0))
    call, info = jax_runner(model, x, 3, rounds=1)
    assert info["formulation"] in FORMULATIONS
    expected = model.infer(x, steps=3, backend="loop").latents
    assert all(float((a - b).abs().max()) < 1e-4 for a, b in zip(call(), expected))
