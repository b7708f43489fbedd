"""Training data: photos in, preprocessed whole images, then seeded random patches (crops) in batches.

Every photo is prepared ONCE as a whole image by `pcmodel.images.preprocess` with the model's own
config (the function the service calls), so training and serving cannot drift apart. Sampling then
cuts windows of the model's native size (16x26 patches for the paper, 32x32 crops for conv-rgb)
out of those prepared images.

A batch is a pure function of (seed, step): resuming from a checkpoint at step n draws exactly the
batches a straight run would have drawn, and every process of a data-parallel run draws the same
global batch and keeps its own slice of it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pcmodel import ModelConfig
from pcmodel.collection import read_file
from pcmodel.images import DEFAULT_MAX_PIXELS, ImageError, decode, preprocess, to_uint8

log = logging.getLogger(__name__)

# scikit-image's bundled photos, CC0 or public domain (skimage.data's docstrings give each source).
DEFAULT_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "grass", "gravel", "brick")
# scikit-learn's two sample photos (CC BY 2.0), never trained on: the held-out set.
HELD_OUT_PHOTOS = ("china.jpg", "flower.jpg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")
GRAY_BANDS = (("L",), ("L", "A"), ("1",), ("I",), ("F",))  # PIL's bands of gray modes (1-bit, 16/32-bit, float)


class DataError(ValueError):
    """Training data that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Photo:
    """One source photo: a name (file or bundled name) and its pixels as uint8 (H, W) or (H, W, 3)."""

    name: str
    pixels: np.ndarray


def default_photos() -> list[Photo]:
    """scikit-image's eight bundled photos (they install with the package; nothing is downloaded)."""
    from skimage import data

    return [Photo(name, np.asarray(getattr(data, name)())) for name in DEFAULT_PHOTOS]


def held_out_photos() -> list[Photo]:
    """scikit-learn's sample photos china.jpg and flower.jpg (CC BY 2.0; see docs/TRAINING.md)."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return [Photo(Path(f).name, np.asarray(img)) for f, img in zip(bunch.filenames, bunch.images)]


def folder_photos(
    folder: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, option: str = "--data"
) -> tuple[list[Photo], list[str]]:
    """Every PNG, JPEG, TIFF and WebP file under `folder` (recursively, in sorted order).

    Returns (photos, skipped): files that cannot be decoded are listed as "path: reason" and
    skipped. Raises DataError for a missing folder or one without a single usable image; its
    message names the command-line `option` that gave the folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{option} {folder}: no such folder; give a folder of PNG, JPEG, TIFF or WebP images")
    # Not only regular files: a FIFO or a device named like an image is listed as skipped (never read).
    files = sorted(p for p in root.rglob("*") if not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES)
    photos, skipped = [], []
    for path in files:
        try:
            image = decode(read_file(str(path)), max_pixels=max_pixels)  # at most pcmodel's file limit, 100 MiB
            # 8-bit as the service converts it (palette, CMYK, 1-bit, 32-bit, alpha): the pixels a user's image
            # gives the model are the same in training and in serving.
            pixels = to_uint8(image, "gray" if image.getbands() in GRAY_BANDS else "rgb")
        except (ImageError, OSError) as exc:
            skipped.append(f"{path.relative_to(root)}: {(exc.strerror if isinstance(exc, OSError) else None) or exc}")
            continue
        photos.append(Photo(str(path.relative_to(root)), pixels))
    if not photos:
        found = f"{len(files)} image file(s), none readable" if files else "no image files"
        raise DataError(
            f"{option} {folder}: {found}; the folder needs at least one readable {', '.join(IMAGE_SUFFIXES)} image"
        )
    return photos, skipped


def fingerprint(photos: Sequence[Photo]) -> str:
    """sha256 over the photos' names and pixels: identifies a data set in provenance and on resume."""
    digest = hashlib.sha256()
    for photo in photos:
        digest.update(f"{photo.name}:{photo.pixels.shape}\n".encode())
        digest.update(np.ascontiguousarray(photo.pixels).tobytes())
    return digest.hexdigest()


