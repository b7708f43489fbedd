"""Every variant of the JAX peer computes what the definition computes: latents within 1e-4 of the plain loop."""

from __future__ import annotations

import pytest
import torch

import pcmodel
from tests.pcmodel.conftest import KINDS, tiny_config

pytest.importorskip("jax")

from benchmarks.jax_peer import VARIANTS, hybrid_applies, jax_infer, jax_runner, quadratic_applies, variants_for

BATCHED = [v for v in VARIANTS if v not in ("quadratic", "hybrid")]  # the variants that run every network


def _check(model: pcmodel.PCModel, x: torch.Tensor, steps: int, variant: str) -> None:
    expected = model.infer(x, steps=steps, backend="loop")
    latents, energy = jax_infer(model, x, steps, variant)
    assert len(latents) == len(expected.latents)
    for got, want in zip(latents, expected.latents):
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-4
    assert energy.shape == (steps + 1, x.shape[0])
    torch.testing.assert_close(energy, expected.energy, rtol=1e-5, atol=1e-4)


CONFIGS = [("identity", "gaussian", "zeros"), ("tanh", "cauchy", "feedforward")]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("f", "prior", "start"), CONFIGS)
def test_tiny_configs_match_the_loop(kind: str, f: str, prior: str, start: str, variant: str) -> None:
    model = pcmodel.create(tiny_config(kind, f=f, prior=prior, initial_latents=start), seed=3)
    c, h, w = model.config.input_shape
    applies = {"quadratic": quadratic_applies, "hybrid": hybrid_applies}.get(variant)
    if applies is not None and not applies(model.config, (h, w)):
        with pytest.raises(ValueError, match="identity"):
            jax_infer(model, torch.zeros((1, c, h, w)), 1, variant)
        return
    x = torch.randn((3, c, h, w), generator=torch.Generator().manual_seed(7))
    _check(model, x, 7, variant)


@pytest.mark.parametrize("variant", ["quadratic", "hybrid"])
@pytest.mark.parametrize("kind", KINDS)
def test_quadratic_with_cauchy_priors_and_feedforward_start(kind: str, variant: str) -> None:
    """The Cauchy prior stays outside H (its gradient per step); the feed-forward start is linear in x."""
    model = pcmodel.create(tiny_config(kind, f="identity", prior="cauchy", initial_latents="feedforward"), seed=3)
    x = torch.randn((3, *model.config.input_shape), generator=torch.Generator().manual_seed(7))
    _check(model, x, 7, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_paper_network_at_its_default_steps(variant: str) -> None:
    """rao-ballard-1999 (shipped weights) at T = 100: every variant, the quadratic one included."""
    model = pcmodel.load("rao-ballard-1999").with_dynamics(init="zero", solver="gradient")  # as the peer runs
    assert variants_for(model.config, model.config.input_shape[1:]) == VARIANTS
    x = torch.rand((2, *model.config.input_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    _check(model, x, 100, variant)


@pytest.mark.parametrize("variant", BATCHED)
def test_conv_rgb_matches_the_loop(variant: str) -> None:
    model = pcmodel.load("conv-rgb").with_dynamics(init="zero", solver="gradient")  # as the peer runs
    assert not {"quadratic", "hybrid"} & set(variants_for(model.config, model.config.input_shape[1:]))  # tanh
    x = torch.rand((2, *model.config.input_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    _check(model, x, 10, variant)


def test_runner_keeps_the_fastest_variant() -> None:
    model = pcmodel.load("rao-ballard-1999").with_dynamics(init="zero", solver="gradient")  # as the peer runs
    x = torch.rand((2, *model.config.input_shape), generator=torch.Generator().manual_seed(0))
    call, info = jax_runner(model, x, 3, rounds=1, min_time=0)
    assert set(info["prepare_ms"]) == set(VARIANTS)
    assert info["variant"] == min(info["prepare_ms"], key=info["prepare_ms"].get)
    expected = model.infer(x, steps=3, backend="loop").latents
    assert all(float((a - b).abs().max()) < 1e-4 for a, b in zip(call(), expected))
