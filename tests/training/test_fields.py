"""training/fields.py: level-2 measures on constructed fields, the random-U2 comparison, the autocorrelation
on synthetic stripes, the PCA control."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pcmodel
from training import fields
from training.gabor import fit_gabor, gabor, gabor_summary

from .conftest import TINY


def _parts(per_module: list[np.ndarray], shape=(16, 26), step=5) -> np.ndarray:
    """One field's module parts (1, M, H, W) from 16x16 patches placed at offsets 0, step, 2 step."""
    parts = np.zeros((1, len(per_module), *shape))
    for m, patch in enumerate(per_module):
        parts[0, m, :16, m * step : m * step + 16] = patch
    return parts


def _blob(sigma: float = 2.0) -> np.ndarray:
    yy, xx = np.mgrid[0:16, 0:16] - 7.5
    return np.exp(-(yy**2 + xx**2) / (2 * sigma**2))


def test_a_field_in_one_module_spreads_less_than_one_over_all_three():
    zero = np.zeros((16, 16))
    one = fields.module_spread(_parts([zero, _blob(), zero]))
    three = fields.module_spread(_parts([_blob(), _blob(), _blob()]))
    assert one["outside_share"][0] == pytest.approx(0.0) and one["participation"][0] == pytest.approx(1.0)
    assert three["outside_share"][0] == pytest.approx(2 / 3) and three["participation"][0] == pytest.approx(3.0)


def test_an_elongated_field_scores_higher_than_an_isotropic_blob():
    yy, xx = np.mgrid[0:21, 0:21] - 10.0
    blob = np.exp(-(yy**2 + xx**2) / 8.0)
    bar = np.exp(-(yy**2) / 2.0 - xx**2 / 60.0)  # a horizontal bar
    diagonal = np.exp(-((xx - yy) ** 2) / 4.0 - (xx + yy) ** 2 / 120.0)
    elongation = fields.elongation(np.stack([blob, bar, diagonal]))
    assert elongation[0] < 0.05 and elongation[1] > 0.8 and elongation[2] > 0.8
    # stripes of one orientation against a sum of stripes of four orientations under the same envelope
    stripes = blob * np.cos(2 * np.pi * 0.2 * xx)
    star = blob * sum(np.cos(2 * np.pi * 0.2 * (xx * np.cos(a) + yy * np.sin(a))) for a in np.arange(4) * np.pi / 4)
    orientation = fields.orientation_index(np.stack([stripes, star, blob]))
    assert orientation[0] > 0.8 and orientation[1] < 0.3 and orientation[2] < 0.1


def test_neighbouring_parts_agree_when_a_bar_continues_across_modules():
    yy = np.mgrid[0:16, 0:26][0].astype(float)
    bar = np.exp(-((yy - 7.5) ** 2) / 2.0)  # a horizontal bar along the whole patch
    continued = np.zeros((1, 3, 16, 26))
    for m in range(3):
        continued[0, m, :, 5 * m : 5 * m + 16] = bar[:, 5 * m : 5 * m + 16]
    rng = np.random.default_rng(0)
    unrelated = _parts([rng.standard_normal((16, 16)) for _ in range(3)])
    assert fields.overlap_agreement(continued)[0] > 0.9
    assert abs(fields.overlap_agreement(unrelated)[0]) < 0.2


def test_module_parts_add_up_to_the_models_level2_fields():
    model = pcmodel.create("rao-ballard-1999", seed=3)
    parts = fields.module_parts(model)
    assert parts.shape == (128, 3, 16, 26)
    expected = model.receptive_fields(2)[:, 0].double().numpy()
    assert np.abs(parts.sum(axis=1) - expected).max() < 1e-5 * np.abs(expected).max()
    assert fields.module_parts(pcmodel.create("conv-rgb")) is None


def test_random_u2_keeps_the_norm_and_random_u2_are_not_significant():
    model = pcmodel.create(TINY, seed=0)
    generator = torch.Generator().manual_seed(1)
    u2 = model.weights[1]
    random = fields.random_like(u2, generator)
    assert torch.allclose(random.flatten(1).norm(dim=1), u2.double().flatten(1).norm(dim=1), rtol=1e-12)
    # Freshly initialised U2 are Gaussian themselves, so under the null hypothesis each p is uniform:
    # over 20 models, p < 0.05 should come about once per measure (5 or more: probability 0.3%), and
    # the median p sits near 0.5.
    ps = {name: [] for name in fields.MEASURE_NAMES}
    for seed in range(20):
        report = fields.level2_report(pcmodel.create(TINY, seed=100 + seed), draws=40, seed=seed)
        assert report["fields"] == 8 and report["modules"] == 3
        for name, m in report["measures"].items():
            ps[name].append(m["p"])
    for name, values in ps.items():
        assert sum(p < 0.05 for p in values) <= 4, name
        assert 0.2 < float(np.median(values)) < 0.8, name


