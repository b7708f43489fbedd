"""pc-serve-soak: mixed good and bad traffic against pc-serve for N minutes; the server watched over time.

    pc-serve-soak --minutes 3                      # starts its own pc-serve on loopback
    pc-serve-soak --url http://127.0.0.1:3000 --server-pid PID --minutes 30 --json
    pc-serve-soak --minutes 3 --protocol mixed     # /encode and the Open Inference Protocol's REST infer

Each client sends, in a seeded mix: good images (/encode at the default steps, in tile mode, a large
16-bit gray PNG), an /encode_batch with a bad image among good ones, and bad requests (not an image,
truncated, a decompression bomb, steps out of range). --protocol v2 sends the Open Inference Protocol's
REST infer instead (benchmarks/v2wire.py, as tritonclient sends it): good images with binary tensors and
with JSON ones, two images in one request, model metadata, and bad requests (a FP32 `image`, a shape
that does not match the data, steps out of range, not an image, an unknown model: 404, a body over
PC_MAX_BODY_BYTES: 413 before it is read, binary data cut short); --protocol mixed sends both mixes at
once, half each, which is what an operator's traffic looks like. Every answer is checked against what
that request should get (a 503 with Retry-After is allowed for any request: it is load shedding; a v2
error must be the protocol's JSON body with the expected reason).
Reported per minute: requests, statuses, p50/p99 latency, and the server's resident memory and open
files; at the end, whether /metrics moved by exactly what the client counted (images encoded,
rejections by reason, /encode responses per endpoint and status, v2 calls per method and code in
pc_v2_rest_requests_total). Exit status 1 on a 5xx other than 503, an invalid answer, or a
disagreement. Loopback only: it refuses other hosts. The loops are bounded by time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
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

from . import v2wire
from .loadtest import Spec, check, machine, percentiles_ms, photos

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SAMPLE_EVERY_S = 2.0
PROTOCOLS = ("encode", "v2", "mixed")
SHED = ("overloaded", "over_budget")  # the reasons of a 503 (load shedding)


@dataclass(frozen=True)
class Kind:
    """One kind of request: how to send it and what the service must answer."""

    name: str
    weight: float
    endpoint: str
    files: list  # httpx `files` (a multipart /encode request)
    form: dict[str, str]
    status: int  # the expected status (503 is always allowed)
    images: int = 0  # images a 200 encodes
    reasons: tuple[str, ...] = ()  # error reasons a 200 (batch) or the rejection counts
    spec: Spec | None = None  # for a full check of an /encode 200
    # The Open Inference Protocol's requests: the body and headers (None: multipart), the call's name in
    # pc_v2_rest_requests_total (None: answered before the v2 routes, e.g. 413 by the body gate), how a 200
    # is checked (the steps it must show, None: the model's default), and the HTTP method.
    body: tuple[bytes, dict[str, str]] | None = None
    v2_method: str | None = None
    v2_steps: int | None = None
    v2_outputs: tuple[str, ...] | None = None  # a 200's outputs, checked with v2wire.check; None: not checked
    method: str = "POST"
    declared_length: int | None = None  # a Content-Length over the limit, sent with no body (raw socket)

    @property
    def protocol(self) -> str:
        return "encode" if self.body is None and self.declared_length is None and self.method == "POST" else "v2"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_kinds() -> list[Kind]:
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


def v2_kinds(model: str, max_body_bytes: int) -> list[Kind]:
    """The Open Inference Protocol's mix for the model named `model` (GET /model's name); weights sum to 1."""
    good = photos(64)
    infer = v2wire.infer_path(model)
    image = {"name": "image", "datatype": "BYTES", "shape": [1]}
    binary = v2wire.image_request([good[1]])
    element = v2wire.bytes_elements([good[0]])
    whole, headers = v2wire.encode({"inputs": [{**image, "parameters": {"binary_data_size": len(element)}}]}, element)
    cut = (whole[: len(whole) - len(element) // 2], headers)  # the body ends halfway through the image's bytes
    fp32 = v2wire.encode({"inputs": [{**image, "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}, b"\0" * 4)
    short = v2wire.encode({"inputs": [{**image, "shape": [2], "data": [base64.b64encode(good[0]).decode()]}]})
    tiled = ("latent_1", "energy")

    def v2(name: str, weight: float, body, status: int, reasons=(), path: str = infer, **more) -> Kind:
        return Kind(name, weight, path, [], {}, status, reasons=reasons, body=body, v2_method="ModelInfer", **more)

    return [
        v2("v2_binary", 0.45, binary, 200, images=1, v2_outputs=v2wire.OUTPUTS),
        v2("v2_json", 0.12, v2wire.image_request([good[3]], binary=False), 200, images=1, v2_outputs=v2wire.OUTPUTS),
        v2(
            "v2_two_tiled",
            0.06,
            v2wire.image_request(good[:2], {"size_mode": "tile", "steps": 30}, tiled),
            200,
            images=2,
            v2_steps=30,
            v2_outputs=tiled,
        ),
        Kind("v2_metadata", 0.02, f"/v2/models/{model}", [], {}, 200, v2_method="ModelMetadata", method="GET"),
        v2("v2_fp32_image", 0.05, fp32, 400, ("bad_request",)),
        v2("v2_bad_shape", 0.05, short, 400, ("bad_request",)),
        v2("v2_bad_steps", 0.05, v2wire.image_request([good[0]], {"steps": 0}), 400, ("bad_parameter",)),
        v2("v2_not_an_image", 0.05, v2wire.image_request([b"hello, not pixels"]), 400, ("bad_image",)),
        v2("v2_unknown_model", 0.05, binary, 404, ("not_found",), path=v2wire.infer_path("no-such-model")),
        Kind("v2_oversize", 0.05, infer, [], {}, 413, reasons=("too_large",), declared_length=max_body_bytes + 1),
        v2("v2_truncated", 0.05, cut, 400, ("bad_request",)),
    ]


def kinds(protocol: str = "encode", model: str = "", max_body_bytes: int = 0) -> list[Kind]:
    """The request mix of a protocol; `mixed` is both mixes, each at half its weight."""
    if protocol == "encode":
        return encode_kinds()
    if protocol == "v2":
        return v2_kinds(model, max_body_bytes)
    if protocol == "mixed":
        both = [*encode_kinds(), *v2_kinds(model, max_body_bytes)]
        return [dataclasses.replace(k, weight=k.weight / 2) for k in both]
    raise ValueError(f"protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")


@dataclass
class Tally:
    """What the client saw; compared with the server's /metrics at the end."""

    responses: Counter = field(default_factory=Counter)  # (endpoint, status) of /encode and /encode_batch
    v2_calls: Counter = field(default_factory=Counter)  # (method, code) of the v2 routes' answers
    v2_gate_maybe: int = 0  # v2 503s that the body gate may have answered before the v2 routes (over_budget)
    images: int = 0
    errors: Counter = field(default_factory=Counter)  # reason
    shed: int = 0  # 503s (overloaded or over_budget)
    invalid: list[str] = field(default_factory=list)
    latencies: dict[int, list[float]] = field(default_factory=dict)  # minute -> seconds
    statuses: dict[int, Counter] = field(default_factory=dict)  # minute -> status counts
    by_protocol: dict[str, Counter] = field(default_factory=dict)  # encode / v2 -> status counts


