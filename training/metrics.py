"""Reconstruction metrics shared by the training log and pc-analyze."""

from __future__ import annotations

import torch

from pcmodel import InferenceResult


def error_sums(result: InferenceResult) -> tuple[float, float]:
    """(sum ||e_0||^2, sum ||target_0||^2) over a batch, in the space level 1 predicts.

    For convolutional levels the target is the input x and the error x - f(U r). For the paper's
    modules it is each module's windowed patch w * patch and the error w * patch - U r: the quantity
    the model itself minimises (overlapping pixels count once per module).
    """
    error, prediction = result.errors[0], result.predictions[0]
    target = error + prediction
    return float(error.double().square().sum()), float(target.double().square().sum())


def relative_error(result: InferenceResult) -> float:
    """||target - prediction||^2 / ||target||^2 at level 1 (1.0 for the zero code)."""
    error, target = error_sums(result)
    return error / max(target, 1e-30)


def image_relative_error(x: torch.Tensor, result: InferenceResult) -> float:
    """||x - reconstruction||^2 / ||x||^2 on the image grid (module overlaps averaged for display)."""
    return float((x - result.reconstruction).double().square().sum() / x.double().square().sum().clamp_min(1e-30))
