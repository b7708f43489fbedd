"""pc-serve's supervisor: BentoML's HTTP workers as child processes that pc-serve starts and watches.

`bentoml serve` runs a circus arbiter that binds one socket shared by every worker, restarts a
worker that fails to start forever, keeps a dead worker's Prometheus files, and holds the socket
open while it drains (new connections wait in the backlog, unanswered, until the process exits).
pc-serve runs BentoML's own worker entry point (`_bentoml_impl.worker.service`, what the arbiter
runs, through service.worker, which bounds request heads as they arrive) under this small supervisor instead:

- One socket per worker, all bound to the port with SO_REUSEPORT, so the kernel spreads
  connections over the workers (with one shared socket, the first worker to wake accepts every
  queued connection, and keep-alive clients stay with it). The supervisor only binds them; a
  worker's server calls listen() once its application has started, so the port accepts
  connections only when a worker can answer them.
- A worker that exits is restarted, and its live Prometheus gauges (requests in progress) are
  removed with `multiprocess.mark_process_dead`, so /metrics stops counting its lost requests. Its
  socket is closed at once (connections waiting in its backlog are reset, new ones go to the other
  workers or are refused) and its replacement gets a fresh one, which listens once it can answer.
- A worker reports its model load through a file in the state directory (`ready-PID`, or
  `failed-PID` holding a one-line error, see service.health); a worker that failed is stopped as at
  a drain. While every worker has reported ready, the supervisor keeps the file ALL_READY there, and
  the workers' readiness probes say ready only then (a pod is ready when all of it is). The first
  time, it calls `on_ready` (pc-serve prints the URL). MAX_START_FAILURES failed starts in a row
  stop pc-serve with exit status 1 and that line, after the other workers have drained.
- SIGTERM or SIGINT: the supervisor closes its copies of the sockets and passes the signal on;
  each worker's server stops listening, so new connections are refused at once, and finishes the
  requests in flight before it exits; then run() returns 0. The supervisor takes the signals over when
  it is built, before it binds anything: a signal before run() starts no worker (run() returns 0 at once).
- A second SIGINT while a worker is still draining (Ctrl-C twice) is a forced stop: run() returns
  FORCED_EXIT (130, 128 + SIGINT, as a shell reports Ctrl-C) instead of 0. A terminal's Ctrl-C reaches the
  workers too (one process group), and a second one makes each worker's uvicorn stop at once, cutting off
  its requests in flight; a worker still running FORCED_GRACE_S after it (the SIGINTs were sent to pc-serve
  alone) is killed. The supervisor does not pass the second SIGINT on: a worker that already has it would
  get a third while it exits, after uvicorn has given the handler back, and log tracebacks of cancelled
  requests. A second SIGTERM changes nothing (uvicorn's rule too): the drain goes on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import multiprocess

logger = logging.getLogger(__name__)

WORKER_MODULE = "_bentoml_impl.worker.service"  # what `bentoml serve` runs in each worker process
# The options of that module's command that worker_command passes (BentoML has no public API to start one
# worker on a given socket: `bentoml serve` always starts its own arbiter). check_worker_module holds the
# installed BentoML to them, so an upgrade that moves or changes the module fails at start, loudly.
WORKER_OPTIONS = ("fd", "service_name", "worker_id")
STATE_DIR_VARIABLE = "PCSERVE_STATE_DIR"  # where workers write ready-PID / failed-PID (service.health)
ALL_READY = "all-ready"  # in the state directory while every worker has reported ready (service.health)
MAX_START_FAILURES = 3  # failed worker starts in a row before pc-serve gives up
POLL_S = 0.2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORCED_EXIT = 128 + signal.SIGINT  # run()'s status after a second SIGINT cut the drain short
FORCED_GRACE_S = 5.0  # after a forced stop, how long a worker may take to exit before it is killed
# Free space pc-serve needs in BENTOML_HOME to start (service.cli), and below which a worker's death is put down
# to a full disk. A worker's Prometheus files take ~0.4 MiB after varied traffic (5 files of 64 KiB, the
# histograms' 128 KiB; the endpoint label is bounded, service.endpoints) and a dead worker's stay until
# pc-serve restarts: 16 MiB holds 8 workers and dozens of restarts (docs/DEPLOY.md).
MIN_FREE_BYTES = 16 << 20


class StartFailed(RuntimeError):
    """Workers failed to start MAX_START_FAILURES times in a row; the message is the last one's error."""