async def declare_too_much(url: str, kind: Kind) -> httpx.Response:
    """POST with a Content-Length over the limit and no body at all: the answer must come before any of it."""
    parts = urlparse(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(
            (
                f"POST {kind.endpoint} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/octet-stream\r\n"
                f"Inference-Header-Content-Length: 2\r\nContent-Length: {kind.declared_length}\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
        length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 60)
        return httpx.Response(status, headers=headers, content=body)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def judge(kind: Kind, response: httpx.Response, default_steps: int | None) -> str | None:
    """Why an answer with the expected status is wrong for `kind`, or None."""
    if response.status_code == 200:
        if kind.spec is not None:
            return check(kind.spec, response, default_steps)
        if kind.v2_outputs is not None:
            steps = kind.v2_steps if kind.v2_steps is not None else default_steps
            return v2wire.check(response, steps, kind.images, kind.v2_outputs)
        return None
    if kind.protocol == "v2":  # the protocol's error body: {"error": "...", "reason": ...}
        try:
            body = response.json()
        except ValueError:
            return f"error body is not JSON: {response.text[:120]}"
        if not isinstance(body, dict) or not isinstance(body.get("error"), str):
            return f'error body has no "error" text: {response.text[:120]}'
        if kind.reasons and body.get("reason") != kind.reasons[0]:
            return f"reason {body.get('reason')!r}, expected {kind.reasons[0]!r}: {body['error'][:120]}"
    return None


async def client(
    http: httpx.AsyncClient, mix: list[Kind], seed: int, deadline: float, t0: float, tally: Tally, url: str
):
    rng = np.random.default_rng(seed)
    weights = np.array([k.weight for k in mix]) / sum(k.weight for k in mix)
    default_steps = (await http.get("/model")).json()["steps"]["default"]
    while time.monotonic() < deadline:  # bounded by the clock
        kind = mix[rng.choice(len(mix), p=weights)]
        start = time.monotonic()
        try:
            if kind.declared_length is not None:
                response = await declare_too_much(url, kind)
            elif kind.method == "GET":
                response = await http.get(kind.endpoint)
            elif kind.body is not None:
                response = await http.post(kind.endpoint, content=kind.body[0], headers=kind.body[1])
            else:
                response = await http.post(kind.endpoint, files=kind.files, data=kind.form)
        except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            tally.invalid.append(f"{kind.name}: request failed: {exc!r}")
            continue
        code = response.status_code
        minute = int((start - t0) // 60)
        tally.latencies.setdefault(minute, []).append(time.monotonic() - start)
        tally.statuses.setdefault(minute, Counter())[code] += 1
        tally.by_protocol.setdefault(kind.protocol, Counter())[code] += 1
        if kind.v2_method is not None:
            tally.v2_calls[(kind.v2_method, str(code))] += 1
        elif kind.protocol == "encode":
            tally.responses[(kind.endpoint, code)] += 1
        if code == 503:
            tally.shed += 1
            if response.headers.get("retry-after") is None:
                tally.invalid.append(f"{kind.name}: 503 without Retry-After")
            if kind.v2_method is not None and _reason(response) != "overloaded":
                tally.v2_gate_maybe += 1  # over_budget: the body gate's (no v2 call) or the decoding budget's
            continue
        if code != kind.status:
            tally.invalid.append(f"{kind.name}: status {code}, expected {kind.status}: {response.text[:120]}")
            continue
        if problem := judge(kind, response, default_steps):
            tally.invalid.append(f"{kind.name}: {problem}")
        if code == 200:
            tally.images += kind.images
        tally.errors.update(kind.reasons)


def _reason(response: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        return response.json().get("reason")
    return None


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


def _labelled(samples: dict, name: str, label: str, **match: str) -> set[str]:
    """The values `label` takes in the samples of `name` that match."""
    return {
        dict(labels)[label]
        for (n, labels), _ in samples.items()
        if n == name and label in dict(labels) and all(dict(labels).get(k) == x for k, x in match.items())
    }


def agreement(before: dict, after: dict, tally: Tally) -> list[str]:
    """Differences between the client's counts and the server's /metrics (empty when they agree exactly):
    images encoded; rejections by every reason that moved or that the client counted (503s by their sum,
    overloaded + over_budget); /encode's responses per endpoint and status; and every v2 (method, code) that
    moved or that the client counted. A v2 503 that says over_budget may come from the body gate, before the
    v2 routes: those are the only slack (ModelInfer 503s between the client's count less them and it)."""
    problems = []

    def delta(name: str, **labels: str) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    if delta("pc_images_total") != tally.images:
        problems.append(f"pc_images_total moved {delta('pc_images_total'):.0f}, client counted {tally.images}")
    errors = "pc_request_errors_total"
    reasons = _labelled(before, errors, "reason") | _labelled(after, errors, "reason")
    for reason in sorted((reasons | set(tally.errors)) - set(SHED)):
        got, n = delta("pc_request_errors_total", reason=reason), tally.errors.get(reason, 0)
        if got != n:
            problems.append(f"errors {reason}: /metrics {got:.0f}, client {n}")
    shed = sum(delta("pc_request_errors_total", reason=r) for r in SHED)
    if shed != tally.shed:
        problems.append(f"503s: /metrics {shed:.0f} (overloaded + over_budget), client {tally.shed}")
    for (endpoint, status), n in tally.responses.items():
        got = delta("bentoml_service_request_total", endpoint=endpoint, http_response_code=str(status))
        if got != n:
            problems.append(f"{endpoint} {status}: bentoml_service_request_total moved {got:.0f}, client {n}")
    name = "pc_v2_rest_requests_total"
    methods = _labelled(before, name, "method") | _labelled(after, name, "method") | {m for m, _ in tally.v2_calls}
    for method in sorted(methods):
        codes = _labelled(before, name, "code", method=method) | _labelled(after, name, "code", method=method)
        for code in sorted(codes | {c for m, c in tally.v2_calls if m == method}):
            got, n = delta(name, method=method, code=code), tally.v2_calls.get((method, code), 0)
            slack = tally.v2_gate_maybe if (method, code) == ("ModelInfer", "503") else 0
            if not n - slack <= got <= n:
                problems.append(f"v2 {method} {code}: {name} moved {got:.0f}, client {n}")
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


async def soak(url: str, pid: int | None, minutes: float, clients: int, seed: int, protocol: str = "encode") -> dict:
    card = httpx.get(url + "/model", timeout=30).json()
    mix = kinds(protocol, card["name"], card["limits"]["max_body_bytes"])
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
        await asyncio.gather(watch(), *(client(http, mix, seed + i, deadline, t0, tally, url) for i in range(clients)))
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
        "protocol": protocol,
        "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "statuses_by_protocol": {
            p: {str(k): v for k, v in sorted(c.items())} for p, c in sorted(tally.by_protocol.items())
        },
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
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="encode",
        help="encode: multipart /encode and /encode_batch; v2: the Open Inference Protocol's REST infer (binary and "
        "JSON tensors); mixed: both in one run, half each (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60 or args.clients < 1:
        parser.error("--minutes must be in (0, 1440] and --clients at least 1")

    from .launch import LocalServer

    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            parser.error("--url must be a loopback address (127.0.0.1, localhost, ::1): the soak sends bad traffic")
        report = asyncio.run(
            soak(args.url.rstrip("/"), args.server_pid, args.minutes, args.clients, args.seed, args.protocol)
        )
    else:
        with LocalServer() as server:
            assert server.process is not None
            report = asyncio.run(
                soak(server.url, server.process.pid, args.minutes, args.clients, args.seed, args.protocol)
            )
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['requests']} requests ({args.protocol}) in {args.minutes} min from {args.clients} clients: "
            f"{report['statuses_by_protocol']}; "
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
