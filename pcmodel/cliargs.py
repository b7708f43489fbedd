"""Command-line arguments shared by every console script: checked before any work, reported in one line.

A user's mistake on the command line is one line on stderr, `prog: what was wrong and what is
allowed`, and exit status 2, never a traceback. The argparse types here run while the arguments are
parsed, so a bad value fails before a model or a data set is loaded; checks that need the model (an
input size the hierarchy must tile) go through `fail` once it is loaded, before the real work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .config import ConfigError, ModelConfig, level_shapes


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: message (see prog --help)`, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def fail(prog: str, message: str) -> int:
    """Report a user's mistake found after parsing: one line on stderr; returns the exit status 2."""
    print(f"{prog}: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """An int >= 1 (step, thread, request and batch counts: 0 would mean nothing to do)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An int >= 0 (seeds, counts where 0 has a meaning of its own)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (step sizes, rates)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
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


def existing_folder(text: str) -> Path:
    """A path to a folder."""
    path = Path(text)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "no such folder"
        raise argparse.ArgumentTypeError(f"{text}: {what}")
    return path


def output_folder(text: str) -> Path:
    """A folder to write into: it may not exist yet, but it may not be a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder to write into")
    return path


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
