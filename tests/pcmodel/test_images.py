"""Images: decoding untrusted bytes, modes, the presets' preprocessing, fitting and tiling."""

from __future__ import annotations

import io
import math
import struct
import zlib

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


@pytest.mark.parametrize(
    "mode",
    ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F"],
)
def test_every_mode_pillow_makes_is_gray_and_rgb(mode):
    """Pillow converts some modes to RGB only (LAB: a TIFF sent to the gray paper's model had been a 500) or to
    their unpremultiplied form only (La)."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8))
    image = rgb.convert("RGBA").convert(mode) if mode in ("La", "RGBa") else rgb.convert(mode)
    assert image.mode == mode
    assert to_uint8(image, "gray").shape == (6, 5) and to_uint8(image, "rgb").shape == (6, 5, 3)
    if mode in ("RGB", "LAB", "YCbCr", "HSV"):  # the same picture: gray as from its RGB, within rounding
        plain = np.asarray(image.convert("RGB").convert("L"), dtype=int)
        assert np.abs(to_uint8(image, "gray").astype(int) - plain).max() <= 1


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


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with(size: tuple[int, int], before: bytes = b"", after: bytes = b"", end: bytes = b"") -> bytes:
    """A real PNG of `size` (width, height) written by Pillow, with chunks inserted before its first IDAT chunk,
    after its last IDAT chunk (where Pillow reads them only when it decodes the pixels) and after IEND."""
    data = encode(photo(size), "PNG")
    first, iend = data.index(b"IDAT") - 4, data.index(b"IEND") - 4
    return data[:first] + before + data[first:iend] + after + data[iend:] + end


def exif_chunk(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return png_chunk(b"eXIf", exif.tobytes()[6:])  # an eXIf chunk holds the TIFF data, without "Exif\0\0"


def xmp_chunk(orientation: int) -> bytes:
    xmp = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="{orientation}"/></x:xmpmeta>'
    return png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp.encode())


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_png_whose_exif_follows_its_pixels_is_planned_turned(orientation):
    """A PNG's eXIf chunk may follow its pixel data, where Pillow reads it only as it decodes them. Planned from the
    header (pcmodel.decoding, the service's and pc-encode's path), the image is already the tall one it decodes to:
    full mode scales it and tile mode counts its tiles as shown, not as stored."""
    from pcmodel import decoding
    from pcmodel.images import open_image, upright_size

    data = png_with((80, 40), after=exif_chunk(orientation))
    assert decode(data).size == (40, 80)  # Pillow turns it as it decodes
    assert upright_size(open_image(data)) == (40, 80)
    config = pcmodel.load("default").config
    image = open_image(data)
    assert decoding.plan(image, config, "full", decoding.Limits()) > 0
    rows, shown, _ = decoding.prepare(image, config, "full")
    want_rows, want_shown, _ = prepare_image(to_uint8(decode(data), "rgb"), config, "full")
    assert shown.shape[1:] == (80, 40) and torch.equal(rows, want_rows) and torch.equal(shown, want_shown)
    # The plan's refusals name the size as shown: full mode scales 40x80 to 8x16 (its longer side to 16) ...
    with pytest.raises(ImageError, match=r"this 40x80 image is scaled to 8x16") as info:
        decoding.plan(open_image(data), config, "full", decoding.Limits(min_side=9), max_side=16)
    assert info.value.reason == "too_small"
    # ... and tile mode tiles 40x80 with 55 tiles of 16x26 (80x40 would need 48, under this limit of 50).
    paper = pcmodel.get_preset("rao-ballard-1999")
    with pytest.raises(ImageError, match=r"this 40x80 image needs 55 tiles") as info:
        decoding.plan(open_image(data), paper, "tile", decoding.Limits(max_tiles=50))
    assert info.value.reason == "too_large"


LATE = {
    "late eXIf": {"after": exif_chunk(6)},
    "late eXIf over an early one": {"before": exif_chunk(1), "after": exif_chunk(8)},
    "early eXIf without a late one": {"before": exif_chunk(6), "after": png_chunk(b"tEXt", b"Comment\0hello")},
    "late XMP": {"after": xmp_chunk(6)},
    "late eXIf after IEND": {"end": exif_chunk(6)},
    "late eXIf after a damaged chunk header": {"after": png_chunk(b"t?Xt", b"x") + exif_chunk(6)},
    "late eXIf after a damaged text chunk": {"after": png_chunk(b"zTXt", b"Comment\0\x07") + exif_chunk(6)},
    "late eXIf running into IEND": {"after": exif_chunk(6)[:-10] + b"\0" * 4},
    "late eXIf longer than the file": {"after": struct.pack(">I", 1 << 31) + b"eXIf" + exif_chunk(6)[8:]},
    "damaged late eXIf": {"after": png_chunk(b"eXIf", b"MM\0*\0\0\0\x08\xff\xff")},
}


@pytest.mark.parametrize("case", LATE)
def test_the_planned_size_is_the_decoded_size_whatever_follows_a_pngs_pixels(case):
    """upright_size reads what follows a PNG's pixels as Pillow's decoder does: the last eXIf wins, XMP counts where
    no EXIF orientation does, nothing after IEND or a damaged chunk header does, and a damaged chunk raises
    nothing (decoding fails where Pillow fails). The plan's size and the decoded one are the same."""
    from pcmodel import decoding
    from pcmodel.images import load, open_image, upright_size

    data = png_with((80, 40), **LATE[case])
    image = open_image(data)
    planned = upright_size(image)
    try:
        decoded = decode(data).size
    except ImageError as exc:
        assert exc.reason == "bad_image", case  # Pillow cannot decode it; the plan raised nothing
        return
    assert planned == decoded, case
    config = pcmodel.load("default").config
    decoding.plan(image, config, "full", decoding.Limits())
    assert load(image).size == decoded  # planning (which reads the EXIF) does not change what load turns


