"""pc-bench runs end to end at a tiny size and reports every field (a benchmark: nothing here is timed);
the notebook-style reference it measures against is the mathematics (autograd = the plain loop)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pcmodel
from benchmarks.bench import main
from benchmarks.cases import DEFAULT_CASES, parse_case
from benchmarks.flops import flops_per_step
from benchmarks.reference import reference_energy, reference_infer
from benchmarks.runners import configure_engine
from pcmodel import PCModel

from .conftest import KINDS, tiny_config

ROOT = Path(__file__).resolve().parents[2]

RESULT_FIELDS = {
    "max_abs_diff", "one_off_seconds", "samples", "ms", "ms_median", "spread", "images_per_s",
    "gflops", "peak_share", "speedup", "speedup_rounds", "letter", "note",
}  # fmt: skip


def test_pc_bench_json_reports_every_field(capsys):
    argv = ["--case", "conv-rgb:32x32:1", "--case", "rao-ballard-1999:16x26:2", "--steps", "3"]
    assert main([*argv, "--rounds", "2", "--min-time", "0", "--peak-size", "128", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and "gpu" in machine
    assert {"python", "torch", "onnxruntime", "onnx", "numpy"} <= set(machine["versions"])
    assert report["settings"]["threads"]["torch_intra_op"] == report["settings"]["threads"]["onnxruntime_intra_op"]
    assert report["matmul_peak"]["best_gflops"] > 0
    assert [c["case"] for c in report["cases"]] == ["conv-rgb 32x32 B=1", "rao-ballard-1999 16x26 B=2"]
    conv, paper = report["cases"]
    assert conv["flops_per_step"]["matmul"] == 326_976  # docs/MODEL.md section 6 (and the peer benchmark)
    assert paper["flops_per_step"]["matmul"] == 2 * 147_456
    for case in report["cases"]:
        results = case["results"]
        assert {"reference", "torch", "onnxruntime"} <= set(results)
        assert results["reference"]["letter"] == "a" and results["onnxruntime"]["letter"] == "c"
        assert set(results["onnxruntime"]["one_off_seconds"]) == {"plan", "export", "session"}
        for r in results.values():
            assert set(r) >= RESULT_FIELDS
            assert r["max_abs_diff"] <= 1e-4  # every backend agrees with (a)
            assert r["ms"] > 0 and r["images_per_s"] > 0 and r["gflops"] > 0 and len(r["samples"]) == 2
        assert results["reference"]["speedup"] == pytest.approx(1.0)


def test_pc_bench_table_and_its_errors(capsys):
    argv = ["--case", "rao-ballard-1999:16x26:1", "--steps", "2", "--rounds", "1", "--min-time", "0"]
    assert main([*argv, "--peak-size", "64", "--backends", "reference,onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "| rao-ballard-1999 16x26 B=1 | (c) onnxruntime |" in out and "matmul peak" in out
    with pytest.raises(SystemExit):
        main(["--backends", "reference,tensorflow"])
    with pytest.raises(SystemExit):
        main(["--case", "conv-rgb:32:1"])
    assert parse_case(DEFAULT_CASES[2]).size == (128, 128)
    assert main(["--case", "conv-rgb:33x32:1", "--steps", "1", "--rounds", "1", "--peak-size", "64"]) == 2
    assert "does not tile" in capsys.readouterr().err


@pytest.mark.parametrize("threads", ["1025", "1000000"])
def test_pc_bench_refuses_a_thread_count_out_of_range_in_one_line(threads):
    """--threads is pcmodel.cliargs.thread_count, 1 to 1024, as every other command's: a million had been taken and
    handed to torch.set_num_threads, which crashes the process (SIGSEGV). A real run of the command, in a process of
    its own; the case is tiny, so that without the bound it would end at once rather than time a while."""
    argv = ["--threads", threads, "--case", "rao-ballard-1999:16x26:1", "--steps", "1", "--rounds", "1"]
    argv += ["--min-time", "0", "--peak-size", "64", "--backends", "reference", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, (done.returncode, done.stderr[-2000:])
    assert err[0].startswith(f"pc-bench: argument --threads: must be at most 1024, got {threads}")


@pytest.mark.parametrize(("kind", "prior"), [(k, p) for k in KINDS for p in pcmodel.PRIORS])
def test_reference_is_the_definition(kind, prior, generator):
    """Autograd of the plainly built energy gives the hand-derived loop's trajectory (float64), from the
    config's start and from a given one, for every prior."""
    config = tiny_config(kind, "tanh", prior, initial_latents="feedforward")
    weights = [torch.randn(s, generator=generator, dtype=torch.float64) * 0.3 for s in PCModel.weight_shapes(config)]
    model = PCModel(config, weights, allow_unstable=True)
    x = torch.randn((2, *config.input_shape), generator=generator, dtype=torch.float64)
    latents, trace = reference_infer(config, model.weights, x, 15)
    expected = model.infer(x, steps=15, backend="loop")
    for a, b in zip(latents, expected.latents):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(trace, expected.energy, rtol=1e-10, atol=0)
    torch.testing.assert_close(
        reference_energy(config, [w.double() for w in model.weights], x, latents), model.energy(x, latents)
    )
    start = [torch.randn(r.shape, generator=generator, dtype=torch.float64) * 0.5 for r in latents]
    warm, warm_trace = reference_infer(config, model.weights, x, 15, init=start)
    given = model.infer(x, steps=15, backend="loop", init=start)
    for a, b in zip(warm, given.latents):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(warm_trace, given.energy, rtol=1e-10, atol=0)


