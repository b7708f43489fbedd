"""pc-encode --init reads a start file as the service's `start` does (pcmodel.starts), in real pc-encode runs:
latents with or without the leading rows axis, the file's own geometry checked against the image, and a
bad file refused in one line on stderr with exit status 2, before anything is printed on stdout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pcmodel.images import sample_photo

STEPS = "20"


def pc_encode(*args: str | Path) -> subprocess.CompletedProcess:
    exe = shutil.which("pc-encode", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "pcmodel.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=600)


def frame(folder: Path, height: int, width: int) -> Path:
    path = folder / f"frame{width}x{height}.png"
    Image.fromarray(sample_photo()[:height, :width]).save(path)
    return path


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A 96x64 frame encoded in full mode: (the frame, its encoding.npz, pc-encode's summary)."""
    folder = tmp_path_factory.mktemp("wide")
    image = frame(folder, 64, 96)
    run = pc_encode(image, "--size-mode", "full", "--steps", STEPS, "--out", folder / "enc")
    assert run.returncode == 0, run.stderr
    return image, folder / "enc" / "encoding.npz", json.loads(run.stdout)


def latents(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files if k.startswith("latent_")}


def test_encoding_npz_says_where_its_latents_came_from(wide):
    with np.load(wide[1]) as saved:
        assert str(saved["size_mode"]) == "full" and saved["image_size"].tolist() == [64, 96]  # as the model saw it
        assert saved["image_size"].tolist() == list(saved["input"].shape[-2:])


def test_latents_without_the_rows_axis_are_a_start(wide, tmp_path):
    """An /encode response's latents have no rows axis outside tile mode; saved with np.savez, they are a start."""
    image, encoding, first = wide
    start = tmp_path / "response.npz"
    np.savez(start, **{k: a[0] for k, a in latents(encoding).items()})  # (causes, H, W)
    run = pc_encode(image, "--size-mode", "full", "--steps", "1", "--init", start, "--out", tmp_path / "o")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["energy_initial"] == pytest.approx(first["energy_final"], rel=1e-5)


BAD = {
    "finite but huge": (lambda saved: {k: a * 1e30 for k, a in saved.items()}, "within +-10000"),
    "int latents": (lambda saved: {k: a.astype(np.int64) for k, a in saved.items()}, "not floats"),
    "a level past the model's": (lambda saved: {**saved, "latent_3": saved["latent_2"]}, "latent_3"),
    "another size mode": (lambda saved: {**saved, "size_mode": np.array("tile")}, "size mode tile"),
    "not a zip": (None, "not an .npz (zip) file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_start_file_is_one_line_and_exit_2(case, wide, tmp_path):
    image, encoding, _ = wide
    make, text = BAD[case]
    start = tmp_path / "start.npz"
    if make is None:
        start.write_bytes(b"\x80\x04not an npz, a pickle's first bytes")
    else:
        np.savez(start, **make(latents(encoding)))
    run = pc_encode(image, "--size-mode", "full", "--steps", "1", "--init", start, "--out", tmp_path / "o")
    assert run.returncode == 2 and run.stdout == "", run.stdout  # nothing printed: no JSON with Infinity in it
    assert run.stderr.startswith(f"pc-encode: --init {start}") and len(run.stderr.strip().splitlines()) == 1
    assert text in run.stderr and "pickle" not in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


def test_a_start_from_an_image_of_another_size_is_refused(wide, tmp_path):
    """96x64 and 64x96 are both padded to full mode's 176 bucket: the same shapes, other places of the picture."""
    _, encoding, _ = wide
    tall = frame(tmp_path, 96, 64)
    run = pc_encode(tall, "--size-mode", "full", "--steps", "1", "--init", encoding, "--out", tmp_path / "o")
    assert run.returncode == 2 and run.stdout == ""
    assert "96x64" in run.stderr and "64x96" in run.stderr and "same size" in run.stderr
    # Latents alone do not say where they came from: only their shapes are compared (accepted, as documented).
    bare = tmp_path / "bare.npz"
    np.savez(bare, **latents(encoding))
    run = pc_encode(tall, "--size-mode", "full", "--steps", "1", "--init", bare, "--out", tmp_path / "o")
    assert run.returncode == 0, run.stderr
