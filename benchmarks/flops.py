"""The FLOP and byte model of one inference step (docs/MODEL.md section 6), for GFLOP/s and % of peak."""

from __future__ import annotations

import math
from typing import Any

import pcmodel


def flops_per_step(model: pcmodel.PCModel, size: tuple[int, int], batch: int) -> dict[str, Any]:
    """docs/MODEL.md section 6: sum_l 4 B C_l C_{l-1} kh kw H_l W_l (prediction and U^T e), plus ~10 per element.

    Module and dense levels fit the same formula with H_l W_l = the number of modules. `bytes_floor`:
    the memory traffic of one perfectly fused step (read the input and every latent, write every latent,
    float32): the bandwidth bound at large batch, where nothing stays in cache.
    """
    per_level = []
    elements = latents = 0
    for level in model.levels(size):
        g = level.geometry
        causes, rows, cols = g.latent
        per_level.append(4 * batch * causes * g.lower[0] * g.kernel[0] * g.kernel[1] * rows * cols)
        error_elements = g.patch_size * rows * cols if level.patchwise else math.prod(g.lower)
        elements += batch * (error_elements + causes * rows * cols)
        latents += batch * causes * rows * cols
    inputs = batch * model.config.input_shape[0] * size[0] * size[1]
    return {
        "matmul": sum(per_level),
        "per_level": per_level,
        "elementwise": 10 * elements,
        "bytes_floor": 4 * (inputs + 2 * latents),
    }
