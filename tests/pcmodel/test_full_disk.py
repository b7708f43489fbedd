"""pc-export and pc-encode on a full disk (a real tmpfs of a few hundred KB): one line naming the option and the
lack of space, exit status 1 (a resource, not the user's mistake), and no file truncated, half written or
destroyed: every output is written to a temporary file and renamed over the old one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ..full_disk import fill, free_kb, mounts, one_line, run

NO_SPACE = "No space left on device"


@pytest.fixture
def small_disk(tmp_path):
    yield from mounts(tmp_path)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_on_a_full_disk_keeps_the_old_file(small_disk):
    disk = small_disk(400)  # room for two of conv-rgb's exports (183 KB), not for rao-ballard-1999's (3.2 MB)
    target = disk / "x.onnx"
    assert run("pc-export", "conv-rgb", "-o", target, "--no-check").returncode == 0
    good = target.read_bytes()
    filler = fill(disk)
    before = files(disk)
    done = run("pc-export", "rao-ballard-1999", "-o", target, "--no-check")
    line = one_line(done, "pc-export")
    assert done.returncode == 1, done.stderr
    assert f"--output {target}" in line and NO_SPACE in line
    assert target.read_bytes() == good  # the previous export, whole
    assert files(disk) == before  # and no temporary file left beside it

    new = disk / "y.onnx"  # a new export on a full disk leaves nothing, not an empty or truncated file
    done = run("pc-export", "rao-ballard-1999", "-o", new, "--no-check")
    assert done.returncode == 1 and NO_SPACE in one_line(done, "pc-export")
    assert files(disk) == before

    filler.unlink()  # room again (for a file the size of the old one, beside it until it replaces it)
    assert run("pc-export", "conv-rgb", "-o", target, "--no-check").returncode == 0
    assert target.read_bytes() == good and files(disk) == {"x.onnx": good}


def test_export_to_a_disk_that_cannot_be_written_is_still_the_users_mistake(small_disk):
    disk = small_disk(64, read_only=True)
    done = run("pc-export", "rao-ballard-1999", "-o", disk / "x.onnx", "--no-check")
    assert done.returncode == 2, done.stderr  # a read-only file system: the path's fault, not a lack of space
    assert f"--output {disk / 'x.onnx'}" in one_line(done, "pc-export")
    assert not list(disk.iterdir())


def test_encode_one_image_on_a_full_disk_writes_nothing(small_disk):
    disk = small_disk(220)
    out = disk / "one"
    out.mkdir()
    (out / "input.png").write_bytes(b"an earlier run's")  # the files of an earlier run stay as they were
    fill(disk)
    done = run("pc-encode", "--model", "rao-ballard-1999", "--out", out)
    line = one_line(done, "pc-encode")
    assert done.returncode == 1, done.stderr
    assert f"--out {out}" in line and NO_SPACE in line
    assert files(out) == {"input.png": b"an earlier run's"}  # no empty or half-written file, no temporary one


def _images(folder: Path, count: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


COLLECTION = ["--model", "rao-ballard-1999", "--size-mode", "resize", "--workers", "1", "--json"]


def test_collection_whose_last_manifest_write_fails_is_not_reported_complete(small_disk, tmp_path):
    images = _images(tmp_path / "images", 30)
    disk = small_disk(400)
    free = free_kb(disk)
    probe = run("pc-encode", images, "--out", disk / "probe", *COLLECTION)
    assert probe.returncode == 0, probe.stderr
    used = free - free_kb(disk)  # what a complete run takes
    for path in sorted((disk / "probe").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (disk / "probe").rmdir()
    filler = fill(disk, leave_kb=used)  # room for the run, not for the manifest's temporary copy at the end

    out = disk / "a"
    done = run("pc-encode", images, "--out", out, *COLLECTION)
    line = one_line(done, "pc-encode")
    assert done.returncode == 1, done.stderr
    assert str(out / "manifest.json") in line and NO_SPACE in line
    summary = json.loads(done.stdout)
    assert summary["status"] == "failed"
    assert (summary["rows"], summary["done"], summary["failed"], summary["encoded"]) == (30, 30, 0, 30)
    assert not [p for p in out.rglob("*.tmp")]

    filler.unlink()  # room again: the same command finishes, nothing encoded twice or lost
    again = run("pc-encode", images, "--out", out, *COLLECTION)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["status"], summary["rows"], summary["encoded"]) == ("complete", 30, 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] == 30


def test_collection_started_on_a_full_disk_reports_the_rows_it_has(small_disk, tmp_path):
    images = _images(tmp_path / "images", 12)
    disk = small_disk(220)
    out = disk / "a"
    first = run("pc-encode", images, "--out", out, *COLLECTION)
    assert first.returncode == 0, first.stderr
    fill(disk)
    done = run("pc-encode", images, "--out", out, *COLLECTION)
    line = one_line(done, "pc-encode")
    assert done.returncode == 1, done.stderr
    assert str(out / "manifest.json") in line and NO_SPACE in line
    summary = json.loads(done.stdout)
    assert (summary["status"], summary["rows"], summary["done"], summary["failed"]) == ("failed", 12, 12, 0)
