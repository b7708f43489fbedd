"""One image part as the model's input: checked from its header (`plan`), then decoded and preprocessed
(`prepare`) exactly as training does."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pcmodel import ModelConfig
from pcmodel.images import Fit, TileGrid, full_size, open_image, prepare_image, tile_count

from .decoding import decoded_bytes, draft_for, load_uint8
from .errors import RequestError
from .forms import Part
from .options import EncodeOptions
from .settings import Settings


@dataclass(frozen=True)
class Prepared:
    """One image as the model takes it: rows for the batcher, and what `input` shows."""

    rows: torch.Tensor  # (n, C, h, w): the image at the native size (n = 1), its tiles, or padded (full)
    shown: torch.Tensor  # (C, H, W): the preprocessed image (the stitched tiles' area in tile mode)
    grid: TileGrid | None  # tile mode only
    fit: Fit | None = None  # full mode only: the padding to the bucket size


_URL_PREFIXES = (b"http://", b"https://", b"ftp://", b"file://", b"data:", b"s3://", b"gs://")
SMALL_PIXELS = 256 * 256  # images up to this size are decoded and encoded on the event loop (< ~1 ms)


def is_small(part: Part) -> bool:
    """Whether the image header says at most SMALL_PIXELS pixels (reads the header only)."""
    try:
        with Image.open(io.BytesIO(part.data)) as image:
            width, height = image.size
    except Exception:  # not an image, or a bomb: prepare() says which, quickly
        return len(part.data) <= 1 << 20
    return width * height <= SMALL_PIXELS


@dataclass(frozen=True)
class Planned:
    """An image opened and checked from its header, not yet decoded, and what decoding it will cost."""

    image: Image.Image  # lazy: no pixel decoded yet (a JPEG already set to decode reduced, in resize mode)
    cost: int  # bytes its decoding and preprocessing may hold at once (the decoding budget's charge)


def plan(part: Part, options: EncodeOptions, config: ModelConfig, settings: Settings) -> Planned:
    """Check an image from its header alone: format, pixels, sides, decoded bytes, tiles (all before decoding)."""
    if part.data[:16].strip().lower().startswith(_URL_PREFIXES):
        raise RequestError(
            400,
            "bad_image",
            f"the `{part.name}` field holds a URL; this service never fetches URLs: upload the image file itself "
            f"(curl -F {part.name}=@photo.jpg)",
        )
    image = open_image(part.data, max_pixels=settings.max_pixels, min_side=settings.min_side)
    width, height = image.size
    channels = config.input_shape[0]
    if options.size_mode == "tile":
        tiles = tile_count(config, height, width)
        # The batcher queues at most max_queue rows: an image with more tiles could never be admitted.
        limit = min(settings.max_tiles, settings.max_queue)
        if tiles > limit:
            native = config.input_shape[1:]
            raise RequestError(
                413,
                "too_large",
                f"in tile mode this {width}x{height} image needs {tiles} tiles of {native[0]}x{native[1]}, over "
                f"the limit of {limit}; send a smaller image or use size_mode=resize",
            )
    # Resize and full mode scale the image down first: a JPEG may decode at a reduced size.
    scaled = {"resize": config.input_shape[1:], "full": full_size(height, width, options.full_max_side)}
    draft_for(image, config.preprocess.color, scaled.get(options.size_mode))
    raw = decoded_bytes(image)
    if raw > settings.max_image_bytes:
        raise RequestError(
            413,
            "too_large",
            f"this {width}x{height} {image.mode} image decodes to {raw} bytes, over the limit of "
            f"{settings.max_image_bytes}; send fewer pixels or 8 bits per sample",
        )
    width, height = image.size  # after a JPEG's draft
    # The decoded pixels plus one 8-bit copy (palette and 1-bit images expand to RGB(A) to be reduced).
    # Resize and full mode convert to the model's channels after reducing and scale before filtering; tile
    # mode converts the whole image and holds it as float32 with the filter's temporaries (about six
    # copies) over the model's channels.
    per_pixel = 4 if image.mode in ("P", "PA", "1") else len(image.getbands())
    if options.size_mode == "tile":
        per_pixel = max(per_pixel, channels) + 6 * 4 * channels
    return Planned(image=image, cost=raw + width * height * per_pixel)


def prepare(planned: Planned, options: EncodeOptions, config: ModelConfig) -> Prepared:
    """Decode a planned image and preprocess it exactly as training does (pcmodel.images)."""
    width, height = planned.image.size
    scaled = {"resize": config.input_shape[1:], "full": full_size(height, width, options.full_max_side)}
    try:
        pixels = load_uint8(planned.image, config.preprocess.color, scaled.get(options.size_mode))
    finally:
        planned.image.close()  # frees the decoded pixels now, not when the last reference goes
    if options.size_mode == "full":  # the size from the original image: a JPEG's draft must not change it
        pixels = np.asarray(Image.fromarray(pixels).resize(scaled["full"][::-1], Image.Resampling.BICUBIC))
    rows, shown, placement = prepare_image(pixels, config, options.size_mode, options.full_max_side)
    return Prepared(rows=rows, shown=shown, grid=placement.grid, fit=placement.fit)
