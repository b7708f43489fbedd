"""pc-serve and its stop signals, each against a real pc-serve of its own (the signals end it).

SIGTERM or SIGINT (Ctrl-C) is a graceful stop with exit status 0 from pc-serve's first moments on, also before
a worker has started (Kubernetes sends SIGTERM whenever a pod goes); a second SIGINT while draining (Ctrl-C
twice) is a forced stop with exit status 130; no worker process outlives pc-serve.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.launch import free_port
from service import supervisor

from .conftest import Server

pytestmark = pytest.mark.slow


def _group(pgid: int) -> list[str]:
    """The command lines of the processes left in process group `pgid`."""
    left = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if os.getpgid(process.pid) == pgid:
                left.append(" ".join(process.info["cmdline"] or []))
        except (ProcessLookupError, psutil.Error):
            pass
    return left


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (the kernel's SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _wait_for(log: Path, text: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} never appeared in the log:\n{log.read_text()[-3000:]}"
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the kernel's signal masks in /proc")
def test_sigterm_right_after_start_stops_cleanly_before_any_worker(tmp_path):
    """Before: pc-serve took SIGTERM over only once it started its workers, seconds after it started (its imports
    and the checkpoint's check come first), and died of an earlier one (status -15). Now it catches SIGTERM from
    its first moments; one that comes then stops it with status 0, before any worker has started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PC_")}
    env.update(
        BENTOML_HOME=str(tmp_path / "bentoml"),
        BENTOML_DO_NOT_TRACK="true",
        TMPDIR=str(tmp_path),
        PC_HOST="127.0.0.1",
        PC_GRPC_PORT="0",
    )
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--port", str(free_port())],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while not _catches(process.pid, signal.SIGTERM):  # as soon as it does: its imports are still under way
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGTERM)  # pc-serve alone, as a container runtime does
        assert process.wait(60) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "SIGTERM while starting: stopping before any worker starts" in text
        assert "worker 1 started" not in text and "Traceback" not in text, text[-3000:]
        assert _group(process.pid) == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize("again", ["group", "pc-serve"])
def test_a_second_ctrl_c_while_draining_forces_the_stop_with_status_130(tmp_path, again):
    """Before: Ctrl-C twice cut off the request in flight (the workers' uvicorn force-quits) and pc-serve still
    exited 0, as after a complete drain; a second SIGINT to pc-serve alone did nothing (the drain waited for the
    request). Now a forced stop exits 130, a worker that got only the first SIGINT is killed FORCED_GRACE_S
    later, and no worker is left behind."""
    with Server(tmp_path, grpc_port=0) as server:
        assert server.process is not None
        pid = server.process.pid
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            # A request in flight that holds the drain: its body never arrives.
            sock.sendall(
                b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 100000\r\n\r\n--b\r\n"
            )
            time.sleep(0.5)
            os.killpg(pid, signal.SIGINT)  # Ctrl-C in a terminal: pc-serve and its workers
            _wait_for(server.log, "SIGINT: finishing the requests in flight, then stopping")
            time.sleep(1.0)
            assert server.process.poll() is None, "the drain did not wait for the request in flight"
            if again == "group":
                os.killpg(pid, signal.SIGINT)  # Ctrl-C again: each worker's uvicorn stops at once too
            else:
                os.kill(pid, signal.SIGINT)  # `kill -INT` of pc-serve: its supervisor stops the workers
            assert server.process.wait(supervisor.FORCED_GRACE_S + 30) == 130, server.log_tail()
        assert "SIGINT again: a forced stop" in server.log.read_text()
        assert _group(pid) == []


def test_one_ctrl_c_drains_with_status_0_even_if_another_comes_as_pc_serve_exits(tmp_path):
    """Before: Ctrl-C again after the drain, while pc-serve's interpreter shut down (Python gives the signal its
    default action then), ended it by SIGINT (status -2). Now a graceful stop stays status 0 (a SIGINT after the
    last worker has exited cuts nothing off: no forced stop)."""
    with Server(tmp_path, grpc_port=0) as server:
        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGINT)
        _wait_for(server.log, "every worker has stopped")
        deadline = time.monotonic() + 30
        while server.process.poll() is None and time.monotonic() < deadline:  # Ctrl-C again and again
            os.killpg(server.process.pid, signal.SIGINT)  # nothing is left to force
            time.sleep(0.001)
        assert server.process.wait(1) == 0, server.log_tail()
        assert "forced stop" not in server.log.read_text()
        assert _group(server.process.pid) == []
