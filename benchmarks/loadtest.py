"""pc-serve-loadtest: many concurrent clients against the service; every response checked.

    pc-serve-loadtest                      # starts its own pc-serve; 32 clients, 2,000 requests
    pc-serve-loadtest --url http://host:3000 --server-pid PID --clients 8 --requests 200
    pc-serve-loadtest --protocol v2        # the same load over the Open Inference Protocol (binary tensors)

Requests mix the bundled photos at 64x64 (most at the model's default steps, some at other step
counts and some in tile mode, so batches must group by steps). Each response is checked: status
200, the steps asked for, shapes, input - reconstruction = error_map exactly, and the energy lower
after inference than before (--protocol v2: the same checks on the binary tensors /v2/.../infer
returns, the steps from the energy trace's length). Reports status counts, latency percentiles, throughput and the
server's resident memory after the run against after warm-up (target <= 1.2x). Exit status 1 on
any 5xx, other failure, or invalid response. The load generator runs on the same machine as the
server unless --url points elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import platform
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np
from PIL import Image

from pcmodel.cliargs import ArgumentParser, device_name, model_source, nonnegative_int, positive_int
from service.client import decode_array

from . import v2wire


@dataclass(frozen=True)
class Spec:
    """One request: an image and the form fields to send with it."""

    image: bytes
    steps: int | None = None
    size_mode: str | None = None
    outputs: str | None = None
    solver: str | None = None
    init: str | None = None

    def form(self) -> dict[str, str]:
        fields = {"steps": self.steps, "size_mode": self.size_mode, "outputs": self.outputs}
        fields.update(solver=self.solver, init=self.init)
        return {k: str(v) for k, v in fields.items() if v is not None}

    @functools.cached_property
    def encoded(self) -> tuple[bytes, dict[str, str]]:
        """The multipart body and its headers, built once: the load generator shares the server's cores."""
        request = httpx.Request("POST", "http://x/encode", files={"image": ("image.png", self.image)}, data=self.form())
        return request.read(), {"content-type": request.headers["content-type"]}

    @functools.cached_property
    def v2_encoded(self) -> tuple[bytes, dict[str, str]]:
        """The Open Inference Protocol request with binary tensors (what tritonclient sends), built once."""
        parameters: dict[str, object] = {"steps": self.steps} if self.steps is not None else {}
        if self.size_mode is not None:
            parameters["size_mode"] = self.size_mode
        return v2wire.image_request([self.image], parameters)


@dataclass
class Sample:
    status: int
    seconds: float
    problem: str | None = None  # why a 200 response was invalid, or the error text


@dataclass
class Report:
    clients: int
    requests: int
    seconds: float
    statuses: dict[str, int]
    invalid: int
    problems: list[str]
    latency_ms: dict[str, float]
    requests_per_s: float
    rss_after_warmup_mb: float | None = None
    rss_after_mb: float | None = None
    rss_ratio: float | None = None
    machine: dict[str, str] = field(default_factory=dict)

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if code.startswith("5") or code == "failed")


def photos(size: int = 64) -> list[bytes]:
    """The bundled public-domain photos, centre-cropped and resized to size x size, as PNG bytes."""
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        array = getattr(data, name)()
        h, w = array.shape[:2]
        side = min(h, w)
        crop = Image.fromarray(array[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2])
        buffer = io.BytesIO()
        crop.resize((size, size), Image.Resampling.BICUBIC).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def mixed_specs(n: int, size: int = 64, seed: int = 0) -> list[Spec]:
    """80% at the default steps, 10% at 50 steps, 10% in tile mode at 30 steps; photos in rotation."""
    rng = np.random.default_rng(seed)
    images = photos(size)
    specs = []
    for i in range(n):
        image = images[i % len(images)]
        kind = rng.random()
        if kind < 0.8:
            specs.append(Spec(image))
        elif kind < 0.9:
            specs.append(Spec(image, steps=50))
        else:
            specs.append(Spec(image, steps=30, size_mode="tile"))
    return specs


def check(spec: Spec, response: httpx.Response, default_steps: int | None) -> str | None:
    """None if the response is a valid encoding of spec, else what is wrong."""
    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]}"
    try:
        body = response.json()
        want = spec.steps if spec.steps is not None else default_steps
        if want is not None and body["steps"] != want:
            return f"steps {body['steps']}, asked for {want}"
        if not body["energy"]["final"] < body["energy"]["initial"]:
            return f"energy did not fall: {body['energy']}"
        shown, recon, error = (decode_array(body[k]["array"]) for k in ("input", "reconstruction", "error_map"))
        if not (shown.shape == recon.shape == error.shape) or not np.array_equal(shown - recon, error):
            return "input - reconstruction != error_map"
        if not all(np.isfinite(decode_array(a)).all() for a in body["latents"]):
            return "latents not finite"
    except (KeyError, ValueError, TypeError) as exc:
        return f"malformed response: {exc!r}"
    return None


def check_v2(spec: Spec, response: httpx.Response, default_steps: int | None) -> str | None:
    """None if the /v2 response is a valid encoding of spec (binary outputs), else what is wrong."""
    return v2wire.check(response, spec.steps if spec.steps is not None else default_steps)


