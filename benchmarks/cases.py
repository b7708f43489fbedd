"""What pc-bench measures: a case is a model, an input size and a batch size (`--case MODEL:HxW:B`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pcmodel
from pcmodel.cliargs import model_source, size_error

DEFAULT_CASES = (
    "conv-rgb:32x32:1",
    "conv-rgb:32x32:32",
    "conv-rgb:128x128:1",
    "conv-rgb:128x128:32",
    "rao-ballard-1999:16x26:1",
    "rao-ballard-1999:16x26:32",
)


@dataclass(frozen=True)
class Case:
    """One benchmark case: a model (name or checkpoint), an input size and a batch size."""

    model: str
    size: tuple[int, int]
    batch: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.size[0]}x{self.size[1]} B={self.batch}"

    @property
    def text(self) -> str:
        """As --case writes it."""
        return f"{self.model}:{self.size[0]}x{self.size[1]}:{self.batch}"


def check_cases(cases: list[Case]) -> str | None:
    """Why a case cannot run (its model does not load, or its size does not tile the model), else None.

    Loading a checkpoint takes milliseconds: every case is checked before the first is timed.
    """
    for case in cases:
        try:
            model = pcmodel.load(case.model)
        except (OSError, ValueError) as exc:
            return f"--case {case.text}: {exc}"
        if problem := size_error(model.config, case.size):
            return f"--case {case.text}: {problem}"
    return None


def parse_case(text: str) -> Case:
    """MODEL:HxW:B, e.g. conv-rgb:32x32:1 (MODEL: a preset name or a checkpoint path)."""
    try:
        model, size, batch = text.rsplit(":", 2)
        h, w = (int(v) for v in size.lower().split("x"))
        case = Case(model, (h, w), int(batch))
    except ValueError:
        raise argparse.ArgumentTypeError(f"case {text!r} is not MODEL:HxW:B, e.g. conv-rgb:32x32:1") from None
    if min(h, w, case.batch) < 1:
        raise argparse.ArgumentTypeError(f"case {text!r}: sizes and batch must be positive")
    try:
        model_source(model)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"case {text!r}: {exc}") from None
    return case
