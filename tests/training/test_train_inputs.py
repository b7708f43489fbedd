"""pc-train's inputs from a user: a folder's images converted as the service converts them, files that are not
images or not regular files skipped and listed, names and folders that cannot escape, a log cut short."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pcmodel.images import decode, to_uint8
from training import data
from training.train import main

from .conftest import FAST


def _save(image: Image.Image, path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())


def test_a_folders_images_are_the_pixels_the_service_would_use(tmp_path):
    """Palette, CMYK, 1-bit, 32-bit and gray-with-alpha images give the 8-bit pixels the service's decoding gives
    (a CMYK JPEG had trained as white, a palette PNG on its indices; 1-bit, 32-bit and LA stopped the run); a
    FIFO and a link to /dev/zero named like images are skipped and listed, never read."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    images = {
        "palette.png": (rgb.convert("P"), "PNG", "rgb"),
        "cmyk.jpg": (rgb.convert("CMYK"), "JPEG", "rgb"),
        "one-bit.png": (rgb.convert("1"), "PNG", "gray"),
        "int32.tif": (Image.fromarray(rng.integers(0, 2**20, (40, 48), dtype=np.int32)), "TIFF", "gray"),
        "gray-alpha.png": (rgb.convert("LA"), "PNG", "gray"),
    }
    for name, (image, fmt, _) in images.items():
        _save(image, tmp_path / name, fmt)
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    photos, skipped = data.folder_photos(tmp_path)
    got = {p.name: p.pixels for p in photos}
    assert set(got) == set(images)
    for name, (_, _, color) in images.items():
        want = to_uint8(decode((tmp_path / name).read_bytes()), color)
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert sorted(line.split(":")[0] for line in skipped) == ["fifo.png", "zero.png"]
    assert all("not a regular file" in line for line in skipped)


def test_a_model_name_never_leaves_runs(tmp_path, tiny_config_file, monkeypatch):
    """The default --out is runs/NAME, NAME from the config (or an untrusted checkpoint): an absolute name or one
    with '..' wrote outside runs/."""
    monkeypatch.chdir(tmp_path)
    escape = tmp_path / "escaped"
    assert main(["--config", str(tiny_config_file), *FAST, "--updates", "1", "--set", f"name={escape}"]) == 0
    assert not escape.exists()
    (folder,) = (tmp_path / "runs").iterdir()  # one run folder, inside runs/
    assert (folder / "model.safetensors").is_file() and folder.name.endswith("escaped")


def test_a_log_line_cut_short_does_not_stop_a_resume(tmp_path, tiny_config_file):
    """A kill or a full disk mid-append leaves half a line in metrics.jsonl: the resume drops it (it had failed on
    it), and the log is then the straight run's."""
    out = tmp_path / "run"
    base = ["--config", str(tiny_config_file), *FAST]
    assert main([*base, "--updates", "3", "--out", str(out)]) == 0
    with open(out / "metrics.jsonl", "a") as log:
        log.write('{"step": 4, "energy": 1.')
    assert main(["--resume", str(out / "model.safetensors"), "--updates", "6", *FAST[4:]]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6 and steps.count(4) == 1


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        (["--out", "{file}/sub"], "cannot write there"),
        (["--scales", "0.01"], "--scales 0.01"),
    ],
    ids=["out under a file", "scales too small"],
)
def test_mistakes_found_after_loading_are_one_line(tmp_path, tiny_config_file, capsys, extra, text):
    (tmp_path / "file").write_text("")
    argv = ["--config", str(tiny_config_file), *FAST, *(a.format(file=tmp_path / "file") for a in extra)]
    if "--out" not in extra:
        argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and text in err and "Traceback" not in err


def test_amortise_takes_held_out_photos(tmp_path, capsys):
    """--amortise measures on --held-out when it is given (it used scikit-learn's photos whatever was given): an
    empty folder is refused as in training."""
    (tmp_path / "empty").mkdir()
    checkpoint = str(Path(__file__).resolve().parents[2] / "pcmodel" / "weights" / "rao-ballard-1999.safetensors")
    argv = ["--amortise", checkpoint, "--held-out", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "--held-out" in capsys.readouterr().err
