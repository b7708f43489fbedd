"""Learning the amortised start (training/amortise.py): U untouched, and the shipped amortisers pay."""

from __future__ import annotations

import json

import pytest
import torch

import pcmodel
from benchmarks import amortised as amortised_benchmark
from training import amortise, data
from training.amortise import start_curves, start_report
from training.report import start_markdown
from training.train import main

from .conftest import FAST, TINY


def test_amortise_fits_a_start_and_leaves_u_bit_for_bit(tmp_path):
    model = pcmodel.create(TINY, seed=2)
    path = tmp_path / "tiny.safetensors"
    sha = model.save(path)
    out = tmp_path / "fitted"
    args = ["--amortise", str(path), "--updates", "4", "--batch-size", "8", "--infer-steps", "5", "--eval-every", "2"]
    assert main([*args, "--out", str(out), "--threads", "1"]) == 0
    fitted = pcmodel.load(out / "model.safetensors")
    assert fitted.sha256 == sha and fitted.config == model.config
    for a, b in zip(fitted.weights, model.weights):
        assert a.numpy().tobytes() == b.numpy().tobytes()
    assert fitted.amortiser is not None and float(fitted.amortiser.params["level1.A.out.weight"].abs().max()) > 0
    assert (out / "model.safetensors").read_bytes() != path.read_bytes()  # the file changed, the model did not
    lines = [json.loads(line) for line in (out / "amortise_metrics.jsonl").read_text().splitlines()]
    evaluated = [line for line in lines if "held_out_fit_error_1" in line]
    assert [line["step"] for line in evaluated] == [0, 2, 4]
    assert evaluated[0]["held_out_fit_error_1"] == 1.0  # a fresh amortiser guesses zero: the whole way off
    assert evaluated[-1]["held_out_fit_error_1"] < 1.0
    assert [c["step"] for c in fitted.provenance["amortiser"]["curve"]] == [0, 2, 4]
    assert fitted.provenance["amortiser"]["options"]["updates"] == 4
    # pc-analyze's section: both starts against the fixed point, early stop on three sets, the fit's record.
    report = start_report(fitted, count=16, reference_steps=300)
    assert set(report["steps_used_tol"]) == {"held-out", "noise", "checkerboard"}
    assert report["curves"]["zero"]["latent_distance"][0] == [1.0, 1.0]
    assert [c["step"] for c in report["learning_curve"]] == [0, 2, 4]
    text = "\n".join(start_markdown(report))
    assert "## The amortised start" in text and "| checkerboard |" in text and "| 4 |" in text
    assert set(report["steps_used_own_tol"]) == {"held-out", "noise", "checkerboard"}
    assert start_report(model) is None and "has no amortiser" in "\n".join(start_markdown(None))


