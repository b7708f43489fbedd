"""Set the dynamics a checkpoint is served with: its steps, start and solver (U and the amortiser unchanged).

    python -m training.served pcmodel/weights/conv-rgb.safetensors --steps 20 --init amortised \\
        --solver nesterov --momentum 0.85 --level-steps 1 2 --out pcmodel/weights/conv-rgb.safetensors

The served defaults are part of the config (`steps`, `initial_latents`, `solver`, `momentum`, `window`,
`level_steps`), so
the content hash changes with them while the weights stay bit for bit; the file's provenance keeps the
command under "served" beside the training's own. The measurements that choose them: docs/PERFORMANCE.md
("Issue 21: the served defaults") and docs/TRAINING.md.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

import pcmodel
from pcmodel.cliargs import ArgumentParser, fail, model_source, positive_float, positive_int, step_count
from pcmodel.solvers import solver_for


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(prog="python -m training.served", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=model_source, help="checkpoint path or shipped model name")
    parser.add_argument("--out", type=Path, required=True, help="where to write the checkpoint (may be the same)")
    parser.add_argument("--steps", type=step_count, help="refinement steps (default: unchanged)")
    parser.add_argument("--init", choices=("zero", "amortised"), help="the start (default: unchanged)")
    parser.add_argument("--solver", choices=pcmodel.SOLVERS, help="the dynamics (default: unchanged)")
    parser.add_argument("--momentum", type=float, help="beta of momentum and nesterov, in [0, 1)")
    parser.add_argument("--window", type=positive_int, help="m of anderson (default: the model's)")
    parser.add_argument(
        "--level-steps",
        type=positive_float,
        nargs="+",
        metavar="M",
        help="the plain step's multiplier per level, one per level (1 ... 1: none; not for gradient)",
    )
    args = parser.parse_args(argv)
    if args.momentum is not None and not 0 <= args.momentum < 1:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    try:
        model = pcmodel.load(args.checkpoint)
        name = model.config.solver if args.solver is None else args.solver
        beta = model.config.momentum if args.momentum is None else args.momentum
        window = model.config.window if args.window is None else args.window
        level_steps = model.config.level_steps if args.level_steps is None else tuple(args.level_steps)
        if name == "gradient" and args.level_steps is not None and any(m != 1 for m in level_steps):
            raise ValueError("--level-steps: the gradient solver takes none (its per-level steps are k1_scale)")
        changed = (args.solver, args.momentum, args.window, args.level_steps) != (None, None, None, None)
        solver = solver_for(name, pcmodel.Solver(), beta, window, level_steps) if changed else None
        weights = [w.clone() for w in model.weights]
        served = model.with_dynamics(steps=args.steps, init=args.init, solver=solver)
    except (pcmodel.CheckpointError, pcmodel.UnstableStepError, ValueError) as exc:
        return fail("python -m training.served", str(exc))
    assert all(torch.equal(a, b) for a, b in zip(weights, served.weights))
    provenance = dict(served.provenance)
    provenance["served"] = {
        "command": "python -m training.served " + shlex.join(argv),
        "from_sha256": model.sha256,
        "steps": served.config.steps,
        "initial_latents": served.config.initial_latents,
        "solver": served.config.served_solver.label,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    served.save(args.out, provenance=provenance)
    print(f"{args.out}: served with {served.config.steps} steps of {served.config.served_solver.label} from "
          f"{served.config.initial_latents}; sha256 {served.sha256[:12]} (was {model.sha256[:12]})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
