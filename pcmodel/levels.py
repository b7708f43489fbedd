"""Level kinds: how U_l maps causes r_l onto the map below, and the adjoint of that map.

Every level stores U_l as a tensor (causes, C_below, kh, kw): row c is cause c's basis function,
an image patch of the lower map. The paper's matrix U (patch pixels x causes) is its transpose.

- Convolutional: the prediction of the whole lower map is conv_transpose2d(r, U, stride);
  overlapping contributions add up. The adjoint U^T e is conv2d(e, U, stride).
- Modules (the paper): the lower map is cut into patches (as F.unfold does), each patch optionally
  multiplied by a Gaussian window w; each module predicts its own patch with the shared U. The
  "target" of the level is therefore the windowed patches, and overlapping pixels appear in
  several modules' errors.
- Dense: a modules level whose single module covers the whole lower map.

A level never owns state: it is pure geometry, so a model composes levels and owns the energy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import LevelConfig, LevelGeometry


def gaussian_window(kernel: tuple[int, int], sigma: float) -> torch.Tensor:
    """Gaussian window (kh, kw) with peak 1, centred on the patch (float64)."""
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in kernel]
    yy, xx = torch.meshgrid(*axes, indexing="ij")
    return torch.exp(-(yy**2 + xx**2) / (2 * sigma**2))


@dataclass(frozen=True)
class Level:
    """The linear maps of one level at one geometry. Tensors are (B, ...) batches."""

    config: LevelConfig
    geometry: LevelGeometry

    @property
    def patchwise(self) -> bool:
        """True for modules and dense levels: per-patch prediction rather than a summed map."""
        return self.config.kind_info.patchwise

    def _unfold(self, lower: torch.Tensor) -> torch.Tensor:
        return F.unfold(lower, self.geometry.kernel, stride=self.geometry.stride)  # (B, D, M)

    def _fold(self, patches: torch.Tensor) -> torch.Tensor:
        size = self.geometry.lower[1:]
        return F.fold(patches, size, self.geometry.kernel, stride=self.geometry.stride)  # (B, C, H, W)

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
        if not self.patchwise:
            return F.conv_transpose2d(r, U, stride=self.geometry.stride)
        return U.reshape(U.shape[0], -1).T @ r.flatten(2)  # (D, C) @ (B, C, M) -> (B, D, M)

    def adjoint(self, g: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """U^T g, shaped like r: (B, causes, H_l, W_l)."""
        if not self.patchwise:
            return F.conv2d(g, U, stride=self.geometry.stride)
        out = U.reshape(U.shape[0], -1) @ g  # (C, D) @ (B, D, M) -> (B, C, M)
        return out.reshape(g.shape[0], *self.geometry.latent)

    def target(self, lower: torch.Tensor) -> torch.Tensor:
        """What this level predicts, from the map below: the map itself, or its windowed patches."""
        if not self.patchwise:
            return lower
        patches = self._unfold(lower)
        w = self.window(lower.dtype, lower.device)
        return patches if w is None else patches * w

    def target_adjoint(self, e: torch.Tensor) -> torch.Tensor:
        """Adjoint of `target`: maps an error in target space back onto the lower map (sums overlaps)."""
        if not self.patchwise:
            return e
        w = self.window(e.dtype, e.device)
        return self._fold(e if w is None else e * w)

    def weight_gradient(self, g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """d<g, U r>/dU summed over the batch, shaped like U: (causes, C_below, kh, kw)."""
        patches = self._unfold(g) if not self.patchwise else g  # (B, D, M)
        grad = torch.einsum("bcm,bdm->cd", r.flatten(2), patches)
        return grad.reshape(self.config.causes, *self.geometry.lower[:1], *self.geometry.kernel)

    def to_lower_map(self, target_space: torch.Tensor, average: bool = True) -> torch.Tensor:
        """A target-space tensor shown on the lower map (B, C_below, H, W), for display.

        Patchwise with average=True: the least-squares map x minimising sum_m ||w * x_m - p_m||^2,
        i.e. overlapping module predictions averaged with weights w (a plain mean without a
        window). average=False sums the patches as they are (U_1 U_2 over the whole region).
        """
        if not self.patchwise:
            return target_space
        if not average:
            return self._fold(target_space)
        w = self.window(target_space.dtype, target_space.device)
        if w is None:
            ones = torch.ones_like(target_space[:1])
            return self._fold(target_space) / self._fold(ones)
        weight = self._fold(w.square().expand(-1, target_space.shape[-1]).unsqueeze(0))
        return self._fold(target_space * w) / weight

    def as_patches(self, target_space: torch.Tensor) -> torch.Tensor:
        """Patchwise target-space tensor (B, D, M) as per-module patches (B, M, C_below, kh, kw)."""
        b, _, m = target_space.shape
        return target_space.transpose(1, 2).reshape(b, m, self.geometry.lower[0], *self.geometry.kernel)
