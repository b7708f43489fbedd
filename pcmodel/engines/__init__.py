"""The inference machinery: the program of pcmodel.engines.program, run by one of several backends.

Words: a *backend* is one way to run the program (loop, torch, onnxruntime, numba, cuda-graph; the
"torch backend" is the program on eager torch ops); a *plan* is the step's arrangement for one input
size; a *program* is what a backend built for (plan, steps); "engines" names this package only.

- plans.py: the definition's step rearranged per input size (quadratic or levelwise);
- program.py: the step written once against ops.py (TorchOps) or onnx_graph.py (OnnxOps);
- torch_engine.py, onnxruntime.py, cuda_graph.py: the backends (base.py: what a backend is);
- select.py: the pure rule that picks one; state.py: what a model has prepared and built.
"""

from __future__ import annotations

from .base import Backend, EngineRun
from .select import BACKENDS, Choice, select
from .state import MAX_PREPARED_SHAPES, MAX_PREPARED_STEPS, EngineState, weights_key

__all__ = [
    "BACKENDS",
    "MAX_PREPARED_SHAPES",
    "MAX_PREPARED_STEPS",
    "Backend",
    "Choice",
    "EngineRun",
    "EngineState",
    "select",
    "weights_key",
]
