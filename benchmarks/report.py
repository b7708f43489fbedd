"""pc-bench's text output: the machine and settings lines, the Markdown table, the level-1 maps and profiles."""

from __future__ import annotations

from typing import Any


def table(report: dict[str, Any]) -> str:
    """The results as a Markdown table (one row per case and backend)."""
    lines = [
        "| case | backend | ms/batch | spread | images/s | x (a) | max abs diff | GFLOP/s | % peak | one-off (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in report["cases"]:
        for name, r in case["results"].items():
            label = f"({r['letter']}) {name}" if r["letter"] else name
            one_off = ", ".join(f"{k} {v:.3g}" for k, v in r["one_off_seconds"].items()) or "-"
            speedup = f"{r['speedup']:.2f}" if r["speedup"] else "-"
            share = f"{100 * r['peak_share']:.1f}"
            lines.append(
                f"| {case['case']} | {label} | {r['ms']:.3f} | {100 * r['spread']:.0f}% | {r['images_per_s']:.0f} | "
                f"{speedup} | {r['max_abs_diff']:.1e} | {r['gflops']:.2f} | {share} | {one_off} |"
            )
    return "\n".join(lines)


def print_text(report: dict[str, Any], threads: int, steps: int) -> None:
    """The whole report as text (what pc-bench prints without --json)."""
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; GPU: {m['gpu']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    print(f"threads: torch {threads}, onnxruntime intra-op {threads}, inter-op 1; T = {steps}")
    print(f"onnxruntime batches of B > 1: min({threads}, B) shards at once, 1 intra-op thread each (ort_shards)")
    p = report["matmul_peak"]
    print(f"matmul peak (float32 {p['size']}^2): best {p['best_gflops']:.1f} GFLOP/s, median {p['median_gflops']:.1f}")
    for case in report["cases"]:
        f = case["flops_per_step"]
        print(f"{case['case']}: {case['plan']} plan, {f['matmul']:,} FLOPs per step (levels {f['per_level']})")
    print(table(report))
    for case in report["cases"]:
        if case["ops_us"]:
            print(f"\nlevel-1 maps, {case['case']} (us per call):")
            for name, us in case["ops_us"].items():
                print(f"  {name}: {us:.1f}")
    for prof in report.get("profiles", []):
        print(f"\nprofile {prof['case']}: torch backend {prof['torch_ops_per_step']} ops/step; ", end="")
        print(f"onnxruntime {prof['onnx_nodes']} nodes, {prof['onnxruntime_kernels_per_step']} kernels/step")
        for row in prof["torch"][:8]:
            print(f"  torch {row['op']}: {row['calls_per_step']}/step, {row['self_us_total']} us")
        for row in prof["onnxruntime"][:8]:
            print(f"  ort {row['op']}: {row['nodes_per_step']}/step, {row['us_per_run']} us/run")
