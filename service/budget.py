"""Memory budgets: bytes a worker process may hold at once for one purpose, shared by its requests.

Two budgets per worker: request bodies in flight (BodyGate charges each body twice, the bytes and
their parsed form, from arrival to response) and images being decoded (PCEncoder charges an image's
decoding cost, `inputs.Planned.cost`, while it decodes and preprocesses). A request that fits waits
up to `wait_s` for room, then gets OverBudget (503 with Retry-After: it would succeed later); one
that is larger than the whole budget gets NeverFits (413: it never would).

After large decodes the C allocator keeps freed pages (glibc returns a heap's top only above
M_TRIM_THRESHOLD, and keeps other arenas' pages). When the decoding budget falls back to zero
after at least TRIM_AFTER_BYTES were released, `malloc_trim(0)` hands them back to the system.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import AsyncIterator

from . import metrics

logger = logging.getLogger(__name__)

TRIM_AFTER_BYTES = 64 * 1024 * 1024  # released bytes worth a malloc_trim (it walks every arena: ~ms)


class OverBudget(RuntimeError):
    """The budget is full for now: the caller should retry later (HTTP 503 with Retry-After)."""


class NeverFits(ValueError):
    """The request needs more than the whole budget (HTTP 413)."""


class Budget:
    """A byte count with a capacity, shared by the coroutines of one event loop (one worker process)."""

    def __init__(self, name: str, capacity: int, wait_s: float, trim: bool = False) -> None:
        assert name in metrics.BUDGETS, f"unknown budget {name!r}"
        self.name = name
        self.capacity = capacity
        self.wait_s = wait_s
        self.used = 0
        self._trim = trim
        self._released_since_trim = 0
        self._room: asyncio.Condition | None = None
        self._room_loop: asyncio.AbstractEventLoop | None = None
        metrics.BUDGET_LIMIT.labels(budget=name).set(capacity)
        metrics.INFLIGHT_BYTES.labels(budget=name).set(0)

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._room is None or self._room_loop is not loop:  # first use, or a new event loop
            self._room, self._room_loop = asyncio.Condition(), loop
        return self._room

    async def acquire(self, n: int, what: str, wait: bool = True) -> None:
        """Take n bytes, waiting up to wait_s for room (not at all with wait=False)."""
        if n > self.capacity:
            raise NeverFits(
                f"{what} needs {n} bytes of the worker's {self.name} budget of {self.capacity} bytes; "
                "send a smaller image or fewer images"
            )
        if self.used + n > self.capacity:
            room = self._condition()
            async with room:
                try:
                    if not wait:
                        raise TimeoutError
                    await asyncio.wait_for(room.wait_for(lambda: self.used + n <= self.capacity), self.wait_s)
                except TimeoutError:
                    raise OverBudget(
                        f"the worker holds {self.used} of its {self.capacity} bytes for {self.name} and {what} needs "
                        f"{n}; retry in a moment"
                    ) from None
        self.used += n
        metrics.INFLIGHT_BYTES.labels(budget=self.name).set(self.used)

    def release(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, f"{self.name} budget released more than it took"
        metrics.INFLIGHT_BYTES.labels(budget=self.name).set(self.used)
        self._released_since_trim += n
        if self._room is not None:
            asyncio.get_running_loop().create_task(self._notify(self._room))
        if self._trim and self.used == 0 and self._released_since_trim >= TRIM_AFTER_BYTES:
            self._released_since_trim = 0
            asyncio.get_running_loop().run_in_executor(None, malloc_trim)

    @staticmethod
    async def _notify(room: asyncio.Condition) -> None:
        async with room:
            room.notify_all()

    @contextlib.asynccontextmanager
    async def hold(self, n: int, what: str) -> AsyncIterator[None]:
        await self.acquire(n, what)
        try:
            yield
        finally:
            self.release(n)


def _libc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _libc_trim()


def malloc_trim() -> None:
    """Return the C heap's free pages to the system (glibc); a no-op elsewhere."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
