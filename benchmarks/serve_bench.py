"""pc-serve-bench: the service's latency, throughput with batching on and off, and its overhead.

    pc-serve-bench                       # conv-rgb, 64x64 photos, T = 100, 3 rounds
    pc-serve-bench --json --rounds 5 --concurrency 1,8,32
    pc-serve-bench --versus-paper --size 256 --concurrency 1,8   # the served defaults vs the paper's dynamics

Starts two servers side by side on this machine (batching on: PC_MAX_BATCH_SIZE=32; off: 1) and
measures them in alternating rounds, so that drift on a shared machine hits both alike. Per server
and round: one sequential client gives the latency p50/p95/p99; the model's own batch-1 time is
read from each response's Server-Timing header (the model call inside the server) and also timed in
this process after each request (`model.infer`, same image, steps and backend); the overhead is the
p50 HTTP latency minus the p50 model time in the server (also: the median of the per-request
differences, and the difference to the local model time). Then the images/s at each concurrency,
sent by a minimal asyncio HTTP client over keep-alive connections. The load generator runs on the
same machine as the servers and competes with them for the cores.
Prints medians over the rounds; --json prints every number and the machine.

With --versus-paper, one server (batching on) is sent two kinds of request in alternating rounds: the
model's served defaults (no solver, init or steps fields: what /model reports) and the paper's dynamics
as served before the fast defaults (solver=gradient, init=zero, --steps, default 100); the summary gives
each one's latency, model time and images/s, and the served defaults' speed-up (the paper's latency and
model time over the served ones; the served images/s over the paper's).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import time
import urllib.parse

import numpy as np

from pcmodel.cliargs import (
    ArgumentParser,
    device_name,
    fail,
    model_source,
    nonnegative_int,
    positive_int,
    step_count,
)
from service.client import server_timing

from .loadtest import Spec, drive, machine, percentiles_ms, photos


def server_model_ms(header: str) -> float:
    """The model time the server reports for a request (Server-Timing: model;dur=...)."""
    timing = server_timing(header)
    if "model" not in timing:
        raise SystemExit("pc-serve-bench: the response has no Server-Timing model entry")
    return timing["model"]


def sequential(url: str, spec: Spec, requests: int, model, rows, steps: int | None) -> dict:
    """One client, requests one after another, each followed by the model's own call on the same rows.

    Pairing the two makes them see the same moment of a shared machine; a short pause between them
    keeps the server's idle threads out of the local call. The client is the standard library's
    keep-alive HTTP/1.1 connection, the lightest at hand, so that the latency is the service's
    (httpx adds ~0.5 ms of its own per request on these cores).
    """
    body, headers = spec.encoded
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=300)
    http_s, model_s, server_model = [], [], []
    try:
        for _ in range(requests):
            start = time.perf_counter()
            connection.request("POST", "/encode", body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            http_s.append(time.perf_counter() - start)
            if response.status != 200:
                raise SystemExit(f"pc-serve-bench: a request failed: {response.status} {payload[:200]!r}")
            server_model.append(server_model_ms(response.getheader("server-timing", "")))
            time.sleep(0.01)
            start = time.perf_counter()
            # .cpu(): wait for a GPU to finish, as the server does
            model.infer(rows, steps=steps, solver=spec.solver, init=spec.init).energy.cpu()
            model_s.append(time.perf_counter() - start)
            time.sleep(0.01)
    finally:
        connection.close()
    http_ms, model_ms, in_server = np.asarray(http_s) * 1000, np.asarray(model_s) * 1000, np.asarray(server_model)
    http_p50 = float(np.percentile(http_ms, 50))
    return {
        "latency_ms": percentiles_ms(http_s),
        "model_batch1_p50_ms": round(float(np.percentile(model_ms, 50)), 3),
        "model_in_server_p50_ms": round(float(np.percentile(in_server, 50)), 3),
        "overhead_ms": round(http_p50 - float(np.percentile(in_server, 50)), 3),
        "overhead_paired_median_ms": round(float(np.median(http_ms - in_server)), 3),
        "overhead_vs_local_model_ms": round(http_p50 - float(np.percentile(model_ms, 50)), 3),
        "images_per_s_1": round(requests / float(http_ms.sum() / 1000), 2),
    }


async def blast(url: str, spec: Spec, clients: int, requests: int) -> float:
    """Send `requests` copies of spec over `clients` keep-alive connections; returns the wall time.

    A minimal HTTP/1.1 client on asyncio streams (the request bytes are built once), so that the
    load generator, which shares the cores with the server here, takes as little of them as it can.
    """
    body, headers = spec.encoded
    parsed = urllib.parse.urlsplit(url)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST /encode HTTP/1.1\r\nHost: {parsed.netloc}\r\n{head}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    left = iter(range(requests))

    async def client() -> None:
        reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port)
        try:
            for _ in left:
                writer.write(request)
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                if b" 200 " not in status:
                    raise SystemExit(f"pc-serve-bench: a request failed: {status!r}")
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start


def measure(url: str, spec: Spec, requests: int, concurrency: list[int], model, rows, steps: int | None) -> dict:
    """One server, one round: sequential latency and overhead, then images/s at each concurrency."""
    out = sequential(url, spec, requests, model, rows, steps)
    out["images_per_s"] = {"1": out.pop("images_per_s_1")}
    for c in concurrency:
        if c == 1:
            continue
        n = max(requests, 6 * c)
        out["images_per_s"][str(c)] = round(n / asyncio.run(blast(url, spec, c, n)), 2)
    return out


def _counts(text: str) -> list[int]:
    """--concurrency: comma-separated client counts, each at least 1."""
    try:
        return [positive_int(c) for c in text.split(",")]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: give client counts like 1,8,32 ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="pc-serve-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=model_source, default="default", help="checkpoint or name (default: %(default)s)"
    )
    parser.add_argument("--size", type=positive_int, default=64, help="photo side in pixels (default: %(default)s)")
    parser.add_argument("--steps", type=step_count, default=100, help="inference steps T (default: %(default)s)")
    parser.add_argument("--size-mode", choices=("resize", "tile", "full"), default=None, help="default: the model's")
    parser.add_argument(
        "--requests", type=positive_int, default=100, help="sequential requests per round (default: %(default)s)"
    )
    parser.add_argument("--concurrency", type=_counts, default="1,8,32", help="client counts (default: %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="alternating rounds (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="PC_MAX_BATCH_SIZE when batching is on (default: 32)"
    )
    parser.add_argument(
        "--device", type=device_name, default="auto", help="PC_DEVICE for the servers and the local model"
    )
    parser.add_argument(
        "--torch-threads", type=nonnegative_int, default=0, help="PC_TORCH_THREADS for both (0: the default)"
    )
    parser.add_argument(
        "--workers", type=positive_int, default=1, help="PC_WORKERS for both servers (default: %(default)s)"
    )
    parser.add_argument(
        "--versus-paper",
        action="store_true",
        help="one server: its served defaults vs the paper's dynamics (solver=gradient, init=zero, --steps)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with every number")
    args = parser.parse_args(argv)
    concurrency = args.concurrency

    import torch

    import pcmodel
    from service.forms import Part
    from service.host import default_threads, pick_device
    from service.inputs import plan, prepare
    from service.options import parse_options
    from service.settings import Settings

    from .launch import LocalServer

    limits = Settings()
    if args.steps > limits.max_steps:
        return fail("pc-serve-bench", f"--steps {args.steps}: the service takes at most {limits.max_steps} steps")
    if args.size < limits.min_side:
        return fail("pc-serve-bench", f"--size {args.size}: the service takes images of at least {limits.min_side} px")
    try:
        model = pcmodel.load(args.model).to(pick_device(args.device))
    except (OSError, ValueError) as exc:
        return fail("pc-serve-bench", f"--model {args.model}: {exc}")
    image = photos(args.size)[0]
    spec = Spec(image, steps=args.steps, size_mode=args.size_mode)
    if args.versus_paper:
        spec = Spec(image, steps=args.steps, size_mode=args.size_mode, solver="gradient", init="zero")
        specs = {"served": (Spec(image, size_mode=args.size_mode), None), "paper": (spec, args.steps)}
    device = pick_device(args.device)
    torch.set_num_threads(args.torch_threads or default_threads(args.workers))  # as in the servers
    options = parse_options(spec.form(), model.config, Settings())
    planned = plan(Part("image", "x.png", image), options, model.config, Settings())
    rows = prepare(planned, options, model.config).rows.to(device)
    prepare_local(model, rows, args.steps)
    model.infer(rows, steps=args.steps)  # warm-up (and the fast backends' export)
    if args.versus_paper:
        return versus_paper(args, model, rows, specs, device)

    rounds = []
    common = dict(
        model=args.model,
        device=args.device,
        torch_threads=args.torch_threads,
        workers=args.workers,
        warmup_steps=args.steps,
    )
    with (
        LocalServer(max_batch_size=args.batch_size, **common) as on,
        LocalServer(max_batch_size=1, **common) as off,
    ):
        for server in (on, off):  # the servers' own warm-up of the HTTP path
            asyncio.run(drive(server.url, [spec] * 20, 4, args.steps, validate=False))
        backend = model.infer(rows, steps=args.steps).backend
        for r in range(args.rounds):
            result = {}
            order = [("on", on), ("off", off)] if r % 2 == 0 else [("off", off), ("on", on)]
            for name, server in order:
                result[name] = measure(server.url, spec, args.requests, concurrency, model, rows, args.steps)
            rounds.append(result)
            print(f"round {r + 1}/{args.rounds}: {json.dumps(result)}", file=sys.stderr)

    summary = summarize(rounds, concurrency)
    report = {
        "model": model.name,
        "device": str(device),
        "backend": backend,
        "image": f"{args.size}x{args.size} PNG",
        "rows_per_image": int(rows.shape[0]),
        "steps": args.steps,
        "size_mode": options.size_mode,
        "batch_size_on": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "workers": args.workers,
        "requests": args.requests,
        "rounds": rounds,
        "summary": summary,
        "machine": machine(),
        "note": "load generator on the same machine as the servers",
    }
    if args.json:
        print(json.dumps(report))
    else:
        print_summary(report)
    return 0


def prepare_local(model, rows, steps: int) -> None:
    """The local model's fast programs for what the server runs: the served and the paper's solver at the
    model's steps and at `steps`, at the rows' shape (as the server warms them). Unprepared, a call would run on
    the torch backend and the local model column would not time the server's path."""
    solvers = list(dict.fromkeys([model.solver(), model.solver("gradient")]))
    model.prepare(steps=sorted({model.config.steps, steps}), shapes=[tuple(rows.shape[1:])], solvers=solvers)


