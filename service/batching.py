"""Adaptive batching: concurrent requests share model calls, grouped by (steps, solver and start, input shape).

Why our own batcher rather than BentoML's `batchable` API: a batchable method is an HTTP endpoint
whose single argument is the list, so /encode (a multipart form) cannot be one, and reaching it
from /encode goes through BentoML's internal HTTP self-proxy (a second serialisation of every
tensor). Its dispatcher also cancels requests with 503 when its latency estimate passes
`max_latency_ms`, and it cannot group by steps or shape or split a tiled image across batches.

How it works: each request submits a job, a block of rows (one image, or the tiles of one image)
of one input shape, one step count and one solver and start. A single task on the event loop takes the
oldest job's key (steps, solver and start, shape) and gathers rows of queued jobs with that key, oldest first, up to
`max_batch_size` rows (a large job is split across batches), then runs `model.infer` on a
dedicated thread. While the model runs, new requests queue, so the next batch is as large as the
load: one client pays no waiting, many clients get large batches. No request is cancelled by a
deadline; only a full queue is refused, with 503. A model call that fails on a shared batch is run again
for each request's rows alone, so one request's bad rows fail that request only. The queue counts pixels,
in units of the model's native input size (`unit_pixels`): a row of a 256x256 full-mode image weighs 64 rows
of 32x32, what it costs the model. `max_queue` is in those units.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pcmodel.results import join, rows

logger = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The queue is full: the caller should retry later (HTTP 503)."""


@dataclass
class Settled:
    """The part of an InferenceResult the service returns, on the CPU; rows follow the job's rows (split and
    joined by pcmodel.results.rows / join, as the engines' results are)."""

    latents: list[torch.Tensor]  # level 1 first, each (n, causes, H_l, W_l)
    errors: list[torch.Tensor]  # level 1 first: level l-1 minus level l's prediction (InferenceResult.errors)
    reconstruction: torch.Tensor  # (n, C, H, W)
    energy: torch.Tensor  # (steps + 1, n)
    steps: torch.Tensor  # (n,)
    backend: str
    model_seconds: float = 0.0  # time of the model calls these rows were in (summed over calls)
    wait_seconds: float = 0.0  # time from submit until the first of those calls started


@dataclass(eq=False)  # identity, not field equality: jobs hold tensors, and the queue removes by identity
class _Job:
    x: torch.Tensor  # (n, C, H, W) on the model's device
    steps: int
    future: asyncio.Future[Settled]
    how: Hashable = None  # what else a model call needs to share (the host's solver and start)
    start: list[torch.Tensor] | None = None  # given starting latents, one per level, rows like x
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when its first rows went into a model call
    next_row: int = 0  # rows before this one have been handed to a batch
    parts: dict[int, Settled] = field(default_factory=dict)  # first row -> result of that chunk
    done_rows: int = 0
    weight: int = 1  # queue units per row: ceil(pixels of a row / the native size's pixels)

    @property
    def key(self) -> tuple[int, Hashable, tuple[int, ...]]:
        return self.steps, self.how, tuple(self.x.shape[1:])

    @property
    def rows(self) -> int:
        return self.x.shape[0]


InferFn = Callable[[torch.Tensor, int, Hashable, list[torch.Tensor] | None], Settled]


