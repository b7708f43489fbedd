"""What a backend is: its declaration (`BackendSpec`, what the registry and the rule read) and its interface.

Each backend module declares one `SPEC` with its name, where it runs, which plans and priors it runs,
whether it is installed (checked without importing anything heavy) and a factory that makes it (and
imports what it needs then). pcmodel.engines.registry lists the specs; nothing else names a backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..results import EngineRun
from ..solvers import GRADIENT, Solver
from .plans import Plan


class Backend(Protocol):
    """A way to run the inference program. `key` identifies the parameters a program was built from."""

    name: str

    def prepare(
        self, plan: Plan, steps: int, shape: tuple[int, ...], key: tuple, init: bool = False, solver: Solver = GRADIENT
    ) -> None:
        """Build (or refresh) what `run` needs for these steps, input shape, start (`init`: r0 given) and
        solver, for parameters `key`."""

    def run(
        self,
        plan: Plan,
        x: torch.Tensor,
        steps: int,
        key: tuple,
        r0: Sequence[torch.Tensor] | None = None,
        solver: Solver = GRADIENT,
    ) -> EngineRun:
        """The fixed-step inference of x (B, C, H, W) on this backend, from r0 (or the config's start),
        each plain step moved by `solver` (pcmodel.solvers)."""


def always() -> bool:
    return True


@dataclass(frozen=True)
class BackendSpec:
    """A backend's declaration: what the automatic rule (pcmodel.engines.select) needs to know of it."""

    name: str
    factory: Callable[[], Backend]  # makes the backend; imports its libraries then, not before
    devices: tuple[str, ...]  # device types it runs on
    plans: tuple[str, ...]  # plan kinds it runs (pcmodel.engines.plans.plan_kind)
    builds: bool  # keeps programs built for prepared (steps, shape): a candidate of the automatic rule
    available: Callable[[], bool] = always  # installed (found without importing it)
    priors: tuple[str, ...] | None = None  # non-quadratic priors it runs; None: every prior
    takes_new_weights: bool = False  # a built program follows new weights in place (no rebuild while learning)
    install: str = ""  # how to get it where it is not available
    plan_note: str = ""  # what its plans mean, for the message when a call does not fit

    def unfit(self, device: str, plan: str, priors: frozenset[str]) -> str | None:
        """Why this backend cannot run a call, as the end of a sentence "backend 'x' ...", or None."""
        if device not in self.devices:
            if self.devices == ("cuda",):
                return "needs the model on a CUDA device: model.to('cuda') first"
            where = " or ".join(d.upper() for d in self.devices)
            return f"runs on the {where}; move the model with model.to('{self.devices[0]}')"
        if plan not in self.plans or (self.priors is not None and not priors <= set(self.priors)):
            what = f"the {' or '.join(self.plans)} plan"
            if self.plan_note:
                what += f" ({self.plan_note})"
            if self.priors is not None:
                what += f" with the {', '.join(self.priors)} priors"
            need = f" and needs {self.install}" if self.install and not self.available() else ""
            return f"runs {what}{need}"
        if not self.available():
            return f"is not installed: {self.install}"
        return None
