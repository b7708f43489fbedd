"""pc-serve-soak: mixed good and bad traffic against pc-serve for N minutes; the server watched over time.

    pc-serve-soak --minutes 3                      # starts its own pc-serve on loopback
    pc-serve-soak --url http://127.0.0.1:3000 --server-pid PID --minutes 30 --json

Each client sends, in a seeded mix: good images (/encode at the default steps, in tile mode, a large
16-bit gray PNG), an /encode_batch with a bad image among good ones, and bad requests (not an image,
truncated, a decompression bomb, steps out of range). Every answer is checked against what that
request should get (a 503 with Retry-After is allowed for any request: it is load shedding).
Reported per minute: requests, statuses, p50/p99 latency, and the server's resident memory and open
files; at the end, whether /metrics moved by exactly what the client counted (images encoded,
rejections, responses per endpoint and status). Exit status 1 on a 5xx other than 503, an invalid
answer, or a disagreement. Loopback only: it refuses other hosts. The loops are bounded by time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import struct
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import numpy as np
import psutil
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from .loadtest import Spec, check, machine, percentiles_ms, photos

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SAMPLE_EVERY_S = 2.0


@dataclass(frozen=True)
class Kind:
    """One kind of request: how to send it and what the service must answer."""

    name: str
    weight: float
    endpoint: str
    files: list  # httpx `files`
    form: dict[str, str]
    status: int  # the expected status (503 is always allowed)
    images: int = 0  # images a 200 encodes
    reasons: tuple[str, ...] = ()  # error reasons a 200 (batch) or the rejection counts
    spec: Spec | None = None  # for a full check of an /encode 200


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def kinds() -> list[Kind]:
    good = photos(64)
    gray16 = _png(Image.fromarray((np.add.outer(np.arange(3000), np.arange(3000)) % 5 * 9000).astype(np.uint16)))
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )
    one = {"image": ("a.png", good[0])}
    return [
        Kind("good", 0.55, "/encode", [("image", ("a.png", good[1]))], {}, 200, 1, spec=Spec(good[1])),
        Kind("tile", 0.10, "/encode", [("image", ("a.png", good[2]))], {"size_mode": "tile", "steps": "30"}, 200, 1),
        Kind("large_gray16", 0.03, "/encode", [("image", ("g.png", gray16))], {"outputs": "latents"}, 200, 1),
        Kind(
            "batch_with_bad",
            0.08,
            "/encode_batch",
            [("images", (f"{i}.png", d)) for i, d in enumerate([*good[:3], b"not an image"])],
            {"outputs": "latents"},
            200,
            3,
            ("bad_image",),
        ),
        Kind("not_an_image", 0.06, "/encode", [("image", ("a.png", b"hello, not pixels"))], {}, 400, 0, ("bad_image",)),
        Kind("truncated", 0.06, "/encode", [("image", ("a.png", good[0][:300]))], {}, 400, 0, ("bad_image",)),
        Kind("bomb", 0.06, "/encode", [("image", ("b.png", bomb))], {}, 413, 0, ("too_large",)),
        Kind("bad_steps", 0.06, "/encode", list(one.items()), {"steps": "0"}, 422, 0, ("bad_parameter",)),
    ]


@dataclass
class Tally:
    """What the client saw; compared with the server's /metrics at the end."""

    responses: Counter = field(default_factory=Counter)  # (endpoint, status)
    images: int = 0
    errors: Counter = field(default_factory=Counter)  # reason
    shed: int = 0  # 503s (overloaded or over_budget)
    invalid: list[str] = field(default_factory=list)
    latencies: dict[int, list[float]] = field(default_factory=dict)  # minute -> seconds
    statuses: dict[int, Counter] = field(default_factory=dict)  # minute -> status counts


