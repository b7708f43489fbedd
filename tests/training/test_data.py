"""training.data: the photos, folders (bad files listed and skipped), and seeded windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pcmodel.images import preprocess
from training import data

from .conftest import TINY


def test_default_photos_are_the_eight_bundled_ones():
    photos = data.default_photos()
    assert [p.name for p in photos] == list(data.DEFAULT_PHOTOS)
    assert all(p.pixels.dtype == np.uint8 and min(p.pixels.shape[:2]) >= 300 for p in photos)


def test_held_out_photos_are_scikit_learns():
    photos = data.held_out_photos()
    assert [p.name for p in photos] == ["china.jpg", "flower.jpg"]
    assert all(p.pixels.shape == (427, 640, 3) for p in photos)


def test_folder_lists_and_skips_unreadable_files(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(tmp_path / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "c.webp")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(tmp_path / "d.tiff")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "notes.txt").write_text("not an image")
    photos, skipped = data.folder_photos(tmp_path)
    assert [p.name for p in photos] == ["a.png", "c.webp", "d.tiff", "sub/b.jpg"]
    assert len(skipped) == 1 and skipped[0].startswith("broken.png: ")


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="no image files"):
        data.folder_photos(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    with pytest.raises(data.DataError, match="none readable"):
        data.folder_photos(tmp_path)
    with pytest.raises(data.DataError, match="no such folder"):
        data.folder_photos(tmp_path / "missing")


def test_prepare_is_the_models_own_preprocessing():
    photo = data.default_photos()[1]
    (prepared,) = data.prepare([photo], TINY)
    assert torch.equal(prepared, preprocess([photo.pixels], TINY)[0])
    half = data.prepare([photo], TINY, scales=(0.5,))[0]
    assert half.shape[-2:] == (256, 256)


def test_batches_depend_only_on_seed_and_step():
    images = data.prepare(data.default_photos()[:3], TINY)
    sampler = data.PatchSampler(images, (8, 12), seed=5)
    first = sampler.batch(7, 16)
    assert first.shape == (16, 1, 8, 12)
    assert torch.equal(first, data.PatchSampler(images, (8, 12), seed=5).batch(7, 16))
    assert not torch.equal(first, sampler.batch(8, 16))
    assert not torch.equal(first, data.PatchSampler(images, (8, 12), seed=6).batch(7, 16))
    # every window is a window of one of the images
    window = first[0, 0]
    found = any((image[0].unfold(0, 8, 1).unfold(1, 12, 1) == window).all(-1).all(-1).any() for image in images)
    assert found


def test_shards_tile_the_global_batch():
    batch = torch.arange(12.0).reshape(12, 1, 1, 1)
    assert torch.equal(torch.cat([data.shard(batch, r, 3) for r in range(3)]), batch)
    with pytest.raises(data.DataError, match="multiple"):
        data.shard(batch, 0, 5)
