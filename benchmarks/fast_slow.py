"""pc-fast-slow: how close each solver and start gets to the network's fixed point, per step and per millisecond.

    python -m benchmarks.fast_slow                      # both presets, 64 held-out crops
    python -m benchmarks.fast_slow --count 256 --json   # the numbers of docs/PERFORMANCE.md
    python -m benchmarks.fast_slow --photos --steps 10,20,100 --momentum 0.7 --momentum 0.8
    python -m benchmarks.fast_slow --kinds anderson --window 3 --window 5 --steps 10,14,20
    python -m benchmarks.fast_slow --model conv-rgb --kinds nesterov --momentum 0.85 --level-steps 1 2

On held-out crops of the model's native size (scikit-learn's two sample photos, never seen in training),
the fixed point is 3,000 steps of the paper's dynamics (gradient, from zero). For each solver (gradient,
momentum, nesterov at the given momenta, anderson at the given windows; each but gradient with the plain
step lengthened per level where --level-steps says) and start (zero, and the amortised
start where the model has one), after T steps: the energy gap (E_T - E*) / |E*| in percent (median, 75th and
90th percentiles over the crops, and the gap of the mean energy), the median per-level latent distance
|r_T - r*| / |r*| in percent, and the wall time of the call per image (batch --batch, the automatic fast
backend, prepared for every T; the amortised start's own time included). The fixed point is the same for
every solver (tests/pcmodel/test_solvers.py), so the rows compare how fast each gets there.

--photos measures whole photos instead of crops: each held-out photo in each size mode the model has
(full for convolutional models, tile), all of its rows settled together; the energy gap is that of the
photo (the sum over its rows) and the latent distance that of all its rows at once, one line per photo.
The model's served defaults are marked; the first row (gradient from zero at the model's steps) is
today's paper dynamics.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

import pcmodel
from pcmodel.cliargs import ArgumentParser, model_source, positive_float, positive_int
from pcmodel.images import has_whole_map_level, prepare_image
from pcmodel.solvers import DEFAULT_WINDOW, MAX_WINDOW, Solver
from training.amortise import energy_gap, latent_distance
from training.data import held_out_photos, held_out_windows

from .machine import machine

STEPS = (5, 10, 20, 50, 100)
FIXED_POINT_STEPS = 3000


def fixed_point(
    model: pcmodel.PCModel, x: torch.Tensor, backend: str | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The settled latents and energy per crop: the paper's dynamics for FIXED_POINT_STEPS steps, from zero."""
    result = model.infer(x, steps=FIXED_POINT_STEPS, solver="gradient", init="zero", backend=backend)
    return result.latents, result.energy[-1]


def gaps(result: pcmodel.InferenceResult, settled: list[torch.Tensor], fixed: torch.Tensor) -> dict[str, Any]:
    """Median energy gap and per-level latent distance to the fixed point over the crops, in percent; and
    the gap's 75th and 90th percentiles and the gap of the mean energy (for rao-ballard-1999 about half the
    held-out crops are nearly blank and at their fixed point under any solver: the median alone hides the rest)."""
    gap = energy_gap(result.energy[-1], fixed).double()
    return {
        "energy_gap_pct": 100 * float(gap.median()),
        "energy_gap_q75_pct": 100 * float(gap.quantile(0.75)),
        "energy_gap_q90_pct": 100 * float(gap.quantile(0.9)),
        "mean_energy_gap_pct": 100 * float(energy_gap(result.energy[-1].double().mean(), fixed.double().mean())),
        "latent_distance_pct": [100 * float(d.median()) for d in latent_distance(result.latents, settled)],
    }


def whole_gaps(result: pcmodel.InferenceResult, settled: list[torch.Tensor], fixed: torch.Tensor) -> dict[str, Any]:
    """The energy gap and per-level latent distance of all rows at once (one photo), in percent."""
    flat = [r.reshape(1, -1) for r in result.latents]
    return {
        "energy_gap_pct": 100 * float(energy_gap(result.energy[-1].sum(), fixed.sum())),
        "latent_distance_pct": [100 * float(d[0]) for d in latent_distance(flat, [s.reshape(1, -1) for s in settled])],
    }


