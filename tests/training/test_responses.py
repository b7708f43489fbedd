"""training.responses: stimuli, the end-stopping index and cell selection, flanks, settling."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import pcmodel
from pcmodel import PCModel
from training import responses


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (the machine's cores are shared), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paper():
    """The paper's network with the paper's dynamics (the shipped file is served faster: issue 21)."""
    return pcmodel.load("rao-ballard-1999").with_dynamics(steps=100, init="zero", solver="gradient")


def test_bars_grow_with_length_and_keep_their_contrast(paper):
    bars = responses.bar_stimuli(paper, [4, 20, 26], [7.5])
    assert bars.shape == (3, 1, 16, 26)
    tiny, short, long = bars[0, 0], bars[1, 0], bars[2, 0]
    assert long.abs().sum() > short.abs().sum() > 2 * tiny.abs().sum()
    # the middle of both bars, farther than the filter's reach from the ends, sees the same stimulus:
    # the same filtered value (no per-image normalisation that would change with the length)
    assert float(long[7:9, 12:14].abs().max()) == pytest.approx(float(short[7:9, 12:14].abs().max()), rel=1e-3)


@pytest.mark.parametrize("contrast", [0.5, 2.0])
def test_contrast_scales_the_stimulus(paper, contrast):
    one = responses.bar_stimuli(paper, [8, 26], [7.5])
    scaled = responses.bar_stimuli(paper, [8, 26], [7.5], contrast=contrast)
    assert float((scaled - contrast * one).abs().max()) < 1e-5 * float(one.abs().max())
    assert float(one.abs().max()) > 0.1


def _window(paper: PCModel, x0: float) -> np.ndarray:
    """A module's Gaussian window over the patch, written out from the config (docs/MODEL.md section 4)."""
    lc = paper.config.levels[0]
    yy, xx = np.mgrid[0:16, 0:26].astype(float)
    return np.exp(-((xx - x0) ** 2 + (yy - 7.5) ** 2) / (2 * lc.window_sigma**2))


@pytest.mark.parametrize("kind", ["iso", "ortho"])
def test_flanks_land_in_the_neighbour_modules_not_the_centre(paper, kind):
    assert responses.module_centres(paper) == [7.5, 12.5, 17.5]  # 16x16 modules at x offsets 0, 5, 10
    bars = responses.flank_bars(paper, 7.5, kind)
    assert len(bars) == 2 and all(b.vertical == (kind == "ortho") for b in bars)
    flanks = responses.stimuli(paper, [bars])[0, 0].numpy().astype(float) ** 2
    left, centre, right = (float((flanks * _window(paper, x0)).sum()) for x0 in (7.5, 12.5, 17.5))
    assert left > 4 * centre and right > 4 * centre
    # at the centre module's window centre (+-2 px) the flanks leave almost nothing
    assert float(flanks[6:10, 11:15].max()) < 0.05 * float(flanks.max())
    assert responses.flank_bars(paper, 7.5, "none") == []
    with pytest.raises(ValueError, match="iso, ortho or none"):
        responses.flank_bars(paper, 7.5, "diagonal")


def test_end_stopping_index_is_the_long_bar_over_the_peak_up_to_a_module():
    lengths = list(range(2, 27, 2))
    curve = [1.0, 2.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0, 9.0, 9.0, 9.0, 9.0, 2.0]  # 18-24 px are beyond the module
    assert responses.end_stopping_index(curve, lengths, module_px=16) == pytest.approx(2.0 / 4.0)
    assert responses.end_stopping_index([1.0] * 13, lengths, module_px=16) == pytest.approx(1.0)


def test_summary_shares_medians_and_the_pass():
    def cell(cause, feedback, without):
        return {"cause": cause, "index_feedback": {"1": feedback}, "index_without": {"1": without}}

    # end-stopped: < 0.7 with feedback AND >= 0.9 without
    table = [cell(4, 0.5, 1.0), cell(2, 0.6, 0.85), cell(9, 0.8, 1.0)]
    summary = responses.summarise(table, steps=100, contrasts=[1.0])
    assert summary["share_end_stopped"] == {"1": pytest.approx(1 / 3)} and not summary["passes"]
    assert summary["median_feedback"]["1"] == pytest.approx(0.6) and summary["median_without"]["1"] == 1.0
    assert summary["headline_cell"] == 4 and summary["cells"] == 3 and summary["steps"] == 100
    assert responses.summarise([*table, cell(1, 0.3, 0.95)], steps=100, contrasts=[1.0])["passes"]  # 2 of 4
    empty = responses.summarise([], steps=100, contrasts=[1.0])
    assert empty["cells"] == 0 and not empty["passes"] and empty["headline_cell"] is None


