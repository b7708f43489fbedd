"""The model's parameters by name: each is declared here once, and everything else takes the names.

A model holds its parameters as an ordered mapping name -> tensor (`PCModel.params`): today one per
level, `level{l}.U` (causes, C_below, kh, kw), the generative weights of docs/MODEL.md. Checkpoints store
each under its name, the content hash covers them by name in this order, plans go stale when any of
them changes, and pc-export records the names. A new parameter of the network is one more `ParameterSpec`
in `parameter_specs`, with its shape and its initial draw.

The amortised start's maps (pcmodel.amortiser) are declared here too, by `amortiser_specs`: per level
`level{l}.A.in.weight`, ... They are optional and live apart from `params` (`model.amortiser`): they
decide where inference starts, not the energy, so the content hash and the engines' plans ignore them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .config import ConfigError, ModelConfig, level_shapes, weight_shapes

Params = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]  # by name, or the per-level U list (level 1 first)


@dataclass(frozen=True)
class ParameterSpec:
    """One named parameter: its shape (from the config alone) and its initial standard deviation."""

    name: str
    shape: tuple[int, ...]
    init_std: float  # a fresh model draws N(0, init_std^2)


def weight_name(level: int) -> str:
    """The name of level `level`'s generative weights U (level 1 first)."""
    return f"level{level}.U"


def parameter_specs(config: ModelConfig) -> list[ParameterSpec]:
    """Every parameter of a model with this config, in canonical order (the checkpoint's and the hash's)."""
    specs = []
    for i, (level, shape) in enumerate(zip(config.levels, weight_shapes(config)), 1):
        fan = shape[1] * shape[2] * shape[3]
        std = level.init_std if level.init_std is not None else fan**-0.5
        specs.append(ParameterSpec(weight_name(i), shape, std))
    return specs


def as_params(config: ModelConfig, values: Params) -> dict[str, torch.Tensor]:
    """The named parameters from a mapping (checked) or from the per-level U list (level 1 first)."""
    specs = parameter_specs(config)
    if not isinstance(values, Mapping):
        values = list(values)
        weights = [s for s in specs if s.name.endswith(".U")]
        if len(values) != len(weights) or len(weights) != len(specs):
            raise ConfigError(f"expected {len(weights)} weight tensors (one U per level), got {len(values)}")
        values = {s.name: v for s, v in zip(weights, values)}
    missing = [s.name for s in specs if s.name not in values]
    extra = sorted(set(values) - {s.name for s in specs})
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else []
        )
        raise ConfigError(f"parameters do not match the config: {'; '.join(parts)}")
    shapes = {s.name: tuple(values[s.name].shape) for s in specs}
    expected = {s.name: s.shape for s in specs}
    if shapes != expected:
        raise ConfigError(f"parameters have shapes {shapes}; this config needs {expected}")
    return {s.name: values[s.name] for s in specs}


def level_weights(config: ModelConfig, params: Params) -> list[torch.Tensor]:
    """Each level's U, level 1 first: what the mathematics (pcmodel.energy) takes."""
    if not isinstance(params, Mapping):
        return list(params)
    return [params[weight_name(i)] for i in range(1, len(config.levels) + 1)]


def params_key(params: Mapping[str, torch.Tensor]) -> tuple:
    """Identifies the parameters' current values: name, tensor identity, storage and in-place version counter.

    learn_step changes them in place (the version counter moves); assigning new tensors changes their
    identity. Either makes every derived plan and program stale.
    """
    return tuple((name, id(t), t.data_ptr(), t._version, str(t.device)) for name, t in params.items())


def amortiser_specs(config: ModelConfig, hidden: int) -> list[ParameterSpec]:
    """The amortiser's parameters (pcmodel.amortiser), level 1 first: per level a convolution with the
    level's geometry into `hidden` channels, a 3x3 one within them and a 3x3 one out to the causes.

    The 3x3 kernels are 1 wide along an axis where the level's native map has a single position (the
    paper's three modules in one row: 1x3; a dense level: 1x1), where the other taps would only ever
    meet zero padding. init_std 0 draws zeros: W_out and every bias start at zero, so a fresh amortiser
    starts r at zero."""
    specs = []
    for i, (shape, geometry) in enumerate(zip(weight_shapes(config), level_shapes(config)), 1):
        causes, below, kh, kw = shape
        near = tuple(3 if n > 1 else 1 for n in geometry.latent[1:])  # the neighbourhood kernel
        prefix = f"level{i}.A"
        specs += [
            ParameterSpec(f"{prefix}.in.weight", (hidden, below, kh, kw), (below * kh * kw) ** -0.5),
            ParameterSpec(f"{prefix}.in.bias", (hidden,), 0.0),
            ParameterSpec(f"{prefix}.mid.weight", (hidden, hidden, *near), (hidden * near[0] * near[1]) ** -0.5),
            ParameterSpec(f"{prefix}.mid.bias", (hidden,), 0.0),
            ParameterSpec(f"{prefix}.out.weight", (causes, hidden, *near), 0.0),
            ParameterSpec(f"{prefix}.out.bias", (causes,), 0.0),
        ]
    return specs