@dataclass
class _Worker:
    index: int  # 1-based, BentoML's worker id
    sock: socket.socket
    process: subprocess.Popen | None = None
    ready: bool = False
    restart_at: float = 0.0


class WorkerModuleChanged(RuntimeError):
    """The installed BentoML's worker entry point is not the one pc-serve was written against."""


def check_worker_module(module: str = WORKER_MODULE, options: tuple[str, ...] = WORKER_OPTIONS) -> None:
    """Raise WorkerModuleChanged unless `module` has a click command `main` taking `options` and the service."""
    import importlib

    import bentoml

    try:
        command = importlib.import_module(module).main
        names = {p.name for p in command.params}
    except (ImportError, AttributeError) as exc:
        raise WorkerModuleChanged(
            f"BentoML {bentoml.__version__} has no worker entry point {module}.main ({exc}); pc-serve needs "
            "BentoML 1.4 (the serve extra pins it)"
        ) from None
    missing = sorted({*options, "bento_identifier"} - names)
    if missing:
        raise WorkerModuleChanged(
            f"BentoML {bentoml.__version__}'s {module} no longer takes {', '.join(missing)}; pc-serve needs "
            "BentoML 1.4 (the serve extra pins it)"
        )


def worker_command(service: str, fd: int, name: str, index: int) -> list[str]:
    """The command line of one BentoML worker process serving `service` on the inherited socket `fd`: BentoML's
    worker command (WORKER_MODULE) run by service.worker."""
    return [
        sys.executable,
        "-m",
        "service.worker",
        service,
        "--fd",
        str(fd),
        "--service-name",
        name,
        "--worker-id",
        str(index),
    ]


def bind_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets bound to host:port with SO_REUSEPORT, not listening yet. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            s.set_inheritable(True)
    except OSError:
        for s in sockets:
            s.close()
        raise
    return sockets


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process can still write on `path`'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def disk_note(bentoml_home: Path) -> str:
    """'' while BENTOML_HOME has MIN_FREE_BYTES free, else a clause naming it and the free bytes."""
    try:
        free = free_bytes(bentoml_home)
    except OSError:
        return ""
    if free >= MIN_FREE_BYTES:
        return ""
    return (
        f"; BENTOML_HOME={bentoml_home} is full ({free} bytes free, pc-serve needs {MIN_FREE_BYTES}): "
        "free space there or give it a larger volume"
    )


def prometheus_dir(bentoml_home: Path) -> Path:
    """BentoML's multiprocess directory, emptied as `bentoml serve` does at every start."""
    path = bentoml_home / "prometheus_multiproc_dir"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


