"""pc-encode: the three maps, a montage one can see, and every array in encoding.npz."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

import pcmodel
from pcmodel.cli import main
from pcmodel.images import montage, prepare_image, sample_photo


def test_pc_encode_writes_maps_montage_and_every_array(tmp_path, capsys):
    out = tmp_path / "encoded"
    # The bundled photo, resized to conv-rgb's 32x32 (its default size mode, full, has its own test).
    assert main(["--steps", "3", "--size-mode", "resize", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    files = {"input.png", "reconstruction.png", "error.png", "montage.png", "encoding.npz"}
    assert {p.name for p in out.iterdir()} == files and set(summary["files"]) == files

    arrays = np.load(out / "encoding.npz")
    model = pcmodel.load("default")
    shapes = [tuple(s) for s in model.latent_shapes()]
    levels = [f"{kind}_{i + 1}" for kind in ("latent", "level_error") for i in range(len(shapes))]
    names = ["input", "reconstruction", "error", "energy", "size_mode", "image_size", *levels]
    assert sorted(arrays.files) == sorted(names)
    assert str(arrays["size_mode"]) == "resize" and arrays["image_size"].tolist() == [32, 32]  # as the model saw it
    for i, shape in enumerate(shapes):
        assert arrays[f"latent_{i + 1}"].shape == (1, *shape)
    assert arrays["input"].shape == (3, 32, 32) == arrays["reconstruction"].shape == arrays["error"].shape
    np.testing.assert_array_equal(arrays["error"], arrays["input"] - arrays["reconstruction"])
    assert arrays["energy"].shape == (3 + 1, 1)  # before the first step and after each
    assert arrays["energy"][0, 0] == pytest.approx(summary["energy_initial"], rel=1e-6)
    assert arrays["energy"][-1, 0] == pytest.approx(summary["energy_final"], rel=1e-6)
    # The latents are the model's own on the photo as the model's config prepares it.
    rows, shown, _ = prepare_image(sample_photo(), model.config, "resize")
    np.testing.assert_allclose(arrays["input"], shown.numpy())
    local = model.infer(rows, steps=3)
    for i, r in enumerate(local.latents):
        np.testing.assert_allclose(arrays[f"latent_{i + 1}"], r.numpy(), rtol=1e-5, atol=1e-6)
    # Level errors: level 1's is the image's (x minus the reconstruction, on the image grid at the native
    # size), and every level's is the model's own result.errors.
    np.testing.assert_allclose(arrays["level_error_1"][0], arrays["error"], atol=1e-5)
    for i, e in enumerate(local.errors):
        np.testing.assert_allclose(arrays[f"level_error_{i + 1}"], e.numpy(), rtol=1e-5, atol=1e-5)

    # The montage: input | reconstruction | error, each 32 px panel enlarged 8x to 256, 4 px apart.
    sheet = np.asarray(Image.open(out / "montage.png"))
    assert sheet.shape == (256, 3 * 256 + 2 * 4, 3)
    for i, name in enumerate(("input", "reconstruction", "error")):
        panel = sheet[:, i * (256 + 4) : i * (256 + 4) + 256]
        np.testing.assert_array_equal(panel[::8, ::8], np.asarray(Image.open(out / f"{name}.png")))
        np.testing.assert_array_equal(panel, np.repeat(np.repeat(panel[::8, ::8], 8, axis=0), 8, axis=1))
    assert (sheet[:, 256 : 256 + 4] == 255).all()  # the gap


def test_pc_encode_tile_mode_on_a_file_keeps_the_image_size(tmp_path, capsys):
    rng = np.random.default_rng(0)
    image = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    assert main([str(image), "--model", "rao-ballard-1999", "--steps", "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    arrays = np.load(out / "encoding.npz")
    # The paper's 16x26 tiles every 8x13 px, the first at (-8, -13), until they reach 8x13 px past the photo:
    # per axis 1 + ceil((side + 2 margin - tile) / stride).
    rows = (1 + math.ceil(40 / 8)) * (1 + math.ceil(50 / 13))
    assert summary["input"] == [1, 1, 40, 50] and arrays["input"].shape == (1, 40, 50)
    assert arrays["latent_1"].shape[0] == rows and arrays["energy"].shape == (3, rows)
    factor = math.ceil(256 / 40)  # the short side reaches at least 256 px
    assert Image.open(out / "montage.png").size == (3 * 50 * factor + 2 * 4, 40 * factor)
    assert Image.open(out / "montage.png").mode == "L"


def test_montage_scales_by_a_whole_factor():
    panels = [Image.new("RGB", (30, 10), c) for c in ("red", "green", "blue")]
    sheet = montage(panels, min_side=25, gap=2)
    assert sheet.size == (3 * 90 + 2 * 2, 30)  # factor ceil(25 / 10) = 3
    assert sheet.getpixel((0, 0)) == (255, 0, 0) and sheet.getpixel((92, 0)) == (0, 128, 0)
    assert montage([Image.new("L", (300, 400))]).size == (300, 400)  # already large: not scaled


def test_pc_encode_full_mode_keeps_the_aspect_ratio(tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray(sample_photo()).resize((120, 90)).save(image)  # 4:3, under the max side: not enlarged
    out = tmp_path / "out"
    assert main([str(image), "--size-mode", "full", "--steps", "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    arrays = np.load(out / "encoding.npz")
    assert summary["size_mode"] == "full" and arrays["input"].shape == (3, 90, 120) == arrays["reconstruction"].shape
    # conv-rgb tiles 16 + 8n; the buckets for 256 are 88, 176, 256: 90x120 pads to 176x176.
    top, bottom, left, right = arrays["padded"].tolist()
    assert (top + 90 + bottom, left + 120 + right) == (176, 176) and abs(top - bottom) <= 1
    assert arrays["latent_1"].shape == (1, 8, (176 - 8) // 4 + 1, (176 - 8) // 4 + 1)
    assert arrays["level_error_1"].shape == (1, 3, 176, 176)
    # The error map is the level-1 error cropped back to the image.
    cropped = arrays["level_error_1"][0, :, top : top + 90, left : left + 120]
    np.testing.assert_allclose(cropped, arrays["error"], atol=1e-5)


def test_pc_encode_full_mode_refuses_a_dense_model(tmp_path, capsys):
    assert main(["--model", "rao-ballard-1999", "--size-mode", "full", "--out", str(tmp_path / "out")]) == 2
    assert "dense level" in capsys.readouterr().err


def test_pc_encode_solver_and_a_warm_start_from_a_previous_encoding(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["--size-mode", "resize", "--steps", "30"]
    assert main([*base, "--solver", "nesterov", "--out", str(first)]) == 0
    summary = json.loads(capsys.readouterr().out)
    model = pcmodel.load("default")
    assert summary["solver"] == model.solver("nesterov").label and summary["init"] == model.config.initial_latents
    rows, _, _ = prepare_image(sample_photo(), model.config, "resize")
    expected = model.infer(rows, steps=30, solver="nesterov")
    assert summary["energy_final"] == pytest.approx(float(expected.energy[-1, 0]), rel=1e-5)
    # The next frame starts where this one ended: its first energy is this one's last.
    start = str(first / "encoding.npz")
    assert main(["--size-mode", "resize", "--steps", "1", "--init", start, "--out", str(second)]) == 0
    warm = json.loads(capsys.readouterr().out)
    assert warm["init"] == start
    assert warm["energy_initial"] == pytest.approx(summary["energy_final"], rel=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init", "random"], "--init"),
        (["--init", "missing.npz"], "--init"),
        (["--init", "OTHER"], "--init"),  # a tile-mode encoding: shapes that do not fit a resized image
        (["--solver", "adam"], "--solver"),
    ],
)
def test_pc_encode_bad_starts_and_solvers_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    if "OTHER" in args:
        assert main(["--size-mode", "tile", "--steps", "1", "--out", str(tmp_path / "tiles")]) == 0
        capsys.readouterr()
        args = ["--init", str(tmp_path / "tiles" / "encoding.npz")]
    err = (
        capsys.readouterr().err
        if _exit_code(["--size-mode", "resize", *args, "--out", str(tmp_path / "o")]) == 2
        else ""
    )
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _exit_code(argv: list[str]) -> int:
    """main's return value, or the code of the SystemExit that argparse raises for a bad option."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
