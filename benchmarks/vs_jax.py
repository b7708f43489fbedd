"""Where we stand against the strongest JAX peer: our CPU backends vs jax.jit, side by side, T = 100.

    python -m benchmarks.vs_jax --threads 1 --json
    python -m benchmarks.vs_jax --threads 2

Cases: conv-rgb 32x32 B=1 and B=32 and the bundled photo at 256x256, B=1 and B=4 (copies of it),
rao-ballard-1999 16x26 B=1 and B=32 (inputs uniform in [-1, 1], seed 0 except the photo). Per round
every runner is timed once (mean over calls lasting at least --min-time), each round's order rotated by
one, so the ratio of a round compares runs taken side by side; the median of the per-round ratios is the number
to read. "ours" is `model.infer(x, steps=100, solver="gradient")` (the automatic backend: numba for
the quadratic plan where numba is installed, else onnxruntime), called once first to prepare; beside it
each CPU backend that applies, asked for by name ("onnxruntime", "numba"), the whole result as `infer`
returns it. JAX runs every variant of benchmarks.jax_peer that applies, each its own runner in the
rounds; the strongest JAX of a cell is the variant with the lowest median there, and every ratio is
against its sample of the same round.

Threads are a property of the process: torch.set_num_threads(n) (our backends read it) and XLA_FLAGS
set by benchmarks.jax_peer.configure_threads before jax is imported. Run one process per thread count.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.cases import Case, check_cases, parse_case
from benchmarks.timing import time_call
from pcmodel.cliargs import ArgumentParser, fail, nonnegative_float, positive_int, step_count, thread_count

CASES = [("conv-rgb", (32, 32), 1, False), ("conv-rgb", (32, 32), 32, False), ("conv-rgb", (256, 256), 1, True),
         ("conv-rgb", (256, 256), 4, True), ("rao-ballard-1999", (16, 26), 1, False),
         ("rao-ballard-1999", (16, 26), 32, False)]  # fmt: skip


def case_input(model: Any, hw: tuple[int, int], batch: int, photo: bool) -> Any:
    """Uniform in [-1, 1] (seed 0), or the bundled photo resized to hw and preprocessed, `batch` copies."""
    import torch

    from pcmodel.images import preprocess, sample_photo

    if photo:  # copies: the time per call does not depend on which photos fill the batch
        return preprocess(sample_photo(), model.config, size=hw).expand(batch, -1, -1, -1).contiguous()
    generator = torch.Generator().manual_seed(0)
    return torch.rand((batch, model.config.input_shape[0], *hw), generator=generator) * 2 - 1


def run_case(
    name: str, hw: tuple[int, int], batch: int, steps: int, rounds: int, min_time: float, photo: bool = False
) -> dict[str, Any]:
    """Ours and every JAX variant timed round after round; ratios against the strongest variant of this cell."""
    import pcmodel
    from benchmarks.jax_peer import compile_variants, latents_of
    from pcmodel.engines import numba_quadratic, plans

    model = pcmodel.load(name).with_dynamics(init="zero", solver="gradient")  # the paper's, as the peer runs
    x = case_input(model, hw, batch, photo)
    model.prepare(steps=[steps], shapes=[hw], solvers=["gradient"])  # the paper's dynamics, as the JAX peer runs
    first = model.infer(x, steps=steps, solver="gradient")
    expected = model.infer(x, steps=steps, backend="loop", solver="gradient").latents
    runners: dict[str, Callable[[], Any]] = {"ours": lambda: model.infer(x, steps=steps, solver="gradient").latents}
    info: dict[str, Any] = {"ours_backend": first.backend, "input": "photo" if photo else "uniform"}
    named = ["onnxruntime"]
    if numba_quadratic.available() and plans.plan_kind(model.config, hw) == "quadratic":
        named.append("numba")
    for backend in named:
        model.infer(x, steps=steps, backend=backend, solver="gradient")  # builds or compiles

        def call(backend: str = backend) -> Any:
            return model.infer(x, steps=steps, backend=backend, solver="gradient").latents

        runners[backend] = call
    jax_calls, info["jax_compile_s"] = compile_variants(model, x, steps)
    for variant, jax_call in jax_calls.items():
        runners[f"jax-{variant}"] = latents_of(jax_call)
    diffs = {}
    for key, runner in runners.items():
        got = runner()
        diffs[key] = max(float((a - b).abs().max()) for a, b in zip(got, expected))
    samples: dict[str, list[float]] = {key: [] for key in runners}
    keys = list(runners)
    for index in range(rounds):
        # Each round starts one runner later, so that no runner's sample always follows the same neighbour
        # (JAX's and onnxruntime's thread pools may keep spinning for a while after a call).
        for key in keys[index % len(keys) :] + keys[: index % len(keys)]:
            samples[key].append(1e3 * time_call(runners[key], min_time))  # ms
    ms = {k: statistics.median(v) for k, v in samples.items()}
    # The strongest JAX of this cell: the variant with the lowest median, measured in these same rounds.
    strongest = min((k for k in runners if k.startswith("jax-")), key=ms.__getitem__)
    info["jax_variant"] = strongest.removeprefix("jax-")
    ratios = {
        key: [j / o for j, o in zip(samples[strongest], samples[key])] for key in runners if not key.startswith("jax-")
    }  # > 1: faster than the strongest JAX
    return {
        "case": f"{name} {hw[0]}x{hw[1]} B={batch}" + (" photo" if photo else ""),
        "ms": ms,
        "jax_ms": ms[strongest],
        "samples_ms": samples,
        "ratio_vs_jax": ratios,
        "median_ratio_vs_jax": {k: statistics.median(v) for k, v in ratios.items()},
        "max_abs_diff_vs_loop": diffs,
        "info": info,
    }


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.vs_jax", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=thread_count, default=1, help="threads for torch and XLA (default: 1)")
    parser.add_argument("--steps", type=step_count, default=100, help="inference steps T (default: 100)")
    parser.add_argument("--rounds", type=positive_int, default=7, help="timing rounds (default: 7)")
    parser.add_argument(
        "--min-time", type=nonnegative_float, default=0.2, help="seconds per timing sample (default: 0.2)"
    )
    parser.add_argument(
        "--case", type=parse_case, action="append", help="MODEL:HxW:B (repeatable); default: the six cases"
    )
    parser.add_argument(
        "--photo-case",
        type=parse_case,
        action="append",
        help="MODEL:HxW:B with the bundled photo resized to HxW as every image (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("jax") is None:
        return fail(parser.prog, "needs jax, which is not installed: pip install -e '.[bench]'")
    chosen = [(c.model, c.size, c.batch, False) for c in args.case or []]
    chosen += [(c.model, c.size, c.batch, True) for c in args.photo_case or []]
    cases = chosen or CASES
    if problem := check_cases([Case(name, hw, batch) for name, hw, batch, _ in cases]):
        return fail(parser.prog, problem)

    from benchmarks.jax_peer import configure_threads

    flags = configure_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    results = []
    for name, hw, batch, photo in cases:
        result = run_case(name, hw, batch, args.steps, args.rounds, args.min_time, photo)
        results.append(result)
        if not args.json:
            ms = "  ".join(f"{k} {v:.3f} ms" for k, v in result["ms"].items())
            print(f"{result['case']}: {ms}  (strongest jax: {result['info']['jax_variant']})")
            for key, ratios in result["ratio_vs_jax"].items():
                rounds = " ".join(f"{r:.2f}" for r in ratios)
                print(f"  {key} / strongest jax speed per round: {rounds}  median {statistics.median(ratios):.2f}x")
            diffs = " ".join(f"{k} {v:.1e}" for k, v in result["max_abs_diff_vs_loop"].items())
            print(f"  max |latent - loop|: {diffs}", flush=True)
    if args.json:
        import platform

        import jax

        machine = {"threads": args.threads, "xla_flags": flags, "torch": torch.__version__, "jax": jax.__version__}
        machine["python"] = platform.python_version()
        json.dump({"machine": machine, "steps": args.steps, "results": results}, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
