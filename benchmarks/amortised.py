"""The amortised start against the zero start, on held-out crops (issue 21, "inference fast and slow").

    python -m benchmarks.amortised                    # both shipped models, a table each
    python -m benchmarks.amortised conv-rgb --json    # one model, the numbers as JSON

For each model: 256 native crops of scikit-learn's sample photos (the held-out set pc-analyze uses), their
fixed point (3,000 plain gradient steps from zero), then from each start (zero, amortised) after
0/5/10/20/50/100 plain gradient steps the median energy gap (E - E*) / |E*| and each level's median latent
distance ||r_l - r_l*|| / ||r_l*||; the median steps an image needs to come within today's accuracy (the
zero start's median gap at 100 steps); and with early stop (tol = the zero start's median gradient norm at
100 steps) the median steps used on the held-out crops, on pixel noise and on an unseen texture, and the
same with each set's own tol (its zero start's median gradient norm after 100 steps).
Results: docs/PERFORMANCE.md, "The amortised start".
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import pcmodel
from pcmodel.cliargs import thread_count
from training import data
from training.amortise import start_report

from .machine import machine


def measure(name: str, count: int = 256) -> dict[str, Any]:
    """Every number of the module docstring for one model (a shipped name or a checkpoint path)."""
    model = pcmodel.load(name)
    begun = time.perf_counter()
    out: dict[str, Any] = {"model": name, "sha256": model.sha256[:12], **start_report(model, count)}
    x = data.held_out_windows(model.config, 1)
    timing = {}
    # The start alone (0 steps) from each init, and 10 steps from zero, one window (batch 1), best of 20.
    for label, init, steps in (("zero", "zero", 0), ("amortised", "amortised", 0), ("10 steps", "zero", 10)):
        times = []
        for _ in range(20):
            start = time.perf_counter()
            model.infer(x, steps=steps, init=init)
            times.append(time.perf_counter() - start)
        timing[label] = min(times) * 1e3
    out["start_ms_batch1"] = timing
    out["seconds"] = round(time.perf_counter() - begun, 1)
    return out


def table(result: dict[str, Any]) -> str:
    curves = result["curves"]
    lines = [
        f"{result['model']} ({result['sha256']}), {result['windows']} held-out crops",
        "steps | median energy gap zero / amortised | gap of the mean zero / amortised | latent distance per level "
        "zero / amortised",
    ]
    z, a = curves["zero"], curves["amortised"]
    for steps in z["energy_gap"]:
        dz = " ".join(f"{d:.3f}" for d in z["latent_distance"][steps])
        da = " ".join(f"{d:.3f}" for d in a["latent_distance"][steps])
        lines.append(
            f"{steps:>5} | {z['energy_gap'][steps]:.3%} / {a['energy_gap'][steps]:.3%} | "
            f"{z['energy_gap_of_mean'][steps]:.3%} / {a['energy_gap_of_mean'][steps]:.3%} | {dz} / {da}"
        )
    lines.append(
        f"steps to within {curves['reach_target_gap']:.3%} of the fixed point (median): zero "
        f"{curves['zero']['steps_to_reach']:g}, amortised {curves['amortised']['steps_to_reach']:g}"
    )
    lines.append(f"early stop at tol {result['tol']:.4g}, median steps used (zero / amortised):")
    for what, used in result["steps_used_tol"].items():
        lines.append(f"  {what}: {used['zero']:g} / {used['amortised']:g}")
    lines.append("early stop at each set's own tol, median steps used (zero / amortised):")
    for what, used in result["steps_used_own_tol"].items():
        lines.append(f"  {what} (tol {used['tol']:.4g}): {used['zero']:g} / {used['amortised']:g}")
    ms = result["start_ms_batch1"]
    lines.append(
        f"one crop: the start alone zero {ms['zero']:.2f} ms, amortised {ms['amortised']:.2f} ms; "
        f"10 steps from zero {ms['10 steps']:.2f} ms"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.amortised", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["conv-rgb", "rao-ballard-1999"], help="shipped names or paths")
    parser.add_argument("--crops", type=int, default=256, help="held-out crops per model (default: 256)")
    parser.add_argument("--threads", type=thread_count, default=1, help="torch threads (default: 1)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = [measure(name, args.crops) for name in args.models]
    if args.json:
        print(json.dumps({"machine": machine(), "threads": args.threads, "results": results}, indent=1))
    else:
        print("\n\n".join(table(r) for r in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
