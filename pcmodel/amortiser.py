"""The amortised start ("inference fast"): a small feed-forward map per level that guesses r_l in one pass.

Hybrid predictive coding (Tschantz, Millidge, Seth & Buckley 2023): a learned feed-forward guess of the
latents, refined by the network's own gradient dynamics (`infer_loop`: "inference slow"). The energy, its
fixed point and the refinement are unchanged; only where the refinement starts moves (docs/MODEL.md
section 2, "The amortised start").

Level l's map A_l reads the level below (the image x for level 1; the amortised r_{l-1} above that):

    h   = tanh(W_in * t + b_in)                     # level l's kernel and stride: (B, hidden, H_l, W_l)
    h  <- h + tanh(W_mid * h + b_mid)               # 3x3, a residual: each position sees its neighbours
    r_l = W_out * h + b_out                         # 3x3: (B, causes, H_l, W_l), like the latents

(* a 2-D convolution; the 3x3 ones are zero-padded, and 1 wide along an axis where the level's native
map has a single position: the paper's modules in one row, a dense level). The first convolution has the
level's own geometry, so the map runs on every input size the level tiles, for every kind (a dense
level's kernel is its whole lower map). The two 3x3 convolutions widen the view: a settled code of
overlapping kernels explains its neighbours away, which a map with level 1's view alone fits poorly (issue
21's probe: relative squared error 0.41 for a linear map; docs/PERFORMANCE.md). W_out and b_out start at
zero, so a fresh amortiser starts the latents at zero.

The parameters are named `level{l}.A.{in,mid,out}.{weight,bias}` (pcmodel.parameters.amortiser_specs)
and stored in the checkpoint next to U; the model's content hash covers U and the config only, so fitting
an amortiser leaves a model's identity alone (pcmodel.checkpoint). Computed once per image before any
backend refines it from there (`model.infer(x, init="amortised")`): in torch, or, for calls a backend that
builds programs serves on a CPU, by onnxruntime from this same definition (a graph of its own:
pcmodel.engines.onnxruntime.OrtGuess, 1.3x faster for a 256 px photo, 7-10x for small maps); and inside an
exported ONNX file (pc-export of a model served from its amortised start).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .config import ConfigError, ModelConfig
from .levels import Level
from .parameters import ParameterSpec, amortiser_specs


@dataclass(frozen=True)
class AmortiserConfig:
    """The amortiser's architecture: stored in the checkpoint beside (not inside) the model's config."""

    hidden: int = 32  # channels of the two hidden maps; 32 fits conv-rgb's level 1 at 0.054 (issue 21's probe)

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, int) or isinstance(self.hidden, bool) or self.hidden < 1:
            raise ConfigError(f"amortiser hidden must be a positive int, got {self.hidden!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> AmortiserConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"amortiser config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("amortiser config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown field(s) in amortiser config: {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**data)


@dataclass
class Amortiser:
    """An amortiser: its architecture and its parameters by name, in `amortiser_specs` order."""

    config: AmortiserConfig
    params: dict[str, torch.Tensor]

    @classmethod
    def create(cls, model_config: ModelConfig, config: AmortiserConfig | None = None, seed: int = 0) -> Amortiser:
        """A fresh amortiser: each parameter drawn from N(0, init_std^2) in declared order from `seed`
        (W_out and the biases are zero: a fresh amortiser starts the latents at zero)."""
        config = config or AmortiserConfig()
        generator = torch.Generator().manual_seed(seed)
        params = {s.name: torch.randn(s.shape, generator=generator) * s.init_std for s in _specs(model_config, config)}
        return cls(config, params)

    @classmethod
    def from_params(
        cls, model_config: ModelConfig, config: AmortiserConfig, params: Mapping[str, torch.Tensor]
    ) -> Amortiser:
        """Checked: every declared parameter present with its shape, nothing else, all finite."""
        specs = _specs(model_config, config)
        missing = [s.name for s in specs if s.name not in params]
        extra = sorted(set(params) - {s.name for s in specs})
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unexpected {', '.join(extra)}"] if extra else []
            )
            raise ConfigError(f"amortiser parameters do not match: {'; '.join(parts)}")
        wrong = {s.name: tuple(params[s.name].shape) for s in specs if tuple(params[s.name].shape) != s.shape}
        if wrong:
            raise ConfigError(f"amortiser parameters have shapes {wrong}; this config needs others")
        named = {s.name: params[s.name].detach().to(torch.float32).clone() for s in specs}
        if not all(bool(torch.isfinite(t).all()) for t in named.values()):
            raise ConfigError("amortiser parameters contain NaN or Inf")
        return cls(config, named)

    def to(self, device: torch.device | str) -> Amortiser:
        self.params = {k: t.to(device) for k, t in self.params.items()}
        return self

    def lowest(self, levels: int) -> Amortiser:
        """The guesses of the lowest `levels` levels only (a level's guess needs only those below it): the
        amortiser of the same hierarchy with the levels above removed."""
        keep = {f"level{i}.A." for i in range(1, levels + 1)}
        return Amortiser(self.config, {k: t for k, t in self.params.items() if k[: k.index(".A.") + 3] in keep})

    def sha256(self) -> str:
        """Hash over the amortiser's config and parameters: the checkpoint checks its file against it."""
        digest = hashlib.sha256(self.config.to_json().encode())
        for name, t in self.params.items():
            t = t.detach().to("cpu", torch.float32).contiguous()
            digest.update(f"\n{name}:F32:{list(t.shape)}\n".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()


def _specs(model_config: ModelConfig, config: AmortiserConfig) -> list[ParameterSpec]:
    return amortiser_specs(model_config, config.hidden)


class GuessOps(Protocol):
    """The four operations a guess takes, so that torch (`TorchGuessOps`) and the exported ONNX graph
    (pcmodel.engines.onnx_graph.OnnxOps) compute it from this one definition."""

    def param(self, name: str, tensor: torch.Tensor) -> Any: ...

    def conv_bias(self, x: Any, weight: Any, bias: Any, stride: tuple[int, int], pad: tuple[int, int]) -> Any: ...

    def tanh_(self, a: Any) -> Any: ...

    def add(self, a: Any, b: Any) -> Any: ...


@dataclass(frozen=True)
class TorchGuessOps:
    """GuessOps in torch, in the dtype of the map the guess reads."""

    dtype: torch.dtype

    def param(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype)

    def conv_bias(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: tuple[int, int], pad: tuple[int, int]
    ) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride=stride, padding=pad)

    def tanh_(self, a: torch.Tensor) -> torch.Tensor:
        return torch.tanh(a)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


def level_guess(
    level: Level, params: Mapping[str, torch.Tensor], index: int, lower: Any, ops: GuessOps | None = None
) -> Any:
    """A_l(lower): level `index`'s (1-based) guess of r_l from the map below (B, C_below, H, W); in torch
    unless `ops` says otherwise (the ONNX graph: names of values)."""
    ops = TorchGuessOps(lower.dtype) if ops is None else ops
    p = {k: ops.param(f"level{index}.A.{k}", params[f"level{index}.A.{k}"]) for k in _LAYER_NAMES}
    mid = params[f"level{index}.A.mid.weight"]
    pad = (mid.shape[2] // 2, mid.shape[3] // 2)  # 3x3, or 1 wide on a one-position axis
    stride = tuple(level.geometry.stride)
    h = ops.tanh_(ops.conv_bias(lower, p["in.weight"], p["in.bias"], stride, (0, 0)))  # type: ignore[arg-type]
    h = ops.add(h, ops.tanh_(ops.conv_bias(h, p["mid.weight"], p["mid.bias"], (1, 1), pad)))  # (B, hidden, H_l, W_l)
    return ops.conv_bias(h, p["out.weight"], p["out.bias"], (1, 1), pad)  # (B, causes, H_l, W_l)


_LAYER_NAMES = ("in.weight", "in.bias", "mid.weight", "mid.bias", "out.weight", "out.bias")


def amortised_latents(
    levels: Sequence[Level], params: Mapping[str, torch.Tensor], x: Any, ops: GuessOps | None = None
) -> list[Any]:
    """Every level's guess, bottom up: r_1 = A_1(x), r_l = A_l(r_{l-1}). Differentiable in torch."""
    out = []
    lower = x
    for index, level in enumerate(levels, 1):
        lower = level_guess(level, params, index, lower, ops)
        out.append(lower)
    return out


FIT_FLOOR = 1e-3  # the loss's floor, a fraction of the batch's mean ||r*_l||^2


def fitting_losses(
    levels: Sequence[Level],
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    settled: Sequence[torch.Tensor],
    floor: float = FIT_FLOOR,
) -> list[torch.Tensor]:
    """Each level's regression loss: the batch mean of ||A_l(in_l) - r*_l||^2 / (||r*_l||^2 + floor), each
    image's squared relative error (floor = `floor` x the batch's mean ||r*_l||^2, so a blank window's r* = 0
    divides by no zero; a floor near 1 weighs the high-contrast windows in, whose latents make up most of a
    whole photo's).

    Per image, not over the batch: a low-contrast window, whose fixed point is near zero, counts as much as
    a high-contrast one, so the guess does not start it further from its fixed point than zero would
    (measured: docs/PERFORMANCE.md, "The amortised start"). in_1 = x and in_l = the amortised r_{l-1},
    detached: each level's map learns from its own error alone (local, as in hybrid predictive coding), on
    the inputs it sees at inference. r* are settled latents.
    """
    losses = []
    lower = x
    for index, (level, target) in enumerate(zip(levels, settled), 1):
        guess = level_guess(level, params, index, lower.detach())
        target = target.to(guess.dtype)
        sizes = target.square().flatten(1).sum(1)  # (B,)
        least = floor * sizes.mean().clamp_min(1e-30)
        losses.append(((guess - target).square().flatten(1).sum(1) / (sizes + least)).mean())
        lower = guess
    return losses