class Supervisor:
    """Runs `workers` BentoML worker processes for `service` on host:port until a signal stops it."""

    def __init__(
        self,
        service: str,
        root: str,
        host: str,
        port: int,
        workers: int,
        env: dict[str, str],
        bentoml_home: Path,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        # The signals first, before anything is bound or created: whatever comes later, run() cleans it up.
        self.stopping = False
        self.forced_at: float | None = None  # when a second SIGINT forced the stop
        self.workers: list[_Worker] = []
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        self.service = service
        self.root = root  # the working directory the service imports from
        self.host, self.port = host, port
        sockets = bind_sockets(host, port, workers)
        self.bentoml_home = bentoml_home
        self.metrics_dir = prometheus_dir(bentoml_home)
        self.state_dir = Path(tempfile.mkdtemp(prefix="pc-serve-state-"))
        name = service.rsplit(":", 1)[-1]
        url = f"http://{'localhost' if host in ('0.0.0.0', '::') else host}:{port}"
        self.env = {
            **env,
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            "BENTOML_RUNNER_MAP": json.dumps({name: url}),
            STATE_DIR_VARIABLE: str(self.state_dir),
        }
        self.name = name
        self.workers = [_Worker(index=i + 1, sock=s) for i, s in enumerate(sockets)]
        self.failures = 0  # failed starts in a row, over all workers
        self.on_ready = on_ready  # called once, when every worker has reported ready
        self.all_ready = False

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (returns 0 once every worker has drained, FORCED_EXIT after a second
        SIGINT cut the drain short) or StartFailed."""
        try:
            for worker in self.workers:
                if self.stopping:  # a signal came before (or while) the workers started: start no more
                    break
                self._start(worker)
            while not self.stopping:
                self._check()
                time.sleep(POLL_S)
            self._drain()
            return FORCED_EXIT if self.forced_at is not None else 0
        except StartFailed:
            self._drain()  # the workers that did start finish their requests in flight
            raise
        finally:
            self._kill_all()
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.stopping:
            logger.info("%s: finishing the requests in flight, then stopping", signal.Signals(signum).name)
            self.stopping = True
        elif signum == signal.SIGINT and self.forced_at is None and any(self._running(w) for w in self.workers):
            logger.warning("SIGINT again: a forced stop, the requests in flight are cut off")
            self.forced_at = time.monotonic()  # _wait kills a worker still running FORCED_GRACE_S from now

    @staticmethod
    def _running(worker: _Worker) -> bool:
        return worker.process is not None and worker.process.poll() is None

    def _start(self, worker: _Worker) -> None:
        if worker.sock.fileno() == -1:  # closed when its last worker exited: a fresh one, not listening yet
            try:
                worker.sock = bind_sockets(self.host, self.port, 1)[0]
            except OSError as exc:  # another process took the port meanwhile
                raise StartFailed(f"cannot listen on {self.host}:{self.port} again: {exc.strerror}") from None
        fd = worker.sock.fileno()
        command = worker_command(self.service, fd, self.name, worker.index)
        worker.process = subprocess.Popen(command, cwd=self.root, env=self.env, pass_fds=(fd,))
        worker.ready = False
        logger.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def _check(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            process = worker.process
            if process is None:
                if now >= worker.restart_at:
                    self._start(worker)
                continue
            pid = process.pid
            failed = self.state_dir / f"failed-{pid}"
            if not worker.ready and (self.state_dir / f"ready-{pid}").exists():
                worker.ready = True
                self.failures = 0
            if process.poll() is None and not failed.exists():
                continue
            if process.poll() is None:  # it reported a failed start: stopped as at a drain (it answers 503s)
                _stop(process)
            multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # drop its in-progress gauges
            worker.sock.close()  # its backlog is reset now, not left waiting for the replacement
            worker.process = None
            was_ready, worker.ready = worker.ready, False
            # A worker killed by SIGBUS or failing to start on a full BENTOML_HOME: the log line says so.
            note = disk_note(self.bentoml_home) if process.returncode != 0 else ""
            if was_ready:
                logger.warning(
                    "worker %d (pid %d) exited (%s)%s; restarting it", worker.index, pid, process.returncode, note
                )
                worker.restart_at = now
                continue
            self.failures += 1
            error = failed.read_text().strip() if failed.exists() else f"exited with status {process.returncode}"
            error += note
            logger.error(
                "worker %d (pid %d) failed to start (%d in a row): %s", worker.index, pid, self.failures, error
            )
            if self.failures >= MAX_START_FAILURES:
                raise StartFailed(f"a worker failed to start {self.failures} times in a row: {error}")
            worker.restart_at = now + min(0.5 * 2**self.failures, 10.0)  # back off a little
        self._mark_ready(all(w.ready for w in self.workers))

    def _mark_ready(self, ready: bool) -> None:
        """Keep ALL_READY in the state directory while every worker is ready (the workers' /readyz reads it)."""
        if ready == self.all_ready:
            return
        path = self.state_dir / ALL_READY
        if ready:
            path.touch()
            if self.on_ready is not None:
                self.on_ready()
                self.on_ready = None
        else:
            path.unlink(missing_ok=True)
        self.all_ready = ready

    def _drain(self) -> None:
        self._mark_ready(False)
        for worker in self.workers:
            worker.sock.close()  # the workers' copies are then the last: when they stop listening, the port closes
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            if worker.process is not None:
                self._wait(worker.process)
                multiprocess.mark_process_dead(worker.process.pid, str(self.metrics_dir))
        logger.info("every worker has stopped")

    def _wait(self, process: subprocess.Popen) -> None:
        """Until `process` exits: as long as its requests in flight take, or FORCED_GRACE_S after a forced stop."""
        while True:
            try:
                process.wait(POLL_S)
                return
            except subprocess.TimeoutExpired:
                if self.forced_at is not None and time.monotonic() - self.forced_at > FORCED_GRACE_S:
                    logger.warning("worker (pid %d) still running after the forced stop: killing it", process.pid)
                    process.kill()
                    process.wait()
                    return

    def _kill_all(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
        for worker in self.workers:
            worker.sock.close()


def _stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM (the worker's server finishes what it is answering), then SIGKILL after `grace_s`."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