async def client(http: httpx.AsyncClient, mix: list[Kind], seed: int, deadline: float, t0: float, tally: Tally):
    rng = np.random.default_rng(seed)
    weights = np.array([k.weight for k in mix]) / sum(k.weight for k in mix)
    default_steps = (await http.get("/model")).json()["steps"]["default"]
    while time.monotonic() < deadline:  # bounded by the clock
        kind = mix[rng.choice(len(mix), p=weights)]
        start = time.monotonic()
        try:
            response = await http.post(kind.endpoint, files=kind.files, data=kind.form)
        except httpx.HTTPError as exc:
            tally.invalid.append(f"{kind.name}: request failed: {exc!r}")
            continue
        minute = int((start - t0) // 60)
        tally.latencies.setdefault(minute, []).append(time.monotonic() - start)
        tally.statuses.setdefault(minute, Counter())[response.status_code] += 1
        tally.responses[(kind.endpoint, response.status_code)] += 1
        if response.status_code == 503:
            tally.shed += 1
            if response.headers.get("retry-after") is None:
                tally.invalid.append(f"{kind.name}: 503 without Retry-After")
            continue
        if response.status_code != kind.status:
            tally.invalid.append(
                f"{kind.name}: status {response.status_code}, expected {kind.status}: {response.text[:120]}"
            )
            continue
        if response.status_code == 200:
            tally.images += kind.images
            if kind.spec is not None and (problem := check(kind.spec, response, default_steps)):
                tally.invalid.append(f"{kind.name}: {problem}")
        tally.errors.update(kind.reasons)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sum(samples: dict, name: str, **match: str) -> float:
    return sum(
        v for (n, labels), v in samples.items() if n == name and all(dict(labels).get(k) == x for k, x in match.items())
    )


def agreement(before: dict, after: dict, tally: Tally) -> list[str]:
    """Differences between the client's counts and the server's /metrics (empty when they agree exactly)."""
    problems = []

    def delta(name: str, **labels: str) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    if delta("pc_images_total") != tally.images:
        problems.append(f"pc_images_total moved {delta('pc_images_total'):.0f}, client counted {tally.images}")
    for reason, n in tally.errors.items():
        if delta("pc_request_errors_total", reason=reason) != n:
            problems.append(
                f"errors {reason}: /metrics {delta('pc_request_errors_total', reason=reason):.0f}, client {n}"
            )
    shed = delta("pc_request_errors_total", reason="overloaded") + delta(
        "pc_request_errors_total", reason="over_budget"
    )
    if shed != tally.shed:
        problems.append(f"503s: /metrics {shed:.0f} (overloaded + over_budget), client {tally.shed}")
    for (endpoint, status), n in tally.responses.items():
        got = delta("bentoml_service_request_total", endpoint=endpoint, http_response_code=str(status))
        if got != n:
            problems.append(f"{endpoint} {status}: bentoml_service_request_total moved {got:.0f}, client {n}")
    return problems


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def resources(pid: int | None) -> dict[str, float] | None:
    if pid is None:
        return None
    rss = fds = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            rss += p.memory_info().rss
            fds += p.num_fds()
    return {"rss_mib": round(rss / 2**20, 1), "open_files": fds}


async def soak(url: str, pid: int | None, minutes: float, clients: int, seed: int) -> dict:
    mix = kinds()
    tally = Tally()
    before = scrape(url)
    samples: list[dict] = []
    t0 = time.monotonic()
    deadline = t0 + minutes * 60

    async def watch():
        while time.monotonic() < deadline:
            if (r := resources(pid)) is not None:
                samples.append({"t_s": round(time.monotonic() - t0, 1), **r})
            await asyncio.sleep(SAMPLE_EVERY_S)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(watch(), *(client(http, mix, seed + i, deadline, t0, tally) for i in range(clients)))
    await asyncio.sleep(0.5)  # the last responses' metrics are written before the body is sent; settle anyway
    after = scrape(url)
    per_minute = []
    for minute in sorted(tally.latencies):
        in_minute = [s for s in samples if minute * 60 <= s["t_s"] < (minute + 1) * 60]
        per_minute.append(
            {
                "minute": minute,
                "requests": len(tally.latencies[minute]),
                "statuses": {str(k): v for k, v in sorted(tally.statuses[minute].items())},
                "p50_ms": percentiles_ms(tally.latencies[minute])["p50"],
                "p99_ms": percentiles_ms(tally.latencies[minute])["p99"],
                "rss_mib_max": max((s["rss_mib"] for s in in_minute), default=None),
                "open_files_max": max((s["open_files"] for s in in_minute), default=None),
            }
        )
    statuses = Counter()
    for counts in tally.statuses.values():
        statuses.update(counts)
    mismatches = agreement(before, after, tally)
    return {
        "minutes": minutes,
        "clients": clients,
        "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(v for k, v in statuses.items() if k >= 500 and k != 503),
        "invalid": len(tally.invalid),
        "problems": sorted(set(tally.invalid))[:10],
        "metrics_agree": not mismatches,
        "mismatches": mismatches,
        "per_minute": per_minute,
        "resources": samples,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pc-serve-soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running service on loopback (default: start pc-serve here)")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's pid, to watch its memory and files")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60 or args.clients < 1:
        parser.error("--minutes must be in (0, 1440] and --clients at least 1")

    from .launch import LocalServer

    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            parser.error("--url must be a loopback address (127.0.0.1, localhost, ::1): the soak sends bad traffic")
        report = asyncio.run(soak(args.url.rstrip("/"), args.server_pid, args.minutes, args.clients, args.seed))
    else:
        with LocalServer() as server:
            assert server.process is not None
            report = asyncio.run(soak(server.url, server.process.pid, args.minutes, args.clients, args.seed))
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['requests']} requests in {args.minutes} min from {args.clients} clients: {report['statuses']}; "
            f"invalid {report['invalid']}; /metrics agrees: {report['metrics_agree']}"
        )
        for row in report["per_minute"]:
            print(f"  minute {row['minute']}: {row}")
        for line in report["problems"] + report["mismatches"]:
            print(f"problem: {line}")
        print(f"machine: {report['machine']}")
    return 1 if report["server_errors"] or report["invalid"] or not report["metrics_agree"] else 0


if __name__ == "__main__":
    sys.exit(main())
