"""pc-analyze: the Gabor fit against known Gabors and noise, the end-stopping experiment, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import pcmodel
from training import analysis
from training.analysis import GaborFit, fit_gabor, gabor
from training.train import main as train

from .conftest import FAST


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
    summary = analysis.gabor_summary(fits)
    assert summary["good_fits"] == 2 and summary["orientation_bins"] == 2 and summary["bins"] == [0, 2]


def test_bars_grow_with_length_and_keep_their_contrast():
    model = pcmodel.create("rao-ballard-1999")
    bars = analysis.bar_stimuli(model, [4, 20, 26], [7.5])
    assert bars.shape == (3, 1, 16, 26)
    tiny, short, long = bars[0, 0], bars[1, 0], bars[2, 0]
    assert long.abs().sum() > short.abs().sum() > 2 * tiny.abs().sum()
    # the middle of both bars, farther than the filter's reach from the ends, sees the same stimulus:
    # the same filtered value (no per-image normalisation that would change with the length)
    assert float(long[7:9, 12:14].abs().max()) == pytest.approx(float(short[7:9, 12:14].abs().max()), rel=1e-3)


def test_end_stopping_on_the_papers_geometry_only():
    model = pcmodel.create("rao-ballard-1999")
    result = analysis.end_stopping(model, steps=20)
    assert result is not None and result["lengths"][-1] == 26 and result["short_px"] == 8
    for name in ("cell_with_feedback", "cell_without_feedback", "population_with_feedback"):
        assert np.isfinite(result["ratios"][name]["long_over_short"])
    assert analysis.end_stopping(pcmodel.create("conv-rgb"), steps=5) is None
    # The cell comes from the candidates (the horizontal Gabor-like fields) when there are any.
    others = [c for c in range(32) if c != result["cell"]]
    assert analysis.end_stopping(model, steps=20, candidates=others[:3])["cell"] in others[:3]
    assert not result["cell_is_horizontal_gabor"]


def test_end_stopping_measures_a_steady_state_by_default():
    model = pcmodel.create("rao-ballard-1999")
    assert analysis.end_stopping(model)["steps"] == max(analysis.END_STOPPING_STEPS, model.config.steps)
    assert analysis.END_STOPPING_STEPS >= 1000  # level 2 relaxes with a time constant of ~130 steps


@pytest.mark.slow
def test_pc_analyze_writes_the_report(tmp_path, tiny_config_file, capsys):
    assert train(["--config", str(tiny_config_file), *FAST, "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "analysis"  # beside the checkpoint by default
    assert analysis.main([str(tmp_path / "run" / "model.safetensors"), "--steps", "20"]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert summary["gabor_share"] == pytest.approx(report["gabor"]["share_good"], abs=1e-3)
    assert len(report["gabor"]["fits"]) == 6
    assert 0 < report["held_out"]["relative_error"] < 1.5
    assert report["end_stopping"] is not None  # the miniature has the paper's geometry
    text = (out / "report.md").read_text()
    for section in ("## D.", "## E.", "## F.", "gabor_fits.png", "end_stopping.png", "china.jpg"):
        assert section in text
    assert (out / "gabor_fits.png").stat().st_size < 300_000 and (out / "end_stopping.png").is_file()
    # training/fields.py's sections: the miniature has the paper's geometry (8 level-2 causes, 6 level-1)
    assert report["level2_fields"]["fields"] == 8 and report["pca_control"]["components"] == 6
    assert report["autocorrelation"]["used"] > 0 and (out / "autocorrelation.png").is_file()
    assert (out / "level2_measures.png").is_file() and "## Level-2 fields against random U2" in text


def test_the_report_goes_beside_its_checkpoint_by_default(tmp_path):
    runs = [tmp_path / "runs" / name for name in ("a", "b")]  # two runs of one preset
    snapshot = runs[0] / "checkpoints" / "step-0000004.safetensors"
    snapshot.parent.mkdir(parents=True)
    for path in (runs[0] / "model.safetensors", runs[1] / "model.safetensors", snapshot):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    outs = [analysis.default_out(str(run / "model.safetensors"), "tiny-paper") for run in runs]
    assert outs == [runs[0] / "analysis", runs[1] / "analysis"]  # no shared analysis/tiny-paper folder
    assert analysis.default_out(str(snapshot), "tiny-paper") == snapshot.parent / "analysis-step-0000004"
    # A shipped model by name: its checkpoint is inside the package, so the report goes to analysis/<name>.
    assert analysis.default_out("default", "conv-rgb") == Path("analysis") / "conv-rgb"
