"""Real servers for the service tests: `pc-serve` in a subprocess on a free port, its own BENTOML_HOME.

Servers are session-scoped (a start costs ~5-10 s on 2 cores): `server` runs the default model with
default limits; `unstable_server` runs a diverging checkpoint with two workers; `guarded_server` has an API
key and small limits. /metrics is read
with prometheus_client's own parser.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import pcmodel
from benchmarks.launch import LocalServer
from pcmodel import PCModel


class Server(LocalServer):
    """A running pc-serve with request and /metrics helpers."""

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, timeout=120, **kwargs)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample at /metrics: {(name, sorted labels): value}."""
        text = self.get("/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    """The default model with default limits, plus one warmed extra step count."""
    with Server(tmp_path_factory.mktemp("server"), warmup_steps="20") as s:
        yield s


API_KEY = "v2-test-key-0123456789"


@pytest.fixture(scope="session")
def guarded_server(tmp_path_factory) -> Iterator[Server]:
    """An API key (from a file, as a Kubernetes Secret mounts it), a small body limit, a tiny queue and a
    batching wait (so concurrent requests meet in one model call)."""
    home = tmp_path_factory.mktemp("guarded")
    (home / "key").write_text(API_KEY + "\n")
    settings = {"max_body_bytes": 100_000, "max_batch_size": 2, "max_queue": 4, "batch_wait_ms": 300}
    with Server(home, api_key_file=home / "key", **settings) as s:
        yield s


def diverging_checkpoint(path: Path) -> Path:
    """conv-rgb with linear f and weights x10: k1 is far above the stability bound, inference overflows."""
    base = pcmodel.create("conv-rgb")
    config = base.config.replace(
        name="diverging", levels=tuple(replace(level, f="identity") for level in base.config.levels)
    )
    PCModel(config, [u * 10 for u in base.weights], allow_unstable=True).save(path, {"note": "diverges on purpose"})
    return path


@pytest.fixture(scope="session")
def unstable_checkpoint(tmp_path_factory) -> Path:
    return diverging_checkpoint(tmp_path_factory.mktemp("ckpt") / "diverging.safetensors")


@pytest.fixture(scope="session")
def unstable_server(tmp_path_factory, unstable_checkpoint) -> Iterator[Server]:
    """A diverging checkpoint served with PC_ALLOW_UNSTABLE, on two worker processes."""
    home = tmp_path_factory.mktemp("unstable")
    with Server(home, model=unstable_checkpoint, allow_unstable=True, workers=2) as s:
        yield s


# ---- images ------------------------------------------------------------------------------------------


def png(image: Image.Image | np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # (512, 512, 3) uint8, public domain


@pytest.fixture(scope="session")
def astronaut64(astronaut) -> bytes:
    return png(Image.fromarray(astronaut).resize((64, 64), Image.Resampling.BICUBIC))


@pytest.fixture(scope="session")
def china_jpeg() -> bytes:
    """scikit-learn's bundled sample photo (china.jpg, 427x640), cropped and re-encoded as JPEG."""
    from sklearn.datasets import load_sample_image

    return png(Image.fromarray(load_sample_image("china.jpg")).crop((100, 100, 196, 164)), "JPEG", quality=90)
