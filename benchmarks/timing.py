"""One timing rule for every benchmark here: the mean over calls that fill a minimum time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def time_call(fn: Callable[[], Any], min_time: float) -> float:
    """Mean seconds per call over calls filling at least `min_time` (at least one call)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls
