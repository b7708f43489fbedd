"""pc-fast-slow: how close each solver and start gets to the network's fixed point, per step and per millisecond.

    python -m benchmarks.fast_slow                      # both presets, 64 held-out crops
    python -m benchmarks.fast_slow --count 256 --json   # the numbers of docs/PERFORMANCE.md

On held-out crops of the model's native size (scikit-learn's two sample photos, never seen in training),
the fixed point is 3,000 steps of the paper's dynamics (gradient, from zero). For each solver (gradient,
momentum, nesterov at the given momenta) and start (zero, and the amortised start where the model has one),
after T steps: the median energy gap (E_T - E*) / |E*| in percent, the median per-level latent distance
|r_T - r*| / |r*| in percent, and the wall time of the call per image (batch --batch, the automatic fast
backend, prepared for every T; the amortised start's own time included). The fixed point is the same for
every solver (tests/pcmodel/test_solvers.py), so the rows compare how fast each gets there.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import torch

import pcmodel
from pcmodel.cliargs import ArgumentParser, model_source, positive_int
from training.data import held_out_windows

from .machine import machine

STEPS = (5, 10, 20, 50, 100)
FIXED_POINT_STEPS = 3000


def fixed_point(model: pcmodel.PCModel, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The settled latents and energy per crop: the paper's dynamics for FIXED_POINT_STEPS steps, from zero."""
    result = model.infer(x, steps=FIXED_POINT_STEPS, solver="gradient", init="zero")
    return result.latents, result.energy[-1]


def gaps(result: pcmodel.InferenceResult, settled: list[torch.Tensor], fixed: torch.Tensor) -> dict[str, Any]:
    """Median energy gap and per-level latent distance to the fixed point, in percent."""
    energy = ((result.energy[-1] - fixed) / fixed.abs()).tolist()
    levels = []
    for r, s in zip(result.latents, settled):
        distance = (r - s).flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1).clamp_min(1e-12)
        levels.append(100 * statistics.median(distance.tolist()))
    return {"energy_gap_pct": 100 * statistics.median(energy), "latent_distance_pct": levels}


def wall_ms(model: pcmodel.PCModel, x: torch.Tensor, steps: int, solver: str, init: str, rounds: int) -> float:
    """Median milliseconds per image of one call on x (the automatic backend), over `rounds` calls."""
    model.infer(x, steps=steps, solver=solver, init=init)  # builds what the call needs
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model.infer(x, steps=steps, solver=solver, init=init)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / x.shape[0]


def measure(name: str, count: int, batch: int, momenta: list[float], rounds: int) -> dict[str, Any]:
    model = pcmodel.load(name)
    x = held_out_windows(model.config, count)
    settled, fixed = fixed_point(model, x)
    solvers = [("gradient", pcmodel.Solver())] + [
        (f"{kind}({beta:g})", pcmodel.Solver(kind, beta)) for kind in ("momentum", "nesterov") for beta in momenta
    ]
    inits = ["zero"] + (["amortised"] if model.has_amortiser else [])
    rows = []
    for init in inits:
        for label, solver in solvers:
            model.prepare(steps=list(STEPS), shapes=[x.shape[1:]], build=False, solvers=[solver])  # its fast programs
            for steps in STEPS:
                row = {"init": init, "solver": label, "steps": steps}
                row.update(gaps(model.infer(x, steps=steps, solver=solver, init=init), settled, fixed))
                row["ms_per_image"] = wall_ms(model, x[:batch], steps, solver, init, rounds)
                rows.append(row)
    return {"model": name, "sha256": model.sha256, "crops": count, "batch": batch, "rows": rows}


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['model']} ({report['crops']} held-out crops; wall time at batch {report['batch']})"]
    head = f"{'init':<10} {'solver':<15} {'T':>4} {'energy gap %':>13} {'latent dist % per level':>26} {'ms/img':>8}"
    lines.append(head)
    for row in report["rows"]:
        levels = ", ".join(f"{v:.3g}" for v in row["latent_distance_pct"])
        lines.append(
            f"{row['init']:<10} {row['solver']:<15} {row['steps']:>4} {row['energy_gap_pct']:>13.4g} "
            f"{levels:>26} {row['ms_per_image']:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="pc-fast-slow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=model_source, action="append", help="a model (default: both presets)")
    parser.add_argument("--count", type=positive_int, default=64, help="held-out crops (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=32, help="batch of the timed calls (default: 32)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed calls per row (default: 5)")
    parser.add_argument(
        "--momentum", type=float, action="append", help="momenta of momentum/nesterov (default: 0.7 and 0.8)"
    )
    parser.add_argument("--json", action="store_true", help="print every number and the machine as JSON")
    args = parser.parse_args(argv)
    momenta = args.momentum or [0.7, 0.8]
    if not all(0 <= m < 1 for m in momenta):
        parser.error("--momentum must be in [0, 1)")
    reports = [measure(n, args.count, args.batch, momenta, args.rounds) for n in args.model or sorted(pcmodel.PRESETS)]
    if args.json:
        print(json.dumps({"machine": machine(), "threads": torch.get_num_threads(), "reports": reports}, indent=2))
    else:
        print("\n\n".join(table(r) for r in reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
