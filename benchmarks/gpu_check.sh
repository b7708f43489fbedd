#!/usr/bin/env bash
# The GPU checks, in one run on a machine with a CUDA device (under 8 minutes): `pytest -m gpu`, pc-bench on
# cuda (--json), the model's CUDA-graph path at B=1 and B=256, and the service on cuda (pc-serve-bench).
# Results go to $OUT (or ./gpu-results): record them in docs/PERFORMANCE.md with the device's name.
# Usage, from the repository root: bash benchmarks/gpu_check.sh (PYTHON names another interpreter)
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export BENTOML_DO_NOT_TRACK=true

# The machine's own python3 with a CUDA build of torch (and onnx, onnxruntime, safetensors, pillow, numba,
# pytest): the repository runs from its source tree, nothing is installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
$python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"

status=0
timeout 180 $python -m pytest -m gpu tests/pcmodel -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.txt" \
    || status=1

timeout 150 $python -m benchmarks.bench --backends torch,cuda-graph,reference --rounds 3 --min-time 0.1 --json \
    > "$out/pc-bench-cuda.json" 2> "$out/pc-bench-cuda.log" || status=1

timeout 60 $python - <<'PY' > "$out/cuda-graph-batches.json" 2> "$out/cuda-graph-batches.log" || status=1
"""The model's automatic CUDA path (a captured CUDA graph) at B=1 and B=256 against the plain loop."""
import json
import time

import torch

import pcmodel

report = {"device": torch.cuda.get_device_name(0), "cases": []}
for name in ("conv-rgb", "rao-ballard-1999"):
    model = pcmodel.load(name, device="cuda")
    model.prepare()
    for batch in (1, 256):
        x = torch.rand((batch, *model.config.input_shape), device="cuda") * 2 - 1
        result = model.infer(x)  # captures the graph for this bucket
        worst = max(
            float((a - b).abs().max()) for a, b in zip(result.latents, model.infer(x, backend="loop").latents)
        )
        torch.cuda.synchronize()
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < 1.0:
            model.infer(x)
            calls += 1
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / calls
        report["cases"].append(
            {"model": name, "batch": batch, "backend": result.backend, "ms_per_call": 1e3 * seconds,
             "images_per_s": batch / seconds, "max_abs_vs_loop": worst}
        )
print(json.dumps(report, indent=2))
PY

if $python -c "import bentoml" 2>/dev/null; then  # the service needs the serve extra
    timeout 180 $python -m benchmarks.serve_bench --device cuda --concurrency 1,32 --rounds 2 --requests 50 --json \
        > "$out/serve-bench-cuda.json" 2> "$out/serve-bench-cuda.log" || status=1
else
    echo "bentoml is not installed: the service benchmark on cuda is skipped" | tee "$out/serve-bench-cuda.log"
fi

echo "gpu_check: done (status $status); files in $out"
exit $status
