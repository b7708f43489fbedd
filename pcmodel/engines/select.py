"""The automatic rule: which backend runs a call. Pure: the same arguments always give the same Choice.

float64 -> torch; early stop (tol) -> the plain loop; otherwise the first registered backend that
builds programs, runs on the device, the plan and the priors, and is installed (pcmodel.engines.registry:
cuda-graph on CUDA; numba for quadratic plans where it is installed, else onnxruntime on a CPU;
docs/PERFORMANCE.md). The fast backends serve the step counts and input shapes the model was *prepared*
for (`PCModel.prepare`); other calls run on the torch backend, which on a CPU then runs row by row so
that an image's result never depends on its batch. Never timed at start-up, so results are deterministic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .registry import BACKENDS, SPECS


@dataclass(frozen=True)
class Choice:
    """A backend name (one of BACKENDS) and, where the rule fell back or was overridden, why."""

    backend: str
    reason: str = ""
    rowwise: bool = False  # torch backend only: one image at a time (batch-invariant results)


@functools.lru_cache(maxsize=1024)  # pure: a call's rule is looked up, not re-derived (~5 us a call)
def select(
    requested: str | None,
    *,
    device: str,
    float64: bool,
    steps: int,
    tol: float | None,
    prepared: bool,
    weights_changing: bool,
    plan: str,
    priors: frozenset[str] = frozenset(),
    installed: frozenset[str] = frozenset(),
) -> Choice:
    """The backend for one call.

    requested: None/"auto" or a name in BACKENDS; device: "cpu" or "cuda"; prepared: whether (steps,
    input shape) is in the model's prepared set; weights_changing: the parameters differ from the previous
    call's (learning: U changes after every batch); plan: the plan kind at this shape; priors: the model's
    non-quadratic priors; installed: the registered backends installed here. While the weights keep
    changing, a program that cannot take new weights in place would be rebuilt for every call (an
    onnxruntime session: ~0.1-0.5 s) and batches are large: such calls run on the torch backend, batched
    (the fastest at training's batch sizes).
    """
    choice = "auto" if requested is None else requested
    if choice not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {requested!r}; choose auto or one of: {', '.join(BACKENDS)}")
    if choice in ("loop", "torch"):
        return Choice(choice, "requested")
    if choice != "auto":
        why = SPECS[choice].unfit(device, plan, priors)
        if why is not None:
            raise ValueError(f"backend {choice!r} {why}")
    if steps == 0:
        return Choice("loop", "no steps")
    if float64:
        return Choice("torch", "float64 input")
    if tol is not None:
        return Choice("loop", "early stop")
    if choice != "auto":
        return Choice(choice, "requested")
    fits = [s for s in SPECS.values() if s.builds and s.name in installed and s.unfit(device, plan, priors) is None]
    if not fits:  # the torch backend runs everything
        return Choice("torch", "no fast backend runs this plan here", rowwise=device != "cuda")
    fast = fits[0]
    if weights_changing and not fast.takes_new_weights:
        return Choice("torch", "the weights changed since the previous call (learning)")
    if not prepared:
        return Choice("torch", f"{fast.name}: not prepared for these steps and shape", rowwise=device != "cuda")
    return Choice(fast.name)
