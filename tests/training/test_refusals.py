"""pc-train, pc-analyze and pc-study refuse out-of-range numbers, broken configs, unwritable output folders and
damaged checkpoints in one line on stderr with exit status 2, before any work (each had been a traceback).

A count of inference steps beyond pcmodel.config.MAX_STEPS is one of them: each step's energy (and in training its
state) is kept, so 10**23 had grown memory until the process was killed. Those cases add --print-config (pc-train)
or an --out that cannot be written (pc-analyze, pc-study), refused later than the count, so that without the cap
they end at once, in another way, rather than start the long run."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

import pcmodel
from pcmodel import LearningConfig
from pcmodel.config import MAX_STEPS
from training import analysis, study
from training.train import main

from .conftest import FAST, TINY

HUGE = "99999999999999999999999"  # past 2**64: overflowed torch and numpy
TOO_MANY_STEPS = str(MAX_STEPS + 1)


def _one_line(capsys, call, prog: str) -> str:
    """Run `call`; assert exit status 2 and a single `prog: ...` line on stderr; return that line."""
    capsys.readouterr()
    try:
        code = call()
    except SystemExit as exit_:  # argparse's refusal
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{prog}: "), (code, err)
    return err[0]


def _fill(argv: list[str], paths: dict[str, str]) -> list[str]:
    """argv with each {name} of the `paths` fixture replaced by its path (other braces are settings' JSON)."""
    return [paths.get(a[1:-1], a) if a.startswith("{") else a for a in argv]


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)  # json.loads ran out of recursion
    big = tmp_path / "big.json"
    with big.open("wb") as file:  # sparse: over the 1 MiB limit without writing it
        file.truncate(2 * 1024 * 1024)
    afile = tmp_path / "afile"
    afile.write_text("x")
    many_steps = tmp_path / "many-steps.json"
    many_steps.write_text(json.dumps({**TINY.to_dict(), "steps": 10**23}))
    return {"deep": str(deep), "big": str(big), "under_file": str(afile / "sub"), "many_steps": str(many_steps)}


TRAIN_CASES = [
    (["--threads", HUGE], "--threads"),
    (["--threads", "1000000"], "--threads"),  # had crashed the process (exit 139)
    (["--seed", HUGE], "--seed"),
    (["--seed", str(2**63)], "--seed"),
    (["--batch-size", HUGE], "--batch-size"),
    (["--k2", "1e300"], "--k2"),
    (["--k1", "1e300"], "--k1"),
    (["--set", "learning.k2=1e300"], "k2"),
    (["--set", "levels.1.k2_scale=1e20", "--k2", "1e20"], "k2_scale"),  # each allowed, their product not
    (["--set", "levels.0={}"], "causes"),
    (["--set", "preprocess.value_range=5"], "preprocess"),
    (["--set", "levels.0.causes=100000000"], "causes"),
    (["--set", "name=" + "[" * 100_000], "--set name"),
    # Each level allowed, but the weights (about 10**15 floats) cannot be allocated: refused, not a RuntimeError
    (["--set", "levels.1.causes=65536", "--set", "input_shape=[1,8,2000000000]"], "allocated"),
    (["--config", "{deep}"], "nested"),
    (["--config", "{big}"], "few KB"),
    (["--out", ""], "--out"),
    (["--out", "{under_file}"], "--out"),
    (["--infer-steps", TOO_MANY_STEPS, "--print-config"], "--infer-steps"),
    (["--infer-steps", str(10**18), "--print-config"], "--infer-steps"),
    (["--set", "steps=" + TOO_MANY_STEPS, "--print-config"], "steps must be a positive int, at most 100000"),
    (["--set", "steps=" + HUGE, "--print-config"], "steps must be a positive int, at most 100000"),
    (["--config", "{many_steps}", "--print-config"], "steps must be a positive int, at most 100000"),
]


@pytest.mark.parametrize(("argv", "names"), TRAIN_CASES)
def test_pc_train_refuses_in_one_line(tmp_path, tiny_config_file, paths, capsys, argv, names):
    argv = _fill(argv, paths)
    source = [] if "--config" in argv else ["--config", str(tiny_config_file)]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
    line = _one_line(capsys, lambda: main([*source, *FAST, *out, *argv]), "pc-train")
    assert names in line
    assert not (tmp_path / "run").exists()


def test_the_learning_rate_decays_to_its_floor_without_overflowing():
    """The paper's schedule over 10**9 inputs: 1.015 ** (10**9 / 40) overflows a float; k2 has decayed to k2_min."""
    learning = LearningConfig(k2=0.1, k2_decay=1.015, k2_decay_every=40, k2_decay_unit="inputs", k2_min=1e-4)
    assert learning.k2_at(updates=10**4, inputs=10**9) == 1e-4


