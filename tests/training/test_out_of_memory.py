"""A pc-train run that runs out of memory ends with one line naming what to lower, exit status 1 (a resource failure,
not a mistake in the command), instead of torch's traceback.

Real runs in a subprocess whose address space is capped (RLIMIT_AS, Linux): the allocation that does not fit fails
at once, without touching the memory it asks for, so the test is cheap and safe on a shared machine. The same cap
first lets a run of an ordinary size finish, so the failure is the one the flags ask for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pcmodel
from pcmodel import LearningConfig, LevelConfig, ModelConfig, PreprocessConfig

resource = pytest.importorskip("resource")
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS caps the address space on Linux only")

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 3 * 2**30  # address space: an ordinary run of WIDE below peaked at 1.2 GiB
# One convolutional level over 128x128 windows (64 KiB each), so that a large batch is one large allocation.
WIDE = ModelConfig(
    name="wide-window",
    input_shape=(1, 128, 128),
    levels=(LevelConfig(causes=4, kind="convolutional", kernel=(8, 8), init_std=0.1),),
    k1=0.005,
    steps=5,
    preprocess=PreprocessConfig(color="gray", value_range=(0.0, 1.0)),
    learning=LearningConfig(k2=0.01),
)
QUIET = ["--no-progress", "--no-figures", "--device", "cpu", "--threads", "1"]


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def pc_train(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA driver to start inside the capped address space
    command = [sys.executable, "-m", "training.train", *argv, *QUIET]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=_limit)


def _last_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert sum(line.startswith("pc-train: ") for line in lines) == 1, lines  # the reason once, in the last line
    assert not any("Error" in line for line in lines), lines  # nor torch's RuntimeError, nor a MemoryError
    return lines[-1]


def test_running_out_of_memory_is_one_line_naming_what_to_lower(tmp_path):
    config = tmp_path / "wide.json"
    config.write_text(WIDE.to_json())
    ordinary = pc_train("--config", str(config), "--updates", "1", "--batch-size", "8", "--out", str(tmp_path / "a"))
    assert ordinary.returncode == 0, ordinary.stderr[-2000:]  # the cap leaves room for a run of an ordinary size

    # 100,000 windows of 64 KiB: the batch alone is 6.1 GiB
    huge = pc_train("--config", str(config), "--updates", "1", "--batch-size", "100000", "--out", str(tmp_path / "b"))
    line = _last_line(huge)
    assert line.startswith("pc-train: out of memory at update 1 (batches of 100000 inputs of 1x128x128, T = 5 ")
    assert line.endswith("lower --batch-size (now 100000) or --infer-steps (now 5)")

    # --amortise: an amortiser with 200,000 hidden channels (its middle map alone is 1.3 TiB)
    model = tmp_path / "a" / "model.safetensors"
    fit = pc_train(
        "--amortise", str(model), "--updates", "1", "--amortise-hidden", "200000", "--out", str(tmp_path / "c")
    )
    line = _last_line(fit)
    assert line.startswith("pc-train: out of memory fitting the amortiser (hidden 200000, batches of 8 inputs")
    assert "lower --amortise-hidden (now 200000), --batch-size (now 8) or --infer-steps (now 100)" in line
    assert not (tmp_path / "c" / "model.safetensors").exists()

    # --amortise-targets fixed-point: a pool of 200,000 windows of 64 KiB (12 GiB) is held whole
    pool = pc_train(
        "--amortise", str(model), "--amortise-targets", "fixed-point", "--target-pool", "200000",
        "--out", str(tmp_path / "d"),
    )  # fmt: skip
    line = _last_line(pool)
    assert line.startswith("pc-train: out of memory fitting the amortiser (hidden 32, batches of 8 inputs")
    assert "a pool of 200000 settled windows): lower --amortise-hidden (now 32), --batch-size (now 8) or " in line
    assert line.endswith("--target-pool (now 200000)")


def test_pc_analyze_out_of_memory_is_one_line(tmp_path):
    """A model whose input is a whole held-out photo: pc-analyze's 1,000 held-out windows (1 GiB a copy) do not
    fit the capped address space; onnxruntime's arena, which runs them, fails with its own exception class."""
    config = WIDE.replace(name="photo-window", input_shape=(1, 424, 640))
    model = tmp_path / "photo.safetensors"
    pcmodel.create(config, seed=0).save(model)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "training.analysis", str(model), "--out", str(tmp_path / "a"), "--threads", "1"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=_limit)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert sum(line.startswith("pc-analyze: ") for line in lines) == 1, lines
    assert lines[-1] == (
        "pc-analyze: out of memory analysing photo-window (inputs of 1x424x640): free memory, or run it where more "
        "is free"
    )
