"""pc-warm-start: steps to the fixed point for each frame of an image sequence, from zero vs from the previous frame.

    python -m benchmarks.warm_start                  # both presets, a pan and a zoom of 24 frames each
    python -m benchmarks.warm_start --json

A video's neighbouring frames have nearly the same latents, so the previous frame's result is a start close
to the next frame's fixed point (`model.infer(x, init=previous.latents)`, the Python client's and
pc-encode's `--init previous/encoding.npz`). The sequences are made from a held-out photo (scikit-learn's
china.jpg, never seen in training): a slow pan (`--shift` px per frame) and a slow zoom (the crop losing
`--shift` px on each side per frame, resized to the native size), each frame at the model's native size.

For each frame, its fixed point is 3,000 steps of the paper's dynamics from zero; the steps a start needs are
the first T at which the frame's energy gap (E_T - E*) / |E*| falls to `--gap` (default 0.05%, about the
accuracy of today's 100 plain steps on conv-rgb). A cold start begins at zero; a warm start at the previous
frame's latents where that frame stopped. Printed: the median and the 90th percentile of the steps per frame,
per solver.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

import numpy as np
import torch

import pcmodel
from pcmodel.cliargs import ArgumentParser, model_source, positive_float, positive_int
from pcmodel.images import preprocess

from .machine import machine

FIXED_POINT_STEPS = 3000
MAX_STEPS = 300


def photo() -> np.ndarray:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[0]  # china.jpg, 427 x 640


def sequence(kind: str, frames: int, shift: int, side: int) -> list[np.ndarray]:
    """Crops of the held-out photo: a pan to the right, or a zoom in, `shift` px per frame."""
    image = photo()
    top, left = 100, 150
    if kind == "pan":
        return [image[top : top + side, left + i * shift : left + i * shift + side] for i in range(frames)]
    big = side + 2 * frames * shift
    crops = []
    for i in range(frames):
        inset = i * shift  # `shift` px off each side per frame
        size = big - 2 * inset
        crops.append(image[top + inset : top + inset + size, left + inset : left + inset + size])
    return crops


def steps_to_gap(trace: torch.Tensor, fixed: float, gap: float) -> int:
    """The first step at which the energy gap is at most `gap` (MAX_STEPS + 1 if never)."""
    reached = ((trace - fixed) / abs(fixed) <= gap).nonzero()
    return int(reached[0]) if len(reached) else MAX_STEPS + 1


def run(model: pcmodel.PCModel, frames: list[np.ndarray], solver: str, gap: float) -> dict[str, Any]:
    """Steps per frame from zero and from the previous frame's stopping point."""
    size = tuple(model.config.input_shape[1:])
    x = preprocess([np.ascontiguousarray(f) for f in frames], model.config, size=size)
    fixed = model.infer(x, steps=FIXED_POINT_STEPS, solver="gradient", init="zero").energy[-1]
    cold = model.infer(x, steps=MAX_STEPS, solver=solver, init="zero")
    cold_steps = [steps_to_gap(cold.energy[:, i], float(fixed[i]), gap) for i in range(len(frames))]
    warm_steps, previous = [], None
    for i in range(len(frames)):
        frame = x[i : i + 1]
        result = model.infer(frame, steps=MAX_STEPS, solver=solver, init=previous or "zero")
        needed = steps_to_gap(result.energy[:, 0], float(fixed[i]), gap)
        warm_steps.append(needed)
        # the next frame starts where this one would have stopped (its latents after `needed` steps)
        previous = model.infer(frame, steps=max(needed, 1), solver=solver, init=previous or "zero").latents
    body = warm_steps[1:]  # the first frame has no previous one
    return {
        "solver": model.solver(solver).label,
        "cold_median": statistics.median(cold_steps[1:]),
        "cold_p90": float(np.percentile(cold_steps[1:], 90)),
        "warm_median": statistics.median(body),
        "warm_p90": float(np.percentile(body, 90)),
        "cold_steps": cold_steps,
        "warm_steps": warm_steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="pc-warm-start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=model_source, action="append", help="a model (default: both presets)")
    parser.add_argument("--frames", type=positive_int, default=24, help="frames per sequence (default: 24)")
    parser.add_argument("--shift", type=positive_int, default=1, help="px per frame (default: 1)")
    parser.add_argument("--gap", type=positive_float, default=0.05, help="energy gap in percent (default: 0.05)")
    parser.add_argument("--json", action="store_true", help="print every number and the machine as JSON")
    args = parser.parse_args(argv)
    reports = []
    for name in args.model or sorted(pcmodel.PRESETS):
        model = pcmodel.load(name)
        side = max(model.config.input_shape[1:])
        for kind in ("pan", "zoom"):
            frames = sequence(kind, args.frames, args.shift, side)
            for solver in ("gradient", "nesterov"):
                row = run(model, frames, solver, args.gap / 100)
                reports.append({"model": name, "sequence": kind, **row})
    if args.json:
        print(json.dumps({"machine": machine(), "gap_pct": args.gap, "reports": reports}, indent=2))
        return 0
    print(f"steps to a {args.gap:g}% energy gap per frame (median / p90; {args.frames} frames, {args.shift} px/frame)")
    w = max([14, *(len(r["solver"]) for r in reports)])
    print(f"{'model':<18} {'sequence':<8} {'solver':<{w}} {'cold':>12} {'warm':>12}")
    for r in reports:
        cold, warm = f"{r['cold_median']:g} / {r['cold_p90']:g}", f"{r['warm_median']:g} / {r['warm_p90']:g}"
        print(f"{r['model']:<18} {r['sequence']:<8} {r['solver']:<{w}} {cold:>12} {warm:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