def test_used_causes_are_the_columns_holding_most_of_u2s_norm():
    u2 = torch.zeros(6, 4, 1, 3, dtype=torch.float64)
    u2[4, 0, 0, 0], u2[1, 1, 0, 1], u2[3, 2, 0, 2] = 3.0, 2.0, 0.5  # squared norms 9, 4, 0.25 of 13.25
    u2 += 1e-4  # decayed columns: tiny, not zero
    assert fields.used_causes(u2, share=0.9).tolist() == [4, 1]  # 9 + 4 >= 90% of the total
    assert fields.used_causes(u2, share=0.5).tolist() == [4]
    assert fields.used_causes(u2, share=0.99).tolist() == [4, 1, 3]


def test_the_comparison_detects_fields_that_continue_across_modules():
    # A U2 whose every cause drives the same level-1 cause in all three modules: the parts are shifted
    # copies of one smooth field, so they agree where they overlap, which random U2 do not.
    model = pcmodel.create(TINY, seed=0)
    u1 = torch.zeros_like(model.weights[0])
    u1[:, 0] = torch.tensor(np.exp(-((np.arange(8) - 3.5) ** 2) / 8.0)).float()[None, :, None]  # smooth
    u1 += 0.01 * torch.randn(u1.shape, generator=torch.Generator().manual_seed(0))
    u2 = torch.zeros_like(model.weights[1])
    u2[torch.arange(8), torch.arange(8) % 6] = 1.0  # (causes, C1, 1, M): all modules
    model = pcmodel.PCModel(model.config, [u1, u2], allow_unstable=True)
    report = fields.level2_report(model, draws=40, seed=0)
    assert report["measures"]["overlap_agreement"]["p"] < 0.05
    assert report["measures"]["participation"]["value"] == pytest.approx(3.0, rel=0.01)


@pytest.mark.parametrize("degrees", [0, 30, 90, 135])
def test_autocorrelation_of_stripes_is_longer_along_them(degrees):
    rng = np.random.default_rng(degrees)
    yy, xx = np.mgrid[0:96, 0:96].astype(float)
    theta = np.radians(degrees)  # the stripes run at theta from the x axis
    across = -xx * np.sin(theta) + yy * np.cos(theta)
    image = np.cos(2 * np.pi * across / 9.0) + 0.2 * rng.standard_normal(xx.shape)
    result = fields.autocorrelation([image], patches=100, seed=0)
    assert result["used"] > 80
    assert min(result["along"][1:]) > 0.6  # along the stripes the image repeats itself
    assert result["across"][4] < -0.3  # half a period across: anti-correlated
    assert result["half_width_across"] < 3.0 and result["half_width_along"] is None


def test_pca_control_gives_one_field_per_level1_cause():
    config = pcmodel.get_preset("rao-ballard-1999")
    pcs = fields.pca_fields(config, patches=3000)
    assert pcs.shape == (32, 16, 16)
    flat = pcs.reshape(32, -1)
    assert np.allclose(flat @ flat.T, np.eye(32), atol=1e-8)  # orthonormal components


def _gabors(count: int) -> np.ndarray:
    """Localised Gabors of several orientations at scattered centres (a basis no rotation keeps)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float64)
    out = []
    for i in range(count):
        y0, x0 = rng.uniform(5, 11, size=2)
        params = [1.0, y0, x0, np.pi * i / count, 1.8, 2.4, 0.18, rng.uniform(0, np.pi), 0.0]
        out.append(gabor(np.array(params), yy, xx))
    return np.stack(out)


def test_span_control_tells_a_learned_basis_from_its_span():
    """Rotations of distinct localised Gabors are mixtures, not Gabors (the share is the basis's); copies
    of one Gabor span one direction, so every rotation is that Gabor again (the share is the span's)."""
    basis = _gabors(8)
    assert gabor_summary([fit_gabor(f) for f in basis])["share_good"] == 1.0
    distinct = fields.span_control(basis, draws=2)
    assert distinct["rotated_share_median"] <= 0.5, distinct  # measured 0.31
    assert distinct["effective_dimension"] > 5, distinct
    copies = np.repeat(_gabors(1), 8, axis=0) * np.linspace(0.5, 1.5, 8)[:, None, None]
    collapsed = fields.span_control(copies, draws=2)
    assert collapsed["rotated_share_median"] == 1.0, collapsed
    assert collapsed["effective_dimension"] == pytest.approx(1.0), collapsed
