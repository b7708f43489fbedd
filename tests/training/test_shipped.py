"""The shipped weights: they load by name, meet the issue's targets, and their recorded command still trains.

Targets (issues 3 and 13, docs/MODEL.md section 5, docs/TRAINING.md): rao-ballard-1999's level-1 fields
are Gabor-like (R^2 >= 0.7 and n_x >= 0.1) covering >= 6 of 8 orientation bins, its held-out relative
error <= 0.2, every level within 5% of its fixed point at the default steps, feedback makes its
headline cell and half its driven horizontal cells end-stopped, and its used level-2 fields span
modules coherently and are oriented; conv-rgb has a held-out relative error <= 0.1 on 32x32 crops of
photos it never saw, and its per-level steps bring its energy near steady state, all with the default
steps.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

import pcmodel
from training import data, fields, measurements, responses
from training.gabor import fit_gabor, gabor_summary, level1_fields
from training.train import main as train

WEIGHTS = Path(pcmodel.__file__).parent / "weights"
GABOR_SHARE = 0.7  # issue 13's target (the shipped model measures 0.78)

# A shortened re-run of each shipped model's own command (its first updates, same seed and data),
# and the bound its last logged energy per input must fall below: measured, plus a margin (TRAINING.md).
SHORT_RUNS = {
    "rao-ballard-1999": (["--updates", "40", "--eval-every", "40"], 2.0),  # measured 8.14 -> 1.74
    "conv-rgb": (["--updates", "40", "--eval-every", "40"], 120.0),  # measured 651.9 -> 104.6
}


@pytest.mark.parametrize("name", ["rao-ballard-1999", "conv-rgb"])
def test_shipped_file_loads_by_name_and_is_stable(name):
    assert (WEIGHTS / f"{name}.safetensors").is_file()
    assert pcmodel.shipped_models()[name] == f"shipped checkpoint {name}"
    model = pcmodel.load(name)
    assert model.sha256 == pcmodel.load(WEIGHTS / f"{name}.safetensors").sha256
    assert model.config.k1 < 0.9 * model.stability_bound()  # a margin, not just loadable
    command = model.provenance["command"].split()
    assert command[0] == "pc-train" and command[command.index("--preset") + 1] == name
    assert (WEIGHTS / f"{name}.safetensors").stat().st_size < 1_000_000  # kilobytes: U and the amortiser
    assert pcmodel.load("default").sha256 == pcmodel.load("conv-rgb").sha256


@pytest.mark.slow
def test_rao_ballard_reproduces_the_papers_fields_and_reconstructs():
    model = pcmodel.load("rao-ballard-1999")
    fits = [fit_gabor(f) for f in level1_fields(model)]
    summary = gabor_summary(fits)
    assert summary["fields"] == 32
    assert summary["share_good"] >= GABOR_SHARE, summary  # R^2 >= 0.7 and n_x >= 0.1 (blobs excluded)
    assert summary["orientation_bins"] >= 6, summary
    held = measurements.held_out_reconstruction(model, count=500)
    assert held["relative_error"] <= 0.2, held


@pytest.mark.slow
def test_rao_ballard_gabor_share_is_its_basis_not_its_span():
    """The share is learned: random rotations of the same fields (the same span, what the window and a
    code without a preferred basis give) are far less Gabor-like, and the fields use many directions."""
    model = pcmodel.load("rao-ballard-1999")
    share = gabor_summary([fit_gabor(f) for f in level1_fields(model)])["share_good"]
    span = fields.span_control(np.stack(level1_fields(model)))
    assert span["rotated_share_median"] <= share - 0.3, span  # measured 0.78 against 0.25
    assert span["effective_dimension"] >= 10, span  # measured 12.7 of 32


@pytest.mark.slow
def test_rao_ballard_level2_fields_span_modules_coherently_and_are_oriented():
    """Issue 13: the used level-2 fields spread over more than one module (a level-1 field covers one),
    their neighbouring parts agree, and they are oriented, beyond 100 random U2 (p < 0.01)."""
    report = fields.level2_report(pcmodel.load("rao-ballard-1999"))
    measures = report["measures"]
    assert measures["participation"]["value"] >= 1.5, measures["participation"]  # modules, of 3
    assert measures["overlap_agreement"]["p"] < 0.01 and measures["orientation"]["p"] < 0.01, measures
    assert report["used"] >= 5, report["used"]


@pytest.mark.slow
def test_rao_ballard_settles_every_level_at_its_default_steps():
    """Issue 13: each level within 5% of its fixed point after the default T (median over held-out windows),
    at the served dynamics (issue 21: 20 Anderson steps from the amortised start) and at the paper's."""
    model = pcmodel.load("rao-ballard-1999")
    assert model.config.steps == 20 and model.config.levels[1].k1_scale != 1
    windows = data.held_out_windows(model.config, 200, seed=3)
    fast = responses.settling(model, windows, reference_steps=2000)
    assert max(fast["median_relative_distance"]) <= 0.05, fast  # measured 0.003% / 0.11% (pc-analyze, 1,000 windows)
    paper = model.with_dynamics(steps=100, init="zero", solver="gradient")
    settled = responses.settling(paper, windows, reference_steps=2000)
    assert max(settled["median_relative_distance"]) <= 0.05, settled
    # ...which one k1 of 1 for both levels (level 2's step; the single-k1 bound is 5.8) does not do: at T = 100 a
    # level is still several % from its fixed point (measured 4.3% / 5.7%, per-level 0.001% / 0.05%).
    single, served = settled["single_k1"]["median_relative_distance"], settled["median_relative_distance"]
    assert max(single) > max(0.02, 10 * max(served)), settled


