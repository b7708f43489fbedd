"""python -m training.served: a checkpoint's served dynamics set, its weights and amortiser bit for bit."""

from __future__ import annotations

import pytest
import torch

import pcmodel
from training.served import main

from .conftest import TINY


def test_served_sets_the_dynamics_and_keeps_the_weights(tmp_path, capsys):
    model = pcmodel.create(TINY, seed=3)
    path = tmp_path / "tiny.safetensors"
    sha = model.save(path, provenance={"command": "pc-train --preset tiny"})
    out = tmp_path / "served.safetensors"
    assert main([str(path), "--steps", "12", "--solver", "nesterov", "--momentum", "0.75", "--out", str(out)]) == 0
    assert "nesterov(0.75)" in capsys.readouterr().out
    served = pcmodel.load(out)
    assert (served.config.steps, served.config.solver, served.config.momentum) == (12, "nesterov", 0.75)
    assert served.config.replace(steps=model.config.steps, solver="gradient", momentum=model.config.momentum) == (
        model.config
    )
    assert all(torch.equal(a, b) for a, b in zip(served.weights, model.weights)) and served.sha256 != sha
    assert served.provenance["command"] == "pc-train --preset tiny"  # the training's own record stays
    assert served.provenance["served"]["from_sha256"] == sha and "--steps 12" in served.provenance["served"]["command"]
    assert served.infer(torch.zeros(1, *TINY.input_shape)).latents[0].abs().max() == 0  # runs: zero in, zero out


def test_served_sets_anderson_with_its_window(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    pcmodel.create(TINY, seed=3).save(path)
    out = tmp_path / "served.safetensors"
    assert main([str(path), "--solver", "anderson", "--window", "3", "--out", str(out)]) == 0
    assert "anderson(3)" in capsys.readouterr().out
    served = pcmodel.load(out)
    assert (served.config.solver, served.config.window) == ("anderson", 3)
    assert served.solver() == pcmodel.Solver("anderson", window=3)
    back = tmp_path / "back.safetensors"  # and back to the paper's dynamics: the window's neutral value again
    assert main([str(out), "--solver", "gradient", "--out", str(back)]) == 0
    assert pcmodel.load(back).config == pcmodel.load(path).config


def test_served_sets_level_steps_and_the_gradient_clears_them(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    pcmodel.create(TINY, seed=3).save(path)
    out = tmp_path / "served.safetensors"
    argv = [str(path), "--solver", "nesterov", "--momentum", "0.5", "--level-steps", "1", "1.5", "--out", str(out)]
    assert main(argv) == 0
    assert "nesterov(0.5; level steps 1/1.5)" in capsys.readouterr().out
    served = pcmodel.load(out)
    assert served.config.level_steps == (1.0, 1.5) and served.solver() == pcmodel.Solver("nesterov", 0.5, 0, (1, 1.5))
    back = tmp_path / "back.safetensors"
    assert main([str(out), "--solver", "gradient", "--out", str(back)]) == 0
    assert pcmodel.load(back).config == pcmodel.load(path).config  # the neutral value again: the old hash


@pytest.mark.parametrize(
    "argv",
    [
        ["--solver", "nesterov", "--level-steps", "1", "0"],
        ["--solver", "nesterov", "--level-steps", "1", "2", "3"],
        ["--solver", "gradient", "--level-steps", "1", "2"],
        ["--init", "amortised"],
        ["--momentum", "1.5"],
        ["--solver", "newton"],
        ["--steps", "0"],
        ["--steps", "100001"],  # past pcmodel.config.MAX_STEPS
        ["--window", "0"],
        ["--solver", "anderson", "--window", "9"],
    ],
)
def test_served_refuses_a_bad_setting_in_one_line(tmp_path, capsys, argv):
    path = tmp_path / "tiny.safetensors"
    pcmodel.create(TINY, seed=3).save(path)
    try:
        code = main([str(path), *argv, "--out", str(tmp_path / "x.safetensors")])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and not (tmp_path / "x.safetensors").exists()
    err = capsys.readouterr().err.strip()
    assert err and "Traceback" not in err and len(err.splitlines()) <= 3
