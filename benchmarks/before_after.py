"""Time `model.infer` (prepared shape) on the cases issue 20 names, in one process, as one JSON line.

Run it from two checkouts in alternating processes to compare them side by side (docs/PERFORMANCE.md,
"Issue 20: before and after"):

    for r in 1 2 3 4 5; do
      for tree in OLD NEW; do (cd $tree && PYTHONPATH=$tree python NEW/benchmarks/before_after.py --threads 1); done
    done

(this file from the new tree for both, so that both run the same cases and steps).

Only pcmodel's public API is used, so any checkout since the engines refactor runs it.
"""

from __future__ import annotations

import argparse
import json
import time

CASES = [("conv-rgb", (32, 32), 1), ("conv-rgb", (32, 32), 32), ("conv-rgb", "photo", 1), ("conv-rgb", "photo", 4),
         ("rao-ballard-1999", (16, 26), 1), ("rao-ballard-1999", (16, 26), 32)]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.before_after", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch (and so backend) threads (default: 1)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of calls per case (default: 0.5)")
    parser.add_argument("--steps", type=int, default=100, help="inference steps T (default: 100, the issue's cases)")
    args = parser.parse_args(argv)

    import torch

    import pcmodel
    from pcmodel.images import sample_photo

    torch.set_num_threads(args.threads)
    out = {}
    for name, size, batch in CASES:
        # The paper's dynamics at T steps (the shipped configs serve 20 Nesterov steps from a learned start).
        model = pcmodel.load(name).with_dynamics(steps=args.steps, init="zero", solver="gradient")
        if size == "photo":  # the bundled photo at 256x256, `batch` copies
            x, hw = model.preprocess([sample_photo()], size=(256, 256)).repeat(batch, 1, 1, 1), (256, 256)
        else:
            generator = torch.Generator().manual_seed(0)
            x, hw = torch.rand((batch, model.config.input_shape[0], *size), generator=generator) * 2 - 1, size
        model.prepare(shapes=[hw], solvers=["gradient"])
        for backend in ["onnxruntime"] + (["auto"] if name == "rao-ballard-1999" else []):
            model.infer(x, backend=backend, solver="gradient")
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.min_time or calls < 3:
                model.infer(x, backend=backend, solver="gradient")
                calls += 1
            out[f"{name} {hw[0]}x{hw[1]} B={batch} {backend}"] = (time.perf_counter() - start) / calls * 1e3
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
