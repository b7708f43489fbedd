"""The registered backends, in the automatic rule's order of preference: a new backend is one module
with a `SPEC` (pcmodel.engines.base.BackendSpec) and one entry here.

Importing this module imports no backend library: onnx, onnxruntime and numba are imported by a
backend's factory or program, the first time it is used.
"""

from __future__ import annotations

from .base import BackendSpec
from .cuda_graph import SPEC as CUDA_GRAPH
from .numba_quadratic import SPEC as NUMBA
from .onnxruntime import SPEC as ONNXRUNTIME
from .torch_engine import SPEC as TORCH

SPECS: dict[str, BackendSpec] = {spec.name: spec for spec in (TORCH, CUDA_GRAPH, NUMBA, ONNXRUNTIME)}
BACKENDS = ("loop", *SPECS)  # every name `model.infer(backend=...)` takes, besides auto


def installed() -> frozenset[str]:
    """The registered backends whose libraries are installed here."""
    return frozenset(name for name, spec in SPECS.items() if spec.available())
