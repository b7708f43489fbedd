"""pc-bench: fixed-T inference of every backend side by side, on the same weights, inputs and steps.

Cases (a) the notebook-style reference (benchmarks.reference: eager PyTorch, autograd of the energy at
every step), (b) the torch backend, (c) onnxruntime, (d) CUDA graphs (when CUDA is available: float32,
TF32 and bf16 operands, and the eager torch backend on the GPU for comparison) and (e) pcx, the same
network written in pcx's idioms (when the optional `pcx` extra is importable), (f) an independent
jax.jit of the network (benchmarks.jax_peer) and (g) the numba backend (quadratic plans). For each it
prints the
largest latent difference from (a), ms per batch, images/s, the speed-up over (a), the model's FLOPs per
step (docs/MODEL.md section 6), the achieved GFLOP/s and its share of this machine's matmul peak (measured
first, in the same run), and the one-off costs (graph build, session, capture, compile) apart. Where
onnxruntime splits the batch into single-threaded shards (`ort_shards`), the whole batch on one
session with all threads runs beside it as "onnxruntime-unsharded".

Timing: every backend of a case is timed once per round, round after round (interleaved, so a busy
machine slows all alike); a sample is the mean over calls filling `--min-time`; the best round counts
and the spread (worst / best - 1) is reported. This is a benchmark, never a test: no target is asserted.

The work is split by job: benchmarks.cases (what is measured), machine (the machine and its matmul
peak), flops (the FLOP model), runners (the backends, and the one function that changes engine
settings), pcx_port (case e), jax_peer (case f), measure (timing one case), profiling and report.
This module is the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import torch

from pcmodel.cliargs import ArgumentParser, fail, nonnegative_float, positive_int, step_count, thread_count
from pcmodel.engines import onnxruntime as ort_engine

from .cases import DEFAULT_CASES, check_cases, parse_case
from .machine import machine, matmul_peak
from .measure import bench_case
from .profiling import profile_case
from .report import print_text
from .runners import LETTERS


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="pc-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--case",
        dest="cases",
        type=parse_case,
        action="append",
        help="MODEL:HxW:B (repeatable; default: the six cases)",
    )
    parser.add_argument("--steps", type=step_count, default=100, help="inference steps T (default: %(default)s)")
    parser.add_argument(
        "--backends",
        default="reference,torch,onnxruntime,numba,cuda-graph,pcx,jax",
        help="comma-separated subset of reference,torch,onnxruntime,numba,cuda-graph,pcx,jax (default: all)",
    )
    parser.add_argument("--rounds", type=positive_int, default=5, help="timing rounds per case (default: %(default)s)")
    parser.add_argument(
        "--min-time", type=nonnegative_float, default=0.2, help="seconds per timing sample (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="torch and onnxruntime threads, 1 to 1024 (default: all cores)",
    )
    parser.add_argument("--ideas", action="store_true", help="also time the alternatives recorded in PERFORMANCE.md")
    parser.add_argument("--profile", action="store_true", help="also profile the torch backend and onnxruntime")
    parser.add_argument(
        "--peak-size", type=positive_int, default=2048, help="matmul size for the peak (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="pc-bench: %(message)s")
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = set(names) - set(LETTERS)
    if unknown or not names:
        parser.error(f"argument --backends: unknown {sorted(unknown)}; choose from {', '.join(LETTERS)}")
    if problem := check_cases(args.cases or [parse_case(c) for c in DEFAULT_CASES]):
        return fail("pc-bench", problem)
    threads = args.threads or ort_engine.available_cores()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)  # onnxruntime sessions take torch's thread count
    if "jax" in names and "jax" not in sys.modules:
        from .jax_peer import configure_threads

        configure_threads(threads)  # XLA fixes its thread pools when jax is first imported
    try:
        return _run(args, names, threads)
    finally:
        torch.set_num_threads(saved)


def _run(args: argparse.Namespace, names: list[str], threads: int) -> int:
    cases = args.cases or [parse_case(c) for c in DEFAULT_CASES]
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "steps": args.steps,
            "rounds": args.rounds,
            "min_time_s": args.min_time,
            "threads": {"torch_intra_op": threads, "onnxruntime_intra_op": threads, "onnxruntime_inter_op": 1},
            "onnxruntime_shards": f"min({threads}, batch) with 1 intra-op thread each (ort_shards)",
            "input": "uniform in [-1, 1], seed 0; weights: the shipped checkpoint or the seed-0 preset",
        },
    }
    report["matmul_peak"] = matmul_peak(args.peak_size)  # first, in the same run as the cases
    peak = report["matmul_peak"]["best_gflops"]
    report["cases"] = []
    for case in cases:
        try:
            report["cases"].append(bench_case(case, args.steps, names, args.rounds, args.min_time, peak, args.ideas))
        except (OSError, ValueError) as exc:
            print(f"pc-bench: {case.label}: {exc}", file=sys.stderr)
            return 2
        if not args.json:
            print(f"done: {case.label}", file=sys.stderr)
    if args.profile:
        report["profiles"] = [profile_case(case, args.steps) for case in cases]
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    print_text(report, threads, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