ANALYZE_CASES = [
    (["--threads", HUGE], "--threads"),
    (["--out", ""], "--out"),
    (["--out", "{under_file}"], "--out"),
    (["--out", "/proc/x"], "--out /proc/x"),  # its folder exists but nothing can be made in it
    (["--steps", TOO_MANY_STEPS, "--out", "/proc/x"], "--steps"),
    (["--end-stopping-steps", TOO_MANY_STEPS, "--out", "/proc/x"], "--end-stopping-steps"),
    (["--reference-steps", TOO_MANY_STEPS, "--out", "/proc/x"], "--reference-steps"),
]


@pytest.mark.parametrize(("argv", "names"), ANALYZE_CASES)
def test_pc_analyze_refuses_in_one_line(paths, capsys, argv, names):
    if "/proc/x" in argv and not os.path.isdir("/proc"):
        pytest.skip("no /proc on this system")
    argv = _fill(argv, paths)
    line = _one_line(capsys, lambda: analysis.main(["rao-ballard-1999", "--random-draws", "2", *argv]), "pc-analyze")
    assert names in line


STUDY_CASES = [
    (["--threads", HUGE], "--threads"),
    (["--seeds", HUGE], "--seeds"),
    (["--batch-size", HUGE], "--batch-size"),
    (["--set", "levels.0={}"], "--set levels.0={}"),
    (["--grid", "levels.0={},{}"], "--grid levels.0={}"),
    (["--set", "learning.k2=1e300"], "k2"),
    (["--config", "{deep}"], "nested"),
    (["--config", "{big}"], "few KB"),
    (["--out", ""], "--out"),
    (["--out", "{under_file}"], "--out"),
    (["--out", "/proc/x"], "--out /proc/x"),
    (["--analysis-steps", TOO_MANY_STEPS, "--out", "/proc/x"], "--analysis-steps"),
    (["--end-stopping-steps", TOO_MANY_STEPS, "--out", "/proc/x"], "--end-stopping-steps"),
    (["--set", "steps=" + TOO_MANY_STEPS, "--out", "/proc/x"], "at most 100000"),
    (["--grid", f"steps=10,{TOO_MANY_STEPS}", "--out", "/proc/x"], "--grid steps"),
]


@pytest.mark.parametrize(("argv", "names"), STUDY_CASES)
def test_pc_study_refuses_in_one_line(tmp_path, paths, capsys, argv, names):
    if "/proc/x" in argv and not os.path.isdir("/proc"):
        pytest.skip("no /proc on this system")
    argv = _fill(argv, paths)
    out = [] if "--out" in argv else ["--out", str(tmp_path / "s")]
    line = _one_line(capsys, lambda: study.main([*out, "--updates", "1", *argv]), "pc-study")
    assert names in line
    assert not (tmp_path / "s").exists()


def _damage_options(training: dict) -> None:
    training["options"]["no_such_option"] = 1


def _damage_state(key: str, value: object):
    def damage(training: dict) -> None:
        training["state"][key] = value

    return damage


DAMAGES = {
    "unknown option": _damage_options,
    "no step": lambda t: t.pop("step"),
    "no scales": lambda t: t["options"].pop("scales"),
    "step not a number": lambda t: t.update(step="abc"),
    "step negative": lambda t: t.update(step=-1),
    "state null": lambda t: t.update(state=None),
    "data not an object": lambda t: t.update(data=5),
    "options not an object": lambda t: t.update(options=[1]),
    "batch size zero": lambda t: t["options"].update(batch_size=0),
    "energy a string": _damage_state("energy_average", "high"),
    "commands not a list": _damage_state("commands", 3),
    "seconds a string": _damage_state("seconds", "long"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    config = folder / "tiny.json"
    config.write_text(TINY.to_json())
    assert main(["--config", str(config), *FAST, "--updates", "2", "--out", str(folder / "run")]) == 0
    return folder / "run" / "model.safetensors"


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_of_a_damaged_training_record_is_one_line(tmp_path, trained, capsys, damage):
    model = pcmodel.load(trained)
    training = copy.deepcopy(model.provenance["training"])
    DAMAGES[damage](training)
    path = tmp_path / "model.safetensors"
    model.save(path, {"training": training})
    line = _one_line(capsys, lambda: main(["--resume", str(path), "--updates", "4", *FAST[4:]]), "pc-train")
    assert "training record is damaged" in line and str(path) in line


def test_resume_of_a_record_with_too_many_inference_steps_is_one_line(tmp_path, trained, capsys):
    """A record whose infer_steps is past the cap (an edited file) is damaged like any other bad value. The run is
    at update 2 and --updates 2 asks nothing more, so without the check it would end at once ("nothing to do")."""
    model = pcmodel.load(trained)
    training = copy.deepcopy(model.provenance["training"])
    training["options"]["infer_steps"] = 10**23
    path = tmp_path / "model.safetensors"
    model.save(path, {"training": training})
    line = _one_line(capsys, lambda: main(["--resume", str(path), "--updates", "2", *FAST[4:]]), "pc-train")
    assert "training record is damaged" in line and "infer_steps must be a positive int, at most 100000" in line
