"""Warm starts between the two readers, against a real server and real pc-encode runs: pc-encode's
encoding.npz is /encode's `start` in every size mode and /encode's latents are pc-encode's --init; both read
a start file one way (pcmodel.starts), and a start made from an image of another size, or in another size
mode, is refused where the file says so, even when the latents' shapes happen to agree."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import png

TOL = 1e-3  # pc-encode runs the torch backend, the server its prepared ones: they agree as backends do


def pc_encode(*args: str | Path) -> subprocess.CompletedProcess:
    exe = shutil.which("pc-encode", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "pcmodel.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=600)


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def latents_of(response: dict) -> list[np.ndarray]:
    """A response's latents as numpy arrays, shaped as sent (no tile axis outside tile mode)."""
    return [
        np.frombuffer(base64.b64decode(a["data"]), dtype="<f4").reshape(a["shape"]).copy() for a in response["latents"]
    ]


def encode(server, image: bytes, start: bytes | None = None, **fields: str):
    files = {"image": ("frame.png", image), **({"start": ("start.npz", start)} if start is not None else {})}
    return server.post("/encode", files=files, data=fields)


@pytest.mark.parametrize("mode", ["full", "resize", "tile"])
def test_encoding_npz_is_a_start_and_a_response_is_an_init_in_every_size_mode(server, astronaut, tmp_path, mode):
    frame = tmp_path / "frame.png"
    frame.write_bytes(png(astronaut[100:164, 200:296]))  # 96x64: not scaled in full mode
    made = pc_encode(frame, "--size-mode", mode, "--steps", "20", "--out", tmp_path / "enc")
    assert made.returncode == 0, made.stderr
    encoding = tmp_path / "enc" / "encoding.npz"
    with np.load(encoding) as saved:
        assert saved["latent_1"].ndim == 4  # (rows, causes, H, W) in every mode: a response's have no rows axis
    # pc-encode's file as the service's start: it starts where pc-encode ended.
    warm = encode(server, frame.read_bytes(), encoding.read_bytes(), size_mode=mode, steps="1")
    assert warm.status_code == 200, warm.text
    assert warm.json()["init"] == "given"
    assert warm.json()["energy"]["initial"] == pytest.approx(json.loads(made.stdout)["energy_final"], rel=TOL)
    # The other way: a response's latents, saved with np.savez as they came, as pc-encode's --init.
    response = encode(server, frame.read_bytes(), size_mode=mode, steps="20").json()
    latents = latents_of(response)
    assert [a.ndim for a in latents] == [4 if mode == "tile" else 3] * len(latents)
    (tmp_path / "response.npz").write_bytes(npz(**{f"latent_{i}": a for i, a in enumerate(latents, 1)}))
    init = pc_encode(
        frame, "--size-mode", mode, "--steps", "1", "--init", tmp_path / "response.npz", "--out", tmp_path / "o"
    )
    assert init.returncode == 0, init.stderr
    assert json.loads(init.stdout)["energy_initial"] == pytest.approx(response["energy"]["final"], rel=TOL)


def test_a_start_of_other_shapes_is_reported_as_sent(server, astronaut):
    small = png(astronaut[:64, :64])
    latents = latents_of(encode(server, small, size_mode="resize", steps="1").json())  # (8, 7, 7), (10, 3, 3)
    start = npz(**{f"latent_{i}": a for i, a in enumerate(latents, 1)})
    refused = encode(server, small, start, size_mode="full")
    assert refused.status_code == 422 and refused.json()["reason"] == "bad_parameter"
    message = refused.json()["error"]
    assert "(8, 7, 7)" in message and "(1, 8, 7, 7)" not in message, message  # the shapes the client sent
    with_rows = npz(**{f"latent_{i}": a[None] for i, a in enumerate(latents, 1)})
    assert "(1, 8, 7, 7)" in encode(server, small, with_rows, size_mode="full").json()["error"]


def test_a_start_from_an_image_of_another_size_is_refused_where_the_file_says_so(server, astronaut, tmp_path):
    """Tile mode: a 120x100 image's 9x8 tiles and a 100x120 image's 8x9 have the same shapes; full mode:
    256x160 and 160x256 are both padded to the 256 bucket. The latents sit at other places of the picture."""
    cases = [
        ("tile", astronaut[:100, :120], astronaut[:120, :100]),
        ("full", astronaut[:160, :256], astronaut[:256, :160]),
    ]
    for mode, made_from, used_for in cases:
        out = tmp_path / mode
        made = pc_encode(_saved(made_from, tmp_path), "--size-mode", mode, "--steps", "2", "--out", out)
        assert made.returncode == 0, made.stderr
        data = (out / "encoding.npz").read_bytes()
        refused = encode(server, png(used_for), data, size_mode=mode, steps="1")
        assert refused.status_code == 422, refused.text
        assert "same size" in refused.json()["error"] and refused.json()["reason"] == "bad_parameter"
        # Without the file's geometry (latents alone) only the shapes can be compared: accepted, as documented.
        with np.load(out / "encoding.npz") as saved:
            bare = npz(**{k: saved[k] for k in saved.files if k.startswith("latent_")})
        assert encode(server, png(used_for), bare, size_mode=mode, steps="1").status_code == 200
        assert encode(server, png(made_from), data, size_mode=mode, steps="1").status_code == 200  # the same size


def _saved(image: np.ndarray, folder: Path) -> Path:
    path = folder / f"frame{image.shape[0]}x{image.shape[1]}.png"
    path.write_bytes(png(image))
    return path


@pytest.mark.parametrize(
    ("arrays", "text"),
    [
        ({"latent_3": np.zeros((10, 3, 3), np.float32)}, "latent_3"),  # past the model's two levels
        ({"size_mode": np.array("tile")}, "size mode tile"),  # made in another size mode
        ({"image_size": np.array([64, 48])}, "same size"),  # a 48x64 image's, for a 64x64 one
        ({"image_size": np.array([64.0, 64.0])}, "image_size"),  # not integers
        ({"latent_1": np.zeros((8, 7, 7), np.int64)}, "not floats"),
    ],
    ids=["an extra level", "another size mode", "another size", "a float image_size", "int latents"],
)
def test_a_start_file_is_refused_for_what_it_holds(server, astronaut, arrays, text):
    image = png(astronaut[:64, :64])
    latents = {"latent_1": np.zeros((8, 7, 7), np.float32), "latent_2": np.zeros((10, 3, 3), np.float32)}
    assert encode(server, image, npz(**latents), size_mode="resize", steps="1").status_code == 200
    refused = encode(server, image, npz(**{**latents, **arrays}), size_mode="resize", steps="1")
    assert refused.status_code == 422 and refused.json()["reason"] == "bad_parameter", refused.text
    assert text in refused.json()["error"]
