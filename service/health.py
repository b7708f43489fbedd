"""The model loads in the background, so the worker answers its probes from the moment it listens.

BentoML builds the service in its ASGI lifespan, before the worker's server listens: a model load
and warm-up inside `__init__` (seconds, more with PC_WARMUP_STEPS) left /readyz and /livez
unanswered all that time. ModelLoader starts the load on a thread instead; meanwhile /readyz says
503, /livez 200, and encode requests get 503 (reason `loading`, service.service). A failed load makes
/livez fail (a bare `bentoml serve` under Kubernetes is then restarted) and, under pc-serve, writes
`failed-PID` with the one-line error to the supervisor's state directory (`ready-PID` on success),
so pc-serve can count failed starts (service.supervisor).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from .supervisor import ALL_READY, STATE_DIR_VARIABLE

logger = logging.getLogger(__name__)

T = TypeVar("T")


class NotLoaded(RuntimeError):
    """The model failed to load; the message is the one-line reason."""


class ModelLoader(Generic[T]):
    """Runs `load()` once on a thread; `value` is its result once it has returned."""

    def __init__(self, load: Callable[[], T]) -> None:
        self._load = load
        self.value: T | None = None
        self.error: str | None = None  # one line, when the load failed
        self._done = threading.Event()
        threading.Thread(target=self._run, name="pc-load", daemon=True).start()

    def _run(self) -> None:
        try:
            self.value = self._load()
        except Exception as exc:
            logger.exception("the model failed to load")
            self.error = (str(exc) or type(exc).__name__).splitlines()[0]
            _report("failed", self.error)
        else:
            _report("ready", "")
        finally:
            self._done.set()

    @property
    def loaded(self) -> bool:
        return self.value is not None


def every_worker_ready() -> bool:
    """Under pc-serve: whether every worker has reported its model loaded (the supervisor's ALL_READY file), so
    that a worker's /readyz speaks for the whole server; elsewhere (a bare `bentoml serve`) always true."""
    directory = os.environ.get(STATE_DIR_VARIABLE)
    return not directory or (Path(directory) / ALL_READY).exists()


def _report(state: str, line: str) -> None:
    directory = os.environ.get(STATE_DIR_VARIABLE)
    if not directory:
        return  # not under pc-serve (a bare `bentoml serve`)
    path = Path(directory) / f"{state}-{os.getpid()}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(line + "\n")
    os.replace(tmp, path)  # the supervisor never reads a half-written line
