"""A worker's Prometheus files with real blocks under every page, so a full BENTOML_HOME cannot kill it.

In multiprocess mode prometheus_client keeps each process's values in mmap'd files
(`$PROMETHEUS_MULTIPROC_DIR/{counter,histogram,gauge_*}_{pid}.db`). Its MmapedDict makes a file with
`truncate` (64 KiB) and grows it with `truncate` (doubling) when a new series does not fit: sparse files.
The pages get their blocks only when they are first written through the mmap, and on a full filesystem that
write is answered with SIGBUS: with BENTOML_HOME full, the first request that needed a new series (the first
GET /healthz, a new status code) killed the worker (exit -7), and every replacement died the same way
(docs/RELIABILITY.md, item 12).

`install()` (service.worker, before any metric exists) makes prometheus_client use BackedMmapedDict, which
allocates the blocks with posix_fallocate before the file is mapped: when it opens a file (the whole file) and
before MmapedDict grows one (up to the size it will grow to). A full filesystem is then an OSError (ENOSPC)
before anything is mapped, never a signal:

- at start (EAGER: the files this service's metrics use, made when the worker starts): the worker fails to
  start, and the supervisor names the full BENTOML_HOME;
- a new series that does not fit while the filesystem is full: the request goes on; the series is left out
  of the file (and of /metrics) until space is freed, the next update of it tries again (its value is kept in
  the worker's memory meanwhile), and one WARNING every 60 s says so.

Written against prometheus_client 0.20-0.26: it uses MmapedDict's `_f`, `_used`, `_capacity` and
`_init_value`, and the module attribute `prometheus_client.values.MmapedDict`. `install()` checks they are
there and, if a future version moved them, logs a WARNING and leaves prometheus_client as it is (the
supervisor still names a full disk when a worker dies of it); tests/service/test_full_disk.py checks the files'
blocks on a real server.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time

from prometheus_client import mmap_dict, values


def _logger() -> logging.Logger:
    # Made when first used, not at import: install() runs before BentoML configures logging, and its dictConfig
    # (disable_existing_loggers) silences every logger that exists by then.
    return logging.getLogger(__name__)


# The files this service's metrics (service.metrics) and BentoML's use, made and allocated at worker start (a
# file made later, on a full disk, would fail the request that needed it): prometheus_client's
# `{prefix}_{pid}.db`.
EAGER = ("counter", "histogram", "gauge_all", "gauge_livesum", "gauge_max")
# Bytes a new entry may take beyond its key: MmapedDict's 4-byte length, up to 8 of padding, two doubles.
_ENTRY_OVERHEAD = 4 + 8 + 16
WARN_EVERY_S = 60.0


class _Warn:
    last = float("-inf")
    skipped = 0


def _allocate(fd: int, size: int) -> None:
    """Blocks for [0, size) of `fd`, the file grown to `size` if smaller. OSError (ENOSPC): nothing changed."""
    os.posix_fallocate(fd, 0, size)


def _full(exc: OSError, what: str) -> None:
    """One WARNING every WARN_EVERY_S about series left out of the files (the others are counted)."""
    now = time.monotonic()
    if now - _Warn.last < WARN_EVERY_S:
        _Warn.skipped += 1
        return
    more = f" ({_Warn.skipped} more since the last warning)" if _Warn.skipped else ""
    _Warn.last, _Warn.skipped = now, 0
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "?")
    _logger().warning(
        "no space for a new Prometheus series in %s (%s): %s is left out of /metrics until space is freed%s",
        directory,
        exc.strerror,
        what,
        more,
    )


class BackedMmapedDict(mmap_dict.MmapedDict):
    """prometheus_client's MmapedDict whose file has blocks under every byte, before any of it is mapped."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            prepare(filename)
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        needed = self._used + len(key.encode("utf-8")) + _ENTRY_OVERHEAD
        if needed > self._capacity:  # MmapedDict will double the file until the entry fits: blocks first
            capacity = self._capacity
            while needed > capacity:
                capacity *= 2
            _allocate(self._f.fileno(), capacity)  # then its truncate() changes no size, or only shrinks it
        super()._init_value(key)

    def read_value(self, key: str) -> tuple[float, float]:
        try:
            return super().read_value(key)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            _full(exc, _series(key))
            return 0.0, 0.0

    def write_value(self, key: str, value: float, timestamp: float) -> None:
        try:
            super().write_value(key, value, timestamp)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            _full(exc, _series(key))


def _series(key: str) -> str:
    """`name{labels}` of an MmapedDict key (json: metric, sample name, labels, help)."""
    try:
        _, name, labels, _ = json.loads(key)
        text = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    except (ValueError, TypeError, AttributeError):
        text = key
    return text[:300]


def prepare(filename: str) -> None:
    """Make `filename` (if missing) and give every byte of it, at least MmapedDict's first 64 KiB, a block.
    OSError (ENOSPC on a full disk): a file this call made is removed (an empty .db file breaks /metrics)."""
    fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            _allocate(fd, max(size, mmap_dict._INITIAL_MMAP_SIZE))
        except OSError:
            if size == 0:
                os.unlink(filename)
            raise
    finally:
        os.close(fd)


def compatible() -> str | None:
    """None if prometheus_client is the one BackedMmapedDict was written against, else what is missing."""
    if getattr(values, "MmapedDict", None) is not mmap_dict.MmapedDict:
        return "prometheus_client.values.MmapedDict is not mmap_dict.MmapedDict"
    if not hasattr(mmap_dict, "_INITIAL_MMAP_SIZE") or not hasattr(mmap_dict.MmapedDict, "_init_value"):
        return "prometheus_client.mmap_dict has no _INITIAL_MMAP_SIZE or MmapedDict._init_value"
    return None


def install(directory: str | None = None) -> bool:
    """Before any metric exists in this process: prometheus_client uses BackedMmapedDict, and the EAGER files
    are made. False (a WARNING logged) when prometheus_client is not multiprocess here or has changed; OSError
    when the EAGER files cannot be made (a full disk)."""
    directory = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return False
    problem = compatible()
    if problem is not None:
        _logger().warning("metric files left sparse (a full BENTOML_HOME can kill the worker): %s", problem)
        return False
    values.MmapedDict = BackedMmapedDict
    for prefix in EAGER:
        prepare(os.path.join(directory, f"{prefix}_{os.getpid()}.db"))
    return True