def test_fixed_point_targets_are_the_papers_settled_latents_of_one_pool(tmp_path, monkeypatch):
    """--amortise-targets fixed-point: a pool drawn once and settled by the paper's dynamics from zero for
    REFERENCE_STEPS steps (numba where it runs the model, else the loop: the same definition); each update
    fits a batch of the pool. U stays bit for bit; the options are recorded."""
    monkeypatch.setattr(amortise, "REFERENCE_STEPS", 200)  # a tiny model settles in far fewer
    model = pcmodel.load("rao-ballard-1999")
    images = data.prepare(data.default_photos()[:2], model.config)
    size = model.config.input_shape[1:]
    sampler = data.PatchSampler(data.dihedral(images, size), size, seed=5)
    options = amortise.AmortiseOptions(pool=48, targets="fixed-point", updates=3, batch_size=8)
    x, settled = amortise.settled_pool(model, sampler, options)
    assert amortise.settling_backend(model) == "numba" and x.shape == (48, *model.config.input_shape)
    assert torch.equal(x, sampler.batch(0, 48))
    definition = model.infer(x.double(), steps=200, init="zero", solver="gradient", backend="loop").latents
    for got, want in zip(settled, definition):
        assert float((got.double() - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert amortise.settling_backend(pcmodel.load("conv-rgb")) == "loop"  # numba runs no convolutional plan

    tiny = pcmodel.create(TINY, seed=2)
    path = tmp_path / "tiny.safetensors"
    sha = tiny.save(path)
    out = tmp_path / "fitted"
    args = ["--amortise", str(path), "--updates", "4", "--batch-size", "8", "--eval-every", "2", "--threads", "1"]
    fit = ["--amortise-targets", "fixed-point", "--target-pool", "32", "--amortise-floor", "1", "--augment"]
    assert main([*args, *fit, "--out", str(out)]) == 0
    fitted = pcmodel.load(out / "model.safetensors")
    assert fitted.sha256 == sha and all(torch.equal(a, b) for a, b in zip(fitted.weights, tiny.weights))
    recorded = fitted.provenance["amortiser"]["options"]
    recorded = tuple(recorded[k] for k in ("targets", "pool", "floor", "augment"))
    assert recorded == ("fixed-point", 32, 1.0, True)
    curve = fitted.provenance["amortiser"]["curve"]
    assert curve[-1]["held_out_fit_error_1"] < curve[0]["held_out_fit_error_1"] == 1.0  # it learns the fixed points
    # The same command fits the same amortiser (the pool and its batches depend on the seed only).
    again = tmp_path / "again"
    assert main([*args, *fit, "--out", str(again)]) == 0
    params = pcmodel.load(again / "model.safetensors").amortiser.params
    assert all(torch.equal(v, params[k]) for k, v in fitted.amortiser.params.items())


def test_dihedral_gives_each_photo_in_eight_views_that_hold_a_window():
    image = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(2, 5, 7)
    views = data.dihedral([image], (4, 4))
    assert len(views) == 8 and len({v.numpy().tobytes() for v in views}) == 8  # all different
    assert all(sorted(v.flatten().tolist()) == sorted(image.flatten().tolist()) for v in views)  # moved, not changed
    assert [tuple(v.shape[1:]) for v in views[:4]] == [(5, 7), (5, 7), (7, 5), (7, 5)]
    assert len(data.dihedral([image], (4, 6))) == 4  # turned, it is 5 wide: those views are left out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--augment"], "--augment only shape a fit with --amortise CHECKPOINT"),
        (["--amortise-targets", "fixed-point", "--amortise-floor", "1"], "--amortise-targets, --amortise-floor only"),
    ],
)
def test_fit_flags_without_amortise_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--preset", "rao-ballard-1999", "--updates", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_a_target_pool_needs_fixed_point_targets(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    pcmodel.create(TINY, seed=2).save(path)
    assert main(["--amortise", str(path), "--target-pool", "10", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "--target-pool sizes the pool of --amortise-targets fixed-point" in err
    assert len(err.strip().splitlines()) == 1
    fixed = ["--amortise-targets", "fixed-point", "--infer-steps", "5"]
    assert main(["--amortise", str(path), *fixed, "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "--infer-steps sets the hybrid targets' T" in err and len(err.strip().splitlines()) == 1


def test_the_fit_does_not_depend_on_the_dynamics_the_model_is_served_with(tmp_path):
    """The targets settle with the paper's dynamics (TARGET_STEPS plain gradient steps from A's guess): a model
    and its twin served with Nesterov at 7 steps get the same amortiser, bit for bit."""
    model = pcmodel.create(TINY, seed=2)
    fitted = []
    for name, twin in (("paper", model), ("served", model.with_dynamics(steps=7, solver="nesterov"))):
        path = tmp_path / f"{name}.safetensors"
        twin.save(path)
        out = tmp_path / f"fitted-{name}"
        args = ["--amortise", str(path), "--updates", "2", "--batch-size", "4", "--eval-every", "2"]
        assert main([*args, "--out", str(out), "--threads", "1"]) == 0
        fitted.append(pcmodel.load(out / "model.safetensors").amortiser.params)
    assert fitted[0].keys() == fitted[1].keys()
    for key in fitted[0]:
        assert fitted[0][key].numpy().tobytes() == fitted[1][key].numpy().tobytes(), key


def test_the_benchmark_prints_both_starts_as_json(tmp_path, capsys):
    model = pcmodel.create(TINY, seed=2)
    model.amortiser = pcmodel.Amortiser.create(model.config, pcmodel.AmortiserConfig(hidden=4))
    path = tmp_path / "tiny.safetensors"
    model.save(path)
    assert amortised_benchmark.main([str(path), "--crops", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert set(result["curves"]) == {"zero", "amortised", "reach_target_gap"}
    # A fresh amortiser guesses zero, so both starts are the same run.
    assert result["curves"]["zero"]["energy_gap"] == result["curves"]["amortised"]["energy_gap"]
    assert set(result["start_ms_batch1"]) == {"zero", "amortised", "10 steps"}


def test_amortise_refuses_flags_that_would_change_the_model(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    pcmodel.create(TINY).save(path)
    assert main(["--amortise", str(path), "--k1", "0.05", "--out", str(tmp_path / "o")]) == 2
    assert "--amortise leaves the model as it is, so --k1 cannot be given" in capsys.readouterr().err


def test_learning_an_amortiser_alongside_u_leaves_u_on_its_course(tmp_path, tiny_config_file):
    runs = {}
    for name, extra in (("plain", []), ("hybrid", ["--amortiser"])):
        out = tmp_path / name
        assert main(["--config", str(tiny_config_file), *FAST, *extra, "--out", str(out)]) == 0
        runs[name] = pcmodel.load(out / "model.safetensors")
    assert runs["plain"].amortiser is None and runs["hybrid"].amortiser is not None
    assert runs["plain"].sha256 == runs["hybrid"].sha256
    lines = [json.loads(line) for line in (tmp_path / "hybrid" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["amortiser_loss_1"] > 0 for line in lines)
    losses = [line["amortiser_loss_1"] for line in lines]
    assert losses[-1] < losses[0]  # it learns
    # A run that learns one resumes learning it; one that does not cannot start mid-way.
    assert main(["--resume", str(tmp_path / "hybrid" / "model.safetensors"), "--updates", "8"]) == 0
    assert main(["--resume", str(tmp_path / "plain" / "model.safetensors"), "--updates", "8", "--amortiser"]) == 2


@pytest.mark.parametrize("name", ["conv-rgb", "rao-ballard-1999"])
def test_the_shipped_amortisers_beat_the_zero_start_on_held_out_crops(name):
    model = pcmodel.load(name)
    assert model.amortiser is not None
    paper = model.with_dynamics(steps=100, init="zero", solver="gradient")  # the U the amortiser was fitted to
    assert paper.sha256.startswith({"conv-rgb": "c11f80838d11", "rao-ballard-1999": "3e25d53eae7a"}[name])
    x = data.held_out_windows(model.config, 64)
    fixed = model.infer(x, steps=500, init="zero", backend="loop", solver="gradient").energy[-1]  # near E*
    zero, amortised = (
        model.infer(x, steps=10, init=init, backend="loop", solver="gradient").energy[-1]
        for init in ("zero", "amortised")
    )
    # Both starts settle to the same fixed point: the median gap per window, and the gap of the mean
    # energy (where the high-contrast windows weigh in), are both smaller from the amortised start.
    assert float(((amortised - fixed) / fixed).median()) < 0.8 * float(((zero - fixed) / fixed).median())
    assert float(amortised.mean() - fixed.mean()) < 0.5 * float(zero.mean() - fixed.mean())


def test_start_curves_measure_against_the_fixed_point():
    model = pcmodel.load("conv-rgb")
    x = data.held_out_windows(model.config, 8)
    fixed = model.infer(x, steps=300, init="zero", backend="loop")
    curves = start_curves(model, x, fixed, inits=("zero",))
    gaps = list(curves["zero"]["energy_gap"].values())
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0.5  # from zero the gap only falls
    distance = curves["zero"]["latent_distance"]
    assert distance[0] == [1.0, 1.0]  # the zero start is the whole fixed point away
    assert torch.tensor(distance[100]).max() < 0.2
