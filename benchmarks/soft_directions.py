"""Why whole photos in tile mode settle slowly: the directions the data do not see, and what Newton's method does there.

    python -m benchmarks.soft_directions                          # rao-ballard-1999, both held-out photos, tile mode
    python -m benchmarks.soft_directions --photo china.jpg --newton-steps 8 --json

Issue 21 asks every level within 5% of the fixed point in latent distance. rao-ballard-1999 on a whole photo in
tile mode (every native window of the photo, one row each) is 17-26% away after the served 20 steps, and 20-30%
after the paper's 100. Where is that distance? Where every level's f is the identity, the energy is a quadratic
form plus the priors, E(r) = r^T H r / 2 - b^T r + c + sum_l g_l(r_l), and H (the Hessian of the errors' part)
depends on U alone, the same for every row. Its null space is the set of moves that change no prediction
error: there only the prior acts, and the Cauchy prior's curvature is at most 2 alpha and negative beyond |r| = 1,
so a gradient step barely moves the state there, and the fixed point itself is soft there (starts that settle at
the same energy differ along these directions). For each photo this reports, against the issue's yardstick (3,000
of the paper's steps from zero), each run's per-level latent distance split into the part in H's null space
(eigenvalues below 1e-3 of the largest) and the part in its range, and how far its predictions are from the
yardstick's: for the served defaults, the paper's 100 steps, Nesterov(0.8) from the amortised start at 100 and
1,000 steps; and a damped Newton iteration from zero (per row, H plus the prior's curvature floored at --floor,
halving the step until the row's energy falls), a second-order method's step count and wall time beside the
served call's. A research tool: it measures, nothing serves it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

import pcmodel
from pcmodel.cliargs import ArgumentParser, model_source, positive_float, positive_int
from pcmodel.energy import level_errors, prior_gradient

from .fast_slow import fixed_point, photo_rows

NULL_RELATIVE = 1e-3
Latents = list[torch.Tensor]


def _flat(latents: Latents) -> torch.Tensor:
    return torch.cat([r.reshape(r.shape[0], -1) for r in latents], 1)


def _levels_of(model: pcmodel.PCModel, flat: torch.Tensor, hw: tuple[int, int]) -> Latents:
    out, start = [], 0
    for shape in model.latent_shapes(hw):
        size = shape[0] * shape[1] * shape[2]
        out.append(flat[:, start : start + size].reshape(flat.shape[0], *shape))
        start += size
    return out


def _prior_gradient(model: pcmodel.PCModel, latents: Latents) -> Latents:
    return [
        torch.zeros_like(r) if (g := prior_gradient(r, lc.prior, lc.alpha)) is None else g
        for r, lc in zip(latents, model.config.levels)
    ]


def quadratic_hessian(model: pcmodel.PCModel, hw: tuple[int, int]) -> torch.Tensor:
    """H (n x n, float64) of the errors' part of one row's energy at input size hw, all levels' latents flat.

    dE/dr minus the priors' part is linear in r and x (every f the identity), so at x = 0 its value at the
    i-th unit vector is H's i-th column."""
    if any(lc.f != "identity" for lc in model.config.levels):
        raise ValueError("the errors' part of the energy is quadratic only where every level's f is the identity")
    n = sum(c * h * w for c, h, w in model.latent_shapes(hw))
    unit = _levels_of(model, torch.eye(n, dtype=torch.float64), hw)
    x = torch.zeros(n, model.config.input_shape[0], *hw, dtype=torch.float64)
    data = [g - p for g, p in zip(model.gradients(x, unit), _prior_gradient(model, unit))]
    h = _flat(data).T
    return (h + h.T) / 2  # symmetric up to rounding


def prior_curvature(model: pcmodel.PCModel, latents: Latents) -> torch.Tensor:
    """The priors' second derivative at each latent, flat (rows, n): each g_l is a sum over coordinates."""
    with torch.enable_grad():
        rs = [r.detach().clone().requires_grad_(True) for r in latents]
        total = sum(g.sum() for g in _prior_gradient(model, rs))
        return _flat(list(torch.autograd.grad(total, rs)))


