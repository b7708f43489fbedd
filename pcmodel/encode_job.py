"""An encoding job over a collection: the output folder checked and locked, what is left to do, the shard
writer, and the local engine (worker processes).

Resuming is a property of the data set itself: every row a complete shard holds is done. A run reads
the shards' path and sha256 columns, skips the inputs whose file still has that sha256, removes the rows
of inputs that changed (their shards rewritten atomically) and encodes the rest. Rows reach a shard only
when their whole batch is done, and a shard is renamed into place only when written and fsynced, so an
interrupted run (Ctrl-C, SIGTERM, a killed process, a full disk) leaves complete shards and nothing
else: the next run neither repeats nor loses a row.

The local engine: `workers` processes (forkserver where there is one: torch is imported once), each
loading the model once with one thread, at most DEPTH batches in flight per worker (memory does not
grow with the number of images), a worker that dies restarted and its batches redone; a batch that
kills its worker twice is split into single files, and a file that kills it twice becomes an error row.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from . import encodings
from .collection import BatchEncoder, EncodeSettings, Input, batches, file_sha256

DEPTH = 2  # batches in flight per worker: one running, one waiting, so a worker never idles on the driver
ATTEMPTS = 2  # a batch whose worker dies this many times is split; a single file becomes an error row
MAX_RESTARTS_PER_WORKER = 20  # more, and something kills every worker (memory, a broken install): stop
SHARD_SECONDS = 60.0  # a shard is written at least this often, so a killed run loses at most a minute of work


class OutputError(ValueError):
    """--out cannot take this job: it holds another data set, or another pc-encode writes into it."""


class WriteError(OSError):
    """A shard could not be written (a full disk, a folder that became unwritable); the complete ones stand."""


class WorkerError(RuntimeError):
    """The workers cannot go on: one could not start (its model failed to load), they kept dying, or the Ray
    job failed. The complete shards stand; the run can be resumed."""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("predictive-coding")
    except PackageNotFoundError:
        return "unknown"


def identity(model, settings: EncodeSettings) -> dict[str, Any]:
    """What a data set's rows depend on: a run into the same --out must have the same."""
    return {
        "model": {"name": model.name, "sha256": model.sha256},
        "levels": model.num_levels,
        "steps": settings.steps,
        "solver": model.solver(settings.solver).label,
        "init": settings.init or model.config.initial_latents,
        "size_mode": settings.size_mode,
        "max_side": settings.max_side if settings.size_mode == "full" else None,
        "outputs": list(settings.outputs),
        "limits": asdict(settings.limits),
    }


def _canonical(ident: Any) -> Any:
    """An identity compared as its rows depend on it: the outputs as a set (the columns' order is fixed)."""
    if isinstance(ident, dict) and isinstance(ident.get("outputs"), list):
        return {**ident, "outputs": sorted(map(str, ident["outputs"]))}
    return ident


def _describe(ident: dict[str, Any]) -> str:
    model = ident["model"]
    text = f"model {model['name']} (sha256 {model['sha256'][:12]}), steps {ident['steps']}, {ident['size_mode']} mode"
    text += f", solver {ident.get('solver')}, init {ident.get('init')}"
    if ident.get("max_side") is not None:
        text += f" at max side {ident['max_side']}"
    return text + f", outputs {','.join(ident['outputs'])}"


