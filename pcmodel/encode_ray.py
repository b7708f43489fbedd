"""pc-encode --engine ray: the same batches through the same BatchEncoder, as a Ray Data pipeline.

`ray.data.from_items` holds the batches of paths (pcmodel.collection.batches, as the local engine makes
them), `map_batches` runs `RayEncoder` (a callable class: each actor loads the model once, one thread)
on an actor pool of `workers`, and the rows come back to this process, which writes them with the
local engine's shard writer, so resuming works the same way (a row lands only in a complete shard).

A killed actor (the OOM killer, a signal, a crash) is restarted by Ray and its batches run again: Ray
Data's own fault tolerance (actors restarted and their tasks retried without limit). So that a file that
kills its actor every time does not loop forever, the actors count in a small shared actor (`Attempts`)
how often each batch was started and not finished, as the local engine counts its workers' deaths: a
batch whose actor died ATTEMPTS times is encoded one file at a time, and a file whose actor died ATTEMPTS
times becomes a `worker_died` row instead of being encoded again.

Locally Ray is started for the job with `workers` + 1 CPUs (every CPU taken by actors can stall a
data set: the reading tasks need one), no dashboard and no usage reporting; `address` (auto,
ray://host:port) joins an existing cluster instead, whose nodes must have this package installed and
see the input files at the same paths (docs/ENCODINGS.md, "On a Ray cluster").

Signals: while `ray.init` runs, SIGINT and SIGTERM are held (a signal that comes is delivered once Ray is up,
so that Ray is shut down whole: a ray.init cut short leaves its raylet's agents running, orphaned), and the
handlers that Ray sets meanwhile are not installed where the caller had chosen its own: Ray's SIGTERM handler
calls sys.exit, which went past pc-encode's clean stop (the process aborted: exit 134, no summary, the
manifest left `running`). Ctrl-C and SIGTERM then reach this thread as in the local engine, while it waits
for Ray Data's next rows; a table's rows are written and counted as one step, and Ray is shut down before the
exception goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence

from . import encodings
from .collection import BatchEncoder, EncodeSettings, Input, batches
from .encode_job import ATTEMPTS, DEPTH, Progress, ShardWriter, WorkerError, error_rows, signals_deferred

GROUPS_PER_TASK = 4  # batches per Ray task: Ray Data's cost per task is paid once for this many


class RayEncoder:
    """An actor's state: the model, loaded once. Called with a batch of one or more batches of paths."""

    def __init__(self, settings: EncodeSettings, sha256: str, attempts) -> None:
        self.encoder = BatchEncoder(settings, threads=1, expect_sha256=sha256)
        self.settings = settings
        self.sha256 = sha256
        self.attempts = attempts  # the job's Attempts actor

    def __call__(self, batch: dict) -> object:
        import pyarrow as pa
        import ray

        task = ("task", int(batch["batch"][0]))  # open from here to the return: a death anywhere in it counts
        ray.get(self.attempts.start.remote(task))
        tables = []
        for key, text in zip(batch["batch"], batch["inputs"]):
            key = int(key)
            inputs = [Input(path, file) for path, file in json.loads(str(text))]
            if ray.get(self.attempts.start.remote(key)) < ATTEMPTS:
                tables.append(self.encode(inputs))
            else:  # its actor died on each try: one file at a time, to find the one that kills it
                tables.extend(self.alone(item) for item in inputs)
            ray.get(self.attempts.finish.remote(key))
        ray.get(self.attempts.finish.remote(task))
        return pa.concat_tables(tables)

    def alone(self, item: Input) -> object:
        import ray

        if ray.get(self.attempts.start.remote(item.path)) >= ATTEMPTS:
            message = f"the Ray actor died encoding this file, {ATTEMPTS} times"
            return error_rows([item], self.settings, self.sha256, self.encoder.levels, message, "worker_died")
        table = self.encode([item])
        ray.get(self.attempts.finish.remote(item.path))
        return table

    def encode(self, inputs: list[Input]) -> object:
        levels, outputs = self.encoder.levels, self.settings.outputs
        try:
            return encodings.table(self.encoder(inputs), levels, outputs)
        except Exception:  # as the local engine does (an exception here would stop the whole data set)
            message = f"encoding failed: {traceback.format_exc(limit=5)}"
            return error_rows(inputs, self.settings, self.sha256, levels, message, "internal")


