"""Checkpoints: round trips for both presets, and one clear sentence for every kind of bad file."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save as save_safetensors

import pcmodel
from pcmodel import CheckpointError
from pcmodel.checkpoint import load as load_checkpoint
from pcmodel.config import MAX_STEPS


@pytest.fixture(params=sorted(pcmodel.PRESETS))
def model(request):
    return pcmodel.create(request.param, seed=11)


def test_round_trip(model, tmp_path):
    path = tmp_path / "model.safetensors"
    sha = model.save(path, provenance={"data": "unit test"})
    loaded = pcmodel.load(path)
    assert loaded.config == model.config
    assert sha == loaded.sha256 == model.sha256
    for a, b in zip(model.weights, loaded.weights):
        assert a.numpy().tobytes() == b.numpy().tobytes()
    assert loaded.provenance["data"] == "unit test"
    assert {"date", "code_version"} <= set(loaded.provenance)
    x = torch.randn((2, *model.config.input_shape), generator=torch.Generator().manual_seed(0))
    assert model.infer(x, steps=5).latents[0].equal(loaded.infer(x, steps=5).latents[0])


def test_hash_ignores_provenance_but_not_weights_or_config(model, tmp_path):
    a = model.save(tmp_path / "a.safetensors", provenance={"data": "one"})
    b = model.save(tmp_path / "b.safetensors", provenance={"data": "two"})
    assert a == b
    model.weights[0][0, 0, 0, 0] += 1e-3
    assert model.save(tmp_path / "c.safetensors") != a
    other = pcmodel.PCModel(model.config.replace(steps=7), model.weights)
    assert other.sha256 != model.sha256


def test_file_is_plain_safetensors_with_our_metadata(model, tmp_path):
    path = tmp_path / "m.safetensors"
    model.save(path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header["__metadata__"]
    assert meta["format"] == "pcmodel-checkpoint" and meta["format_version"] == "4"
    assert pcmodel.ModelConfig.from_json(meta["config"]) == model.config
    assert sorted(k for k in header if k != "__metadata__") == [f"level{i + 1}.U" for i in range(model.num_levels)]


def write_checkpoint(path, model, *, tensors=None, config=None, **meta_overrides):
    tensors = tensors if tensors is not None else {f"level{i + 1}.U": w for i, w in enumerate(model.weights)}
    metadata = {
        "format": "pcmodel-checkpoint",
        "format_version": "1",
        "config": config if isinstance(config, str) else (config or model.config).to_json(),
        "provenance": "{}",
        "sha256": model.sha256,
    }
    metadata.update(meta_overrides)
    path.write_bytes(save_safetensors(tensors, metadata=metadata))
    return path


def good_file(tmp_path, name="good.safetensors"):
    model = pcmodel.create("conv-rgb")
    path = tmp_path / name
    model.save(path)
    return model, path


def expect(path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as info:
        pcmodel.load(path)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_missing_file(tmp_path):
    expect(tmp_path / "nope.safetensors", "no such checkpoint file")


def test_a_directory_or_a_fifo_is_named_for_what_it_is(tmp_path):
    assert "no such" not in expect(tmp_path, "is a directory, not a checkpoint file")
    os.mkfifo(tmp_path / "pipe.safetensors")
    assert "no such" not in expect(tmp_path / "pipe.safetensors", "is a named pipe")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    expect(path, "is empty")


@pytest.mark.parametrize("keep", [5, 60, 0.5, 0.99])
def test_truncated_file(tmp_path, keep):
    _, path = good_file(tmp_path)
    data = path.read_bytes()
    cut = keep if isinstance(keep, int) else int(len(data) * keep)
    path.write_bytes(data[:cut])
    expect(path, "truncated|too short")


def test_foreign_file(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.safetensors"
    Image.new("RGB", (4, 4)).save(path, format="PNG")
    expect(path, "not a safetensors file")


def test_foreign_safetensors(tmp_path):
    path = tmp_path / "other.safetensors"
    path.write_bytes(save_safetensors({"weight": torch.zeros(3)}, metadata={"framework": "pt"}))
    expect(path, "not a pcmodel checkpoint")


def test_pickle(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"level1.U": [1.0, 2.0]}, protocol=4))
    expect(path, "pickle")


def test_torch_save_zip(tmp_path):
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    expect(path, "never loads pickles")


def test_mismatched_shapes(tmp_path):
    model = pcmodel.create("conv-rgb")
    first, second = model.config.levels
    bigger = model.config.replace(levels=(dataclasses.replace(first, causes=9), second))
    path = write_checkpoint(tmp_path / "m.safetensors", model, config=bigger)
    expect(path, r"level\d.U has shape .* the config needs")


def test_missing_and_extra_tensors(tmp_path):
    model = pcmodel.create("conv-rgb")
    path = write_checkpoint(tmp_path / "a.safetensors", model, tensors={"level1.U": model.weights[0]})
    expect(path, "missing level2.U")
    tensors = {"level1.U": model.weights[0], "level2.U": model.weights[1], "level3.U": torch.zeros(1)}
    path = write_checkpoint(tmp_path / "b.safetensors", model, tensors=tensors)
    expect(path, "unexpected level3.U")


def test_wrong_dtype(tmp_path):
    model = pcmodel.create("conv-rgb")
    tensors = {"level1.U": model.weights[0].double(), "level2.U": model.weights[1]}
    expect(write_checkpoint(tmp_path / "d.safetensors", model, tensors=tensors), "dtype F64, expected F32")


def test_unknown_format_version(tmp_path):
    model = pcmodel.create("conv-rgb")
    expect(write_checkpoint(tmp_path / "v.safetensors", model, format_version="99"), "format version '99'")


def test_invalid_config(tmp_path):
    model = pcmodel.create("conv-rgb")
    data = json.loads(model.config.to_json())
    data["levels"][0]["sigma2"] = -1
    path = write_checkpoint(tmp_path / "c.safetensors", model, config=json.dumps(data))
    expect(path, "invalid model config: sigma2 must be a positive")


def test_a_config_asking_more_inference_steps_than_the_cap_is_invalid(tmp_path):
    """steps is checked on loading like every other config value (10**23 had grown memory until killed); a model at
    the cap still saves and loads."""
    at_cap = pcmodel.create(pcmodel.get_preset("conv-rgb").replace(steps=MAX_STEPS))
    at_cap.save(tmp_path / "cap.safetensors")
    assert pcmodel.load(tmp_path / "cap.safetensors").config.steps == MAX_STEPS
    data = json.loads(at_cap.config.to_json())
    data["steps"] = 10**23
    path = write_checkpoint(tmp_path / "s.safetensors", at_cap, config=json.dumps(data))
    expect(path, f"invalid model config: steps must be a positive int, at most {MAX_STEPS}, got {10**23}")


def test_tampered_weights(tmp_path):
    _, path = good_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    expect(path, "content hash")


def test_shipped_names_load():
    for name in pcmodel.shipped_models():
        model = pcmodel.load(name)
        assert model.config.name == ("conv-rgb" if name == "default" else name)


def test_unknown_name():
    with pytest.raises(CheckpointError, match="not a model name"):
        pcmodel.load("no-such-model")


def test_low_level_loader_returns_config_and_provenance(tmp_path):
    model, path = good_file(tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt.config == model.config and ckpt.sha256 == model.sha256


def test_format_1_files_keep_loading_with_the_same_identity(tmp_path):
    """A format-1 file (no per-level rates in its config) loads as k1_scale = k2_scale = 1, same hash."""
    preset = pcmodel.get_preset("conv-rgb")
    unit = tuple(dataclasses.replace(lc, k1_scale=1.0, k2_scale=1.0) for lc in preset.levels)
    model = pcmodel.create(preset.replace(levels=unit), seed=3)
    old_json = json.dumps(json.loads(model.config.to_json()), sort_keys=True, separators=(",", ":"))
    assert "k1_scale" not in old_json  # neutral rates are left out of the canonical JSON
    path = write_checkpoint(tmp_path / "v1.safetensors", model, config=old_json, format_version="1")
    loaded = pcmodel.load(path)
    assert loaded.sha256 == model.sha256 and loaded.config == model.config


def test_per_level_rates_are_saved_and_change_the_identity(tmp_path):
    model = pcmodel.create("rao-ballard-1999", seed=3)
    levels = list(model.config.levels)
    levels[1] = dataclasses.replace(levels[1], k1_scale=0.05, k2_scale=20.0)
    ranked = pcmodel.PCModel(model.config.replace(levels=tuple(levels)), model.weights)
    assert ranked.sha256 != model.sha256
    path = tmp_path / "rates.safetensors"
    ranked.save(path)
    loaded = pcmodel.load(path)
    assert (loaded.config.levels[1].k1_scale, loaded.config.levels[1].k2_scale) == (0.05, 20.0)
    assert loaded.sha256 == ranked.sha256
    with pytest.raises(pcmodel.ConfigError, match="k1_scale must be a positive"):
        dataclasses.replace(levels[1], k1_scale=0.0)


def test_column_norm_is_saved_and_changes_the_identity(tmp_path):
    """Format 3: a level's column_norm is in the config and the hash; without one the JSON is as before."""
    model = pcmodel.create("conv-rgb", seed=3)
    assert "column_norm" not in model.config.to_json()
    levels = list(model.config.levels)
    levels[0] = dataclasses.replace(levels[0], column_norm=0.5)
    normed = pcmodel.PCModel(model.config.replace(levels=tuple(levels)), model.weights)
    assert normed.sha256 != model.sha256
    normed.save(tmp_path / "n.safetensors")
    loaded = pcmodel.load(tmp_path / "n.safetensors")
    assert loaded.config.levels[0].column_norm == 0.5 and loaded.sha256 == normed.sha256
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(pcmodel.ConfigError, match="column_norm must be a positive"):
            dataclasses.replace(levels[0], column_norm=bad)


def test_format_2_files_keep_loading_with_the_same_identity(tmp_path):
    """A format-2 file (no column_norm in its config) loads as column_norm = None, same hash."""
    model = pcmodel.create("conv-rgb", seed=3)
    assert "column_norm" not in model.config.to_json()
    path = write_checkpoint(tmp_path / "v2.safetensors", model, format_version="2")
    loaded = pcmodel.load(path)
    assert loaded.sha256 == model.sha256 and all(lc.column_norm is None for lc in loaded.config.levels)
