"""pc-train on a full disk (a real tmpfs of a few hundred KB): one line naming --out and the lack of space, exit
status 1, never a traceback; no temporary or half-written checkpoint or figure left; --resume goes on from the
last checkpoint once there is room."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import pcmodel

from ..full_disk import mounts, one_line, run

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
