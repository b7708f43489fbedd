"""`import pcmodel` imports no backend library: onnx, onnxruntime and numba load when a backend first runs.

The time itself (at most 0.3 s beyond `import torch`) is measured with `python -X importtime` and recorded
in docs/PERFORMANCE.md, not asserted: this checks what makes it cheap.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("onnx", "onnxruntime", "numba", "scipy", "bentoml", "pyarrow", "ray")


def loaded_after(code: str) -> set[str]:
    probe = f"import sys, json; {code}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_pcmodel_loads_no_backend_library():
    assert not set(HEAVY) & loaded_after("import pcmodel; pcmodel.load('conv-rgb')")


def test_a_backend_loads_its_library_when_it_first_runs():
    code = (
        "import pcmodel, torch; m = pcmodel.load('conv-rgb'); "
        "m.infer(torch.zeros(1, *m.config.input_shape), steps=2, backend='onnxruntime')"
    )
    assert {"onnx", "onnxruntime"} <= loaded_after(code)