def versus_paper(args: argparse.Namespace, model, rows, specs: dict, device) -> int:
    """--versus-paper: one server, the served defaults and the paper's dynamics in alternating rounds."""
    from .launch import LocalServer

    for spec, steps in specs.values():  # warm the local model's programs for both
        model.infer(rows, steps=steps, solver=spec.solver, init=spec.init)
    common = dict(model=args.model, device=args.device, torch_threads=args.torch_threads, workers=args.workers)
    rounds = []
    with LocalServer(max_batch_size=args.batch_size, warmup_steps=args.steps, **common) as server:
        asyncio.run(drive(server.url, [s for s, _ in specs.values()] * 10, 4, args.steps, validate=False))
        for r in range(args.rounds):
            names = list(specs) if r % 2 == 0 else list(reversed(specs))
            result = {
                name: measure(server.url, specs[name][0], args.requests, args.concurrency, model, rows, specs[name][1])
                for name in names
            }
            rounds.append(result)
            print(f"round {r + 1}/{args.rounds}: {json.dumps(result)}", file=sys.stderr)
    summary = summarize(rounds, args.concurrency, names=tuple(specs))
    med = statistics.median
    summary["served_speedup"] = {
        "latency_p50": round(
            med([r["paper"]["latency_ms"]["p50"] / r["served"]["latency_ms"]["p50"] for r in rounds]), 2
        ),
        "model_in_server_p50": round(
            med([r["paper"]["model_in_server_p50_ms"] / r["served"]["model_in_server_p50_ms"] for r in rounds]), 2
        ),
        "images_per_s": {
            str(c): round(
                med([r["served"]["images_per_s"][str(c)] / r["paper"]["images_per_s"][str(c)] for r in rounds]), 2
            )
            for c in args.concurrency
        },
    }
    card = model.config
    report = {
        "model": model.name,
        "device": str(device),
        "image": f"{args.size}x{args.size} PNG",
        "rows_per_image": int(rows.shape[0]),
        "served": {"steps": card.steps, "solver": model.solver().label, "init": card.initial_latents},
        "paper": {"steps": args.steps, "solver": "gradient", "init": "zero"},
        "size_mode": args.size_mode or card.preprocess.size_mode,
        "rounds": rounds,
        "summary": summary,
        "machine": machine(),
        "note": "load generator on the same machine as the server",
    }
    if args.json:
        print(json.dumps(report))
        return 0
    s = report["summary"]
    print(f"{report['model']} on {report['device']}, {report['image']} in {report['size_mode']} mode")
    for name in specs:
        lat, row = s[name]["latency_ms"], s[name]
        print(
            f"{name:6} {report[name]}: p50 {lat['p50']} / p99 {lat['p99']} ms, "
            f"model {row['model_in_server_p50_ms']} ms in the server, overhead {row['overhead_ms']} ms; images/s "
            + ", ".join(f"{c} clients {v}" for c, v in row["images_per_s"].items())
        )
    print(f"served defaults' speed-up over the paper's dynamics: {json.dumps(s['served_speedup'])}")
    return 0