async def drive(
    url: str,
    specs: list[Spec],
    clients: int,
    default_steps: int | None = None,
    validate: bool = True,
    v2_model: str | None = None,
) -> tuple[list[Sample], float]:
    """Send every spec with `clients` concurrent connections (to /encode, or with `v2_model` to
    /v2/models/{v2_model}/infer); returns the samples and the wall time."""
    path = "/encode" if v2_model is None else f"/v2/models/{v2_model}/infer"
    checker = check if v2_model is None else check_v2
    queue = iter(enumerate(specs))
    samples: list[Sample | None] = [None] * len(specs)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        for index, spec in queue:  # a shared iterator: each client takes the next request
            start = time.perf_counter()
            try:
                body, headers = spec.encoded if v2_model is None else spec.v2_encoded
                response = await http.post(path, content=body, headers=headers)
                seconds = time.perf_counter() - start
                problem = checker(spec, response, default_steps) if validate else None
                if not validate and response.status_code != 200:
                    problem = f"status {response.status_code}"
                samples[index] = Sample(response.status_code, seconds, problem)
            except httpx.HTTPError as exc:
                samples[index] = Sample(0, time.perf_counter() - start, f"request failed: {exc!r}")

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return [s for s in samples if s is not None], wall


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1000
    return {f"p{q}": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)} | {"mean": round(float(a.mean()), 2)}


def summarize(samples: list[Sample], wall: float, clients: int) -> Report:
    statuses = Counter("failed" if s.status == 0 else str(s.status) for s in samples)
    problems = [s.problem for s in samples if s.problem]
    return Report(
        clients=clients,
        requests=len(samples),
        seconds=round(wall, 3),
        statuses=dict(sorted(statuses.items())),
        invalid=len(problems),
        problems=sorted(set(problems))[:10],
        latency_ms=percentiles_ms([s.seconds for s in samples]),
        requests_per_s=round(len(samples) / wall, 2),
        machine=machine(),
    )


def machine() -> dict[str, str]:
    import os

    import bentoml
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bentoml": bentoml.__version__,
    }


def run(
    url: str,
    clients: int,
    requests: int,
    warmup: int,
    rss: Callable[[], int] | None = None,
    specs: list[Spec] | None = None,
    protocol: str = "encode",
) -> Report:
    """Warm up, take the server's memory, run the load, take it again. `rss()` returns bytes (or None).
    `protocol`: encode (multipart /encode) or v2 (the Open Inference Protocol's REST infer)."""
    card = httpx.get(url + "/model", timeout=30).json()
    default_steps = card["steps"]["default"]
    v2_model = card["name"] if protocol == "v2" else None
    specs = specs if specs is not None else mixed_specs(requests)
    if warmup:
        asyncio.run(drive(url, mixed_specs(warmup, seed=1), clients, default_steps, False, v2_model))
    before = rss() if rss else None
    samples, wall = asyncio.run(drive(url, specs, clients, default_steps, v2_model=v2_model))
    report = summarize(samples, wall, clients)
    if rss:
        after = rss()
        report.rss_after_warmup_mb = round(before / 2**20, 1)
        report.rss_after_mb = round(after / 2**20, 1)
        report.rss_ratio = round(after / before, 3)
    return report


def _url(text: str) -> str:
    """--url: an http(s) address with a host."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL like http://127.0.0.1:3000")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="pc-serve-loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", type=_url, help="a running service, http://HOST:PORT (default: start pc-serve here)")
    parser.add_argument(
        "--server-pid", type=positive_int, help="with --url: the server's pid, to report its memory (default: none)"
    )
    parser.add_argument(
        "--model", type=model_source, default="default", help="model for the server this starts (default: %(default)s)"
    )
    parser.add_argument(
        "--device", type=device_name, default="auto", help="PC_DEVICE for the server this starts (default: auto)"
    )
    parser.add_argument("--clients", type=positive_int, default=32, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--requests", type=positive_int, default=2000, help="requests in all (default: %(default)s)")
    parser.add_argument(
        "--warmup",
        type=nonnegative_int,
        default=None,
        help="requests before the memory baseline (default: 4 x clients)",
    )
    parser.add_argument(
        "--protocol",
        choices=("encode", "v2"),
        default="encode",
        help="encode: multipart POST /encode; v2: the Open Inference Protocol's REST infer with binary tensors "
        "(default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.server_pid is not None and not args.url:
        parser.error("argument --server-pid: only with --url (a server this command starts is measured already)")
    warmup = args.warmup if args.warmup is not None else 4 * args.clients

    from .launch import LocalServer, process_tree_rss

    if args.url:
        rss = (lambda: process_tree_rss(args.server_pid)) if args.server_pid else None
        report = run(args.url.rstrip("/"), args.clients, args.requests, warmup, rss, protocol=args.protocol)
    else:
        with LocalServer(model=args.model, device=args.device) as server:
            report = run(server.url, args.clients, args.requests, warmup, server.rss_bytes, protocol=args.protocol)
    if args.json:
        print(json.dumps(asdict(report) | {"server_errors": report.server_errors}))
    else:
        print(
            f"{report.requests} requests from {report.clients} clients in {report.seconds} s "
            f"({report.requests_per_s} req/s); statuses {report.statuses}; invalid {report.invalid}"
        )
        print(f"latency ms: {report.latency_ms}")
        if report.rss_ratio is not None:
            verdict = "within" if report.rss_ratio <= 1.2 else "OVER"
            print(
                f"server RSS: {report.rss_after_warmup_mb} MiB after warm-up, {report.rss_after_mb} MiB after the run: "
                f"{report.rss_ratio}x ({verdict} the 1.2x target)"
            )
        for problem in report.problems:
            print(f"problem: {problem}")
        print(f"machine: {report.machine}")
    return 1 if report.server_errors or report.invalid else 0


if __name__ == "__main__":
    sys.exit(main())