def damped_newton(
    model: pcmodel.PCModel, x: torch.Tensor, hessian: torch.Tensor, start: Latents, steps: int, floor: float
) -> Iterator[Latents]:
    """Newton's method per row on the energy (float64), yielding the latents after each step: the system is H
    plus the priors' curvature floored at `floor` (the Cauchy prior's is negative beyond |r| = 1, where a plain
    Newton step would climb), and each row's step is halved (up to 8 times) until its energy falls (else the
    row stays)."""
    hw = (x.shape[2], x.shape[3])
    r = _flat(start).double()
    x = x.double()
    for _ in range(steps):
        latents = _levels_of(model, r, hw)
        energy = model.energy(x, latents)
        system = hessian + torch.diag_embed(prior_curvature(model, latents).clamp_min(floor))
        # numpy's LAPACK: torch 2.13's batched solve of systems this large fails (MKL: "Parameter 6 was incorrect
        # on entry to DLASWP") once torch.set_num_threads has gone from 1 to 2 in the process (as some tests do).
        rhs = _flat(model.gradients(x, latents)).unsqueeze(2)
        move = torch.from_numpy(np.linalg.solve(system.numpy(), rhs.numpy())).squeeze(2)
        length = torch.ones(r.shape[0], 1, dtype=r.dtype)
        for _ in range(8):
            trial = r - length * move
            worse = model.energy(x, _levels_of(model, trial, hw)) > energy
            if not bool(worse.any()):
                break
            length = torch.where(worse.unsqueeze(1), length / 2, length)
        r = torch.where(worse.unsqueeze(1), r, trial)  # a row whose energy still does not fall stays
        yield _levels_of(model, r, hw)


def split_distance(
    model: pcmodel.PCModel, x: torch.Tensor, latents: Latents, reference: Latents, null: torch.Tensor
) -> dict[str, Any]:
    """Per level, in percent of |r*_l| (all rows at once): |r_l - r*_l|, its part in H's null space and its part
    in H's range; and |prediction_l - prediction*_l| / |prediction*_l| per level."""
    hw = (x.shape[2], x.shape[3])
    diff = _flat(latents).double() - _flat(reference).double()
    in_null = _levels_of(model, (diff @ null) @ null.T, hw)
    whole = _levels_of(model, diff, hw)
    out: dict[str, Any] = {"latent_distance_pct": [], "null_part_pct": [], "range_part_pct": []}
    for d, dn, ref in zip(whole, in_null, reference):
        scale = float(ref.double().norm())
        out["latent_distance_pct"].append(100 * float(d.norm()) / scale)
        out["null_part_pct"].append(100 * float(dn.norm()) / scale)
        out["range_part_pct"].append(100 * float((d - dn).norm()) / scale)
    mine, theirs = _predictions(model, x, latents), _predictions(model, x, reference)
    out["prediction_distance_pct"] = [100 * float((a - b).norm() / b.norm()) for a, b in zip(mine, theirs)]
    return out


def _predictions(model: pcmodel.PCModel, x: torch.Tensor, latents: Latents) -> list[torch.Tensor]:
    weights = [w.double() for w in model.weights]
    errors = level_errors(model.levels((x.shape[2], x.shape[3])), weights, x.double(), [r.double() for r in latents])
    return [e.prediction for e in errors]


def _runs(model: pcmodel.PCModel) -> list[tuple[str, dict[str, Any]]]:
    """The served defaults, the paper's dynamics, and Nesterov(0.8) at 100 and 1,000 steps from the model's best
    start (the amortised one where it has an amortiser)."""
    served = model.config
    init = "amortised" if model.has_amortiser else "zero"
    nesterov = pcmodel.Solver("nesterov", 0.8)
    return [
        (f"served: {served.initial_latents} + {served.served_solver.label}, {served.steps}", {}),
        ("paper: gradient from zero, 100", dict(steps=100, solver="gradient", init="zero")),
        *((f"nesterov(0.8) from {init}, {t}", dict(steps=t, solver=nesterov, init=init)) for t in (100, 1000)),
    ]