def _attempts_class() -> type:
    """Attempts, defined here so that Ray sends its code by value: its process imports neither torch nor pcmodel."""

    class Attempts:
        """Per task (("task", its first batch)), batch (an int) and file (its path): how often an actor started it
        and did not finish it."""

        def __init__(self) -> None:
            self.open: dict = {}  # started, not finished: the actor died on it
            self.split: set = set()  # batches encoded one file at a time

        def start(self, key) -> int:
            died = self.open.get(key, 0)
            self.open[key] = died + 1
            if isinstance(key, int) and died >= ATTEMPTS:
                self.split.add(key)
            return died

        def finish(self, key) -> None:
            self.open[key] -= 1

        def counts(self) -> tuple[int, int]:
            """The actors' deaths while encoding (each leaves its task open), and the batches split."""
            return sum(n for key, n in self.open.items() if isinstance(key, tuple)), len(self.split)

    return Attempts


def run_ray(
    settings: EncodeSettings,
    sha256: str,
    levels: int,
    work: Sequence[Input],
    workers: int,
    address: str | None,
    writer: ShardWriter,
    progress: Progress,
    report: Callable[[Progress], None] = lambda p: None,
) -> None:
    """Encode `work` on a Ray Data actor pool of `workers` into `writer` (the module docstring)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import pyarrow as pa
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan and timings are not pc-encode's output
    started = not ray.is_initialized()
    # Ray prints the errors it hears of (a worker that died, a task retried) on stdout, which is --json's.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if started:
                common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
                with _signals_held():  # the module docstring
                    if address:
                        ray.init(address=address, **common)
                    else:
                        ray.init(num_cpus=workers + 1, **common)
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            target = encodings.schema(levels, settings.outputs)
            # No CPU, restarted empty if it dies (then the counts start again); its calls are retried.
            attempts = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_attempts_class()).remote()
            groups = batches(work, settings.batch_size)
            items = [{"batch": i, "inputs": json.dumps([[x.path, x.file] for x in g])} for i, g in enumerate(groups)]
            blocks = -(-len(items) // GROUPS_PER_TASK)
            dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                RayEncoder,
                fn_constructor_kwargs={"settings": settings, "sha256": sha256, "attempts": attempts},
                batch_size=GROUPS_PER_TASK,
                batch_format="numpy",
                # Ray Data restarts a dead actor and retries its tasks (max_restarts and max_task_retries -1
                # by default); all the tasks a dead actor held are retried: let it hold as few as the local
                # engine's workers do.
                compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=DEPTH),
                num_cpus=1,
            )
            left = {item.path for item in work}  # inputs with no row yet
            try:
                for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                    table = table.cast(target)  # Ray keeps the columns, not the schema's metadata
                    paths = table.column("path").to_pylist()
                    if not left.issuperset(paths):  # a batch that came back twice (a retry): its rows once only
                        table = table.filter(pa.array([path in left for path in paths]))
                    left.difference_update(paths)
                    with signals_deferred():  # written and counted as one step: the summary's counts are the rows
                        writer.add(table)
                        progress.add(table)
                    report(progress)
            except ray.exceptions.RayError as exc:  # the cluster failed the job: one line, the shards stand
                text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # Ray colours its messages
                first = text.splitlines()[0][:300] if text else ""
                raise WorkerError(f"the Ray job failed ({type(exc).__name__}: {first})") from None
            deaths, split = ray.get(attempts.counts.remote())
            progress.restarts += deaths
            progress.split += split
        finally:
            if started:
                ray.shutdown()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held while Ray starts (the module docstring): a signal that comes is recorded, and
    delivered once the handlers are back. The handlers Ray sets meanwhile are recorded, not installed
    (signal.signal replaced for the while, as Ray's own DeferSigint does for SIGINT); then each signal gets the
    caller's handler back, or where the caller had none (SIG_DFL) the one Ray set."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    install = signal.signal
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    came: list[int] = []
    wanted: dict = {}  # what Ray set

    def hold(signum, frame) -> None:
        came.append(signum)

    def record(signum, handler):
        if signum not in before:
            return install(signum, handler)
        previous = wanted.get(signum, before[signum])
        wanted[signum] = handler
        return previous

    for sig in before:
        install(sig, hold)
    signal.signal = record
    try:
        yield
    finally:
        signal.signal = install
        error: BaseException | None = None
        for sig, handler in before.items():
            chosen = handler is not None and handler != signal.SIG_DFL
            handler = handler if chosen else wanted.get(sig, signal.SIG_DFL)
            # signal.signal first runs the handlers of signals come meanwhile: one put back already may raise
            # here, and the rest must not stay held; that exception goes on once all are back.
            while signal.getsignal(sig) is not handler:
                try:
                    install(sig, handler)
                except BaseException as exc:
                    error = error or exc
        if error is not None:
            raise error
        for sig in dict.fromkeys(came):
            signal.raise_signal(sig)  # to this thread: its handler runs (and raises) here
