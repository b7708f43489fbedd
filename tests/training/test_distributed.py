"""torchrun: 2 CPU processes (gloo) train the same model as one process on the same global batches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pcmodel
from training.train import main

from .conftest import FAST

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_config_file):
    args = ["--config", str(tiny_config_file), *FAST, "--updates", "5", "--batch-size", "16"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.train", *args, "--out", str(tmp_path / "ddp")]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = pcmodel.load(tmp_path / "single" / "model.safetensors")
    ddp = pcmodel.load(tmp_path / "ddp" / "model.safetensors")
    assert ddp.provenance["training"]["world_size"] == 2
    assert not torch.equal(single.weights[0], pcmodel.create(single.config, seed=0).weights[0])  # it trained
    for a, b in zip(single.weights, ddp.weights):
        # The same global batch, split 8 + 8: only the order of float additions differs (measured ~2e-8).
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # only rank 0 wrote: one log, one line per update
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
