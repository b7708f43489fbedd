"""A level at one input size: its config, its resolved shapes (LevelGeometry), its window, and its kind's maps.

The maps themselves (prediction U r, its adjoint, the target and its adjoint) are the kind's, written
once in pcmodel.kinds; a level supplies the geometry they act on (unfold / fold at its kernel and
stride, the window). A level never owns state: it is pure geometry, so a model composes levels and
owns the energy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import LevelConfig, LevelGeometry
from .kinds import LevelKind


def gaussian_window(kernel: tuple[int, int], sigma: float) -> torch.Tensor:
    """Gaussian window (kh, kw), 1 at the patch's centre (between pixels on an even side: sampled peak < 1; float64)."""
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in kernel]
    yy, xx = torch.meshgrid(*axes, indexing="ij")
    return torch.exp(-(yy**2 + xx**2) / (2 * sigma**2))


@dataclass(frozen=True)
class Level:
    """One level at one geometry: its config, its shapes, and its kind's maps (pcmodel.kinds) on them.
    Tensors are (B, ...) batches."""

    config: LevelConfig
    geometry: LevelGeometry

    @property
    def kind(self) -> LevelKind:
        return self.config.kind_info

    @property
    def patchwise(self) -> bool:
        """True for modules and dense levels: per-patch prediction rather than a summed map."""
        return self.kind.patchwise

    def unfold(self, lower: torch.Tensor) -> torch.Tensor:
        """The patches of a map below (B, D, M), as F.unfold takes them at this level's kernel and stride."""
        return F.unfold(lower, self.geometry.kernel, stride=self.geometry.stride)

    def fold(self, patches: torch.Tensor) -> torch.Tensor:
        """The adjoint of `unfold`: patches (B, D, M) summed back onto the map below (B, C, H, W)."""
        size = self.geometry.lower[1:]
        return F.fold(patches, size, self.geometry.kernel, stride=self.geometry.stride)

    def window(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Per-patch-pixel window (D, 1) in unfold order, or None."""
        if self.config.window_sigma is None:
            return None
        w = gaussian_window(self.geometry.kernel, self.config.window_sigma)
        return w.reshape(1, -1).repeat(self.geometry.lower[0], 1).reshape(-1, 1).to(dtype=dtype, device=device)

    def predict(self, r: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """U r: the linear prediction (before f) in the level's target space.

        Convolutional: (B, C_below, H, W). Patchwise: (B, D, M), D = C_below*kh*kw, M = modules.
        """
        return self.kind.predict(self, r, U)

    def adjoint(self, g: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """U^T g, shaped like r: (B, causes, H_l, W_l)."""
        return self.kind.adjoint(self, g, U)

    def target(self, lower: torch.Tensor) -> torch.Tensor:
        """What this level predicts, from the map below: the map itself, or its windowed patches."""
        return self.kind.target(self, lower)

    def target_adjoint(self, e: torch.Tensor) -> torch.Tensor:
        """Adjoint of `target`: maps an error in target space back onto the lower map (sums overlaps)."""
        return self.kind.target_adjoint(self, e)

    def weight_gradient(self, g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """d<g, U r>/dU summed over the batch, shaped like U: (causes, C_below, kh, kw)."""
        return self.kind.weight_gradient(self, g, r)

    def to_lower_map(self, target_space: torch.Tensor, average: bool = True) -> torch.Tensor:
        """A target-space tensor shown on the lower map (B, C_below, H, W), for display.

        Patchwise with average=True: the least-squares map x minimising sum_m ||w * x_m - p_m||^2,
        i.e. overlapping module predictions averaged with weights w (a plain mean without a
        window). average=False sums the patches as they are (U_1 U_2 over the whole region).
        """
        return self.kind.to_lower_map(self, target_space, average)

    def as_patches(self, target_space: torch.Tensor) -> torch.Tensor:
        """Patchwise target-space tensor (B, D, M) as per-module patches (B, M, C_below, kh, kw)."""
        b, _, m = target_space.shape
        return target_space.transpose(1, 2).reshape(b, m, self.geometry.lower[0], *self.geometry.kernel)
