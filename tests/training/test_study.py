"""pc-study: seeds and controls end to end on the miniature, resuming without redoing, bad arguments."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from training import study

from .conftest import TINY


@pytest.mark.slow
def test_a_study_trains_analyses_tabulates_and_skips_what_is_done(tmp_path, tiny_config_file):
    out = tmp_path / "study"
    argv = [
        "--config", str(tiny_config_file), "--set", "levels.0.causes=2", "--seeds", "0,1", "--updates", "20",
        "--batch-size", "8", "--analysis-steps", "5", "--end-stopping-steps", "10",
        "--random-draws", "10", "--out", str(out),
    ]  # fmt: skip
    assert study.main(argv) == 0
    result = json.loads((out / "study.json").read_text())
    assert [r["run"] for r in result["rows"]] == ["seed0", "seed1"]
    for r in result["rows"]:
        assert "error" not in r, r
        assert 0 <= r["gabor_share"] <= 1 and 0 < r["held_out_error"] < 1.5
        assert set(r["level2"]) == {"outside_share", "participation", "elongation", "orientation", "overlap_agreement"}
        assert all(0 < m["p"] <= 1 for m in r["level2"].values())
    report = json.loads((out / "seed1" / "analysis" / "report.json").read_text())
    assert "--seed 1" in report["provenance_command"] and "levels.0.causes=2" in report["provenance_command"]
    (summary,) = result["summary"]
    assert summary["seeds"] == 2 and summary["gabor_share"]["std"] >= 0
    assert summary["held_out_error"]["mean"] == pytest.approx(
        (result["rows"][0]["held_out_error"] + result["rows"][1]["held_out_error"]) / 2
    )
    text = (out / "study.md").read_text()
    assert "| seed1 |" in text and "Over seeds" in text

    # Run again: every run has its model and analysis, so nothing is trained or analysed again.
    logs = {r: (out / r / "train.log").read_text() for r in ("seed0", "seed1")}
    start = time.perf_counter()
    assert study.main(argv) == 0
    assert time.perf_counter() - start < 5  # reading two reports
    assert {r: (out / r / "train.log").read_text() for r in logs} == logs
    assert json.loads((out / "study.json").read_text())["rows"] == result["rows"]


def test_the_plan_is_every_grid_point_for_every_seed(tmp_path):
    args = study.build_parser().parse_args(
        ["--out", str(tmp_path), "--seeds", "3,4", "--grid", "levels.1.sigma2=1,10", "--grid", "k1=0.05,0.08"]
    )
    runs = study.plan(args)
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert runs[0].settings == ("levels.1.sigma2=1", "k1=0.05") and runs[0].seed == 3
    command = study.train_command(args, runs[0], tmp_path / runs[0].name)
    assert command[command.index("--seed") + 1] == "3" and "levels.1.sigma2=1" in command
    # --controls: a Gaussian-prior run per grid point (first seed), trained with the prior changed
    args.controls = True
    controls = [r for r in study.plan(args) if r.control]
    assert [(r.seed, r.control) for r in controls] == [(3, "gaussian-prior")] * 4
    command = study.train_command(args, controls[0], tmp_path / controls[0].name)
    assert study.GAUSSIAN_PRIOR in command and "levels.1.sigma2=1" in command


def test_the_controls_table_has_the_pca_fields_and_random_weights():
    config = TINY.replace(levels=(dataclasses.replace(TINY.levels[0], causes=2), TINY.levels[1]))
    rows = [{"run": "seed0", "gabor_share": 0.5, "blobs": 0, "orientation_bins": 1}]
    reports = {study.Run(0, ()): {"gabor": {"random_weights": {"share_good": 0.0, "blobs": 0, "orientation_bins": 0}}}}
    table = study.controls(rows, reports, config)
    assert list(table) == ["seed0", "PCA (top 2 components)", "random weights"]
    assert table["PCA (top 2 components)"]["fields"] == 2
    assert "| PCA (top 2 components) |" in study.markdown(
        {"base": "x", "command": "pc-study", "rows": [], "summary": [], "controls": table}
    )


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--seeds", "a,b"], "--seeds"),
        (["--seeds", "1,1"], "--seeds"),
        (["--grid", "levels.1.sigma2"], "--grid"),
        (["--set", "k1"], "--set"),
        (["--updates", "0"], "--updates"),
        (["--set", "levels.7.sigma2=1"], "levels.7"),
        (["--grid", "levels.0.no_such=1,2"], "no_such"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, argv, names):
    try:
        code = study.main(["--out", str(tmp_path / "s"), *argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("pc-study: ") and names in err[0]
    assert not (tmp_path / "s").exists()