@dataclass
class Output:
    """An output folder, checked and locked for one job (release with `close`)."""

    folder: Path
    identity: dict[str, Any]
    lock: Any = None
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path, ident: dict[str, Any]) -> Output:
        """Check that --out is empty or holds this job's data set, take its lock and clear a crashed run's
        temporary files. Raises OutputError (nothing written) or OSError (the folder cannot be written)."""
        try:
            old = encodings.read_manifest(folder) if folder.is_dir() else None
        except ValueError as exc:
            raise OutputError(f"--out {folder}: {exc}; give another --out, or move it away") from None
        if old is not None:
            previous = old.get("identity", {})
            if old.get("format") != encodings.FORMAT or _canonical(previous) != _canonical(ident):
                what = _describe(previous) if previous else "an unknown format"
                raise OutputError(
                    f"--out {folder} holds a data set of {what}; this run is {_describe(ident)}: give another --out "
                    "folder, or the same options to finish that one"
                )
            damaged = encodings.damaged_shards(folder)
            if damaged:
                shard, why = damaged[0]
                raise OutputError(
                    f"--out {folder}: the shard {shard} cannot be read ({why}; {len(damaged)} such): it was damaged "
                    "outside pc-encode; move it away and run the same command to encode its rows again"
                )
        elif (folder / encodings.DATA).is_dir():
            raise OutputError(
                f"--out {folder} has a {encodings.DATA}/ folder but no {encodings.MANIFEST}: give another --out"
            )
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "w")  # noqa: SIM115 (held for the job's life)
        try:
            import fcntl  # POSIX; elsewhere a second writer is not detected

            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            lock.close()
            raise OutputError(f"--out {folder}: another pc-encode is writing into it; wait for it or stop it") from None
        encodings.remove_partial(folder)
        manifest = old or {"format": encodings.FORMAT, "identity": ident, "runs": 0, "seconds_total": 0.0}
        return cls(folder, ident, lock, manifest)

    def write_manifest(self, **changes: Any) -> None:
        self.manifest.update(changes, version=version())
        encodings.write_manifest(self.folder, self.manifest)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None


@dataclass(frozen=True)
class Work:
    """What a run has to do: the inputs still missing from the data set, and what it found there."""

    pending: list[Input]
    done: int  # inputs whose rows are in the data set, their files unchanged
    changed: int  # inputs whose files changed since their rows were written: rows removed, encoded again


def plan(folder: Path, inputs: Sequence[Input], threads: int = 4) -> Work:
    """Compare the inputs with the rows in the data set (hashing, on threads, the files that have rows)."""
    rows = encodings.done(folder)
    have = [item for item in inputs if item.path in rows]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        hashes = list(pool.map(lambda item: file_sha256(item.file), have))
    stale: dict[Path, set[str]] = {}
    for item, sha in zip(have, hashes):
        old_sha, shard = rows[item.path]
        if sha != old_sha or sha is None:  # changed, or unreadable now: encode it again (its row says why)
            stale.setdefault(shard, set()).add(item.path)
    for shard, paths in stale.items():
        encodings.drop_rows(shard, paths)
    redo = {p for paths in stale.values() for p in paths}
    pending = [item for item in inputs if item.path not in rows or item.path in redo]
    return Work(pending=pending, done=len(have) - len(redo), changed=len(redo))


class ShardWriter:
    """Rows gathered as Arrow tables and written as a shard every `shard_rows` rows or SHARD_SECONDS."""

    def __init__(self, folder: Path, shard_rows: int, shard_seconds: float = SHARD_SECONDS) -> None:
        self.folder = folder
        self.shard_rows = shard_rows
        self.shard_seconds = shard_seconds
        self.tables: list[Any] = []
        self.rows = 0
        self.since = time.monotonic()
        self.written = 0  # shards this run

    def add(self, table) -> None:
        if not self.tables:
            self.since = time.monotonic()
        self.tables.append(table)
        self.rows += table.num_rows
        if self.rows >= self.shard_rows or time.monotonic() - self.since >= self.shard_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.tables:
            return
        import pyarrow as pa

        # An interrupt waits for the shard. The rows are forgotten before they are written all the same: what
        # raises meanwhile (an interrupt off the main thread, a full disk) leaves them on disk once or not at all (the
        # same command encodes them again), never to the final flush to write twice.
        with signals_deferred():
            tables, self.tables, self.rows = self.tables, [], 0
            try:
                encodings.write_shard(self.folder, pa.concat_tables(tables))
            except OSError as exc:
                raise WriteError(exc.errno, exc.strerror or str(exc), str(self.folder / encodings.DATA)) from exc
            self.written += 1


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM noted during the block and raised again when it ends (from the main thread; elsewhere
    nothing is held). Their Python handlers are swapped, not the signal mask: pthread_sigmask holds a signal for
    the calling thread only, the kernel then gives it to another (torch, pyarrow and Ray start some), and Python
    runs the handler in the main thread all the same, inside the block."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    noted: list[int] = []
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    handlers = {sig: h for sig, h in handlers.items() if h is not None}  # None: set outside Python, left alone
    try:
        for sig in handlers:
            signal.signal(sig, lambda signum, frame: noted.append(signum))
        yield
    finally:
        _put_back(handlers)
        for sig in dict.fromkeys(noted):
            signal.raise_signal(sig)  # to this thread: its handler runs (and raises) here


