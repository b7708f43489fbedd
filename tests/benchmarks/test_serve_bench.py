"""pc-serve-bench's local model call times the server's path, not the torch fallback."""

from __future__ import annotations

import torch

import pcmodel
from benchmarks import serve_bench


def test_the_local_model_runs_the_fast_backend_for_both_dynamics():
    """A 64 px photo's rows (not the native shape): unprepared, both calls fall back to torch; prepared as
    pc-serve-bench prepares them, the served and the paper's dynamics each run a fast backend, as in the server."""
    model = pcmodel.load("conv-rgb")
    rows = torch.rand(1, 3, 64, 64)
    assert model.infer(rows, steps=100, solver="gradient", init="zero").backend == "torch"
    serve_bench.prepare_local(model, rows, 100)
    assert model.infer(rows).backend != "torch"
    assert model.infer(rows, steps=100, solver="gradient", init="zero").backend != "torch"