class Batcher:
    """Runs `infer(x, steps, how, start)` on batches gathered from concurrent `submit` calls (module doc)."""

    def __init__(
        self,
        infer: InferFn,
        max_batch_size: int,
        max_queue: int,
        wait_s: float = 0.0,
        unit_pixels: int | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.wait_s = wait_s
        self.unit_pixels = unit_pixels  # pixels of one queue unit (the native size); None: every row weighs 1
        self._on_batch = on_batch  # (rows, seconds) after each model call, for metrics
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued = 0  # queue units waiting (rows weighted by their pixels)
        self._queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # One thread: one model call at a time per process; torch uses its own threads inside it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pc-infer", initializer=thread_init)

    async def submit(
        self, x: torch.Tensor, steps: int, how: Hashable = None, start: list[torch.Tensor] | None = None
    ) -> Settled:
        """Queue the rows of x (n, C, H, W) for `steps` inference steps; returns their results. Rows batch
        with rows of the same steps, `how` (anything else the call shares) and shape; `start`: their own
        starting latents (one tensor per level, rows like x; `how` must then say that starts are given).

        The job weighs rows x ceil(H W / unit_pixels) queue units, at most max_queue (so one image
        larger than the whole queue still runs, alone).
        """
        weight = 1 if self.unit_pixels is None else -(-x.shape[-2] * x.shape[-1] // self.unit_pixels)
        cost = min(x.shape[0] * weight, self.max_queue)
        if x.shape[0] > self.max_queue:  # never admissible: inputs.plan refuses such images first (413)
            raise ValueError(f"{x.shape[0]} rows can never fit a queue of {self.max_queue}")
        if self._queued + cost > self.max_queue:
            raise Overloaded(
                f"the model's queue is full ({self._queued_rows} images or tiles waiting, {self._queued} of "
                f"{self.max_queue} native-size units); retry in a moment"
            )
        self._ensure_running()
        future = asyncio.get_running_loop().create_future()
        job = _Job(x=x, steps=steps, future=future, weight=weight, how=how, start=start)
        self._queue.append(job)
        self._queued += cost
        self._queued_rows += job.rows
        assert self._wakeup is not None
        self._wakeup.set()
        return await job.future

    @property
    def queued(self) -> int:
        """Rows waiting for the model (not counting the batch that is running)."""
        return self._queued_rows

    @property
    def queued_units(self) -> int:
        """Queue units waiting: rows weighted by their pixels (what max_queue limits)."""
        return self._queued

    @property
    def alive(self) -> bool:
        return self._task is None or not self._task.done()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.get_loop() is not loop:  # first call, or a new event loop
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name="pc-batcher")

    def _gather(self) -> tuple[tuple, list[tuple[_Job, int, int]]]:
        """Rows for the next batch: (key, [(job, first row, end row)]) sharing the oldest job's key."""
        key = self._queue[0].key
        chunks: list[tuple[_Job, int, int]] = []
        room = self.max_batch_size
        for job in self._queue:
            if room == 0:
                break
            if job.key != key:
                continue
            take = min(room, job.rows - job.next_row)
            chunks.append((job, job.next_row, job.next_row + take))
            job.next_row += take
            room -= take
        for job, _, end in chunks:
            if end == job.rows:
                self._queue.remove(job)
        self._queued_rows -= sum(end - start for _, start, end in chunks)
        self._queued = max(0, self._queued - sum((end - start) * job.weight for job, start, end in chunks))
        return key, chunks

    async def _run(self) -> None:
        while True:
            if not self._queue:
                assert self._wakeup is not None
                self._wakeup.clear()
                await self._wakeup.wait()
                if self.wait_s > 0 and self._queued_rows < self.max_batch_size:
                    await asyncio.sleep(self.wait_s)
            try:
                await self._run_batch()
            except Exception as exc:  # a bug here must not strand every waiting request
                logger.exception("the batcher failed; failing the queued requests")
                for job in self._queue:
                    if not job.future.done():
                        job.future.set_exception(exc)
                self._queue.clear()
                self._queued_rows = 0
                self._queued = 0

    async def _run_batch(self) -> None:
        (steps, how, _), chunks = self._gather()
        live = [(job, a, b) for job, a, b in chunks if not job.future.done()]  # skip cancelled requests
        if live:
            await self._settle(live, steps, how)

    async def _settle(self, live: list[tuple[_Job, int, int]], steps: int, how: Hashable) -> None:
        """One model call on these jobs' rows; each job gets its rows' results (or the call's error)."""
        # One job's rows, all of them (one client's request, the common case when the load is light): its own
        # tensors go in and the result comes back whole, without the copies and slices of a shared batch.
        whole = len(live) == 1 and live[0][1] == 0 and live[0][2] == live[0][0].rows
        starts: list[torch.Tensor] | None = None
        if whole:
            x, starts = live[0][0].x.contiguous(), live[0][0].start
        else:
            x = torch.cat([job.x[a:b] for job, a, b in live])  # (rows, C, H, W)
            if live[0][0].start is not None:  # jobs of one key all give starts, or none does
                levels = range(len(live[0][0].start))
                starts = [torch.cat([job.start[i][a:b] for job, a, b in live]) for i in levels]  # type: ignore[index]
        start = time.perf_counter()
        for job, _, _ in live:
            job.started = start if job.started is None else job.started
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._infer, x, steps, how, starts
            )
        except Exception as exc:
            if len(live) > 1:
                # One request's rows can fail a shared call (e.g. a start the model refuses): run each request's
                # rows alone, so that only the requests whose own rows fail get the error.
                logger.warning("inference failed on a batch of %d requests (%s); running each alone", len(live), exc)
                for chunk in live:
                    await self._settle([chunk], steps, how)
                return
            logger.exception("inference failed on a batch of %d", x.shape[0])
            if not live[0][0].future.done():
                live[0][0].future.set_exception(exc)
            return
        seconds = time.perf_counter() - start
        if self._on_batch is not None:
            self._on_batch(x.shape[0], seconds)
        offset = 0
        for job, a, b in live:
            n = b - a
            part = result if whole else rows(result, offset, offset + n)
            job.parts[a] = dataclasses.replace(part, model_seconds=seconds)
            job.done_rows += n
            offset += n
            if job.done_rows == job.rows and not job.future.done():
                parts = [job.parts[k] for k in sorted(job.parts)]
                settled = dataclasses.replace(join(parts), model_seconds=sum(p.model_seconds for p in parts))
                assert job.started is not None
                settled.wait_seconds = job.started - job.submitted
                job.future.set_result(settled)