def _put_back(handlers: dict[int, Any]) -> None:
    """Every handler back, though signal.signal first runs the handlers of signals come meanwhile: one put back
    already may raise, and the rest must not stay swapped; that exception goes on once all are back."""
    error: BaseException | None = None
    for sig, handler in handlers.items():
        while signal.getsignal(sig) is not handler:
            try:
                signal.signal(sig, handler)
            except BaseException as exc:
                error = error or exc
    if error is not None:
        raise error


@dataclass
class Progress:
    """What the engine reports after each batch: inputs finished this run, and of them failed."""

    total: int
    finished: int = 0
    failed: int = 0
    restarts: int = 0
    split: int = 0  # batches whose worker died on every try, run again one file at a time
    started: float = field(default_factory=time.monotonic)

    def add(self, table) -> None:
        self.finished += table.num_rows
        self.failed += table.num_rows - table.column("error").null_count


def error_rows(batch: Sequence[Input], settings: EncodeSettings, sha256: str, levels: int, message: str, reason: str):
    rows = [
        {
            "path": item.path,
            "model_sha256": sha256,
            "size_mode": settings.size_mode,
            "steps": settings.steps,
            "error": message,
            "reason": reason,
        }
        for item in batch
    ]
    return encodings.table(rows, levels, settings.outputs)


# ---- the local engine --------------------------------------------------------------------------