def wall_ms(model: pcmodel.PCModel, x: torch.Tensor, steps: int, solver: str, init: str, rounds: int) -> float:
    """Median milliseconds per image of one call on x (the automatic backend), over `rounds` calls."""
    model.infer(x, steps=steps, solver=solver, init=init)  # builds what the call needs
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model.infer(x, steps=steps, solver=solver, init=init)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / x.shape[0]


def solvers_of(
    momenta: Sequence[float], kinds: Sequence[str], windows: Sequence[int], level_steps: Sequence[float] = ()
) -> list[Solver]:
    """The gradient solver, then each kind at each momentum (anderson: at each window), with level_steps."""
    out = [Solver()]
    lengths = tuple(level_steps)
    for kind in kinds:
        if kind == "anderson":
            out += [Solver(kind, window=m, level_steps=lengths) for m in windows]
        else:
            out += [Solver(kind, b, level_steps=lengths) for b in momenta]
    return out


def measure(
    name: str, count: int, batch: int, solvers: list[Solver], rounds: int, steps_list: list[int]
) -> dict[str, Any]:
    model = pcmodel.load(name)
    x = held_out_windows(model.config, count)
    settled, fixed = fixed_point(model, x, backend="loop")  # batched (the torch backend runs rows one by one)
    inits = ["zero"] + (["amortised"] if model.has_amortiser else [])
    rows = []
    for init in inits:
        for solver in solvers:
            label = solver.label
            model.prepare(steps=steps_list, shapes=[x.shape[1:]], build=False, solvers=[solver])  # its fast programs
            for steps in steps_list:
                row = {"init": init, "solver": label, "steps": steps}
                row.update(gaps(model.infer(x, steps=steps, solver=solver, init=init), settled, fixed))
                row["ms_per_image"] = wall_ms(model, x[:batch], steps, solver, init, rounds)
                rows.append(row)
    return {"model": name, "sha256": model.sha256, "crops": count, "batch": batch, "rows": rows}


def photo_rows(model: pcmodel.PCModel, modes: list[str] | None = None) -> list[tuple[str, str, torch.Tensor]]:
    """(photo, size mode, the rows the model runs) for each held-out photo and size mode of the model
    (default: every mode it has: full for convolutional models, tile)."""
    have = ["tile"] if has_whole_map_level(model.config) else ["full", "tile"]
    modes = have if modes is None else [m for m in modes if m in have]
    return [
        (photo.name, mode, prepare_image(photo.pixels, model.config, mode)[0])
        for photo in held_out_photos()
        for mode in modes
    ]


def measure_photos(
    name: str,
    solvers: list[Solver],
    steps_list: list[int],
    modes: list[str] | None = None,
    backend: str = "loop",
) -> dict[str, Any]:
    """Whole held-out photos: per photo and size mode, every solver and start against the photo's fixed point."""
    model = pcmodel.load(name)
    served = (model.config.initial_latents, model.config.served_solver, model.config.steps)
    rows = []
    for photo, mode, x in photo_rows(model, modes):
        settled, fixed = fixed_point(model, x, backend=backend)  # batched: a photo's tiles are many rows
        for init in ["zero"] + (["amortised"] if model.has_amortiser else []):
            for solver in solvers:
                label = solver.label
                for steps in steps_list:
                    result = model.infer(x, steps=steps, solver=solver, init=init, backend=backend)
                    row = {"photo": photo, "size_mode": mode, "rows": x.shape[0], "init": init, "solver": label}
                    row["steps"] = steps
                    row["served"] = served == (_config_init(init), solver, steps)
                    row.update(whole_gaps(result, settled, fixed))
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)  # a long run's progress
    return {"model": name, "sha256": model.sha256, "photos": True, "rows": rows}


def _config_init(init: str) -> str:
    return "zeros" if init == "zero" else init


def _solver_width(report: dict[str, Any]) -> int:
    return max([15, *(len(row["solver"]) for row in report["rows"])])


