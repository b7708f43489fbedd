"""pc-export: the written ONNX file computes the fixed-T inference (onnxruntime vs torch within 1e-4)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import pcmodel
from pcmodel.engines.onnx_graph import build_graph
from pcmodel.engines.plans import make_plan
from pcmodel.export import main
from pcmodel.solvers import float32_tolerance

from .conftest import tiny_config


def run_file(path, x: torch.Tensor) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"x": x.numpy()})))


@pytest.mark.parametrize("preset", sorted(pcmodel.PRESETS))
def test_pc_export_writes_the_documented_graph_and_matches_torch(preset, tmp_path, capsys, generator):
    path = tmp_path / f"{preset}.onnx"
    assert main([preset, "--steps", "100", "-o", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    served = pcmodel.load(preset).solver()
    assert summary["max_abs_difference"] <= float32_tolerance(served, 100.0)  # pc-export's own check ran
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    levels = len(pcmodel.get_preset(preset).levels)
    assert [i.name for i in model.graph.input] == ["x"]  # the weights are inside the file
    assert [o.name for o in model.graph.output] == [f"latent_{i + 1}" for i in range(levels)] + [
        "energy",
        "reconstruction",
    ]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = {p.key: p.value for p in model.metadata_props}
    torch_model = pcmodel.load(preset)
    assert meta["model"] == preset and meta["steps"] == "100" and meta["sha256"] == torch_model.sha256
    config = torch_model.config
    assert meta["solver"] == config.served_solver.label and meta["init"] == config.initial_latents
    assert meta["k1_per_level"] == ",".join(f"{config.k1 * lc.k1_scale:g}" for lc in config.levels)
    assert summary["k1_per_level"] == pytest.approx([config.k1 * lc.k1_scale for lc in config.levels])
    for batch in (1, 3):  # the batch axis is dynamic
        x = torch.rand((batch, *torch_model.config.input_shape), generator=generator) * 2 - 1
        values = run_file(path, x)
        expected = torch_model.infer(x, steps=100, backend="loop")
        tolerance = float32_tolerance(served, max(float(r.abs().max()) for r in expected.latents))
        for i, r in enumerate(expected.latents):
            assert values[f"latent_{i + 1}"].shape == tuple(r.shape)
            assert np.abs(values[f"latent_{i + 1}"] - r.numpy()).max() <= tolerance
        assert values["energy"].shape == (101, batch)
        np.testing.assert_allclose(values["energy"], expected.energy.numpy(), rtol=1e-4)
        assert np.abs(values["reconstruction"] - expected.reconstruction.numpy()).max() <= tolerance


@pytest.mark.parametrize("kind", ["convolutional", "modules"])
def test_a_model_served_from_its_amortised_start_exports_the_start_in_the_graph(kind, tmp_path, capsys, generator):
    """The graph computes the amortised guess from x (pcmodel.amortiser's one definition): its latents match
    the model's own call, which starts there, and not a zero start's."""
    from pcmodel.amortiser import Amortiser

    config = tiny_config(kind, "tanh", "cauchy")
    model = pcmodel.create(config, seed=1)
    model.amortiser = Amortiser.create(config, seed=2)
    for t in model.amortiser.params.values():
        t.normal_(generator=generator).mul_(0.3)  # a guess far from zero
    served = model.with_dynamics(steps=6, init="amortised", solver="nesterov")
    checkpoint = tmp_path / "served.safetensors"
    served.save(checkpoint)
    path = tmp_path / "served.onnx"
    assert main([str(checkpoint), "-o", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_difference"] <= 1e-4
    graph = onnx.load(str(path))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["init"] == "amortised" and "level1.A.in.weight" in meta["parameters"].split(",")
    assert [i.name for i in graph.graph.input] == ["x"]
    x = torch.randn((2, *config.input_shape), generator=generator)
    values = run_file(path, x)
    expected = served.infer(x, backend="loop")
    cold = served.infer(x, backend="loop", init="zero")
    got = values["latent_1"]
    assert np.abs(got - expected.latents[0].numpy()).max() <= 1e-4
    assert np.abs(got - cold.latents[0].numpy()).max() > 1e-3


def test_export_at_another_size_and_of_a_modules_hierarchy(tmp_path, capsys, generator):
    path = tmp_path / "conv.onnx"
    assert main(["conv-rgb", "--steps", "5", "--size", "64", "48", "-o", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["input"] == ["batch", 3, 64, 48]
    x = torch.rand((2, 3, 64, 48), generator=generator) * 2 - 1
    values = run_file(path, x)
    expected = pcmodel.load("conv-rgb").infer(x, steps=5, backend="loop")
    assert np.abs(values["reconstruction"] - expected.reconstruction.numpy()).max() <= 1e-4
    # A tanh modules hierarchy takes the levelwise graph (unfold and fold as convolutions).
    model = pcmodel.create(tiny_config("modules", "tanh", "cauchy"))
    graph = build_graph(make_plan(model.config, model.weights, (10, 10), torch.float32, torch.device("cpu")), 7)
    path = tmp_path / "modules.onnx"
    path.write_bytes(graph.SerializeToString())
    x = torch.randn((3, 1, 10, 10), generator=generator)
    values = run_file(path, x)
    expected = model.infer(x, steps=7, backend="loop")
    for i, r in enumerate(expected.latents):
        assert np.abs(values[f"latent_{i + 1}"] - r.numpy()).max() <= 1e-4
    assert np.abs(values["reconstruction"] - expected.reconstruction.numpy()).max() <= 1e-4


def test_pc_export_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-model", "-o", str(tmp_path / "a.onnx")])
    assert exit_.value.code == 2 and "not a model name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["conv-rgb", "--steps", "0", "-o", str(tmp_path / "b.onnx")])
    assert exit_.value.code == 2 and "--steps: must be at least 1" in capsys.readouterr().err
    assert main(["rao-ballard-1999", "--size", "16", "31", "-o", str(tmp_path / "c.onnx")]) == 2
    err = capsys.readouterr().err
    assert "--size 16 31" in err and "dense" in err
    assert not any(tmp_path.iterdir())