def _worker(conn, settings: EncodeSettings, sha256: str) -> None:
    """A worker process: load the model once, then encode batches until told to stop (None) or the pipe closes.

    Rows go back as an Arrow IPC stream: the driver only appends them to its shard.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the driver decides
    import pyarrow as pa

    try:
        encoder = BatchEncoder(settings, threads=1, expect_sha256=sha256)
    except Exception as exc:
        _send(conn, "fatal", None, f"{exc.__class__.__name__}: {exc}")
        return
    _send(conn, "ready", None, None)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task, batch = message
        try:
            data = encodings.table(encoder(batch), encoder.levels, settings.outputs)
        except Exception:
            _send(conn, "failed", task, traceback.format_exc(limit=5))
            continue
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, data.schema) as stream:
            stream.write_table(data)
        try:
            conn.send_bytes(b"T" + task.to_bytes(8, "little") + sink.getvalue().to_pybytes())
        except OSError:  # the parent is gone (killed): nobody to answer, and nothing to say on stderr
            return


@dataclass
class _Process:
    process: Any
    conn: Any
    ready: bool = False
    tasks: dict[int, list[Input]] = field(default_factory=dict)


def _context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["pcmodel.collection"])  # torch and pcmodel imported once, not per worker
        return context
    return multiprocessing.get_context("spawn")


def run_local(
    settings: EncodeSettings,
    sha256: str,
    levels: int,
    work: Sequence[Input],
    workers: int,
    writer: ShardWriter,
    progress: Progress,
    report: Callable[[Progress], None] = lambda p: None,
) -> None:
    """Encode `work` on `workers` processes into `writer`. On KeyboardInterrupt (or any error) the workers are
    stopped within a second or two and the exception goes on; the caller flushes what is complete."""
    import pyarrow as pa

    context = _context()
    queue = deque(enumerate(batches(work, settings.batch_size)))
    attempts: dict[int, int] = {}
    next_id = len(queue)
    pool: list[_Process] = []

    def keep(table) -> None:  # written and counted as one step: the summary's `encoded` are rows on disk
        with signals_deferred():
            writer.add(table)
            progress.add(table)

    def start() -> _Process:
        ours, theirs = context.Pipe()
        process = context.Process(target=_worker, args=(theirs, settings, sha256), daemon=True)
        process.start()
        theirs.close()
        return _Process(process, ours)

    def died(worker: _Process) -> None:
        nonlocal next_id
        worker.process.join(timeout=1)  # its pipe closes before it is reaped: then its exit code is known
        progress.restarts += 1
        for task, batch in sorted(worker.tasks.items(), reverse=True):
            attempts[task] = attempts.get(task, 0) + 1
            if attempts[task] < ATTEMPTS:
                queue.appendleft((task, batch))
            elif len(batch) > 1:  # find the file that kills the worker: each on its own
                progress.split += 1
                for item in reversed(batch):
                    queue.appendleft((next_id, [item]))
                    next_id += 1
            else:
                code = worker.process.exitcode
                cause = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
                message = f"the worker process died ({cause}) encoding this file, twice"
                table = error_rows(batch, settings, sha256, levels, message, "worker_died")
                keep(table)
        worker.tasks.clear()
        worker.conn.close()

    try:
        pool = [start() for _ in range(max(1, min(workers, len(queue))))]
        ever_ready = False
        while queue or any(w.tasks for w in pool):
            for w in pool:
                while w.ready and queue and len(w.tasks) < DEPTH:
                    task, batch = queue.popleft()
                    w.tasks[task] = batch
                    w.conn.send((task, batch))
            handles = {w.conn: w for w in pool} | {w.process.sentinel: w for w in pool}
            for handle in wait(list(handles), timeout=1.0):
                w = handles[handle]
                if w not in pool:
                    continue
                try:
                    if handle is w.process.sentinel and not w.conn.poll():
                        raise EOFError
                    payload = w.conn.recv_bytes()
                except (EOFError, OSError):
                    if not w.ready and not ever_ready:
                        raise WorkerError("a worker process died while loading the model") from None
                    died(w)
                    if progress.restarts > MAX_RESTARTS_PER_WORKER * len(pool):
                        message = f"the workers died {progress.restarts} times: see their messages above"
                        raise WorkerError(message) from None
                    pool[pool.index(w)] = start()
                    continue
                if payload[:1] == b"T":
                    task = int.from_bytes(payload[1:9], "little")
                    table = pa.ipc.open_stream(payload[9:]).read_all()
                    del w.tasks[task]
                    keep(table)
                    report(progress)
                    continue
                kind, task, text = json.loads(payload[1:])
                if kind == "ready":
                    w.ready = ever_ready = True
                elif kind == "fatal":
                    raise WorkerError(f"a worker could not load the model: {text}")
                elif kind == "failed":
                    batch = w.tasks.pop(task)
                    table = error_rows(batch, settings, sha256, levels, f"encoding failed: {text}", "internal")
                    keep(table)
            report(progress)
    finally:
        _stop(pool)


def _send(conn, kind: str, task: int | None, text: str | None) -> None:
    """A control message from a worker: J and JSON (rows go as T, the task id and an Arrow IPC stream). A parent
    that is gone hears nothing (its worker then ends at its next receive)."""
    with contextlib.suppress(OSError):
        conn.send_bytes(b"J" + json.dumps([kind, task, text]).encode())


def _stop(pool: Sequence[_Process]) -> None:
    """Stop every worker: a polite None, then SIGTERM, then SIGKILL, within about two seconds."""
    for w in pool:
        with contextlib.suppress(OSError, ValueError):
            w.conn.send(None)
    deadline = time.monotonic() + 0.5
    for w in pool:
        w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if w.process.is_alive():
            w.process.terminate()
    deadline = time.monotonic() + 1.5
    for w in pool:
        w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if w.process.is_alive():
            w.process.kill()
            w.process.join(timeout=1)
        with contextlib.suppress(OSError):
            w.conn.close()


def default_workers() -> int:
    """Every core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def eta_seconds(progress: Progress) -> float | None:
    elapsed = time.monotonic() - progress.started
    if progress.finished == 0 or elapsed <= 0:
        return None
    rate = progress.finished / elapsed
    return (progress.total - progress.finished) / rate if rate > 0 else math.inf


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2)
