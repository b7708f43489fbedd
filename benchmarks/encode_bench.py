"""pc-encode-bench: encoding a folder of images five ways; images/s, peak memory, and the scaling.

    python -m benchmarks.encode_bench                 # 200 images of mixed sizes, conv-rgb at its defaults
    python -m benchmarks.encode_bench --images 2000 --json

The images are crops of the bundled photo, 32 to 160 px a side, half JPEG and half PNG, written to a
temporary folder. The cases, one after another on this machine:

- loop: a plain Python loop in this process: decode, `prepare_image`, `model.infer` one image at a time
  (the model prepared for the same shapes as pc-encode's workers; torch's default threads);
- local-1, local-2: `pc-encode FOLDER --out ...` with 1 and 2 worker processes;
- ray: `pc-encode --engine ray` on a local Ray started for the job (--ray-workers actors);
- http: pc-serve (one worker, its defaults) and service.client's EncoderClient from 8 threads at once,
  outputs=latents.

Each pc-encode case runs twice: on one image (its start-up: the interpreter, the model, the workers or
Ray), then on all; "images/s once started" is (N - 1) / (the difference of the two times). Peak memory
is the largest sum of PSS (shared pages shared out) over the process tree (this process's peak RSS for
the loop, the server for http), sampled every second: reading a process's page map more often slowed
the workers down. Prints a table; --json prints every number and the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from pcmodel.cliargs import ArgumentParser, model_source, positive_int

ROOT = Path(__file__).resolve().parent.parent


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` crops of the bundled photo, 32..160 px a side (mixed aspect ratios), half JPEG, half PNG."""
    from pcmodel.images import sample_photo

    photo = Image.fromarray(sample_photo())
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(32, 161, size=2))
        left, top = int(rng.integers(0, 256 - w + 1)), int(rng.integers(0, 256 - h + 1))
        crop = photo.crop((left, top, left + w, top + h))
        path = folder / f"{i:05d}.{'jpg' if i % 2 else 'png'}"
        crop.save(path, quality=90) if i % 2 else crop.save(path)
        paths.append(path)
    return paths


def _memory(process: psutil.Process) -> int:
    """Proportional set size where the OS reports it (shared pages counted once over the processes that
    share them: forked workers share torch's pages), else resident memory."""
    try:
        return process.memory_full_info().pss
    except (AttributeError, psutil.AccessDenied):
        return process.memory_info().rss