def measure(
    model: pcmodel.PCModel, photo: str, x: torch.Tensor, newton_steps: int, floor: float, backend: str
) -> dict[str, Any]:
    hw = (x.shape[2], x.shape[3])
    hessian = quadratic_hessian(model, hw)
    values, vectors = torch.linalg.eigh(hessian)
    null = vectors[:, values < NULL_RELATIVE * values.max()]
    reference, fixed = fixed_point(model, x, backend=backend)
    report: dict[str, Any] = {"photo": photo, "rows": x.shape[0], "latents_per_row": hessian.shape[0]}
    report["null_dimensions"] = null.shape[1]
    report["reference_energy"] = float(fixed.double().sum())
    report["reference_norm"] = [float(r.double().norm()) for r in reference]
    runs = []
    for label, kwargs in _runs(model):
        start = time.perf_counter()
        result = model.infer(x, backend=backend, **kwargs)
        seconds = time.perf_counter() - start
        row = {"run": label, "seconds": seconds, "energy_gap_pct": _gap(result.energy[-1], fixed)}
        row.update(split_distance(model, x, result.latents, reference, null))
        runs.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # a long run's progress
    zero = [torch.zeros(x.shape[0], *s, dtype=torch.float64) for s in model.latent_shapes(hw)]
    start = time.perf_counter()
    for step, latents in enumerate(damped_newton(model, x, hessian, zero, newton_steps, floor), 1):
        row = {"run": f"damped Newton from zero, {step}", "seconds": time.perf_counter() - start}
        row["energy_gap_pct"] = _gap(model.energy(x.double(), latents), fixed)
        row.update(split_distance(model, x, latents, reference, null))
        runs.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        start = time.perf_counter()
    report["runs"] = runs
    return report


def _gap(energy: torch.Tensor, fixed: torch.Tensor) -> float:
    total, settled = float(energy.double().sum()), float(fixed.double().sum())
    return 100 * (total - settled) / abs(settled)


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['photo']}: {report['rows']} rows of {report['latents_per_row']} latents, "
        f"{report['null_dimensions']} of them in H's null space"
    ]
    lines.append(f"{'run':<38} {'s':>6} {'gap %':>8} {'dist % (null, range) per level':>44} {'pred %':>13}")

    def per_level(row: dict[str, Any]) -> str:
        parts = zip(row["latent_distance_pct"], row["null_part_pct"], row["range_part_pct"])
        return "; ".join(f"{d:.3g} ({n:.3g}, {r:.3g})" for d, n, r in parts)

    for row in report["runs"]:
        pred = ", ".join(f"{p:.3g}" for p in row["prediction_distance_pct"])
        lines.append(
            f"{row['run']:<38} {row['seconds']:>6.2f} {row['energy_gap_pct']:>8.3g} {per_level(row):>44} {pred:>13}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.soft_directions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=model_source, default="rao-ballard-1999", help="(default: %(default)s)")
    parser.add_argument(
        "--photo", action="append", choices=("china.jpg", "flower.jpg"), help="a held-out photo (default: both)"
    )
    parser.add_argument("--rows", type=positive_int, help="only the photo's first N rows (default: all)")
    parser.add_argument("--newton-steps", type=positive_int, default=8, help="(default: %(default)s)")
    parser.add_argument(
        "--floor", type=positive_float, default=5e-4, help="the least prior curvature Newton uses (default: 5e-4)"
    )
    parser.add_argument("--backend", choices=("loop", "numba"), default="numba", help="(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print every number as JSON")
    args = parser.parse_args(argv)
    model = pcmodel.load(args.model)
    if any(lc.f != "identity" for lc in model.config.levels):
        parser.error(f"--model {args.model}: every level's f must be the identity (the errors' part is then quadratic)")
    reports = []
    for photo, _, x in photo_rows(model, ["tile"]):
        if args.photo and photo not in args.photo:
            continue
        rows = x if args.rows is None else x[: args.rows]
        reports.append(measure(model, photo, rows, args.newton_steps, args.floor, args.backend))
        if not args.json:
            print(table(reports[-1]), flush=True)
    if args.json:
        print(json.dumps({"model": args.model, "sha256": model.sha256, "reports": reports}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
