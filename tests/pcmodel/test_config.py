"""Configs: presets complete and JSON round-trippable; invalid configs fail with a message naming the fix."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pcmodel
from pcmodel import ConfigError, LevelConfig, ModelConfig
from pcmodel.config import MAX_STEPS, level_shapes, valid_sizes

from .conftest import KINDS, tiny_config


@pytest.mark.parametrize("name", sorted(pcmodel.PRESETS))
def test_presets_round_trip_through_json(name):
    config = pcmodel.get_preset(name)
    assert ModelConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("name", sorted(pcmodel.PRESETS))
def test_presets_set_every_field(name):
    """No preset leaves a field to a default it never chose: every value is concrete."""

    def walk(obj, path):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{path}.{f.name}")
            elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
                for i, v in enumerate(value):
                    walk(v, f"{path}.{f.name}[{i}]")

    walk(pcmodel.get_preset(name), name)
    paper = pcmodel.get_preset("rao-ballard-1999")
    assert paper.input_shape == (1, 16, 26)
    assert [g.latent for g in level_shapes(paper)] == [(32, 1, 3), (128, 1, 1)]
    conv = pcmodel.get_preset("conv-rgb")
    assert [g.latent for g in level_shapes(conv)] == [(8, 7, 7), (10, 3, 3)]


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_configs_round_trip(kind):
    config = tiny_config(kind, "tanh", "cauchy")
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(sigma2=0.0), "sigma2 must be a positive"),
        (dict(sigma2=-2.0), "sigma2 must be a positive"),
        (dict(f="relu"), "unknown nonlinearity f 'relu'; choose one of: identity, tanh"),
        (dict(prior="laplace"), "unknown prior 'laplace'; choose one of: gaussian, cauchy"),
        (dict(kind="pooling"), "unknown level kind 'pooling'"),
        (dict(alpha=-1.0), "alpha must be a finite number >= 0"),
        (dict(causes=0), "causes must be a positive int"),
        (dict(window_sigma=2.0), "window_sigma applies to modules levels only"),
    ],
)
def test_invalid_levels(change, message):
    base = dict(causes=3, kind="convolutional", kernel=4, stride=2)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        LevelConfig(**{**base, **change})


def test_shapes_that_do_not_tile():
    with pytest.raises(
        ConfigError,
        match=r"level 1 does not tile the input: height 30 with kernel 8 and stride 4 needs height = 8 \+ 4\*n "
        r"\(nearest: 28 or 32\)",
    ):
        pcmodel.get_preset("conv-rgb").replace(input_shape=(3, 30, 32))
    with pytest.raises(ConfigError, match="level 2 does not tile the level 1 map"):
        pcmodel.get_preset("conv-rgb").replace(input_shape=(3, 36, 36))


def test_channels_must_match_the_colour_mode():
    with pytest.raises(ConfigError, match=r"1 channel.*gives 3"):
        pcmodel.get_preset("conv-rgb").replace(input_shape=(1, 32, 32))


def test_unknown_json_fields_are_errors():
    data = pcmodel.get_preset("conv-rgb").to_dict()
    data["levels"][0]["sigma"] = 1.0
    with pytest.raises(ConfigError, match=r"unknown field.*in level 1: sigma"):
        ModelConfig.from_dict(data)
    data = pcmodel.get_preset("conv-rgb").to_dict()
    data["learning_rate"] = 1
    with pytest.raises(ConfigError, match=r"unknown field.*learning_rate"):
        ModelConfig.from_dict(data)


def test_bad_model_settings():
    conv = pcmodel.get_preset("conv-rgb")
    with pytest.raises(ConfigError, match="k1 must be a positive"):
        conv.replace(k1=0)
    with pytest.raises(ConfigError, match="unknown initial_latents 'random'"):
        conv.replace(initial_latents="random")
    with pytest.raises(ConfigError, match="steps must be a positive int"):
        conv.replace(steps=0)
    assert conv.replace(steps=MAX_STEPS).steps == MAX_STEPS == 100_000
    for steps in (MAX_STEPS + 1, 10**23):  # each step's energy is kept: 10**23 had grown memory until killed
        with pytest.raises(ConfigError, match=f"steps must be a positive int, at most {MAX_STEPS}, got {steps}"):
            conv.replace(steps=steps)
        with pytest.raises(ConfigError, match=f"at most {MAX_STEPS}"):
            ModelConfig.from_dict({**conv.to_dict(), "steps": steps})
    model = pcmodel.create("conv-rgb")  # model.infer's own steps are bounded the same way
    with pytest.raises(ValueError, match=f"steps must be from 0 to {MAX_STEPS}, got {MAX_STEPS + 1}"):
        model.infer(torch.zeros(1, *model.config.input_shape), steps=MAX_STEPS + 1)
    with pytest.raises(ConfigError, match="unknown preset 'cifar'; presets: rao-ballard-1999, conv-rgb"):
        pcmodel.get_preset("cifar")


def test_valid_sizes_of_the_convolutional_preset():
    conv = pcmodel.get_preset("conv-rgb")
    (first, period), _ = valid_sizes(conv)
    assert (first, period) == (16, 8)
    for size in range(first, 120, period):
        level_shapes(conv, (size, size))  # tiles
    with pytest.raises(ConfigError):
        level_shapes(conv, (first + period // 2, first))


def test_dense_models_take_their_native_size_only():
    paper = pcmodel.get_preset("rao-ballard-1999")
    assert valid_sizes(paper) == ((16, 0), (26, 0))
    with pytest.raises(ConfigError, match="must be 16x26"):
        level_shapes(paper, (16, 31))


def test_k2_schedule():
    # The paper's schedule (the preset applies the same factor per update, see docs/TRAINING.md).
    paper = pcmodel.LearningConfig(k2=0.2, k2_decay=1.015, k2_decay_every=40, k2_decay_unit="inputs")
    assert paper.k2_at(updates=0, inputs=39) == paper.k2
    assert paper.k2_at(updates=1, inputs=40) == pytest.approx(paper.k2 / 1.015)
    assert paper.k2_at(updates=2, inputs=400) == pytest.approx(paper.k2 / 1.015**10)
