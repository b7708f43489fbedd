"""pc-train on a full disk (a real tmpfs of a few hundred KB): one line naming --out and the lack of space, exit
status 1, never a traceback; no temporary or half-written checkpoint or figure left; --resume goes on from the
last checkpoint once there is room."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import pcmodel

from ..full_disk import fill, mounts, one_line, run
from .conftest import TINY

NO_SPACE = "No space left on device"
# rao-ballard-1999's checkpoints are 84 KB: the run writes model.safetensors and checkpoints/step-N at updates
# 2 and 4, then four figures (about 200 KB).
RUN = ["--preset", "rao-ballard-1999", "--updates", "4", "--checkpoint-every", "2", "--eval-every", "2",
       "--check-every", "2", "--batch-size", "4", "--infer-steps", "5", "--no-progress", "--threads", "1"]  # fmt: skip


@pytest.fixture
def small_disk(tmp_path):
    yield from mounts(tmp_path)


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_checkpoint_on_a_full_disk(small_disk):
    disk = small_disk(220)  # room for the checkpoints of update 2, not for those of update 4
    out = disk / "run"
    done = run("pc-train", *RUN, "--out", out)
    line = one_line(done, "pc-train")
    assert done.returncode == 1, done.stderr
    assert f"--out {out}" in line and NO_SPACE in line and f"--resume {out / 'model.safetensors'}" in line
    assert not leftovers(out)
    assert pcmodel.load(out / "model.safetensors").provenance["training"]["step"] == 2  # the last one, whole

    for snapshot in (out / "checkpoints").iterdir():  # room again: --resume finishes the run
        snapshot.unlink()
    again = run("pc-train", "--resume", out / "model.safetensors", "--no-progress", "--no-figures", "--threads", "1")
    assert again.returncode == 0, again.stderr
    assert pcmodel.load(out / "model.safetensors").provenance["training"]["step"] == 4


def test_the_figures_on_a_full_disk(small_disk):
    disk = small_disk(400)  # room for the run's checkpoints, not for all its figures
    out = disk / "run"
    done = run("pc-train", *RUN, "--out", out)
    line = one_line(done, "pc-train")
    assert done.returncode == 1, done.stderr
    assert f"--out {out}" in line and NO_SPACE in line and "figures" in line
    assert not leftovers(out)
    figures = list((out / "figures").glob("*.png"))
    assert 0 < len(figures) < 4
    for figure in figures:  # each one written is whole
        with Image.open(figure) as image:
            image.load()


def test_pc_analyze_on_a_full_disk(small_disk, tmp_path):
    """pc-analyze's figures and report (~50 KB for a miniature) on a disk with 12 KB free: one line naming --out
    and the lack of space, exit status 1, no temporary file left; its report is written whole or not at all."""
    model = tmp_path / "tiny.safetensors"
    pcmodel.create(TINY, seed=1).save(model)
    disk = small_disk(64)
    fill(disk, leave_kb=12)
    out = disk / "analysis"
    argv = ["--end-stopping-steps", "50", "--reference-steps", "100", "--random-draws", "5", "--threads", "1"]
    done = run("pc-analyze", model, *argv, "--out", out)
    line = one_line(done, "pc-analyze")
    assert done.returncode == 1, done.stderr
    assert f"--out {out}" in line and NO_SPACE in line and "make room" in line
    assert not leftovers(out) and not (out / "report.json").exists()


def test_pc_study_on_a_full_disk(small_disk, tmp_path):
    """pc-study's table on a full disk: one line naming --out, exit status 1, no temporary file left; a run
    trained and analysed before is read, not redone, so the same command finishes once there is room."""
    config = tmp_path / "tiny.json"
    config.write_text(TINY.to_json())
    disk = small_disk(64)
    out = disk / "study"
    run_folder = out / "seed0"
    (run_folder / "analysis").mkdir(parents=True)
    pcmodel.create(TINY, seed=0).save(run_folder / "model.safetensors")
    (run_folder / "analysis" / "report.json").write_text('{"held_out": {"relative_error": 0.5}}')
    filler = fill(disk)
    done = run("pc-study", "--config", config, "--seeds", "0", "--out", out)
    line = one_line(done, "pc-study")
    assert done.returncode == 1, done.stderr
    assert f"--out {out}" in line and NO_SPACE in line and "finished runs are read" in line
    assert not leftovers(out) and not (out / "study.json").exists()
    filler.unlink()
    again = run("pc-study", "--config", config, "--seeds", "0", "--out", out)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "study.json").read_text())["rows"][0]["held_out_error"] == 0.5
