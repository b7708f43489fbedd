"""Decoding an admitted image within the service's memory budget: what its pixels will cost, and 8-bit pixels.

`pcmodel.images` opens and decodes untrusted bytes (pc-encode, training and the service share its
format and pixel limits); these economies are the service's alone, because only the service decodes
many images at once against a memory budget (service.budget): it charges `decoded_bytes` before a
pixel is decoded, lets a JPEG decode reduced (`draft_for`), and `load_uint8` never holds a float copy.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from pcmodel.images import load, to_8bit, to_uint8

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
