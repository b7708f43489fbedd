"""Named configurations: the paper's network and a convolutional network for colour images.

Every field has a concrete value here, so a preset alone defines inference, learning and the
preprocessing of images. The values and how they were chosen are recorded in docs/TRAINING.md.
"""

from __future__ import annotations

from .config import ConfigError, LearningConfig, LevelConfig, ModelConfig, PreprocessConfig

RAO_BALLARD_1999 = ModelConfig(
    name="rao-ballard-1999",
    input_shape=(1, 16, 26),  # one 16x26 patch: three 16x16 modules at horizontal offsets 0, 5, 10
    levels=(
        # Level 1: three modules sharing one U (one basis to show, as in the paper's Fig. 2b), each
        # predicting its own windowed 16x16 patch. The sparse (Cauchy) prior gives localised,
        # oriented fields; a Gaussian one gives global PCA-like patterns (MODEL.md section 4).
        LevelConfig(
            causes=32,
            kind="modules",
            kernel=(16, 16),
            stride=(5, 5),
            f="identity",
            sigma2=1.0,
            prior="cauchy",
            alpha=1.0,
            lam=0.02,
            window_sigma=5.0,
            init_std=0.05,
        ),
        # Level 2: 128 causes predicting all 96 level-1 causes, sigma_td^2 = 10.
        LevelConfig(
            causes=128, kind="dense", f="identity", sigma2=10.0, prior="cauchy", alpha=0.05, lam=0.02, init_std=0.05
        ),
    ),
    k1=0.1,
    steps=100,
    initial_latents="zeros",
    preprocess=PreprocessConfig(
        color="gray",
        value_range=(0.0, 1.0),
        filter="dog",
        dog_sigmas=(1.3, 2.6),
        normalize="image_std",
        gain=1.0,
        size_mode="tile",
    ),
    learning=LearningConfig(k2=0.2, k2_decay=1.015, k2_decay_every=40, k2_decay_unit="inputs", k2_min=0.0),
)

CONV_RGB = ModelConfig(
    name="conv-rgb",
    input_shape=(3, 32, 32),
    levels=(
        LevelConfig(
            causes=8,
            kind="convolutional",
            kernel=(8, 8),
            stride=(4, 4),
            f="tanh",
            sigma2=1.0,
            prior="gaussian",
            alpha=0.01,
            lam=0.001,
        ),
        LevelConfig(
            causes=10,
            kind="convolutional",
            kernel=(3, 3),
            stride=(2, 2),
            f="tanh",
            sigma2=10.0,
            prior="gaussian",
            alpha=0.01,
            lam=0.001,
        ),
    ),
    k1=0.05,
    steps=100,
    initial_latents="zeros",
    preprocess=PreprocessConfig(
        color="rgb", value_range=(-1.0, 1.0), filter="none", normalize="none", size_mode="resize"
    ),
    learning=LearningConfig(k2=0.05, k2_decay=1.0, k2_decay_every=1, k2_decay_unit="updates"),
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (RAO_BALLARD_1999, CONV_RGB)}


def get_preset(name: str) -> ModelConfig:
    """The named preset's config; the error lists the names that exist."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
