"""Fixtures for the training tests: a miniature of the paper's network that trains in seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pcmodel import LearningConfig, LevelConfig, ModelConfig, PreprocessConfig

# The paper's shape in miniature: three overlapping windowed modules in a row, a dense level above.
TINY = ModelConfig(
    name="tiny-paper",
    input_shape=(1, 8, 12),
    levels=(
        LevelConfig(
            causes=6, kind="modules", kernel=(8, 8), stride=(2, 2), window_sigma=3.0, prior="cauchy",
            alpha=1.0, lam=0.02, init_std=0.1,
        ),
        LevelConfig(causes=8, kind="dense", sigma2=10.0, prior="cauchy", alpha=0.05, lam=0.02, init_std=0.1),
    ),
    k1=0.1,
    steps=20,
    preprocess=PreprocessConfig(
        color="gray", value_range=(0.0, 1.0), filter="dog", normalize="image_std", gain=0.3, size_mode="tile"
    ),
    learning=LearningConfig(k2=0.1),
)  # fmt: skip

# Small, fast runs: every output written, held-out set small.
FAST = ["--updates", "6", "--batch-size", "8", "--eval-every", "3", "--checkpoint-every", "4", "--log-every", "1",
        "--no-progress", "--no-figures", "--threads", "1"]  # fmt: skip


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY.to_dict()))
    return path


def python() -> str:
    return sys.executable
