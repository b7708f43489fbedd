"""Timing one case: every backend once per round, round after round, agreement with (a) checked first.

Interleaved rounds mean a busy machine slows every backend alike; a sample is the mean over calls filling
`min_time`; the best round counts, and the per-round ratios to (a) are kept beside it.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

import pcmodel
from pcmodel.engines import plans

from .cases import Case
from .flops import flops_per_step
from .profiling import op_timings
from .reference import reference_infer
from .runners import LETTERS, runners, to_cpu
from .timing import time_call


def bench_case(
    case: Case, steps: int, names: list[str], rounds: int, min_time: float, peak: float, ideas: bool, seed: int = 0
) -> dict[str, Any]:
    """Time every backend on one case, interleaved; agreement with (a) checked first."""
    model = pcmodel.load(case.model).with_dynamics(init="zero", solver="gradient")  # the paper's, as peers run
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((case.batch, model.config.input_shape[0], *case.size), generator=generator) * 2 - 1
    flops = flops_per_step(model, case.size, case.batch)
    with torch.inference_mode(False):
        reference = reference_infer(model.config, model.weights, x, steps)[0]
    model.prepare(steps=[steps], shapes=[case.size], build=False, solvers=["gradient"])  # what it asks for
    todo = runners(model, x, steps, names, ideas)
    results: dict[str, dict[str, Any]] = {}
    for runner in todo:
        latents = to_cpu(runner.call())
        diff = max(float((a - b).abs().max()) for a, b in zip(latents, reference))
        results[runner.name] = {
            "max_abs_diff": diff,
            "one_off_seconds": runner.one_off,
            "samples": [],
            "note": runner.note,
        }
    for _ in range(rounds):
        for runner in todo:
            results[runner.name]["samples"].append(time_call(lambda r=runner: to_cpu(r.call()), min_time))
    reference_best = min(results["reference"]["samples"]) if "reference" in results else None
    reference_samples = list(results["reference"]["samples"]) if "reference" in results else None
    for name, r in results.items():
        best, worst = min(r["samples"]), max(r["samples"])
        r.update(
            ms=best * 1e3,
            ms_median=statistics.median(r["samples"]) * 1e3,
            spread=worst / best - 1,
            images_per_s=case.batch / best,
            gflops=steps * flops["matmul"] / best / 1e9,
            gbytes_per_s_floor=steps * flops["bytes_floor"] / best / 1e9,
        )
        r["peak_share"] = r["gflops"] / peak
        r["speedup"] = reference_best / best if reference_best else None
        if reference_samples:  # the ratio per round, measured side by side
            ratios = [a / b for a, b in zip(reference_samples, r["samples"])]
            r["speedup_rounds"] = [round(v, 3) for v in ratios]
        r["letter"] = LETTERS.get(name, "")
        r["samples"] = [round(s * 1e3, 4) for s in r["samples"]]
    op_us = op_timings(model, x, min_time) if ideas else {}
    return {
        "ops_us": op_us,
        "case": case.label,
        "model": model.name,
        "size": list(case.size),
        "batch": case.batch,
        "steps": steps,
        "plan": plans.plan_kind(model.config, case.size),
        "flops_per_step": flops,
        "results": results,
    }