def test_reading_a_pngs_chunks_is_bounded_and_raises_nothing_on_damage():
    """Every cut and many random byte flips of a PNG with chunks around its pixels: upright_size answers (a size
    either way round) and never raises; the file's read position is kept for decoding."""
    from pcmodel.images import open_image, upright_size

    data = png_with((80, 40), before=exif_chunk(1), after=xmp_chunk(8) + exif_chunk(6))
    rng = np.random.default_rng(0)
    damaged = [data[:cut] for cut in range(data.index(b"IDAT"), len(data))]
    for _ in range(300):
        flipped = bytearray(data)
        for at in rng.integers(data.index(b"IDAT") + 4, len(data), 3):
            flipped[at] = int(rng.integers(0, 256))
        damaged.append(bytes(flipped))
    for sample in damaged:
        try:
            image = open_image(sample)
        except ImageError:
            continue
        position = image.fp.tell()
        assert upright_size(image) in ((80, 40), (40, 80))
        assert image.fp.tell() == position


def test_header_size_reads_past_pillows_own_pixel_limit():
    """Pillow refuses to open an image over its decompression-bomb limit without saying its size: header_size
    still reads it (the header only), and open_image's too_large error names it as for our own limit."""
    from pcmodel.images import header_size, open_image

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    bomb += png_chunk(b"IEND", b"")
    assert 2 * Image.MAX_IMAGE_PIXELS < 100_000 * 100_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    assert header_size(bomb) == (100_000, 100_000)
    with pytest.raises(ImageError, match=r"the image is 100000x100000 = 10000000000 pixels, over the limit of 25000"):
        open_image(bomb, max_pixels=25_000)
    assert header_size(b"not an image") is None and header_size(bomb[:20]) is None
    # Under a max_pixels above Pillow's limit, the limit that refused the image is Pillow's, and named.
    ihdr = struct.pack(">IIBBBBB", 10_000, 9_500, 8, 2, 0, 0, 0)
    warned = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match=rf"the image is 10000x9500 = 95000000 pixels, over the limit of {limit}$"):
        open_image(warned + png_chunk(b"IEND", b""), max_pixels=200_000_000)
