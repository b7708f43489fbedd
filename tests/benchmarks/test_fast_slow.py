"""The inference-speed benchmarks run, print JSON, and measure what they say (small sizes)."""

from __future__ import annotations

import json

from benchmarks import fast_slow, warm_start


def test_fast_slow_reports_every_solver_and_momentum_is_closer_at_20_steps(capsys):
    args = ["--model", "rao-ballard-1999", "--count", "8", "--rounds", "1", "--batch", "4", "--momentum", "0.8"]
    assert fast_slow.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["reports"][0]
    rows = {(r["init"], r["solver"], r["steps"]): r for r in report["rows"]}
    assert {s for _, s, _ in rows} == {"gradient", "momentum(0.8)", "nesterov(0.8)", "anderson(5)"}
    assert {t for *_, t in rows} == set(fast_slow.STEPS)
    plain, fast = rows[("zero", "gradient", 20)], rows[("zero", "nesterov(0.8)", 20)]
    assert 0 <= fast["energy_gap_pct"] < plain["energy_gap_pct"]
    faster = rows[("zero", "anderson(5)", 20)]
    assert faster["mean_energy_gap_pct"] < fast["mean_energy_gap_pct"] < plain["mean_energy_gap_pct"]
    assert 0 <= faster["energy_gap_q75_pct"] <= faster["energy_gap_q90_pct"] < plain["energy_gap_q90_pct"]
    assert len(fast["latent_distance_pct"]) == 2 and fast["ms_per_image"] > 0
    # the gap shrinks with the steps
    gaps = [rows[("zero", "gradient", t)]["energy_gap_pct"] for t in fast_slow.STEPS]
    assert gaps == sorted(gaps, reverse=True)


def test_warm_start_needs_fewer_steps_than_cold_on_a_pan(capsys):
    assert warm_start.main(["--model", "rao-ballard-1999", "--frames", "4", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)["reports"]
    assert {(r["sequence"], r["solver"].split("(")[0]) for r in reports} == {
        (s, k) for s in ("pan", "zoom") for k in ("gradient", "nesterov")
    }
    for r in reports:
        assert len(r["warm_steps"]) == len(r["cold_steps"]) == 4
        assert r["warm_median"] < r["cold_median"], r