def check_sizes(photos: Sequence[Photo], config: ModelConfig, source: str, option: str) -> None:
    """Raise DataError, naming `option` (or the default photos), unless some photo covers the model's input."""
    height, width = config.input_shape[1:]
    if any(p.pixels.shape[0] >= height and p.pixels.shape[1] >= width for p in photos):
        return
    where = f"{option} {source}" if source != "default" else f"the default photos for {option}"
    largest = max(photos, key=lambda p: p.pixels.shape[0] * p.pixels.shape[1])
    raise DataError(
        f"{where}: every image is smaller than the model's input {height}x{width} (the largest, {largest.name}, "
        f"is {largest.pixels.shape[0]}x{largest.pixels.shape[1]}); give images at least {height}x{width}"
    )


def prepare(photos: Sequence[Photo], config: ModelConfig, scales: Sequence[float] = (1.0,)) -> list[torch.Tensor]:
    """Each photo preprocessed whole by the model's config, at each scale: a list of (C, H, W) tensors.

    A scale below 1 resizes the photo first (inside `preprocess`, as the service resizes), so crops
    of it show coarser structure. Photos smaller than the model's input at a scale are left out.
    """
    height, width = config.input_shape[1:]
    out = []
    for photo in photos:
        h, w = photo.pixels.shape[:2]
        for scale in scales:
            size = (round(h * scale), round(w * scale))
            if size[0] < height or size[1] < width:
                continue
            out.append(preprocess([photo.pixels], config, size=None if scale == 1 else size)[0])
    if not out:
        scaled = f" at --scales {','.join(f'{s:g}' for s in scales)}" if tuple(scales) != (1.0,) else ""
        fix = "larger images or larger --scales" if scaled else "larger images"
        raise DataError(f"every image is smaller than the model's input {height}x{width}{scaled}; use {fix}")
    return out


def dihedral(images: Sequence[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """Each prepared (C, H, W) image in its 8 views: turned by 0-3 quarter turns, each also mirrored (a view
    that no longer holds a window of `size` is left out): 8x the distinct windows, and each edge as common as
    its quarter-turned and mirrored twins (horizontal as vertical, one diagonal as the other)."""
    out = []
    for image in images:
        for turns in range(4):
            turned = torch.rot90(image, turns, (-2, -1))
            if turned.shape[-2] >= size[0] and turned.shape[-1] >= size[1]:
                out += [turned, torch.flip(turned, (-1,))]
    return out


class PatchSampler:
    """Random windows of size (h, w) from prepared images; batch `step` depends only on (seed, step).

    A window's image is drawn with probability proportional to the number of positions it offers,
    so every position of every image is equally likely.
    """

    def __init__(self, images: Sequence[torch.Tensor], size: tuple[int, int], seed: int) -> None:
        self.images = list(images)
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        h, w = self.size
        positions = np.array([(im.shape[-2] - h + 1) * (im.shape[-1] - w + 1) for im in self.images], dtype=float)
        if not len(positions) or positions.min() < 1:
            raise DataError(f"every training image must be at least {h}x{w}")
        self.weights = positions / positions.sum()

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The global batch for this step: (batch_size, C, h, w)."""
        rng = np.random.default_rng([self.seed, int(step)])
        h, w = self.size
        which = rng.choice(len(self.images), size=batch_size, p=self.weights)
        windows = []
        for i in which:
            image = self.images[i]
            top = int(rng.integers(0, image.shape[-2] - h + 1))
            left = int(rng.integers(0, image.shape[-1] - w + 1))
            windows.append(image[:, top : top + h, left : left + w])
        return torch.stack(windows)  # (B, C, h, w)


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's contiguous slice of a global batch (the batch size divides by world_size)."""
    if batch.shape[0] % world_size:
        raise DataError(f"the batch size {batch.shape[0]} must be a multiple of the {world_size} processes")
    size = batch.shape[0] // world_size
    return batch[rank * size : (rank + 1) * size]


def held_out_windows(config: ModelConfig, count: int, seed: int = 0, photos: Sequence[Photo] | None = None):
    """A fixed set of `count` windows of the model's size from the held-out photos (default: scikit-learn's)."""
    images = prepare(held_out_photos() if photos is None else photos, config)
    return PatchSampler(images, config.input_shape[1:], seed).batch(0, count)