def test_flops_follow_model_md():
    conv = pcmodel.load("conv-rgb")
    big = flops_per_step(conv, (128, 128), 32)["per_level"]
    assert big == [4 * 32 * 8 * 3 * 64 * 31 * 31, 4 * 32 * 10 * 8 * 9 * 15 * 15]


def test_pc_bench_has_the_jax_peer_case(capsys):
    """Case (f): the independent jax.jit of the same network, timed beside ours and agreeing with (a)."""
    pytest.importorskip("jax")
    argv = ["--case", "rao-ballard-1999:16x26:2", "--steps", "3", "--rounds", "1", "--min-time", "0"]
    assert main([*argv, "--peak-size", "64", "--backends", "reference,onnxruntime,jax", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["cases"][0]["results"]
    assert results["jax"]["letter"] == "f" and results["jax"]["max_abs_diff"] <= 1e-4


def test_pc_bench_profile_reports_ops_and_nodes(capsys):
    """--profile once failed on a name clash (the engines' `ops` module for the profiler's events)."""
    argv = ["--case", "rao-ballard-1999:16x26:1", "--steps", "2", "--rounds", "1", "--min-time", "0"]
    assert main([*argv, "--peak-size", "64", "--backends", "reference", "--profile", "--json"]) == 0
    (profile,) = json.loads(capsys.readouterr().out)["profiles"]
    assert profile["torch_ops_per_step"] > 0 and profile["onnxruntime_kernels_per_step"] > 0
    assert profile["torch"] and profile["onnxruntime"]


def test_configure_engine_sets_known_settings_only():
    model = pcmodel.load("rao-ballard-1999")
    configure_engine(model, "onnxruntime", sharding=False)
    assert model.engines.backend("onnxruntime").sharding is False
    with pytest.raises(AttributeError, match="no setting"):
        configure_engine(model, "onnxruntime", shardnig=False)


def test_before_after_times_every_case_of_issue_20(capsys):
    from benchmarks.before_after import CASES
    from benchmarks.before_after import main as before_after

    threads = torch.get_num_threads()
    try:
        assert before_after(["--min-time", "0"]) == 0  # sets the process's thread count, as a command does
    finally:
        torch.set_num_threads(threads)  # the tests after this one run with the count they started with
    times = json.loads(capsys.readouterr().out)
    assert len(times) == len(CASES) + 2  # rao-ballard-1999's cases on onnxruntime and the automatic backend
    assert all(ms > 0 for ms in times.values())
