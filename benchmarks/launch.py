"""Start `pc-serve` in a subprocess on a free port, for the tests, the load test and the benchmark.

Each server gets its own BENTOML_HOME and TMPDIR (BentoML wipes its Prometheus directory at every
start, so two servers must never share one) and its own process group, so stopping it stops its
workers too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A pc-serve process on 127.0.0.1; `settings` are PC_* names without the prefix (model="conv-rgb")."""

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 120,
        cwd: str | os.PathLike[str] | None = None,
        probe_encode: bool = False,
        **settings: object,
    ):
        self._tmp = None if home is not None else tempfile.TemporaryDirectory(prefix="pc-serve-")
        self.home = Path(home if home is not None else self._tmp.name)  # type: ignore[union-attr]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # gRPC (the Open Inference Protocol) on a free port of its own, never the default 8001 that
        # another server on this machine may hold; grpc_port=0 turns it off.
        settings.setdefault("grpc_port", free_port())
        self.grpc_port = int(settings["grpc_port"])  # type: ignore[call-overload]
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.settings = {
            f"PC_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()
        }
        self.start_timeout_s = start_timeout_s
        self.log = self.home / "server.log"
        self.process: subprocess.Popen | None = None
        self.cwd = cwd  # pc-serve's working directory (relative checkpoint paths are relative to it)
        self.probe_encode = probe_encode  # also POST /encode while starting (recorded in probes)
        self.probes: list[tuple[str, int]] = []  # (path, status) of every /readyz and /livez answer while starting

    def start(self) -> LocalServer:
        """Start and wait until /readyz answers 200 (model loaded and warmed up); a server already running is
        left as it is (`with LocalServer(...).start()` must not start a second one and stop only that)."""
        if self.process is not None and self.process.poll() is None:
            return self
        (self.home / "tmp").mkdir(parents=True, exist_ok=True)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PC_")},
            "BENTOML_HOME": str(self.home / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
            "TMPDIR": str(self.home / "tmp"),
            "PC_HOST": "127.0.0.1",
            "PC_PORT": str(self.port),
            **self.settings,
        }
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.cwd,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pc-serve exited with status {self.process.returncode}:\n{self.log_tail()}")
            if b"Application startup failed" in self.log.read_bytes():  # BentoML would restart the worker
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"the service failed to start:\n{tail}")
            try:
                self.probes.append(("/livez", httpx.get(self.url + "/livez", timeout=2).status_code))
                status = httpx.get(self.url + "/readyz", timeout=2).status_code
                self.probes.append(("/readyz", status))
                if status == 200:
                    return self
                if self.probe_encode:  # not an image: 400 once the model is loaded, 503 while it loads
                    files = {"image": ("probe.png", b"not an image", "image/png")}
                    self.probes.append(
                        ("/encode", httpx.post(self.url + "/encode", files=files, timeout=2).status_code)
                    )
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"pc-serve was not ready within {self.start_timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rss_bytes(self) -> int:
        """Resident memory of the server: the BentoML arbiter and all its worker processes."""
        assert self.process is not None
        return process_tree_rss(self.process.pid)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def process_tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker may exit between the two calls
            total += p.memory_info().rss
    return total
