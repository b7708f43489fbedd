"""The machine a benchmark ran on: CPU, cores, memory, library versions, GPU, and its float32 matmul peak."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from typing import Any

import torch

from pcmodel.engines import onnxruntime as ort_engine


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, library versions and the GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    with contextlib.suppress(ValueError, OSError, AttributeError):  # not every OS names these
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("onnxruntime", "onnx", "numpy", "jax", "pcx", "equinox", "optax"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # not installed
            continue
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": ort_engine.available_cores(),
        "memory_gib": memory,
        "os": platform.platform(),
        "versions": versions,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return info


def matmul_peak(size: int = 2048, repeats: int = 10) -> dict[str, float]:
    """This machine's float32 matmul rate (GFLOP/s): a size x size torch matmul, best and median of `repeats`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return {"best_gflops": max(rates), "median_gflops": statistics.median(rates), "size": size}
