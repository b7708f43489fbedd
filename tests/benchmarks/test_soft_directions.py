"""benchmarks/soft_directions.py: its Hessian is autograd's, its Newton iteration finds the fixed point, and the
report splits the distance as it says."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from benchmarks import soft_directions
from pcmodel import PCModel
from pcmodel.energy import prior_energy

from .conftest import KINDS, tiny_config


def _model(kind: str, generator: torch.Generator, prior: str = "cauchy") -> PCModel:
    config = tiny_config(kind, prior=prior)
    weights = [torch.randn(s, generator=generator) * 0.4 for s in PCModel.weight_shapes(config)]
    return PCModel(config, weights, allow_unstable=True)


@pytest.mark.parametrize("kind", KINDS)
def test_quadratic_hessian_is_autograds_hessian_of_the_energy_without_its_priors(kind, generator):
    """In float64, on a random state and image: H equals the Hessian of E minus the priors' energy, and E's
    gradient at r is H r minus its value at r = 0, plus the priors' gradient."""
    model = _model(kind, generator)
    hw = model.config.input_shape[1:]
    hessian = soft_directions.quadratic_hessian(model, hw)
    shapes = model.latent_shapes(hw)
    x = torch.rand(1, *model.config.input_shape, generator=generator, dtype=torch.float64)

    def errors_part(flat: torch.Tensor) -> torch.Tensor:
        latents = soft_directions._levels_of(model, flat.unsqueeze(0), hw)
        priors = sum(prior_energy(r, lc.prior, lc.alpha).sum() for r, lc in zip(latents, model.config.levels))
        return model.energy(x, latents).sum() - priors

    n = sum(c * h * w for c, h, w in shapes)
    r = torch.randn(n, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.functional.hessian(errors_part, r), hessian, rtol=1e-10, atol=1e-10)


def test_the_hessian_needs_identity_fs(generator):
    model = PCModel(tiny_config("dense", f="tanh"), _model("dense", generator).weights, allow_unstable=True)
    with pytest.raises(ValueError, match="identity"):
        soft_directions.quadratic_hessian(model, model.config.input_shape[1:])


@pytest.mark.parametrize("kind", ["modules", "dense"])
def test_damped_newton_reaches_the_fixed_point_of_the_papers_dynamics(kind, generator):
    """With the Cauchy prior (non-convex beyond |r| = 1): a few Newton steps settle where 5,000 of the paper's
    steps from zero do, and every step lowers every row's energy."""
    model = _model(kind, generator)
    model = PCModel(model.config.replace(k1=0.8 * model.stability_bound()), model.weights, allow_unstable=True)
    x = torch.rand(3, *model.config.input_shape, generator=generator, dtype=torch.float64)
    hw = model.config.input_shape[1:]
    settled = model.infer(x, steps=5000, solver="gradient", init="zero", backend="loop").latents
    hessian = soft_directions.quadratic_hessian(model, hw)
    zero = [torch.zeros(3, *s, dtype=torch.float64) for s in model.latent_shapes(hw)]
    energies = [model.energy(x, zero)]
    for latents in soft_directions.damped_newton(model, x, hessian, zero, steps=30, floor=1e-3):
        energies.append(model.energy(x, latents))
    assert all(bool((b <= a).all()) for a, b in itertools.pairwise(energies))
    for mine, theirs in zip(latents, settled):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_the_report_splits_each_distance_into_null_and_range_parts(capsys):
    args = ["--photo", "china.jpg", "--rows", "24", "--newton-steps", "2", "--backend", "loop", "--json"]
    assert soft_directions.main(args) == 0
    report = json.loads(capsys.readouterr().out)["reports"][0]
    assert report["rows"] == 24 and report["latents_per_row"] == 224 and 0 < report["null_dimensions"] < 224
    runs = {row["run"].split(",")[0]: row for row in report["runs"]}
    assert set(runs) >= {"paper: gradient from zero", "damped Newton from zero"}
    scales = torch.tensor(report["reference_norm"], dtype=torch.float64)
    for row in report["runs"]:
        # the parts are orthogonal in the whole latent vector (not level by level): squares add over the levels
        total, null, rng = (
            float((torch.tensor(row[k], dtype=torch.float64) * scales).square().sum())
            for k in ("latent_distance_pct", "null_part_pct", "range_part_pct")
        )
        assert total > 0 and null + rng == pytest.approx(total, rel=1e-6)
        assert len(row["prediction_distance_pct"]) == 2
    newton = [row for row in report["runs"] if row["run"].startswith("damped Newton")]
    assert newton[1]["energy_gap_pct"] < newton[0]["energy_gap_pct"]


def test_a_model_with_tanh_is_refused_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        soft_directions.main(["--model", "conv-rgb"])
    assert exit_.value.code == 2
    assert "identity" in capsys.readouterr().err
