"""training/gabor.py: the Gabor fit against known Gabors and noise, orientation bins, the summary."""

from __future__ import annotations

import numpy as np
import pytest

from training.gabor import GaborFit, fit_gabor, gabor, gabor_summary


@pytest.mark.parametrize("carrier_deg", [0, 30, 75, 120])
def test_gabor_fit_recovers_a_known_gabor(carrier_deg):
    rng = np.random.default_rng(carrier_deg)
    yy, xx = np.mgrid[0:16, 0:16].astype(float)
    carrier = np.radians(carrier_deg)
    field = gabor(np.array([1.0, 7.0, 8.5, carrier, 2.5, 3.5, 0.15, 0.4, 0.0]), yy, xx)
    fit = fit_gabor(field + 0.03 * rng.standard_normal(field.shape))
    assert fit.r2 > 0.95
    assert fit.frequency == pytest.approx(0.15, rel=0.05)
    difference = (fit.orientation - (carrier_deg + 90)) % 180
    assert min(difference, 180 - difference) < 3


def test_noise_is_not_gabor_like():
    rng = np.random.default_rng(0)
    r2 = [fit_gabor(rng.standard_normal((16, 16))).r2 for _ in range(4)]
    assert max(r2) < 0.2


def test_orientation_bins_are_centred_on_multiples_of_22_5_degrees():
    def bin_of(orientation):
        return GaborFit(1, 1, 0, 0, np.radians(orientation - 90), 1, 1, 0.1, 0, 0).orientation_bin

    assert [bin_of(o) for o in (0, 10, 12, 22.5, 90, 170, 179)] == [0, 0, 1, 1, 4, 0, 0]


def test_summary_counts_good_fits_and_their_bins():
    fits = [GaborFit(r2, 1, 0, 0, np.radians(o - 90), 1, 1, 0.1, 0, 0) for r2, o in ((0.9, 0), (0.8, 45), (0.5, 90))]
    summary = gabor_summary(fits)
    assert summary["good_fits"] == 2 and summary["orientation_bins"] == 2 and summary["bins"] == [0, 2]