def test_cells_are_the_driven_candidates_most_driven_first(paper):
    candidates = [6, 17, 29, 0, 1, 2, 3]
    result = responses.end_stopping(paper, candidates, steps=[20], selection_steps=20, contrasts=[1.0])
    # Independently: the level-1-only network on the definition's loop, every length and row
    plain = PCModel(paper.config.replace(levels=paper.config.levels[:1]), paper.weights[:1], allow_unstable=True)
    x = responses.bar_stimuli(paper, result["lengths"], result["rows"])
    r = plain.infer(x, steps=20, backend="loop").latents[0][:, :, 0, 1].abs()  # (rows * lengths, causes)
    drive = r.amax(dim=0)
    strongest = max(float(drive[c]) for c in candidates)
    expected = sorted((c for c in candidates if drive[c] >= 0.25 * strongest), key=lambda c: -float(drive[c]))
    assert [c["cause"] for c in result["cells"]] == expected
    assert [c["cause"] for c in result["measured"][0]["cells"]] == expected
    assert result["measured"][0]["summary"]["headline_cell"] == expected[0]
    for c in result["cells"]:
        assert c["drive"] == pytest.approx(float(drive[c["cause"]]), rel=1e-4)
    assert responses.end_stopping(paper, [], steps=[20], selection_steps=20)["cells"] == []


def test_settling_is_zero_at_the_reference_and_positive_early(paper):
    from training import data

    windows = data.held_out_windows(paper.config, 16)
    settled = responses.settling(paper, windows, steps=300, reference_steps=300)
    assert max(settled["median_relative_distance"]) < 1e-6 and abs(settled["energy_relative_gap"]) < 1e-6
    early = responses.settling(paper, windows, steps=5, reference_steps=300)
    assert all(d > 0.01 for d in early["median_relative_distance"]) and early["energy_relative_gap"] > 0
    assert early["reference_check"]["steps"] == 150
    assert not early["single_k1"]["same_as_served"]  # the shipped model steps level 2 at its own rate
    # one k1 for both levels is smaller than the served step of at least one of them: it settles slower there
    single, served = early["single_k1"]["median_relative_distance"], early["median_relative_distance"]
    assert any(a > b for a, b in zip(single, served)), (single, served)


def test_single_k1_is_one_step_for_every_level_no_larger_than_any_served_one(paper):
    """The paper's single k1: every k1_scale 1, k1 times the smallest k1_scale below 1 (so it stays stable)."""
    k1 = paper.config.k1
    up = tuple(dataclasses.replace(lv, k1_scale=s) for lv, s in zip(paper.config.levels, (1.0, 4.0)))
    assert responses.single_k1_value(paper.config.replace(levels=up)) == k1
    levels = tuple(dataclasses.replace(lv, k1_scale=s) for lv, s in zip(paper.config.levels, (2.0, 0.5)))
    scaled = PCModel(paper.config.replace(levels=levels, k1=0.4 * k1), paper.weights, allow_unstable=True)
    single = responses.single_k1(scaled)
    assert [lv.k1_scale for lv in single.config.levels] == [1.0, 1.0]
    assert single.config.k1 == pytest.approx(0.2 * k1)
    windows = torch.randn(4, 1, 16, 26) * 0.3
    report = responses.settling(scaled, windows, steps=5, reference_steps=400)
    assert not report["single_k1"]["same_as_served"] and report["single_k1"]["k1"] == pytest.approx(0.2 * k1)
    # level 1 takes a 10x smaller step than served: it is further from its steady state after 5 steps
    assert report["single_k1"]["median_relative_distance"][0] > report["median_relative_distance"][0]
    assert all(math.isfinite(v) for v in report["single_k1"]["median_relative_distance"])


def test_single_k1_is_the_papers_dynamics_whatever_the_model_is_served_with(paper):
    """The served file (Anderson from the amortised start) and its paper's-dynamics twin give the same
    single-k1 model: plain gradient steps from r = 0, one k1, so the report's single-k1 row is the paper's
    dynamics in both (it once kept the served solver and start: 0.0065 / 0.011 at the served T against 0.043 /
    0.057 for the paper's dynamics at T = 100)."""
    served = pcmodel.load("rao-ballard-1999")
    assert served.config.solver == "anderson" and served.config.initial_latents == "amortised"
    fast, slow = responses.single_k1(served), responses.single_k1(paper)
    for net in (fast, slow):
        config = net.config
        assert (config.solver, config.initial_latents, config.level_steps) == ("gradient", "zeros", ())
        assert config.k1 == pytest.approx(1.0) and [lv.k1_scale for lv in config.levels] == [1.0, 1.0]
        assert net.amortiser is None
    assert fast.config.replace(steps=100) == slow.config
    windows = torch.randn(4, 1, 16, 26) * 0.3
    a, b = fast.infer(windows, steps=7, backend="loop"), slow.infer(windows, steps=7, backend="loop")
    for x, y in zip(a.latents, b.latents):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # ...and the settling report measures it at the same T: served with the paper's single k1, not the served solver
    report = responses.settling(served, windows, steps=7, reference_steps=200)
    assert not report["single_k1"]["same_as_served"]
    reference = responses.served(served).infer(windows, steps=200).latents
    expected = responses._relative_distances(a.latents, reference)
    assert report["single_k1"]["median_relative_distance"] == pytest.approx(expected, rel=1e-2)
