"""The service's PNG writer: what Pillow decodes is exactly the array written, for gray and RGB maps."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pcmodel.images import sample_photo
from service.png import png_bytes


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (37, 53), (64, 64, 3), (5, 3, 3), (131, 97, 3)])
def test_pillow_reads_back_exactly_the_pixels(shape, compress):
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    with Image.open(io.BytesIO(png_bytes(pixels, compress))) as image:
        image.load()
        assert image.mode == ("L" if len(shape) == 2 else "RGB")
        assert np.array_equal(np.asarray(image), pixels)


def test_a_photo_compresses_and_round_trips():
    photo = sample_photo()  # (256, 256, 3): smooth rows, where the Up filter pays
    data = png_bytes(photo)
    assert len(data) < 0.8 * photo.nbytes < 0.8 * len(png_bytes(photo, compress=False))  # stored: every byte
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), photo)
    gray = photo[..., 1].copy()  # a non-contiguous slice made plain, then a strided view
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(photo[..., 1])))), gray)