def photo_table(report: dict[str, Any]) -> str:
    lines = [f"{report['model']} (whole held-out photos; * the served defaults)"]
    w = _solver_width(report)
    lines.append(
        f"{'photo':<11} {'mode':<5} {'init':<10} {'solver':<{w}} {'T':>4} {'energy gap %':>13} {'latent dist %':>20}"
    )
    for row in report["rows"]:
        levels = ", ".join(f"{v:.3g}" for v in row["latent_distance_pct"])
        mark = "*" if row["served"] else " "
        lines.append(
            f"{row['photo']:<11} {row['size_mode']:<5} {row['init']:<10} {row['solver']:<{w}} {row['steps']:>4}"
            f"{mark}{row['energy_gap_pct']:>12.4g} {levels:>20}"
        )
    return "\n".join(lines)


def table(report: dict[str, Any]) -> str:
    if report.get("photos"):
        return photo_table(report)
    lines = [f"{report['model']} ({report['crops']} held-out crops; wall time at batch {report['batch']})"]
    w = _solver_width(report)
    head = f"{'init':<10} {'solver':<{w}} {'T':>4} {'energy gap % q50 / q75 / q90 / of the mean':>44}"
    lines.append(f"{head} {'latent dist % per level':>26} {'ms/img':>8}")
    for row in report["rows"]:
        levels = ", ".join(f"{v:.3g}" for v in row["latent_distance_pct"])
        keys = ("energy_gap_pct", "energy_gap_q75_pct", "energy_gap_q90_pct", "mean_energy_gap_pct")
        energy = " / ".join(f"{row[k]:.3g}" for k in keys)
        run = f"{row['init']:<10} {row['solver']:<{w}} {row['steps']:>4}"
        lines.append(f"{run} {energy:>44} {levels:>26} {row['ms_per_image']:>8.3f}")
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
    parser.add_argument(
        "--kinds", default="momentum,nesterov,anderson", help="solvers beside gradient (default: %(default)s)"
    )
    parser.add_argument("--window", type=positive_int, action="append", help="windows of anderson (default: 5)")
    parser.add_argument(
        "--level-steps",
        type=positive_float,
        nargs="+",
        default=(),
        metavar="M",
        help="each solver but gradient: the plain step's multiplier per level (default: none)",
    )
    parser.add_argument(
        "--steps", default=",".join(map(str, STEPS)), help="step counts, comma-separated (default: %(default)s)"
    )
    parser.add_argument("--photos", action="store_true", help="whole held-out photos in each size mode, not crops")
    parser.add_argument(
        "--size-modes", default="full,tile", help="with --photos: the size modes (default: %(default)s, those it has)"
    )
    parser.add_argument(
        "--backend",
        choices=("loop", "numba"),
        default="loop",
        help="with --photos: the batched backend of every run (numba: the paper's network's fast loop)",
    )
    parser.add_argument("--json", action="store_true", help="print every number and the machine as JSON")
    args = parser.parse_args(argv)
    momenta = args.momentum or [0.7, 0.8]
    if not all(0 <= m < 1 for m in momenta):
        parser.error("--momentum must be in [0, 1)")
    kinds = [k for k in args.kinds.split(",") if k]
    if any(k not in ("momentum", "nesterov", "anderson") for k in kinds):
        parser.error("--kinds takes momentum, nesterov and/or anderson")
    windows = args.window or [DEFAULT_WINDOW]
    if max(windows) > MAX_WINDOW:
        parser.error(f"--window must be at most {MAX_WINDOW}")
    solvers = solvers_of(momenta, kinds, windows, args.level_steps)
    try:
        steps_list = sorted({int(v) for v in args.steps.split(",")})
    except ValueError:
        parser.error(f"--steps takes positive step counts, comma-separated, got {args.steps!r}")
    if not steps_list or steps_list[0] < 1:
        parser.error(f"--steps takes positive step counts, comma-separated, got {args.steps!r}")
    names = args.model or sorted(pcmodel.PRESETS)
    if args.photos:
        modes = [m for m in args.size_modes.split(",") if m]
        if not modes or any(m not in ("full", "tile") for m in modes):
            parser.error(f"--size-modes takes full and/or tile, got {args.size_modes!r}")
        reports = [measure_photos(n, solvers, steps_list, modes, args.backend) for n in names]
    else:
        reports = [measure(n, args.count, args.batch, solvers, args.rounds, steps_list) for n in names]
    if args.json:
        print(json.dumps({"machine": machine(), "threads": torch.get_num_threads(), "reports": reports}, indent=2))
    else:
        print("\n\n".join(table(r) for r in reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
