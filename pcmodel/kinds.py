"""Level kinds, each written once: its geometry's rules, its maps in the definition, what its levelwise plan
holds, and its maps in the inference program.

Every level stores U_l as a tensor (causes, C_below, kh, kw): row c is cause c's basis function, an
image patch of the lower map. A kind says how U maps causes r onto the map below and back:

- `predict` U r and its adjoint `adjoint` U^T g, the level's `target` t(lower) (what it predicts, taken
  from the map below) and its adjoint: the definition's maps, on torch tensors (pcmodel.levels.Level
  holds the geometry and calls these);
- `plan_maps`: the tensors a levelwise plan keeps for the level (pcmodel.engines.plans);
- `run_predict`, `run_adjoint`, `run_target`, `run_target_adjoint`, `run_layout`, `run_reconstruction`:
  the same maps in the program's ops (pcmodel.engines.program), written with the ops layer's primitives
  (matmul, reshape_rows, conv, conv_transpose, patches, fold_patches), so eager torch, CUDA graphs and
  ONNX graphs all run them.

A new kind is one class here and its line in LEVEL_KINDS; the config accepts its name from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F


@dataclass
class PlanMaps:
    """What a levelwise plan holds for one level (float64; the plan casts them)."""

    predict: torch.Tensor  # the prediction's weight in the program's form
    adjoint: torch.Tensor  # U^T's weight, unscaled (the plan folds the step size in)
    unfold: torch.Tensor | None = None  # patch kinds: one-hot x window kernel (D, C_low, kh, kw) for ONNX
    phase: bool = False  # a convolutional level 1 in phase layout (its target is x split into phases)
    extra: dict[str, Any] = field(default_factory=dict)  # taps, pad of the phase layout


class LevelKind:
    """A level kind. `level` arguments are pcmodel.levels.Level (config and geometry); `lv` ones are a
    plan's PlanLevel (the level, its plan tensors and its layout)."""

    name: ClassVar[str]
    patchwise: ClassVar[bool]  # predicts (windowed) patches of the map below, one module each
    whole_map: ClassVar[bool] = False  # its one kernel is the whole map below (no kernel or stride in the config)
    window: ClassVar[bool] = False  # accepts a Gaussian window on its patches

    def predict(self, level: Any, r: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, level: Any, g: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, level: Any, lower: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target_adjoint(self, level: Any, e: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_gradient(self, level: Any, g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_lower_map(self, level: Any, target_space: torch.Tensor, average: bool) -> torch.Tensor:
        raise NotImplementedError

    def plan_maps(self, level: Any, U: torch.Tensor, first: bool) -> PlanMaps:
        raise NotImplementedError

    def run_predict(self, ops: Any, lv: Any, r: Any, weight: Any) -> Any:
        raise NotImplementedError

    def run_adjoint(self, ops: Any, lv: Any, g: Any, weight: Any) -> Any:
        raise NotImplementedError

    def run_target(self, ops: Any, lv: Any, lower: Any) -> Any:
        raise NotImplementedError

    def run_target_adjoint(self, ops: Any, lv: Any, e: Any) -> Any:
        raise NotImplementedError

    def run_layout(self, ops: Any, lv: Any, t: Any) -> Any:
        """A final prediction or error in the definition's target layout (phase layout undone)."""
        return t

    def run_error_layout(self, ops: Any, lv: Any, target: Any, prediction: Any, error: Any) -> Any:
        """The final error in the definition's layout, given the target and the prediction already in it."""
        return self.run_layout(ops, lv, error)

    def run_reconstruction(self, ops: Any, lv: Any, prediction: Any) -> Any:
        """f(U_1 r_1) on the input grid from level 1's final prediction (in the definition's layout)."""
        raise NotImplementedError


class Convolutional(LevelKind):
    """The prediction of the whole lower map is conv_transpose2d(r, U, stride); overlapping contributions
    add up. The adjoint U^T e is conv2d(e, U, stride); the target is the map itself. As level 1 of a plan
    it runs in phase layout (`phase_kernels`): two stride-1 convolutions, no transposed one in the loop."""

    name = "convolutional"
    patchwise = False

    def predict(self, level: Any, r: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(r, U, stride=level.geometry.stride)

    def adjoint(self, level: Any, g: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        return F.conv2d(g, U, stride=level.geometry.stride)

    def target(self, level: Any, lower: torch.Tensor) -> torch.Tensor:
        return lower

    def target_adjoint(self, level: Any, e: torch.Tensor) -> torch.Tensor:
        return e

    def weight_gradient(self, level: Any, g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return _weight_gradient(level, level.unfold(g), r)

    def to_lower_map(self, level: Any, target_space: torch.Tensor, average: bool) -> torch.Tensor:
        return target_space

    def plan_maps(self, level: Any, U: torch.Tensor, first: bool) -> PlanMaps:
        if not first:
            return PlanMaps(predict=U, adjoint=U)
        stride = level.geometry.stride
        predict, adjoint, taps = phase_kernels(U, stride)
        latent, lower = level.geometry.latent[1:], level.geometry.lower[1:]
        pad = tuple(s * (n + m - 1) - size for s, n, m, size in zip(stride, latent, taps, lower))
        return PlanMaps(predict=predict, adjoint=adjoint, phase=True, extra=dict(taps=taps, pad=pad))

    def run_predict(self, ops: Any, lv: Any, r: Any, weight: Any) -> Any:
        if lv.phase:
            return ops.conv(r, weight, pads=(lv.taps[0] - 1, lv.taps[1] - 1))
        return ops.conv_transpose(r, weight, stride=lv.stride)

    def run_adjoint(self, ops: Any, lv: Any, g: Any, weight: Any) -> Any:
        if lv.phase:
            return ops.conv(g, weight, taps=lv.taps)
        return ops.conv(g, weight, stride=lv.stride)

    def run_target(self, ops: Any, lv: Any, lower: Any) -> Any:
        return ops.phase_split(lower, lv) if lv.phase else lower

    def run_target_adjoint(self, ops: Any, lv: Any, e: Any) -> Any:
        return e

    def run_layout(self, ops: Any, lv: Any, t: Any) -> Any:
        return ops.phase_merge(t, lv) if lv.phase else t

    def run_error_layout(self, ops: Any, lv: Any, target: Any, prediction: Any, error: Any) -> Any:
        # The target is the map itself: its difference with the merged prediction is the merged error,
        # bit for bit, without a second merge (onnxruntime's DepthToSpace: 0.16 ms at 256 x 256, the Sub 0.03).
        return ops.sub(target, prediction) if lv.phase else error

    def run_reconstruction(self, ops: Any, lv: Any, prediction: Any) -> Any:
        return prediction


class Modules(LevelKind):
    """The paper's: the lower map is cut into patches (as F.unfold does), each optionally multiplied by a
    Gaussian window w; each module predicts its own patch with the shared U, so the target is the windowed
    patches (B, D, M) and overlapping pixels appear in several modules' errors."""

    name = "modules"
    patchwise = True
    window = True

    def predict(self, level: Any, r: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        return U.reshape(U.shape[0], -1).T @ r.flatten(2)  # (D, C) @ (B, C, M) -> (B, D, M)

    def adjoint(self, level: Any, g: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        out = U.reshape(U.shape[0], -1) @ g  # (C, D) @ (B, D, M) -> (B, C, M)
        return out.reshape(g.shape[0], *level.geometry.latent)

    def target(self, level: Any, lower: torch.Tensor) -> torch.Tensor:
        patches = level.unfold(lower)
        w = level.window(lower.dtype, lower.device)
        return patches if w is None else patches * w

    def target_adjoint(self, level: Any, e: torch.Tensor) -> torch.Tensor:
        w = level.window(e.dtype, e.device)
        return level.fold(e if w is None else e * w)

    def weight_gradient(self, level: Any, g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return _weight_gradient(level, g, r)

    def to_lower_map(self, level: Any, target_space: torch.Tensor, average: bool) -> torch.Tensor:
        # average: the least-squares map x minimising sum_m ||w * x_m - p_m||^2, i.e. overlapping module
        # predictions averaged with weights w (a plain mean without a window); else the patches summed.
        if not average:
            return level.fold(target_space)
        w = level.window(target_space.dtype, target_space.device)
        if w is None:
            ones = torch.ones_like(target_space[:1])
            return level.fold(target_space) / level.fold(ones)
        weight = level.fold(w.square().expand(-1, target_space.shape[-1]).unsqueeze(0))
        return level.fold(target_space * w) / weight

    def plan_maps(self, level: Any, U: torch.Tensor, first: bool) -> PlanMaps:
        matrix = U.reshape(U.shape[0], -1)  # (C, D)
        return PlanMaps(predict=matrix.T, adjoint=matrix, unfold=unfold_kernel(level))

    def run_predict(self, ops: Any, lv: Any, r: Any, weight: Any) -> Any:
        causes = lv.level.geometry.latent[0]
        return ops.matmul(weight, ops.reshape_rows(r, (causes, -1)))  # (D, C) @ (B, C, M)

    def run_adjoint(self, ops: Any, lv: Any, g: Any, weight: Any) -> Any:
        return ops.reshape_rows(ops.matmul(weight, g), lv.level.geometry.latent)

    def run_target(self, ops: Any, lv: Any, lower: Any) -> Any:
        return ops.patches(lower, lv)

    def run_target_adjoint(self, ops: Any, lv: Any, e: Any) -> Any:
        return ops.fold_patches(e, lv)

    def run_reconstruction(self, ops: Any, lv: Any, prediction: Any) -> Any:
        return ops.patches_to_map(prediction, lv)


class Dense(Modules):
    """A modules level whose single module covers the whole lower map (the paper's level 2)."""

    name = "dense"
    whole_map = True
    window = False


LEVEL_KINDS: dict[str, LevelKind] = {k.name: k for k in (Modules(), Convolutional(), Dense())}


def _weight_gradient(level: Any, patches: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """d<g, U r>/dU summed over the batch from g's patches (B, D, M), shaped like U."""
    grad = torch.einsum("bcm,bdm->cd", r.flatten(2), patches)
    return grad.reshape(level.config.causes, *level.geometry.lower[:1], *level.geometry.kernel)


def unfold_kernel(level: Any) -> torch.Tensor:
    """F.unfold (times the window) as a convolution kernel (D, C_low, kh, kw): what ONNX can run."""
    c0 = level.geometry.lower[0]
    kh, kw = level.geometry.kernel
    d = c0 * kh * kw
    kernel = torch.eye(d, dtype=torch.float64).reshape(d, c0, kh, kw)
    window = level.window(torch.float64, torch.device("cpu"))
    return kernel if window is None else kernel * window.reshape(d, 1, 1, 1)


def phase_split(x: torch.Tensor, stride: tuple[int, int], pad: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C sh sw, (H + pad_h) / sh, (W + pad_w) / sw): the sub-pixel phases as channels."""
    if pad != (0, 0):
        x = F.pad(x, (0, pad[1], 0, pad[0]))
    b, c, h, w = x.shape
    sh, sw = stride
    x = x.reshape(b, c, h // sh, sh, w // sw, sw).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * sh * sw, h // sh, w // sw)


def phase_merge(p: torch.Tensor, channels: int, stride: tuple[int, int], hw: Sequence[int]) -> torch.Tensor:
    """Inverse of `phase_split`, cropped to hw."""
    b, _, ph, pw = p.shape
    sh, sw = stride
    x = p.reshape(b, channels, sh, sw, ph, pw).permute(0, 1, 4, 2, 5, 3).reshape(b, channels, ph * sh, pw * sw)
    return x[:, :, : hw[0], : hw[1]]


def phase_kernels(U: torch.Tensor, stride: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Kernels of conv_transpose2d(r, U, stride) and conv2d(e, U, stride) in phase layout.

    Output pixel (s i + a) receives r[i - p] U[s p + a] for p < m = ceil(k / s): a stride-1 convolution
    of r (padded by m - 1) with the flipped taps gives every phase a as its own channel; the adjoint is
    the unflipped stride-1 convolution of the phases. U is zero-padded to s m taps.
    """
    c, c0, kh, kw = U.shape
    sh, sw = stride
    mh, mw = -(-kh // sh), -(-kw // sw)
    padded = F.pad(U, (0, sw * mw - kw, 0, sh * mh - kh)).reshape(c, c0, mh, sh, mw, sw)
    predict = padded.permute(1, 3, 5, 0, 2, 4).flip(-1, -2).reshape(c0 * sh * sw, c, mh, mw)
    adjoint = padded.permute(0, 1, 3, 5, 2, 4).reshape(c, c0 * sh * sw, mh, mw)
    return predict.contiguous(), adjoint.contiguous(), (mh, mw)