def summarize(rounds: list[dict], concurrency: list[int], names: tuple[str, ...] = ("on", "off")) -> dict:
    """Medians over the rounds."""

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    out: dict = {}
    for name in names:
        out[name] = {
            "latency_ms": {q: med([r[name]["latency_ms"][q] for r in rounds]) for q in ("p50", "p95", "p99")},
            **{
                key: med([r[name][key] for r in rounds])
                for key in (
                    "model_batch1_p50_ms",
                    "model_in_server_p50_ms",
                    "overhead_ms",
                    "overhead_paired_median_ms",
                    "overhead_vs_local_model_ms",
                )
            },
            "images_per_s": {str(c): med([r[name]["images_per_s"][str(c)] for r in rounds]) for c in concurrency},
        }
    if names != ("on", "off"):
        return out
    top = str(max(concurrency))
    out["speedup_on_at_max_clients_vs_one"] = med(
        [r["on"]["images_per_s"][top] / r["on"]["images_per_s"]["1"] for r in rounds]
    )
    out["batching_gain_at_max_clients"] = med(
        [r["on"]["images_per_s"][top] / r["off"]["images_per_s"][top] for r in rounds]
    )
    return out


def print_summary(report: dict) -> None:
    s = report["summary"]
    print(
        f"{report['model']} ({report['backend']} on {report['device']}), {report['image']} in "
        f"{report['size_mode']} mode ({report['rows_per_image']} row(s)), T = {report['steps']}, "
        f"medians of {len(report['rounds'])} rounds"
    )
    for name in ("on", "off"):
        lat, ips, row = s[name]["latency_ms"], s[name]["images_per_s"], s[name]
        print(
            f"batching {name:3}: one client p50 {lat['p50']} / p95 {lat['p95']} / p99 {lat['p99']} ms; model batch 1 "
            f"p50 {row['model_in_server_p50_ms']} ms in the server, {row['model_batch1_p50_ms']} ms here; overhead "
            f"{row['overhead_ms']} ms (paired {row['overhead_paired_median_ms']} ms, vs the local model "
            f"{row['overhead_vs_local_model_ms']} ms)"
        )
        print("             images/s " + ", ".join(f"{c} clients {v}" for c, v in ips.items()))
    print(
        f"batching on: {s['speedup_on_at_max_clients_vs_one']}x the images/s of one client at the most clients; "
        f"{s['batching_gain_at_max_clients']}x batching off"
    )
    print(f"machine: {report['machine']} ({report['note']})")


if __name__ == "__main__":
    sys.exit(main())
