"""Files written whole or not at all: a temporary file beside the target, fsynced, then renamed over it.

A reader sees the old file or the new one, never part of one; a failure (a full disk, a kill) removes the
temporary file and leaves the old file as it was. Every file pcmodel and pc-train write goes through here:
checkpoints, ONNX exports, pc-encode's maps and data sets, training figures. An OSError that escapes names the
file that was being written (not the temporary one), so a command can say where the write failed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

Writer = Callable[[IO[bytes]], Any]


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable, where the file system lets a folder be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_name(path: Path) -> Path:
    """The hidden temporary file `path` is written as before its rename (.NAME.PID.tmp, beside it)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_temporary(path: Path, write: Writer) -> Path:
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            exc.filename = str(path)  # the file the caller asked for, not our temporary name
        raise
    return tmp


def write_atomic(path: str | os.PathLike[str], write: Writer) -> None:
    """Call write(file object) on a hidden temporary file beside `path`, fsync it, rename it to `path`."""
    write_all([(path, write)])


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    write_all([(path, lambda f: f.write(data))])


def write_all(files: Sequence[tuple[str | os.PathLike[str], Writer]]) -> None:
    """Write several files as one: each to its temporary file first, then all renamed into place. A failure
    while writing removes the temporary files and leaves every target as it was (the renames, which need
    no space, come last)."""
    written: list[tuple[Path, Path]] = []
    try:
        for target, write in files:
            path = Path(target)
            written.append((_write_temporary(path, write), path))
        for tmp, path in written:
            try:
                os.replace(tmp, path)
            except OSError as exc:
                if exc.filename in (None, str(tmp)):
                    exc.filename = str(path)
                raise
    except BaseException:
        for tmp, _ in written:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    for folder in dict.fromkeys(path.parent for _, path in written):
        fsync_folder(folder)