@pytest.mark.slow
def test_rao_ballard_feedback_makes_its_headline_cell_and_half_the_driven_cells_end_stopped():
    """The paper's central effect in the served model (default steps, contrast x1, docs/TRAINING.md)."""
    model = pcmodel.load("rao-ballard-1999")
    fits = [fit_gabor(f) for f in level1_fields(model)]
    es = responses.end_stopping(
        model, measurements.horizontal_cells(fits), steps=[model.config.steps], selection_steps=1000, contrasts=(1.0,)
    )
    cells = es["measured"][0]["cells"]
    assert len(cells) >= 2
    headline = cells[0]
    assert headline["index_feedback"]["1"] < 0.7 and headline["index_without"]["1"] >= 0.9, headline
    summary = es["measured"][0]["summary"]
    assert summary["median_feedback"]["1"] < 0.7 <= 0.9 <= summary["median_without"]["1"], summary
    assert summary["passes"] and summary["share_end_stopped"]["1"] >= 0.5, summary  # half the driven cells
    for cell in cells:  # feedback shortens every driven cell's preferred bar
        assert cell["index_feedback"]["1"] < cell["index_without"]["1"], cell
    # The paper's Fig. 6: with feedback, iso-oriented flanks suppress the headline cell more than
    # ortho-oriented ones (measured at the served T = 20: 0.42 against 0.69 of the centre bar alone; the paper's
    # dynamics 0.22 against 0.60); without, neither does.
    chosen = es["cells"][0]  # the headline cell, with its best bar row
    assert chosen["cause"] == headline["cause"]
    sur = responses.surround(model, chosen["cause"], chosen["bar_row"], steps=[model.config.steps])
    ratios = sur["by_steps"][0]
    assert ratios["feedback_ratio"]["iso"] < ratios["feedback_ratio"]["ortho"] - 0.2, ratios
    assert all(0.9 <= ratios["without_ratio"][k] <= 1.1 for k in ("iso", "ortho")), ratios


@pytest.mark.slow
def test_conv_rgb_reconstructs_held_out_crops():
    model = pcmodel.load("conv-rgb")
    assert model.config.preprocess.size_mode == "full"
    held = measurements.held_out_reconstruction(model, count=500)
    assert held["size"] == [3, 32, 32] and held["steps"] == model.config.steps == 18
    assert held["relative_error"] <= 0.1, held
    assert held["image_relative_error"] == pytest.approx(held["relative_error"], rel=1e-6)  # conv: one and the same


@pytest.mark.slow
def test_conv_rgb_per_level_steps_bring_the_energy_near_its_steady_state():
    """Issue 13: with its per-level steps conv-rgb's latents at T = 100 are near their fixed points
    (measured 2.2% / 4.5% per level against 5,000 steps, energy 0.04% above; held here to 6%, as 32
    windows against 2,000 steps are a smaller sample); with the single k1 they were 9% / 50%. The paper's
    dynamics (the shipped file is served faster, issue 21)."""
    model = pcmodel.load("conv-rgb").with_dynamics(steps=100, init="zero", solver="gradient")
    windows = data.held_out_windows(model.config, 32, seed=3)
    settled = responses.settling(model, windows, steps=100, reference_steps=2000)
    assert max(settled["median_relative_distance"]) <= 0.06, settled
    assert 0 <= settled["energy_relative_gap"] <= 0.01, settled
    single = settled["single_k1"]["median_relative_distance"]
    assert max(single) > 4 * max(settled["median_relative_distance"]), settled


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHORT_RUNS))
def test_the_recorded_command_still_trains(name, tmp_path):
    command = shlex.split(pcmodel.load(name).provenance["command"])
    assert command[0] == "pc-train"
    extra, bound = SHORT_RUNS[name]
    assert train([*command[1:], *extra, "--out", str(tmp_path), "--no-figures", "--no-progress"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["energy"] < bound, lines[-1]
    assert lines[-1]["energy"] < 0.8 * lines[0]["energy"]
