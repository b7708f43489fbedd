"""Does Anderson acceleration pay? The paper's step as a fixed-point map, accelerated, against the solvers served.

    python -m benchmarks.anderson                       # both presets, 64 held-out crops
    python -m benchmarks.anderson --count 128 --window 3 --window 5 --json

Issue 21 names "conjugate-gradient-like or Anderson steps where they pay" beside momentum. The paper's step
r <- G(r) = r - eta dE/dr (per-level eta, `pcmodel.energy.step_rates`) is a fixed-point map whose fixed point
is the network's; Anderson acceleration (type II, window m: the next iterate is the combination of the last m
images G(r_k) whose residuals G(r_k) - r_k combine to the least norm, per image) uses one gradient per step,
as Nesterov does, so the two compare step for step. (Linear conjugate gradient does not apply as such: the
Cauchy prior makes the energy non-quadratic and conv-rgb's f is tanh; nonlinear CG needs a line search, more
than one gradient a step.) On held-out crops (scikit-learn's two photos), against the fixed point (3,000 of the
paper's steps from zero), after T gradient evaluations: the median energy gap (E_T - E*) / |E*| and the
per-level latent distance, in percent, for the paper's gradient step, the served Nesterov and Anderson with
each window, each from zero and from the amortised start. Computed in float64 with the definition's gradient
(`model.gradients`), so the numbers are the methods', not a backend's. A research tool, kept as the measurement
that chose the solver: the served one is pcmodel.solvers' `anderson` (the same type-II iteration with a ridge
of 1e-3 tr(A) instead of 1e-10, for float32; docs/PERFORMANCE.md "Issue 21: Anderson as a solver").
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import torch

import pcmodel
from pcmodel.cliargs import ArgumentParser, model_source, positive_int
from pcmodel.energy import step_rates
from training.amortise import energy_gap, latent_distance
from training.data import held_out_windows

from .fast_slow import fixed_point

STEPS = (5, 10, 20)
Latents = list[torch.Tensor]


def flat(latents: Latents) -> torch.Tensor:
    return torch.cat([r.flatten(1) for r in latents], dim=1)


def unflat(v: torch.Tensor, like: Latents) -> Latents:
    out, start = [], 0
    for r in like:
        size = r[0].numel()
        out.append(v[:, start : start + size].reshape(r.shape))
        start += size
    return out


def paper_map(model: pcmodel.PCModel, x: torch.Tensor) -> Callable[[Latents], Latents]:
    """G(r) = r - eta_l dE/dr_l: the paper's step (the definition's gradient)."""
    etas = [rates.eta for rates in step_rates(model.config)]
    return lambda r: [ri - eta * g for ri, eta, g in zip(r, etas, model.gradients(x, r))]


def anderson(step: Callable[[Latents], Latents], r0: Latents, steps: int, window: int) -> Latents:
    """Type-II Anderson acceleration of r <- step(r), window `window`, per image (least squares on the
    residual differences, a small ridge for conditioning): `steps` evaluations of `step`."""
    r = flat(r0)
    images, residuals = [], []
    for _ in range(steps):
        g = flat(step(unflat(r, r0)))
        images.append(g)
        residuals.append(g - r)
        images, residuals = images[-(window + 1) :], residuals[-(window + 1) :]
        if len(residuals) == 1:
            r = g
            continue
        df = torch.stack([b - a for a, b in itertools.pairwise(residuals)], dim=2)  # (B, n, m)
        dg = torch.stack([b - a for a, b in itertools.pairwise(images)], dim=2)
        gram = df.transpose(1, 2) @ df
        ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)[:, None, None]
        gram = gram + ridge * torch.eye(gram.shape[1], dtype=gram.dtype)
        gamma = torch.linalg.solve(gram, df.transpose(1, 2) @ residuals[-1][:, :, None])
        r = g - (dg @ gamma)[:, :, 0]
    return unflat(r, r0)


def measure(name: str, count: int, windows: list[int]) -> dict[str, Any]:
    model = pcmodel.load(name)
    x = held_out_windows(model.config, count).to(torch.float64)
    settled, fixed = fixed_point(model.with_dynamics(init="zero", solver="gradient"), x)
    settled = [r.to(torch.float64) for r in settled]
    fixed = fixed.to(torch.float64)
    starts = {"zero": [torch.zeros_like(r) for r in settled]}
    if model.has_amortiser:
        starts["amortised"] = [r.to(torch.float64) for r in model.amortised_latents(x.float())]
    step = paper_map(model, x)
    served = model.solver(None)
    rows = []
    for start, r0 in starts.items():
        for steps in STEPS:
            results: dict[str, Latents] = {}
            for solver in ("gradient", served):
                label = "gradient" if solver == "gradient" else served.label
                out = model.infer(x, steps=steps, init=r0, solver=solver, backend="loop")
                results[label] = out.latents
            for window in windows:
                results[f"anderson m={window}"] = anderson(step, r0, steps, window)
            for method, latents in results.items():
                energy = model.energy(x, latents)
                rows.append({
                    "start": start, "steps": steps, "method": method,
                    "energy_gap_pct": 100 * float(energy_gap(energy, fixed).median()),
                    "latent_distance_pct": [100 * float(d.median()) for d in latent_distance(latents, settled)],
                })  # fmt: skip
    return {"model": name, "crops": count, "served": served.label, "rows": rows}


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['model']} ({report['crops']} held-out crops; served: {report['served']})"]
    lines.append(f"  {'start':10s} {'T':>3s}  {'method':22s} {'energy gap %':>13s}  latent distance % per level")
    for row in report["rows"]:
        distance = " / ".join(f"{d:.3g}" for d in row["latent_distance_pct"])
        lines.append(
            f"  {row['start']:10s} {row['steps']:3d}  {row['method']:22s} {row['energy_gap_pct']:13.4g}  {distance}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.anderson", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", type=model_source, help="a shipped model or checkpoint (repeat)")
    parser.add_argument("--count", type=positive_int, default=64, help="held-out crops (default: 64)")
    parser.add_argument("--window", action="append", type=positive_int, help="Anderson windows (default: 2, 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    reports = [measure(name, args.count, args.window or [2, 5]) for name in args.model or sorted(pcmodel.PRESETS)]
    if args.json:
        print(json.dumps({"reports": reports}))
    else:
        print("\n\n".join(table(r) for r in reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
