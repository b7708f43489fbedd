"""pc-analyze: the end-stopping experiment, the report, the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pcmodel
from training import analysis, measurements
from training.gabor import GaborFit
from training.report import end_stopping_markdown, steady_state_markdown
from training.train import main as train

from .conftest import FAST


@pytest.fixture
def one_thread():
    """One torch thread (the machine's cores are shared), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_end_stopping_cells_are_oriented_and_horizontal():
    def fit(r2, orientation, n_x):
        return GaborFit(r2, 1, 0, 0, np.radians(orientation - 90), 2.0, 1, n_x / 2.0, 0, 0)

    fits = [fit(0.9, 5, 0.3), fit(0.6, 0, 0.3), fit(0.9, 0, 0.05), fit(0.9, 45, 0.3), fit(0.8, 175, 0.2)]
    # 1: poor fit, 2: a blob (no stripes), 3: oblique
    assert measurements.horizontal_cells(fits) == [0, 4]


def _synthetic_fits(horizontal):
    return [
        GaborFit(0.9, 1, 0, 0, np.radians((0 if i in horizontal else 90) - 90), 2.0, 1, 0.1, 0, 0) for i in range(32)
    ]


def test_end_stopping_report_keys_on_the_papers_geometry(one_thread):
    model = pcmodel.load("rao-ballard-1999")
    fits = _synthetic_fits({6, 17, 29})
    result = measurements.end_stopping(model, fits, steps=10, steady_steps=30)
    for key in ("summary", "steady"):
        assert set(result[key]) == {
            "cells", "share_end_stopped", "median_feedback", "median_without", "headline_cell", "passes", "steps"
        }  # fmt: skip
        assert set(result[key]["share_end_stopped"]) == {"0.5", "1", "2"}
    assert result["summary"]["steps"] == 10 and result["steady"]["steps"] == 30
    assert result["lengths"][-1] == 26 and result["long_px"] == 26 and result["module_px"] == 16
    cells = result["cells"]
    assert cells and {c["cause"] for c in cells} <= {6, 17, 29}
    for cell in cells:
        assert cell["r2"] == 0.9 and cell["n_x"] == pytest.approx(0.2) and cell["orientation_deg"] == pytest.approx(0)
        for at in ("default", "steady"):
            assert all(np.isfinite(v) for v in cell[at]["index_feedback"].values())
    head = result["summary"]["headline_cell"]
    assert result["mechanism"]["default"]["cause"] == head == result["surround"]["cause"]
    assert len(result["mechanism"]["steady"]["r_td"]) == len(result["lengths"])
    assert result["time_course"]["steps"][-1] == 30 and set(result["time_course"]["served"]) == {"8", "26"}
    assert set(result["surround"]["by_steps"][0]["feedback_ratio"]) == {"none", "iso", "ortho"}
    text = "\n".join(end_stopping_markdown(result))
    assert "end_stopping_mechanism.png" in text and "surround.png" in text
    conv = pcmodel.create("conv-rgb")
    assert measurements.end_stopping(conv, _synthetic_fits(set())) is None and measurements.steady_state(conv) is None
    assert "paper's network only" in "\n".join(steady_state_markdown(None))


def test_end_stopping_measures_a_steady_state_by_default(one_thread):
    assert measurements.END_STOPPING_STEPS >= 1000  # level 2 relaxes with a time constant of ~130 steps
    model = pcmodel.load("rao-ballard-1999")
    result = measurements.end_stopping(model, _synthetic_fits(set()))  # no candidates: nothing to run for long
    assert result["summary"]["steps"] == model.config.steps
    assert result["steady"]["steps"] == max(measurements.END_STOPPING_STEPS, model.config.steps)
    assert result["summary"]["cells"] == 0 and result["time_course"] is None


@pytest.mark.slow
def test_pc_analyze_writes_the_report(tmp_path, tiny_config_file, capsys):
    assert train(["--config", str(tiny_config_file), *FAST, "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "analysis"  # beside the checkpoint by default
    model = str(tmp_path / "run" / "model.safetensors")
    assert analysis.main([model, "--steps", "20", "--end-stopping-steps", "50", "--reference-steps", "100"]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert summary["gabor_share"] == pytest.approx(report["gabor"]["share_good"], abs=1e-3)
    assert len(report["gabor"]["fits"]) == 6
    assert 0 < report["held_out"]["relative_error"] < 1.5
    assert report["end_stopping"] is not None  # the miniature has the paper's geometry
    assert report["end_stopping"]["steady"]["steps"] == 50 and report["steady_state"]["reference_steps"] == 100
    assert summary["end_stopping"] == report["end_stopping"]["summary"]
    text = (out / "report.md").read_text()
    for section in ("## D.", "## E.", "## F.", "gabor_fits.png", "china.jpg", "## Steady state of inference"):
        assert section in text
    assert (out / "gabor_fits.png").stat().st_size < 300_000
    figures = ("end_stopping.png", "end_stopping_mechanism.png", "end_stopping_time.png", "surround.png")
    assert all((out / name).is_file() == bool(report["end_stopping"]["cells"]) for name in figures)
    # training/fields.py's sections: the miniature has the paper's geometry (8 level-2 causes, 6 level-1)
    assert report["level2_fields"]["fields"] == 8 and report["pca_control"]["components"] == 6
    assert report["autocorrelation"]["used"] > 0 and (out / "autocorrelation.png").is_file()
    assert (out / "level2_measures.png").is_file() and "## Level-2 fields against random U2" in text
    assert summary["dynamics"] == {"solver": "gradient", "init": "zeros", "steps": 20}  # --steps: every measurement

    # --solver/--init set the dynamics of every measurement (the report says which); the time course stays
    # the paper's; a bad value is one line and exit 2.
    fast = tmp_path / "fast"
    argv = [model, "--steps", "20", "--end-stopping-steps", "50", "--reference-steps", "100", "--out", str(fast)]
    assert analysis.main([*argv, "--solver", "nesterov", "--init", "zero"]) == 0
    assert json.loads(capsys.readouterr().out)["dynamics"]["solver"].startswith("nesterov(")
    fast_report = json.loads((fast / "report.json").read_text())
    assert "of nesterov(" in (fast / "report.md").read_text()
    assert fast_report["gabor"]["fits"] == report["gabor"]["fits"]  # the same weights
    if report["end_stopping"]["time_course"] is not None:
        assert fast_report["end_stopping"]["time_course"] == report["end_stopping"]["time_course"]
    with pytest.raises(SystemExit) as exit_info:
        analysis.main([model, "--solver", "newton"])
    assert exit_info.value.code == 2
    assert analysis.main([model, "--init", "amortised", "--out", str(tmp_path / "x")]) == 2  # no amortiser
    assert "--init" in capsys.readouterr().err


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


def test_a_model_larger_than_every_held_out_photo_is_one_line_and_exit_2(tmp_path, capsys):
    config = pcmodel.ModelConfig(
        name="too-large",
        input_shape=(1, 512, 512),
        levels=(pcmodel.LevelConfig(causes=4, kind="convolutional", kernel=(8, 8), init_std=0.1),),
        k1=0.005,
        preprocess=pcmodel.PreprocessConfig(color="gray", value_range=(0.0, 1.0)),
    )
    path = tmp_path / "large.safetensors"
    pcmodel.create(config, seed=0).save(path)
    assert analysis.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "pc-analyze: the model's input 512x512 is larger than every held-out photo it is measured on "
        "(china.jpg 427x640, flower.jpg 427x640)"
    )
    assert not (tmp_path / "out").exists()
