"""Level kinds (pcmodel/kinds.py): a kind written as one class and registered reaches the config, the
definition and every backend. Each kind's maps are held to autograd in test_math.py (adjoints) and every
backend to the loop in test_backends.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pcmodel
from pcmodel import kinds
from pcmodel.engines import plans

from .conftest import tiny_config
from .test_backends import assert_same_inference, fast_backends


class DirectConvolutional(kinds.Convolutional):
    """The convolutional maps without the phase layout at level 1: a kind with other plan maps."""

    name = "convolutional-direct"

    def plan_maps(self, level, U, first):
        return super().plan_maps(level, U, first=False)


@pytest.fixture
def direct_kind(monkeypatch):
    monkeypatch.setitem(kinds.LEVEL_KINDS, DirectConvolutional.name, DirectConvolutional())


def test_a_registered_kind_runs_on_every_backend(direct_kind, generator):
    base = tiny_config("convolutional", "tanh", "cauchy")
    levels = (dataclasses.replace(base.levels[0], kind=DirectConvolutional.name), base.levels[1])
    config = base.replace(levels=levels)
    weights = [torch.randn(s, generator=generator) * 0.4 for s in pcmodel.PCModel.weight_shapes(config)]
    model = pcmodel.PCModel(config, weights, allow_unstable=True)
    model = pcmodel.PCModel(config.replace(k1=0.8 * model.stability_bound()), weights, allow_unstable=True)
    plan = plans.make_plan(config, model.params, config.input_shape[1:], torch.float32, torch.device("cpu"))
    assert not plan.levels[0].phase  # its own plan maps
    x = torch.randn((3, *config.input_shape), generator=generator)
    expected = model.infer(x, backend="loop")
    for backend in fast_backends(model):
        assert_same_inference(model.infer(x, backend=backend), expected)
    # The same mathematics as the convolutional kind: the same latents through the phase layout.
    phased = pcmodel.PCModel(base.replace(k1=model.config.k1), weights, allow_unstable=True)
    assert_same_inference(phased.infer(x, backend="onnxruntime"), expected)


def test_an_unknown_kind_is_a_config_error_listing_the_registry():
    with pytest.raises(
        pcmodel.ConfigError, match="unknown level kind 'strided'; choose one of: " + ", ".join(kinds.LEVEL_KINDS)
    ):
        pcmodel.LevelConfig(causes=2, kind="strided", kernel=2)
