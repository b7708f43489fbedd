"""Parameters by name (pcmodel/parameters.py): declared once, stored and hashed by name, old files unchanged."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import pcmodel
from pcmodel.parameters import parameter_specs

from .conftest import tiny_config


def test_a_model_holds_its_parameters_by_name_and_weights_is_their_view():
    model = pcmodel.create("rao-ballard-1999")
    assert list(model.params) == ["level1.U", "level2.U"]
    assert [s.name for s in parameter_specs(model.config)] == list(model.params)
    assert all(w is model.params[f"level{i}.U"] for i, w in enumerate(model.weights, 1))
    model.weights = [w * 2 for w in model.weights]  # assigning the view replaces the named tensors
    assert torch.equal(model.params["level1.U"], model.weights[0])


def test_a_checkpoint_stores_each_parameter_under_its_name(tmp_path):
    model = pcmodel.create(tiny_config("dense"), seed=4)
    path = tmp_path / "m.safetensors"
    sha = model.save(path)
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(model.params)
    loaded = pcmodel.load(path)
    assert loaded.sha256 == sha == model.sha256
    assert all(torch.equal(loaded.params[k], v) for k, v in model.params.items())


def test_a_model_from_named_parameters_equals_one_from_the_list():
    model = pcmodel.load("conv-rgb")
    named = pcmodel.PCModel(model.config, model.params, amortiser=model.amortiser)
    listed = pcmodel.PCModel(model.config, model.weights, amortiser=model.amortiser)
    assert named.sha256 == listed.sha256 == model.sha256
    with pytest.raises(pcmodel.ConfigError, match=r"missing level2\.U; unexpected level2\.V"):
        pcmodel.PCModel(model.config, {"level1.U": model.weights[0], "level2.V": model.weights[1]})
    with pytest.raises(pcmodel.ConfigError, match="parameters have shapes"):
        pcmodel.PCModel(model.config, {"level1.U": model.weights[1], "level2.U": model.weights[0]})


def test_the_shipped_checkpoints_keep_their_hashes():
    """The content hash covers the parameters by name in declared order: the same bytes as before names. The
    shipped files are served with faster dynamics (issue 21: another config, so another hash); with the
    paper's dynamics they are the models of before, hash for hash."""
    for name, served, paper in (("conv-rgb", "46aed78b201d", "c11f80838d11"),
                                ("rao-ballard-1999", "b879501d2409", "3e25d53eae7a")):  # fmt: skip
        model = pcmodel.load(name)
        assert model.sha256.startswith(served)
        assert model.with_dynamics(steps=100, init="zero", solver="gradient").sha256.startswith(paper)
