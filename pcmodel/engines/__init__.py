"""The inference machinery: the program of pcmodel.engines.program, run by one of several backends.

Words: a *backend* is one way to run the program (loop, torch, onnxruntime, numba, cuda-graph; the
"torch backend" is the program on eager torch ops); a *plan* is the step's arrangement for one input
size; a *program* is what a backend built for (plan, steps); "engines" names this package only.

- plans.py: the definition's step rearranged per input size (quadratic or levelwise);
- program.py: the step written once against ops.py (TorchOps) or onnx_graph.py (OnnxOps);
- base.py: what a backend is and declares (BackendSpec); registry.py: the registered backends;
- torch_engine.py, onnxruntime.py, numba_quadratic.py, cuda_graph.py: the backends;
- select.py: the pure rule that picks one; state.py: what a model has prepared and built.
"""

from __future__ import annotations

from .base import Backend, BackendSpec
from .registry import BACKENDS, SPECS
from .select import Choice, select
from .state import MAX_PREPARED_SHAPES, MAX_PREPARED_STEPS, EngineState

__all__ = [
    "BACKENDS",
    "MAX_PREPARED_SHAPES",
    "MAX_PREPARED_STEPS",
    "SPECS",
    "Backend",
    "BackendSpec",
    "Choice",
    "EngineState",
    "select",
]
