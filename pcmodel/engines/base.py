"""What every backend is: prepare a program for (plan, steps, batch), run it, return an EngineRun."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .plans import Plan
from .program import ProgramOutput


@dataclass
class EngineRun:
    """Final latents, the energy (steps + 1, B), and each level's final prediction and error (target layout)."""

    latents: list[torch.Tensor]
    energy: torch.Tensor
    predictions: list[torch.Tensor]
    errors: list[torch.Tensor]
    reconstruction: torch.Tensor

    @classmethod
    def of(cls, out: ProgramOutput) -> EngineRun:
        return cls(out.latents, out.energy, out.predictions, out.errors, out.reconstruction)

    @classmethod
    def cat(cls, parts: list[EngineRun]) -> EngineRun:
        """Runs of consecutive slices of one batch, joined (the energy's batch axis is its second)."""
        if len(parts) == 1:
            return parts[0]

        def join(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
            return torch.cat(tensors, dim=dim)

        return cls(
            latents=[join(list(t)) for t in zip(*(p.latents for p in parts))],
            energy=join([p.energy for p in parts], dim=1),
            predictions=[join(list(t)) for t in zip(*(p.predictions for p in parts))],
            errors=[join(list(t)) for t in zip(*(p.errors for p in parts))],
            reconstruction=join([p.reconstruction for p in parts]),
        )


class Backend(Protocol):
    """A way to run the inference program. `key` identifies the weights a program was built from."""

    name: str

    def prepare(self, plan: Plan, steps: int, shape: tuple[int, ...], key: tuple) -> None:
        """Build (or refresh) what `run` needs for these steps and input shape, for weights `key`."""

    def run(self, plan: Plan, x: torch.Tensor, steps: int, key: tuple) -> EngineRun:
        """The fixed-step inference of x (B, C, H, W) on this backend."""
