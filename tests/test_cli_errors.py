"""Every console script but pc-serve refuses a wrong invocation in one line on stderr, exit status 2.

A table of wrong invocations, each run in-process as `main(argv)`: the status is 2 (returned or by
SystemExit), stderr is one line `prog: ...` with no traceback, and it names the offending option.
Every mistake here is caught before the command's real work (no training, timing or serving starts),
so the whole table runs in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import bench, loadtest, serve_bench, vs_jax
from pcmodel import cli as encode
from pcmodel import export
from training import analysis, study, train

from .training.conftest import TINY

COMMANDS = {
    "pc-encode": encode.main,
    "pc-export": export.main,
    "pc-train": train.main,
    "pc-analyze": analysis.main,
    "pc-study": study.main,
    "pc-bench": bench.main,
    "pc-serve-bench": serve_bench.main,
    "pc-serve-loadtest": loadtest.main,
    "python -m benchmarks.vs_jax": vs_jax.main,
}

# (command, argv, what the message must name). {name} is a path from the `paths` fixture.
CASES = [
    ("pc-encode", ["--steps", "0"], "--steps"),
    ("pc-encode", ["--steps", "-3"], "--steps"),
    ("pc-encode", ["--steps", "ten"], "--steps"),
    ("pc-encode", ["--steps", "100001"], "--steps"),  # past pcmodel.config.MAX_STEPS: memory grew without end
    ("pc-encode", ["{missing}"], "{missing}"),
    ("pc-encode", ["{folder}"], "image"),
    ("pc-encode", ["{text}"], "{text}"),
    ("pc-encode", ["--model", "no-such-model"], "--model"),
    ("pc-encode", ["--model", "{corrupt}"], "--model"),
    ("pc-encode", ["--size-mode", "fit"], "--size-mode"),
    ("pc-encode", ["--out", "{text}"], "--out"),
    ("pc-export", ["no-such-model", "-o", "{folder}/a.onnx"], "model"),
    ("pc-export", ["{corrupt}", "-o", "{folder}/a.onnx"], "{corrupt}"),
    ("pc-export", ["conv-rgb", "--steps", "0", "-o", "{folder}/a.onnx"], "--steps"),
    ("pc-export", ["conv-rgb", "--steps", "100001", "-o", "{folder}/a.onnx"], "--steps"),
    ("pc-export", ["conv-rgb"], "--output"),
    ("pc-export", ["conv-rgb", "-o", "{missing}/a.onnx"], "--output"),
    ("pc-export", ["conv-rgb", "-o", "{folder}"], "--output"),
    ("pc-export", ["conv-rgb", "--size", "0", "32", "-o", "{folder}/a.onnx"], "--size"),
    ("pc-export", ["conv-rgb", "--size", "33", "32", "-o", "{folder}/a.onnx"], "--size"),
    ("pc-export", ["rao-ballard-1999", "--size", "16", "31", "-o", "{folder}/a.onnx"], "--size"),
    ("pc-train", ["--threads", "0"], "--threads"),
    ("pc-train", ["--updates", "0"], "--updates"),
    ("pc-train", ["--batch-size", "0"], "--batch-size"),
    ("pc-train", ["--infer-steps", "0"], "--infer-steps"),
    ("pc-train", ["--infer-steps", "-5"], "--infer-steps"),
    ("pc-train", ["--seed", "-1"], "--seed"),
    ("pc-train", ["--checkpoint-every", "0"], "--checkpoint-every"),
    ("pc-train", ["--eval-every", "0"], "--eval-every"),
    ("pc-train", ["--log-every", "0"], "--log-every"),
    ("pc-train", ["--check-every", "0"], "--check-every"),
    ("pc-train", ["--k1", "0"], "--k1"),
    ("pc-train", ["--k2", "-1"], "--k2"),
    ("pc-train", ["--k1", "nan"], "--k1"),
    ("pc-train", ["--scales", "2"], "--scales"),
    ("pc-train", ["--scales", "a,b"], "--scales"),
    ("pc-train", ["--preset", "no-such-preset"], "--preset"),
    ("pc-train", ["--preset", "conv-rgb", "--config", "{config}"], "--config"),
    ("pc-train", ["--config", "{missing}"], "--config"),
    ("pc-train", ["--config", "{text}"], "--config"),
    ("pc-train", ["--resume", "{missing}"], "--resume"),
    ("pc-train", ["--resume", "{corrupt}"], "--resume"),
    ("pc-train", ["--set", "levels.0.no_such=1"], "--set"),
    ("pc-train", ["--set", "levels.2.k2_scale=50"], "--set"),  # levels count from 0: was an IndexError
    ("pc-train", ["--set", "levels.1.k1_scale=0"], "k1_scale"),
    ("pc-train", ["--data", "{missing}"], "--data"),
    ("pc-train", ["--data", "{text}"], "--data"),
    ("pc-train", ["--config", "{config}", "--data", "{empty}"], "--data"),
    ("pc-train", ["--config", "{config}", "--data", "{small}"], "--data"),
    ("pc-train", ["--held-out", "{missing}"], "--held-out"),
    ("pc-train", ["--config", "{config}", "--held-out", "{empty}"], "--held-out"),
    ("pc-train", ["--config", "{config}", "--held-out", "{small}"], "--held-out"),
    ("pc-train", ["--out", "{text}"], "--out"),
    ("pc-train", ["--device", "tpu"], "--device"),
    ("pc-analyze", ["rao-ballard-1999", "--steps", "0"], "--steps"),
    ("pc-analyze", ["rao-ballard-1999", "--steps", "-1"], "--steps"),
    ("pc-analyze", ["rao-ballard-1999", "--end-stopping-steps", "0"], "--end-stopping-steps"),
    ("pc-analyze", ["rao-ballard-1999", "--threads", "0"], "--threads"),
    ("pc-analyze", ["no-such-model"], "checkpoint"),
    ("pc-analyze", ["{corrupt}"], "{corrupt}"),
    ("pc-analyze", ["rao-ballard-1999", "--out", "{text}"], "--out"),
    ("pc-analyze", ["rao-ballard-1999", "--random-draws", "0"], "--random-draws"),
    ("pc-study", ["--seeds", "0"], "--out"),
    ("pc-study", ["--out", "{text}"], "--out"),
    ("pc-study", ["--out", "{folder}", "--seeds", "a"], "--seeds"),
    ("pc-study", ["--out", "{folder}", "--updates", "0"], "--updates"),
    ("pc-study", ["--out", "{folder}", "--config", "{missing}"], "--config"),
    ("pc-study", ["--out", "{folder}", "--config", "{text}"], "--config"),
    ("pc-study", ["--out", "{folder}", "--set", "levels.0.no_such=1"], "--set"),
    ("pc-study", ["--out", "{folder}", "--grid", "levels.0.no_such=1,2"], "--grid"),
    ("pc-study", ["--out", "{folder}", "--grid", "k1"], "--grid"),
    ("pc-bench", ["--steps", "0"], "--steps"),
    ("pc-bench", ["--steps", "100001"], "--steps"),
    ("pc-bench", ["--rounds", "0"], "--rounds"),
    ("pc-bench", ["--threads", "0"], "--threads"),
    ("pc-bench", ["--min-time", "-1"], "--min-time"),
    ("pc-bench", ["--peak-size", "0"], "--peak-size"),
    ("pc-bench", ["--backends", "reference,tensorflow"], "--backends"),
    ("pc-bench", ["--case", "conv-rgb:32:1"], "--case"),
    ("pc-bench", ["--case", "conv-rgb:32x32:0"], "--case"),
    ("pc-bench", ["--case", "no-such-model:32x32:1"], "--case"),
    ("pc-bench", ["--case", "conv-rgb:33x32:1"], "--case"),
    ("pc-bench", ["--case", "{corrupt}:32x32:1"], "--case"),
    ("pc-serve-bench", ["--steps", "0"], "--steps"),
    ("pc-serve-bench", ["--steps", "5000"], "--steps"),
    ("pc-serve-bench", ["--size", "0"], "--size"),
    ("pc-serve-bench", ["--size", "4"], "--size"),
    ("pc-serve-bench", ["--requests", "0"], "--requests"),
    ("pc-serve-bench", ["--rounds", "0"], "--rounds"),
    ("pc-serve-bench", ["--concurrency", "1,0"], "--concurrency"),
    ("pc-serve-bench", ["--concurrency", "a"], "--concurrency"),
    ("pc-serve-bench", ["--batch-size", "0"], "--batch-size"),
    ("pc-serve-bench", ["--workers", "0"], "--workers"),
    ("pc-serve-bench", ["--torch-threads", "-1"], "--torch-threads"),
    ("pc-serve-bench", ["--model", "no-such-model"], "--model"),
    ("pc-serve-bench", ["--model", "{corrupt}"], "--model"),
    ("pc-serve-bench", ["--device", "tpu"], "--device"),
    ("pc-serve-bench", ["--size-mode", "fit"], "--size-mode"),
    ("pc-serve-loadtest", ["--clients", "0"], "--clients"),
    ("pc-serve-loadtest", ["--requests", "0"], "--requests"),
    ("pc-serve-loadtest", ["--warmup", "-1"], "--warmup"),
    ("pc-serve-loadtest", ["--url", "localhost:3000"], "--url"),
    ("pc-serve-loadtest", ["--server-pid", "1234"], "--server-pid"),
    ("pc-serve-loadtest", ["--model", "no-such-model"], "--model"),
    ("pc-serve-loadtest", ["--device", "tpu"], "--device"),
    ("python -m benchmarks.vs_jax", ["--threads", "0"], "--threads"),
    ("python -m benchmarks.vs_jax", ["--steps", "0"], "--steps"),
    ("python -m benchmarks.vs_jax", ["--threads", "1025"], "--threads"),
    ("python -m benchmarks.vs_jax", ["--rounds", "0"], "--rounds"),
    ("python -m benchmarks.vs_jax", ["--min-time", "-1"], "--min-time"),
    ("python -m benchmarks.vs_jax", ["--case", "conv-rgb"], "--case"),
    ("python -m benchmarks.vs_jax", ["--case", "no-such-model:32x32:1"], "--case"),
    ("python -m benchmarks.vs_jax", ["--case", "conv-rgb:33x32:1"], "--case"),
]
if not torch.cuda.is_available():
    CASES += [
        ("pc-train", ["--device", "cuda"], "--device"),
        ("pc-serve-bench", ["--device", "cuda"], "--device"),
    ]


@pytest.fixture
def paths(tmp_path):
    """Files and folders the wrong invocations point at."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "small").mkdir()
    for i in range(2):  # smaller than TINY's 8x12 input
        Image.fromarray(np.full((6, 6), 100 + i, dtype=np.uint8)).save(tmp_path / "small" / f"{i}.png")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY.to_dict()))
    return {
        "missing": str(tmp_path / "missing"),
        "folder": str(tmp_path / "folder"),
        "empty": str(tmp_path / "empty"),
        "small": str(tmp_path / "small"),
        "text": str(tmp_path / "text.png"),
        "corrupt": str(tmp_path / "corrupt.safetensors"),
        "config": str(tmp_path / "tiny.json"),
    }


def invoke(command: str, argv: list[str], capsys) -> tuple[int | str | None, str]:
    capsys.readouterr()
    try:
        code = COMMANDS[command](argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("command", "argv", "names"), CASES, ids=[f"{c} {' '.join(a)}" for c, a, _ in CASES])
def test_a_wrong_invocation_is_one_line_and_exit_2(command, argv, names, paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # anything a command wrote by mistake would land here
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()  # process-wide: entry points set them
    argv = [a.format(**paths) for a in argv]
    try:
        code, err = invoke(command, argv, capsys)
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{command}: ")
    assert names.format(**paths) in lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "encoded").exists()


def test_every_command_is_in_the_table():
    assert {c for c, _, _ in CASES} == set(COMMANDS)
