"""One image part as the model's input: checked from its header (`plan`), then decoded and preprocessed
(`prepare`) exactly as training does."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from pcmodel import ModelConfig, decoding
from pcmodel.decoding import Limits
from pcmodel.images import Fit, TileGrid, open_image

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


@dataclass(frozen=True)
class Planned:
    """An image opened and checked from its header, not yet decoded, and what decoding it will cost."""

    image: Image.Image  # lazy: no pixel decoded yet (a JPEG already set to decode reduced, in resize mode)
    cost: int  # bytes its decoding and preprocessing may hold at once (the decoding budget's charge)
    small: bool  # at most SMALL_PIXELS pixels in its header: decoded and encoded on the event loop


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
    small = image.size[0] * image.size[1] <= SMALL_PIXELS  # the header's size, before a JPEG's draft
    limits = Limits(
        max_pixels=settings.max_pixels,
        min_side=settings.min_side,
        max_image_bytes=settings.max_image_bytes,
        max_tiles=settings.tile_limit,
    )
    cost = decoding.plan(image, config, options.size_mode, limits, options.full_max_side)  # ImageError: 413
    return Planned(image=image, cost=cost, small=small)


def prepare(planned: Planned, options: EncodeOptions, config: ModelConfig) -> Prepared:
    """Decode a planned image and preprocess it exactly as training does (pcmodel.decoding.prepare)."""
    rows, shown, placement = decoding.prepare(planned.image, config, options.size_mode, options.full_max_side)
    return Prepared(rows=rows, shown=shown, grid=placement.grid, fit=placement.fit)
