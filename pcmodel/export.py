"""pc-export: fixed-T inference as an ONNX file, the graph the onnxruntime backend runs.

The graph is pcmodel.engines.program unrolled (pcmodel.engines.onnx_graph). Inputs and outputs of an
exported file (batch axis dynamic, everything float32):

- input  `x`: (batch, C, H, W), preprocessed as `model.preprocess` does (the size the file was made for);
- inputs `r0_1` ... `r0_L` (only with `--init-inputs`): (batch, causes_l, H_l, W_l), the starting latents
  (a file made without them starts where the model's config says: zeros, feed-forward, or the amortised
  guess, which the graph then computes from x);
- output `latent_1` ... `latent_L`: (batch, causes_l, H_l, W_l), the settled latents r_l;
- output `energy`: (T + 1, batch), the energy of each image before the first step and after each step;
- output `reconstruction`: (batch, C, H, W), f(U_1 r_1) on the input grid (module levels: overlaps averaged).

The metadata (`model`, `sha256`, `steps`, `solver`, `init`, `input_size`, `parameters`) says what the file
computes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import pcmodel

from .atomic import write_bytes
from .cliargs import (
    ArgumentParser,
    fail,
    model_source,
    output_file,
    positive_int,
    size_error,
    step_count,
    write_failure,
)
from .engines.onnx_graph import build_graph
from .engines.plans import make_plan
from .model import UnstableStepError
from .solvers import GRADIENT, SOLVERS, Solver, float32_tolerance


def export(
    model: Any,
    steps: int,
    path: str | Path,
    input_hw: Sequence[int] | None = None,
    check: bool = True,
    init: bool = False,
    solver: str | Solver | None = None,
) -> dict[str, Any]:
    """Write the fixed-`steps` inference of `model` at one input size to an ONNX file; returns a summary.

    `init`: the file takes the starting latents as inputs `r0_1`..`r0_L`. `solver`: the dynamics unrolled
    (pcmodel.solvers; None: the model's own). With `check`, onnxruntime runs
    the file on a random batch and its latents must match the torch backend's within
    pcmodel.solvers.float32_tolerance (1e-4; Anderson 1e-3 of the latents' scale; raises ValueError otherwise).
    """
    hw = tuple(model.config.input_shape[1:] if input_hw is None else input_hw)
    start = time.perf_counter()
    dynamics = model.solver(solver)
    plan = make_plan(model.config, model.params, hw, torch.float32, torch.device("cpu"))
    # A model served from its amortised start: the graph computes the same guess (unless given r0 inputs).
    amortised = model.config.initial_latents == "amortised" and not init
    amortiser = (model.levels(hw), model.amortiser.params) if amortised else None
    graph = build_graph(plan, steps, init=init, solver=dynamics, amortiser=amortiser)
    for key, value in {
        "model": model.name,
        "sha256": model.sha256,
        "steps": str(steps),
        "solver": dynamics.label,
        "init": "inputs r0_1..r0_L" if init else ("amortised" if amortised else model.config.initial_latents),
        "input_size": "x".join(str(v) for v in (model.config.input_shape[0], *hw)),
        # The per-level rates baked into the graph (docs/MODEL.md sections 2-3): k1 * k1_scale per level.
        "k1_per_level": ",".join(f"{model.config.k1 * lc.k1_scale:g}" for lc in model.config.levels),
        "k2_scale_per_level": ",".join(f"{lc.k2_scale:g}" for lc in model.config.levels),
        # The named parameters baked into the graph (pcmodel.parameters), the amortiser's where it computes the start.
        "parameters": ",".join([*model.params, *(model.amortiser.params if amortised else ())]),
        "outputs": "latent_1..latent_L (batch, causes, H_l, W_l); energy (steps+1, batch); reconstruction",
    }.items():
        graph.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(graph)
    write_bytes(path, graph.SerializeToString())  # whole or not at all: a failure leaves the old file as it was
    seconds = time.perf_counter() - start
    summary: dict[str, Any] = {
        "path": str(path),
        "model": model.name,
        "sha256": model.sha256,
        "steps": steps,
        "solver": dynamics.label,
        "k1_per_level": [model.config.k1 * lc.k1_scale for lc in model.config.levels],
        "plan": plan.kind,
        "input": ["batch", model.config.input_shape[0], *hw],
        "inputs": [i.name for i in graph.graph.input],
        "nodes": len(graph.graph.node),
        "bytes": Path(path).stat().st_size,
        "export_seconds": round(seconds, 3),
        "outputs": [o.name for o in graph.graph.output],
    }
    if check:
        summary["max_abs_difference"] = check_file(model, path, steps, hw, init=init, solver=dynamics)
    return summary


def check_file(
    model: Any,
    path: str | Path,
    steps: int,
    hw: Sequence[int],
    batch: int = 3,
    seed: int = 0,
    init: bool = False,
    solver: Solver | None = None,
) -> float:
    """Largest |latent difference| between the ONNX file (onnxruntime) and the torch backend on random input
    in [-1, 1] (and, for a file with `r0_*` inputs, random starting latents). Inputs far outside the range of
    preprocessed images (e.g. Gaussian noise) can send Anderson's long runs, in float32, to different
    minima of the Cauchy prior's non-convex energy on different backends (docs/PERFORMANCE.md)."""
    from .engines.onnxruntime import import_onnxruntime

    ort = import_onnxruntime()
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, model.config.input_shape[0], *hw), generator=generator) * 2 - 1  # preprocessed inputs' range
    feed = {"x": x.numpy()}
    r0 = None
    if init:
        r0 = [torch.randn((batch, *shape), generator=generator) * 0.1 for shape in model.latent_shapes(hw)]
        feed.update({f"r0_{i}": r.numpy() for i, r in enumerate(r0, 1)})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    expected = model.infer(x, steps=steps, backend="torch", init=r0, solver=solver)
    worst = max(float(np.abs(values[f"latent_{i + 1}"] - r.numpy()).max()) for i, r in enumerate(expected.latents))
    tolerance = float32_tolerance(solver or GRADIENT, max(float(r.abs().max()) for r in expected.latents))
    if not worst <= tolerance:
        raise ValueError(
            f"{path}: onnxruntime's latents differ from the torch backend's by {worst:.3g} (> {tolerance:.3g})"
        )
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="pc-export",
        description="Write fixed-T inference as an ONNX file (input x; outputs latent_1..L, energy, reconstruction).",
    )
    parser.add_argument(
        "model", type=model_source, help="checkpoint path or model name (default, conv-rgb, rao-ballard-1999)"
    )
    parser.add_argument("--steps", type=step_count, default=None, help="inference steps T (default: the model's)")
    parser.add_argument("-o", "--output", type=output_file, required=True, help="the .onnx file to write")
    parser.add_argument(
        "--size", type=positive_int, nargs=2, metavar=("H", "W"), help="input size (default: the model's native)"
    )
    parser.add_argument(
        "--init-inputs",
        action="store_true",
        help="the file takes the starting latents as inputs r0_1..r0_L (default: it starts where the model says)",
    )
    parser.add_argument(
        "--solver", choices=SOLVERS, default=None, help="the dynamics unrolled (default: the model's; pcmodel.solvers)"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-torch check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        model = pcmodel.load(args.model)
    except (OSError, ValueError) as exc:
        return fail("pc-export", str(exc))
    if args.size is not None and (problem := size_error(model.config, args.size)):
        return fail("pc-export", f"--size {args.size[0]} {args.size[1]}: {problem}")
    steps = model.config.steps if args.steps is None else args.steps
    try:
        summary = export(
            model, steps, args.output, args.size, check=not args.no_check, init=args.init_inputs, solver=args.solver
        )
    except OSError as exc:  # a full disk exits 1, a path that cannot be written 2; the old file, if any, stays
        kept = "the file there is as it was" if args.output.is_file() else "nothing was written"
        return write_failure("pc-export", f"--output {args.output}", exc, kept)
    except UnstableStepError as exc:
        return fail("pc-export", f"--solver {args.solver}: {exc}")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
