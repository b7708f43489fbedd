"""Shared fixtures: tiny configs covering every level kind, f and prior, and seeded generators."""

from __future__ import annotations

import pytest
import torch

from pcmodel import LevelConfig, ModelConfig, PreprocessConfig


def tiny_config(kind: str, f: str = "identity", prior: str = "gaussian", **overrides) -> ModelConfig:
    """A two-level network of the given kind with every parameter away from its trivial value."""
    common = dict(f=f, prior=prior)
    # Level 2 steps and learns at its own rate, so every test of the mathematics covers per-level rates.
    rates = dict(k1_scale=2.5, k2_scale=3.0)
    if kind == "convolutional":
        levels = (
            LevelConfig(causes=3, kind="convolutional", kernel=4, stride=2, sigma2=0.7, alpha=0.3, lam=0.05, **common),
            LevelConfig(
                causes=4, kind="convolutional", kernel=3, stride=2, sigma2=2.5, alpha=0.2, lam=0.03, **common, **rates
            ),
        )
        shape, color = (3, 12, 12), "rgb"
    elif kind == "modules":
        # Overlapping modules in both directions, with a window, under a modules level over the grid.
        levels = (
            LevelConfig(
                causes=4,
                kind="modules",
                kernel=6,
                stride=2,
                window_sigma=2.0,
                sigma2=0.8,
                alpha=0.4,
                lam=0.02,
                **common,
            ),
            LevelConfig(
                causes=5, kind="modules", kernel=2, stride=1, sigma2=3.0, alpha=0.1, lam=0.04, **common, **rates
            ),
        )
        shape, color = (1, 10, 10), "gray"
    elif kind == "dense":
        # The paper's shape in miniature: overlapping windowed modules in one row, then a dense level.
        levels = (
            LevelConfig(
                causes=4,
                kind="modules",
                kernel=(8, 8),
                stride=(2, 2),
                window_sigma=3.0,
                sigma2=1.0,
                alpha=0.5,
                lam=0.02,
                **common,
            ),
            LevelConfig(causes=6, kind="dense", sigma2=10.0, alpha=0.05, lam=0.02, **common, **rates),
        )
        shape, color = (1, 8, 12), "gray"
    else:
        raise ValueError(kind)
    values = dict(
        name=f"tiny-{kind}",
        input_shape=shape,
        levels=levels,
        k1=0.01,
        steps=20,
        preprocess=PreprocessConfig(color=color),
    )
    values.update(overrides)
    return ModelConfig(**values)


KINDS = ("convolutional", "modules", "dense")


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
