"""Images: decoding untrusted bytes, modes, the presets' preprocessing, fitting and tiling."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

import pcmodel
from pcmodel import ImageError
from pcmodel.images import (
    decode,
    display_pixels,
    filter_images,
    fit,
    fit_size,
    full_buckets,
    prepare_image,
    preprocess,
    sample_photo,
    tile,
    tile_count,
    tile_stride,
    tile_window,
    to_tensor,
    to_uint8,
)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF"])
def test_decode_accepted_formats(fmt):
    image = decode(encode(photo(), fmt))
    assert image.size == (40, 30)


def test_decode_errors():
    with pytest.raises(ImageError, match="empty") as info:
        decode(b"")
    assert info.value.reason == "bad_image"
    with pytest.raises(ImageError, match="not an image") as info:
        decode(b"hello, this is text")
    assert info.value.reason == "bad_image"
    data = encode(photo((200, 200)), "PNG")
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        decode(data[: len(data) // 2])
    assert info.value.reason == "bad_image"
    with pytest.raises(ImageError, match="over the limit") as info:
        decode(encode(Image.new("L", (300, 300)), "PNG"), max_pixels=50_000)
    assert info.value.reason == "too_large"
    with pytest.raises(ImageError, match="not supported") as info:
        decode(encode(photo(), "ICO"))
    assert info.value.reason == "unsupported_format"
    with pytest.raises(ImageError, match="at least 2 pixels") as info:
        decode(encode(Image.new("RGB", (1, 1)), "PNG"), min_side=2)
    assert info.value.reason == "too_small"


def test_decode_applies_exif_orientation():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode(encode(image, "JPEG", exif=exif))
    assert decoded.size == (20, 40)


def test_modes_are_converted():
    gray16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_uint8(gray16, "gray").max() == 255  # scaled, not clipped
    half16 = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))
    assert to_uint8(half16, "gray")[0, 0] == 128
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert to_uint8(cmyk, "rgb")[0, 0].tolist() == [255, 0, 0]
    palette = Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")
    assert to_uint8(palette, "rgb")[0, 0].tolist() == [0, 0, 255]
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_uint8(transparent, "rgb")[0, 0].tolist() == [255, 255, 255]  # composited on white
    assert to_uint8(np.zeros((3, 3, 3), dtype=np.uint8), "gray").shape == (3, 3)
    assert to_uint8(np.ones((3, 3), dtype=np.float32), "rgb")[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(ImageError, match="uint8, uint16 or float"):
        to_uint8(np.zeros((3, 3), dtype=np.int64), "rgb")


def test_conv_rgb_scales_to_minus_one_one():
    config = pcmodel.get_preset("conv-rgb")
    black_white = np.zeros((32, 32, 3), dtype=np.uint8)
    black_white[:, 16:] = 255
    x = preprocess([black_white], config)
    assert x.shape == (1, 3, 32, 32)
    assert float(x[0, 0, 0, 0]) == -1.0 and float(x[0, 0, 0, 31]) == 1.0


def test_paper_preprocessing_is_dog_and_unit_std():
    config = pcmodel.get_preset("rao-ballard-1999")
    image = np.asarray(photo((64, 48)).convert("L"))
    x = preprocess([image], config)
    assert x.shape == (1, 1, 48, 64)
    assert float(x.std(unbiased=False)) == pytest.approx(config.preprocess.gain, rel=1e-4)  # unit std x gain
    flat = np.full((20, 20), 77, dtype=np.uint8)
    assert float(preprocess([flat], config).abs().max()) < 1e-3  # DoG removes uniform light
    # A DoG of a bright dot on a dark field is centre-on: positive at the dot, negative around it.
    dot = np.zeros((21, 21), dtype=np.uint8)
    dot[10, 10] = 255
    y = preprocess([dot], config)[0, 0]
    assert y[10, 10] > 0 and y[10, 13] < 0


def test_whitening_flattens_the_spectrum():
    config = pcmodel.get_preset("rao-ballard-1999")
    whiten = config.preprocess.__class__(color="gray", filter="whiten", normalize="image_std")
    from skimage import data

    x = torch.from_numpy(data.camera().astype(np.float32) / 255).view(1, 1, 512, 512)
    y = filter_images(x, whiten)
    spectrum = torch.fft.rfft2(y[0, 0]).abs()
    low, mid = spectrum[2:6, 2:6].mean(), spectrum[60:80, 60:80].mean()
    raw = torch.fft.rfft2(x[0, 0]).abs()
    assert (low / mid) < 0.2 * (raw[2:6, 2:6].mean() / raw[60:80, 60:80].mean())


def test_resize_and_mixed_sizes():
    config = pcmodel.get_preset("conv-rgb")
    images = [photo((40, 30)), photo((64, 64))]
    with pytest.raises(ValueError, match="different sizes"):
        preprocess(images, config)
    assert preprocess(images, config, size=(32, 32)).shape == (2, 3, 32, 32)


def test_fit_pads_or_crops_to_a_tiling_size():
    config = pcmodel.get_preset("conv-rgb")  # valid sizes 16 + 8n
    assert fit_size(config, 30, 100) == (32, 104)
    assert fit_size(config, 30, 100, "crop") == (24, 96)
    assert fit_size(config, 30, 101, "nearest") == (32, 104)
    assert fit_size(config, 5, 5) == (16, 16)
    x = torch.rand((1, 3, 30, 100))
    fitted, record = fit(x, config)
    assert fitted.shape == (1, 3, 32, 104)
    assert record.undo(fitted).equal(x)
    model = pcmodel.load("conv-rgb")
    result = model.infer(fitted, steps=2)
    assert record.undo(result.reconstruction).shape == x.shape
    cropped, record = fit(x, config, "crop")
    assert cropped.shape == (1, 3, 24, 96)
    back = record.undo(cropped)
    assert back.shape == x.shape and back[..., 3:27, 2:98].equal(cropped)


def test_tile_and_stitch_round_trip():
    x = torch.rand((1, 1, 40, 60))
    tiles, grid = tile(x, (16, 26))
    assert tiles.shape == (3 * 3, 1, 16, 26)
    assert grid.stitch(tiles).equal(x)
    assert tiles[4].equal(x[0, :, 16:32, 26:52])
    small = torch.rand((1, 3, 5, 7))
    tiles, grid = tile(small, (32, 32))
    assert tiles.shape == (1, 3, 32, 32) and grid.stitch(tiles).equal(small)


def test_overlapping_tiles_blend_back_to_the_image():
    x = torch.rand((1, 3, 70, 95))
    tiles, grid = tile(x, (32, 32), (16, 16))
    # Tiles every 16 px from -16 until they pass 16 px beyond the image: 1 + ceil(side / 16) per axis.
    assert (grid.rows, grid.cols) == (1 + math.ceil(70 / 16), 1 + math.ceil(95 / 16)) == (6, 7)
    assert tiles.shape == (42, 3, 32, 32) and grid.margin == (16, 16)
    assert tiles[grid.cols + 1].equal(x[0, :, 0:32, 0:32])  # the second tile of the second row starts at (0, 0)
    torch.testing.assert_close(grid.stitch(tiles), x, atol=1e-6, rtol=0)  # a weighted mean of equal values
    assert tile_count(pcmodel.get_preset("conv-rgb"), 70, 95) == 42


def test_the_tile_window_is_a_partition_of_unity_at_half_overlap():
    w = tile_window((16, 26), (8, 13)).double()
    assert w.shape == (16, 26) and w.min() >= 0
    summed = w[:8] + w[8:]  # rows y and y + 8 overlap
    summed = summed[:, :13] + summed[:, 13:]
    torch.testing.assert_close(summed, torch.ones_like(summed), atol=1e-6, rtol=0)
    assert tile_window((32, 32), (32, 32)).eq(1).all()  # no overlap: every pixel from its one tile


def test_full_mode_scales_keeps_the_aspect_ratio_and_pads_to_a_bucket():
    config = pcmodel.get_preset("conv-rgb")  # valid sizes 16 + 8n
    assert full_buckets(config, 256) == [(88, 88), (176, 176), (256, 256)]  # ceil(256 k / 3), padded up
    photo = np.asarray(Image.fromarray(sample_photo()).resize((640, 480)))
    rows, shown, placement = prepare_image(photo, config, "full", max_side=256)
    assert shown.shape == (3, 192, 256) and rows.shape == (1, 3, 256, 256)  # 4:3, the longer side 256
    f = placement.fit
    assert placement.mode == "full" and (f.top, f.bottom, f.left, f.right) == (32, 32, 0, 0)
    assert f.undo(rows)[0].equal(shown)
    assert rows[0, :, 31].equal(shown[:, 1])  # reflected: row -1 is row 1
    small = np.asarray(Image.fromarray(sample_photo()).resize((50, 40)))
    rows, shown, _ = prepare_image(small, config, "full", max_side=256)
    assert shown.shape == (3, 40, 50) and rows.shape == (1, 3, 88, 88)  # never enlarged
    with pytest.raises(ValueError, match="dense level"):
        prepare_image(small, pcmodel.get_preset("rao-ballard-1999"), "full")


def seam_ratio(model: pcmodel.PCModel, photo: np.ndarray, stride: tuple[int, int]) -> float:
    """Mean |error| within 2 px of the lines of the non-overlapping native-size tile grid, over the mean elsewhere."""
    x = preprocess([photo], model.config)
    th, tw = model.config.input_shape[1:]
    tiles, grid = tile(x, (th, tw), stride)
    error = (x - grid.stitch(model.infer(tiles).reconstruction))[0].abs().mean(0)  # (H, W)
    h, w = error.shape

    def near_lines(n: int, t: int) -> torch.Tensor:  # pixels t*k - 2 .. t*k + 1 for the inner lines 0 < t*k < n
        lines = torch.arange(t, n, t)
        near = torch.zeros(n, dtype=torch.bool)
        for offset in (-2, -1, 0, 1):
            near[(lines + offset).clamp(0, n - 1)] = True
        return near

    seams = near_lines(h, th)[:, None] | near_lines(w, tw)[None, :]
    return float(error[seams].mean() / error[~seams].mean())


def test_overlapping_tiles_leave_no_seams_on_a_photo():
    model = pcmodel.load("conv-rgb")
    photo = np.asarray(Image.fromarray(sample_photo()).resize((192, 160)))
    # Measured on the 256x256 photo (docs/PERFORMANCE.md): 1.62 without overlap, 1.01 with it.
    assert seam_ratio(model, photo, (32, 32)) > 1.3
    assert seam_ratio(model, photo, tile_stride(model.config)) <= 1.2


@pytest.mark.parametrize("channels", [1, 3])
def test_display_pixels_are_the_plain_mapping_in_pixel_order(channels):
    """The in-place fast path against the definition written plainly: [-scale, scale] (centred) or the config's
    value range onto 0..255, rounded half to even, clipped; (H, W, 3) or (H, W)."""
    config = pcmodel.load("conv-rgb").config.preprocess
    generator = torch.Generator().manual_seed(7)
    x = torch.randn((channels, 21, 34), generator=generator) * 0.8
    x[0, 0, :4] = torch.tensor([-50.0, 50.0, 0.0, 1.0])  # clipped at both ends, mid-grey, the range's top
    lo, hi = config.value_range
    for centred, plain in (
        (True, (x.numpy().astype(np.float64) / 1.3 + 1) * 127.5),
        (False, (x.numpy().astype(np.float64) - lo) * 255 / (hi - lo)),
    ):
        expected = np.rint(np.clip(plain, 0, 255)).astype(np.uint8).transpose(1, 2, 0)
        got = display_pixels(x, config, 1.3, centred)
        assert got.dtype == np.uint8 and got.shape == ((21, 34, 3) if channels == 3 else (21, 34))
        assert got.flags.c_contiguous
        difference = np.abs(got.astype(int) - (expected if channels == 3 else expected[:, :, 0]).astype(int))
        assert difference.max() <= 1 and (difference == 0).mean() > 0.999  # float32 against float64 rounding


@pytest.mark.parametrize("shape", [(9, 13), (9, 13, 3)])
def test_to_tensor_and_to_uint8_keep_the_plain_definitions_bits(shape):
    """The one-pass conversion against the plain one (float copy, channels first, scale, shift), and a uint8
    array already in the asked layout comes back from to_uint8 as it is."""
    config = pcmodel.load("conv-rgb").config.preprocess
    pixels = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    lo, hi = config.value_range
    plain = torch.from_numpy(pixels.astype(np.float32))
    plain = (plain[None] if plain.dim() == 2 else plain.permute(2, 0, 1)) * ((hi - lo) / 255.0) + lo
    got = to_tensor(pixels, config)
    assert got.is_contiguous() and got.numpy().tobytes() == plain.contiguous().numpy().tobytes()
    color = "gray" if len(shape) == 2 else "rgb"
    assert to_uint8(pixels, color) is pixels
    other = to_uint8(pixels, "rgb" if color == "gray" else "gray")  # converted, through PIL as before
    assert other.shape == ((9, 13, 3) if color == "gray" else (9, 13))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("mode", ["full", "tile", "resize"])
def test_header_only_decoding_turns_the_image_as_its_exif_says(fmt, orientation, mode):
    """pcmodel.decoding (the service's and pc-encode's path: plan from the header, then prepare) gives exactly
    what decoding the whole image and preprocessing it gives, EXIF orientation included: a wide file shown
    tall stays tall in full mode (it was squashed to the file's own aspect)."""
    from pcmodel import decoding
    from pcmodel.images import open_image

    config = pcmodel.load("default").config
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo((80, 40)), fmt, exif=exif)
    upright = (40, 80) if orientation in (6, 8) else (80, 40)  # (width, height) as shown
    image = open_image(data)
    assert decoding.plan(image, config, mode, decoding.Limits()) > 0
    rows, shown, _ = decoding.prepare(image, config, mode)
    want_rows, want_shown, _ = prepare_image(to_uint8(decode(data), "rgb"), config, mode)
    assert torch.equal(rows, want_rows) and torch.equal(shown, want_shown)
    if mode == "full":
        assert shown.shape[1:] == (upright[1], upright[0])
