"""Decoding untrusted images for a model within limits: what their pixels will cost, and 8-bit pixels.

`pcmodel.images` opens and decodes untrusted bytes (pc-encode, training and the service share its
format and pixel limits). Here are the economies of a program that decodes many images at once against
a memory budget, the service (service.budget) and pc-encode over a collection: `Limits` (the service's
defaults), `plan` checks an opened image from its header alone (tiles, decoded bytes) and returns what
decoding it will cost, `decoded_bytes` is charged before a pixel is decoded, a JPEG decodes reduced
(`draft_for`), `load_uint8` never holds a float copy, and `prepare` gives the model's rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .config import ModelConfig
from .images import (
    DEFAULT_FULL_MAX_SIDE,
    DEFAULT_MAX_PIXELS,
    ImageError,
    Placement,
    full_size,
    load,
    prepare_image,
    tile_count,
    to_8bit,
    to_uint8,
    upright_size,
)

# Bytes per pixel of PIL's modes as decoders produce them ("1" and "P" are stored a byte per pixel).
_MODE_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4, "LA": 2, "La": 2, "PA": 2}
_MODE_BYTES.update({"RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4})
# Resize mode reduces (box-averages) a large image by an integer factor while it stays at least this
# many times the model's native size on its short side; the antialiased bicubic resize does the rest.
# Pillow's `reducing_gap` documents 3 as indistinguishable from resizing the whole image.
REDUCE_MARGIN = 4


def decoded_bytes(image: Image.Image) -> int:
    """Bytes the decoder allocates for an opened image's pixels: pixels x bands x bytes per sample."""
    width, height = image.size
    return width * height * _MODE_BYTES.get(image.mode, 1)


def draft_for(image: Image.Image, color: str, size: tuple[int, int] | None) -> None:
    """Let a JPEG decode small and in the model's colours: DCT scaling (1/2 .. 1/8) down to
    REDUCE_MARGIN x `size` (H, W) on the short side, and gray decoded as gray. A no-op for other formats."""
    if image.format != "JPEG":
        return
    width, height = image.size
    mode = "L" if color == "gray" else "RGB"
    if size is None:
        image.draft(mode, (width, height))
        return
    ratio = min(1.0, REDUCE_MARGIN * max(size) / min(width, height))
    image.draft(mode, (max(1, math.ceil(width * ratio)), max(1, math.ceil(height * ratio))))


def load_uint8(image: Image.Image, color: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """An opened image decoded for a model: (H, W) gray or (H, W, 3) RGB uint8, the same as
    `to_uint8(load(image), color)`, but never holding a float copy of a large image, and (given the
    native `size` (H, W) that resize mode will resize to) reduced first when it is far larger.

    Peak memory: the decoded pixels (`decoded_bytes`, less after `draft_for`) plus one 8-bit copy.
    """
    image = to_8bit(load(image))  # 16/32-bit and float gray as (H, W) "L", in bands of rows
    if size is not None:
        factor = min(image.size) // (REDUCE_MARGIN * max(size))
        if factor >= 2:
            if image.mode in ("P", "PA", "1"):
                image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
            image = image.reduce(factor)
    return to_uint8(image, color)


@dataclass(frozen=True)
class Limits:
    """What one image may cost to decode. The defaults are the service's (service.settings reads them here)."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # from the header: a decompression bomb costs nothing
    min_side: int = 8  # there is nothing to encode in a 1x1 image
    max_image_bytes: int = 100 * 1024 * 1024  # pixels x bands x bytes per sample of the decoded image
    # tile mode: native-size tiles one image may need, counting the overlapping tiles (about 4x the
    # non-overlapping count: tiles overlap by half); cost grows with area
    max_tiles: int = 4096


def plan(
    image: Image.Image,
    config: ModelConfig,
    size_mode: str,
    limits: Limits,
    max_side: int = DEFAULT_FULL_MAX_SIDE,
) -> int:
    """Check an opened image from its header alone (tiles, decoded bytes) and let a JPEG decode reduced where
    the size mode scales it down; returns the bytes its decoding and preprocessing may hold at once.

    Raises ImageError("too_large") for an image over a limit, before any pixel is decoded.
    """
    width, height = upright_size(image)
    channels = config.input_shape[0]
    if size_mode == "tile":
        tiles = tile_count(config, height, width)
        if tiles > limits.max_tiles:
            native = config.input_shape[1:]
            raise ImageError(
                f"in tile mode this {width}x{height} image needs {tiles} tiles of {native[0]}x{native[1]}, over "
                f"the limit of {limits.max_tiles}; send a smaller image or use size_mode=resize",
                "too_large",
            )
    # Resize and full mode scale the image down first: a JPEG may decode at a reduced size.
    scaled = {"resize": config.input_shape[1:], "full": full_size(height, width, max_side)}
    if size_mode == "full" and min(scaled["full"]) < limits.min_side:
        h, w = scaled["full"]
        raise ImageError(
            f"in full mode this {width}x{height} image is scaled to {w}x{h} (its longer side to at most {max_side}), "
            f"under the minimum side of {limits.min_side}; use size_mode=tile",
            "too_small",
        )
    draft_for(image, config.preprocess.color, scaled.get(size_mode))
    raw = decoded_bytes(image)
    if raw > limits.max_image_bytes:
        raise ImageError(
            f"this {width}x{height} {image.mode} image decodes to {raw} bytes, over the limit of "
            f"{limits.max_image_bytes}; send fewer pixels or 8 bits per sample",
            "too_large",
        )
    width, height = image.size  # after a JPEG's draft
    # The decoded pixels plus one 8-bit copy (palette and 1-bit images expand to RGB(A) to be reduced).
    # Resize and full mode convert to the model's channels after reducing and scale before filtering; tile
    # mode converts the whole image and holds it as float32 with the filter's temporaries (about six
    # copies) over the model's channels.
    per_pixel = 4 if image.mode in ("P", "PA", "1") else len(image.getbands())
    if size_mode == "tile":
        per_pixel = max(per_pixel, channels) + 6 * 4 * channels
    return raw + width * height * per_pixel


def prepare(
    image: Image.Image, config: ModelConfig, size_mode: str, max_side: int = DEFAULT_FULL_MAX_SIDE
) -> tuple[torch.Tensor, torch.Tensor, Placement]:
    """Decode a planned image and preprocess it exactly as training does: (rows (n, C, h, w), the
    preprocessed image (C, H, W), placement), as `pcmodel.images.prepare_image` returns them.

    The image is closed afterwards: its decoded pixels are freed now, not when the last reference goes.
    """
    width, height = upright_size(image)
    scaled = {"resize": config.input_shape[1:], "full": full_size(height, width, max_side)}
    try:
        pixels = load_uint8(image, config.preprocess.color, scaled.get(size_mode))
    finally:
        image.close()
    if image.format != "JPEG":  # decoded whole, EXIF orientation applied: the size to scale from, exactly (a PNG
        width, height = image.size  # past images.MAX_PNG_CHUNKS may turn only now; a JPEG's draft changes its size)
        scaled["full"] = full_size(height, width, max_side)
    # Full mode's size comes from the original image (a JPEG's draft must not change it); resized only if it did.
    if size_mode == "full" and pixels.shape[:2] != tuple(scaled["full"]):
        pixels = np.asarray(Image.fromarray(pixels).resize(scaled["full"][::-1], Image.Resampling.BICUBIC))
    return prepare_image(pixels, config, size_mode, max_side)