class PeakRSS:
    """The largest memory (PSS, else RSS) of a process and its descendants together, sampled on a thread."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                total = _memory(root)
                for child in root.children(recursive=True):
                    try:
                        total += _memory(child)
                    except psutil.Error:
                        continue
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def plain_loop(paths: list[Path], model_name: str, size_mode: str | None = None) -> dict:
    """Decode, prepare and infer one image at a time, in this process."""
    import pcmodel
    from pcmodel.collection import EncodeSettings, prepared_shapes
    from pcmodel.images import decode, prepare_image

    model = pcmodel.load(model_name)
    mode = size_mode or model.config.preprocess.size_mode
    model.prepare(shapes=prepared_shapes(model, EncodeSettings(model_name, model.config.steps, mode)))
    started = time.perf_counter()
    for path in paths:
        rows, _, _ = prepare_image(decode(path.read_bytes()), model.config, mode)
        model.infer(rows)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "images_per_s": len(paths) / seconds, "peak_rss_mb": peak / 2**20}


def pc_encode(folder: Path, out: Path, args: list[str], limit: int | None = None) -> tuple[float, int, dict]:
    command = [sys.executable, "-m", "pcmodel.cli", str(folder), "--out", str(out), "--json", *args]
    if limit is not None:
        command += ["--limit", str(limit)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with PeakRSS(process.pid) as rss:
        stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"pc-encode-bench: {' '.join(command)} failed:\n{stderr[-2000:]}")
    return seconds, rss.peak, json.loads(stdout)


def engine_case(folder: Path, scratch: Path, name: str, args: list[str], count: int) -> dict:
    start_up, _, _ = pc_encode(folder, scratch / f"{name}-one", args, limit=1)
    seconds, peak, summary = pc_encode(folder, scratch / name, args)
    assert summary["rows"] == count and summary["failed"] == 0, summary
    # Once started: what the rest of the images cost beyond one image's run (None where the run is too short
    # for the difference to mean anything).
    steady = (count - 1) / (seconds - start_up) if seconds > 1.2 * start_up else None
    return {
        "seconds": seconds,
        "start_up_s": start_up,
        "images_per_s": count / seconds,
        "images_per_s_started": steady,
        "peak_rss_mb": peak / 2**20,
    }


def http_case(paths: list[Path], model_name: str, concurrency: int, size_mode: str | None = None) -> dict:
    from benchmarks.launch import LocalServer
    from service.client import EncoderClient

    data = [p.read_bytes() for p in paths]
    with LocalServer(model=model_name) as server:
        with EncoderClient(server.url) as warm:
            warm.encode(data[0], size_mode=size_mode, outputs=["latents"])
        local = threading.local()

        def one(image: bytes) -> None:
            if not hasattr(local, "client"):
                local.client = EncoderClient(server.url)
            local.client.encode(image, size_mode=size_mode, outputs=["latents"])

        assert server.process is not None
        with PeakRSS(server.process.pid) as rss, ThreadPoolExecutor(concurrency) as pool:
            started = time.perf_counter()
            list(pool.map(one, data))
            seconds = time.perf_counter() - started
    return {"seconds": seconds, "images_per_s": len(paths) / seconds, "peak_rss_mb": rss.peak / 2**20}


def ratio(results: dict[str, dict], a: str, b: str, key: str) -> float | None:
    if a not in results or b not in results or not results[a].get(key) or not results[b].get(key):
        return None
    return results[a][key] / results[b][key]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="pc-encode-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=positive_int, default=200, help="images (default: %(default)s; the issue's: 2000)"
    )
    parser.add_argument("--model", type=model_source, default="default", help="model (default: %(default)s)")
    parser.add_argument("--cases", default="loop,local-1,local-2,ray,http", help="which cases, comma-separated")
    parser.add_argument("--ray-workers", type=positive_int, default=2, help="Ray actors (default: %(default)s)")
    parser.add_argument("--concurrency", type=positive_int, default=8, help="HTTP requests at once")
    parser.add_argument("--size-mode", choices=("resize", "tile", "full"), default=None, help="default: the model's")
    parser.add_argument("--json", action="store_true", help="every number and the machine as JSON")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - {"loop", "local-1", "local-2", "ray", "http"}
    if unknown:
        parser.error(f"--cases: unknown {', '.join(sorted(unknown))}; choose from loop, local-1, local-2, ray, http")
    from benchmarks.machine import machine

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pc-encode-bench-") as tmp:
        folder, scratch = Path(tmp) / "images", Path(tmp) / "out"
        folder.mkdir()
        scratch.mkdir()
        paths = make_images(folder, args.images)
        model = ["--model", args.model] + (["--size-mode", args.size_mode] if args.size_mode else [])
        for case in cases:
            if case == "loop":
                results[case] = plain_loop(paths, args.model, args.size_mode)
            elif case.startswith("local-"):
                workers = case.split("-")[1]
                results[case] = engine_case(folder, scratch, case, [*model, "--workers", workers], len(paths))
            elif case == "ray":
                ray_args = [*model, "--engine", "ray", "--workers", str(args.ray_workers)]
                results[case] = engine_case(folder, scratch, case, ray_args, len(paths))
            elif case == "http":
                results[case] = http_case(paths, args.model, args.concurrency, args.size_mode)
            print(f"pc-encode-bench: {case} done", file=sys.stderr, flush=True)
    ratios = {}
    if {"local-1", "local-2"} <= set(results):
        ratios["local_2_vs_1"] = results["local-2"]["images_per_s_started"] / results["local-1"]["images_per_s_started"]
    if {"local-2", "http"} <= set(results):
        ratios["local_2_vs_http"] = results["local-2"]["images_per_s"] / results["http"]["images_per_s"]
    if {"local-2", "ray"} <= set(results):
        ratios["ray_vs_local_2_started"] = (
            results["ray"]["images_per_s_started"] / results["local-2"]["images_per_s_started"]
        )
    report = {"images": args.images, "model": args.model, "size_mode": args.size_mode, "cases": results}
    report.update(ratios=ratios, machine=machine())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    out = io.StringIO()
    out.write(f"{args.images} images, 32-160 px, model {args.model}\n")
    out.write(f"{'case':<9} {'images/s':>9} {'once started':>13} {'start-up s':>11} {'peak MB':>8}\n")
    for case, r in results.items():
        started = f"{r['images_per_s_started']:.1f}" if r.get("images_per_s_started") else "-"
        start_up = f"{r['start_up_s']:.1f}" if "start_up_s" in r else "-"
        out.write(f"{case:<9} {r['images_per_s']:>9.1f} {started:>13} {start_up:>11} {r['peak_rss_mb']:>8.0f}\n")
    for name, value in ratios.items():
        out.write(f"{name}: {value:.2f}x\n")
    print(out.getvalue(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
