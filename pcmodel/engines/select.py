"""The automatic rule: which backend runs a call. Pure: the same arguments always give the same Choice.

float64 -> torch; early stop (tol) -> the plain loop; CUDA -> cuda-graph; CPU -> numba for quadratic
plans where numba is installed (one compiled loop per image), else onnxruntime (docs/PERFORMANCE.md).
The fast backends serve the step counts and input shapes the model was *prepared* for
(`PCModel.prepare`); other calls run on the torch backend, which on a CPU then runs row by row so that
an image's result never depends on its batch. Never timed at start-up, so results are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("loop", "torch", "onnxruntime", "numba", "cuda-graph")


@dataclass(frozen=True)
class Choice:
    """A backend name (one of BACKENDS) and, where the rule fell back or was overridden, why."""

    backend: str
    reason: str = ""
    rowwise: bool = False  # torch backend only: one image at a time (batch-invariant results)


def select(
    requested: str | None,
    *,
    device: str,
    float64: bool,
    steps: int,
    tol: float | None,
    prepared: bool,
    weights_changing: bool,
    quadratic: bool = False,
    numba: bool = False,
) -> Choice:
    """The backend for one call.

    requested: None/"auto" or a name in BACKENDS; device: "cpu" or "cuda"; prepared: whether (steps,
    input shape) is in the model's prepared set; weights_changing: the weights differ from the previous
    call's (learning: U changes after every batch); quadratic: the model's plan at this shape is quadratic;
    numba: numba is installed. While the weights keep changing on a CPU, a fast program would be rebuilt for
    every call (an onnxruntime session: ~0.1-0.5 s) and batches are large: such calls run on the torch
    backend, batched (the fastest at training's batch sizes). A CUDA graph takes new weights in place.
    """
    choice = "auto" if requested is None else requested
    if choice not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {requested!r}; choose auto or one of: {', '.join(BACKENDS)}")
    if choice in ("loop", "torch"):
        return Choice(choice, "requested")
    on_cuda = device == "cuda"
    if choice == "cuda-graph" and not on_cuda:
        raise ValueError("backend 'cuda-graph' needs the model on a CUDA device: model.to('cuda') first")
    if choice in ("onnxruntime", "numba") and on_cuda:
        raise ValueError(f"backend {choice!r} runs on the CPU; move the model with model.to('cpu')")
    if choice == "numba" and not (quadratic and numba):
        need = "numba installed (pip install 'predictive-coding[fast]')" if quadratic else "a quadratic plan"
        raise ValueError(f"backend 'numba' runs the quadratic plan (linear f, few latents) and needs {need}")
    if steps == 0:
        return Choice("loop", "no steps")
    if float64:
        return Choice("torch", "float64 input")
    if tol is not None:
        return Choice("loop", "early stop")
    if choice != "auto":
        return Choice(choice, "requested")
    fast = "cuda-graph" if on_cuda else ("numba" if quadratic and numba else "onnxruntime")
    if weights_changing and not on_cuda:
        return Choice("torch", "the weights changed since the previous call (learning)")
    if not prepared:
        return Choice("torch", f"{fast}: not prepared for these steps and shape", rowwise=not on_cuda)
    return Choice(fast)
