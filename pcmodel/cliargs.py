"""Command-line arguments shared by every console script: checked before any work, reported in one line.

A user's mistake on the command line is one line on stderr, `prog: what was wrong and what is
allowed`, and exit status 2, never a traceback. The argparse types here run while the arguments are
parsed, so a bad value fails before a model or a data set is loaded; checks that need the model (an
input size the hierarchy must tile) go through `fail` once it is loaded, before the real work.

A run that the machine cannot carry (out of memory: `memory_failure`; a full disk, a quota or a disk error
while writing: `write_failure`) is one line too, naming what ran out and where, and exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .config import MAX_STEPS, MAX_VALUE, ConfigError, ModelConfig, level_shapes

MAX_INT = 2**63 - 1  # torch and numpy take a signed 64-bit integer at most; a larger one overflowed in them
MAX_SEED = MAX_INT
MAX_THREADS = 1024  # torch.set_num_threads(10**6) crashed the process (exit 139)
MAX_BATCH_SIZE = 10**6  # inputs per batch: far beyond any run, and a larger one overflowed numpy's sampler
MAX_CONFIG_BYTES = 1024 * 1024  # a model config is a few KB; the file is read whole, so refuse anything absurd


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: message (see prog --help)`, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def fail(prog: str, message: str) -> int:
    """Report a user's mistake found after parsing: one line on stderr; returns the exit status 2."""
    print(f"{prog}: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed: Python's and numpy's MemoryError, torch's OutOfMemoryError
    (CUDA) or the RuntimeError of torch's CPU allocator ("can't allocate memory"), or onnxruntime's arena
    ("Failed to allocate memory", raised as its own Exception classes), not any other error."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    if isinstance(exc, RuntimeError):
        return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text or "allocate memory" in text
    return type(exc).__module__.startswith("onnxruntime") and "failed to allocate memory" in text


def memory_failure(prog: str, message: str) -> int:
    """Report a run that ran out of memory: one line on stderr; returns the exit status 1 (the machine's
    limit, not a mistake in the command: the same command may run where more memory is free)."""
    print(f"{prog}: out of memory {' '.join(str(message).split())}", file=sys.stderr)
    return 1


# A write that failed for want of a resource (the disk is full, a quota is reached, a file grew past the file
# system's limit, the disk failed), not because of the path the user gave: the same command works once there is
# room. Any other OSError (no such folder, permission denied, a folder where a file should be) is the path's fault.
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.ENOMEM})


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` is a write that failed for want of a resource (RESOURCE_ERRNOS), not a mistake in the path."""
    return isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS


def write_failure(prog: str, where: str, exc: OSError, advice: str = "") -> int:
    """Report a file that could not be written: one line on stderr, `prog: where: cannot write FILE (why)`
    and the advice; returns the exit status: 1 where the disk is full or failed (out_of_space: the machine's
    limit, as memory_failure), 2 where the path cannot be written (the user's mistake, as fail)."""
    reason = exc.strerror or str(exc)
    named = exc.filename and not where.endswith(f" {exc.filename}")  # a file inside `where`, named
    what = f"cannot write {exc.filename}" if named else "cannot write there"
    print(f"{prog}: {where}: {what} ({reason}){f'; {advice}' if advice else ''}", file=sys.stderr)
    return 1 if out_of_space(exc) else 2


def _int(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {'at least 1' if low == 1 else '0 or more'}, got {value}")
    if value > high:
        raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1 (step, request and other counts: 0 would mean nothing to do), below 2**63."""
    return _int(text, 1, MAX_INT)


def nonnegative_int(text: str) -> int:
    """An int >= 0 (counts where 0 has a meaning of its own), below 2**63."""
    return _int(text, 0, MAX_INT)


def step_count(text: str) -> int:
    """A count of inference steps T, 1 to MAX_STEPS (pcmodel.config: each step's energy, and in training its
    state, is kept; a larger count grew memory until the process was killed)."""
    return _int(text, 1, MAX_STEPS)


def thread_count(text: str) -> int:
    """A CPU thread count, 1 to MAX_THREADS."""
    return _int(text, 1, MAX_THREADS)


def random_seed(text: str) -> int:
    """A seed, 0 to 2**63 - 1 (what torch's and numpy's generators take)."""
    return _int(text, 0, MAX_SEED)


def batch_size(text: str) -> int:
    """Inputs per batch, 1 to MAX_BATCH_SIZE."""
    return _int(text, 1, MAX_BATCH_SIZE)


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 and at most 1e30 (step sizes, rates: a larger one does not fit the float32 weights)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    if value > MAX_VALUE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_VALUE:g}, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite float >= 0 (durations)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def existing_file(text: str) -> Path:
    """A path to a readable file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: cannot be read ({exc.strerror})") from None
    return path


def config_file(text: str) -> Path:
    """A readable file of at most MAX_CONFIG_BYTES (a model config as JSON; its contents are checked on reading)."""
    path = existing_file(text)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise argparse.ArgumentTypeError(
            f"{text} is {size} bytes; a model config is a few KB, at most {MAX_CONFIG_BYTES} bytes"
        )
    return path


def read_config(path: Path, option: str = "--config") -> str:
    """The text of a config file, read no further than MAX_CONFIG_BYTES; ConfigError if it is larger or unreadable."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot be read ({exc.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:  # it grew since it was checked, or a special file that reports no size
        raise ConfigError(f"{option} {path}: larger than {MAX_CONFIG_BYTES} bytes; a model config is a few KB")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ConfigError(
            f"{option} {path}: not a model config (not UTF-8 text); write one with --print-config"
        ) from None


def existing_folder(text: str) -> Path:
    """A path to a folder."""
    path = Path(text)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "no such folder"
        raise argparse.ArgumentTypeError(f"{text}: {what}")
    return path


def output_folder(text: str) -> Path:
    """A folder to write into: not empty (that would be the current folder, unasked), and not a file.

    Only checked here, never created (a wrong flag after it must leave nothing behind): `make_folder`
    creates it, and finds a path under a file or in a folder that cannot be written, before the work starts.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a folder to write into (. for the current folder)")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} has a NUL character; give a folder to write into")
    path = Path(text)
    # os.path, not Path: it answers False for a name too long to stat instead of raising
    if os.path.lexists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder to write into")
    return path


def make_folder(path: Path, option: str = "--out") -> str | None:
    """Create `path` (and the folders above it) and check a file can be written in it, before the real work.

    Returns why it cannot be written into, in a few words, or None when it can.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except (OSError, ValueError) as exc:  # ValueError: a name the system cannot take
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"{option} {path}: cannot write there ({reason})"
    return None


def output_file(text: str) -> Path:
    """A file to write: its folder must exist and the path may not be a folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {path.parent} does not exist")
    return path


def model_source(text: str) -> str:
    """A model name `pcmodel.load` knows or a path to a checkpoint file (its contents are checked on load)."""
    from . import shipped_models  # the package's own __init__, imported when it is first needed

    names = shipped_models()
    if text in names:
        return text
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is a folder; give a checkpoint file or a model name ({', '.join(names)})"
        )
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such checkpoint file, and not a model name ({', '.join(names)})")
    return text


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N; a CUDA device only where one is present."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; give auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: give auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device; give cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s), cuda:0..{count - 1}")
    return text


def size_error(config: ModelConfig, size: Sequence[int]) -> str | None:
    """Why the model cannot take an input of size (H, W), or None when its hierarchy tiles it."""
    try:
        level_shapes(config, (int(size[0]), int(size[1])))
    except ConfigError as exc:
        return str(exc)
    return None
