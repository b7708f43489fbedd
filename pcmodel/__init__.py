"""pcmodel: the predictive-coding network of Rao & Ballard (1999), exact and fast.

import pcmodel
model = pcmodel.load("default")                 # a shipped checkpoint, a preset name, or a path
x = model.preprocess(images)                    # PIL images / uint8 arrays -> (B, C, H, W)
result = model.infer(x)                         # fixed-step inference on the latents
result.latents, result.reconstruction, result.error, result.energy, result.steps
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from .amortiser import Amortiser, AmortiserConfig
from .checkpoint import CheckpointError, not_a_file
from .checkpoint import load as _load_checkpoint
from .config import ConfigError, LearningConfig, LevelConfig, ModelConfig, PreprocessConfig
from .energy import constrain_weights
from .images import ImageError
from .model import PCModel, UnstableStepError
from .parameters import level_weights, parameter_specs
from .presets import PRESETS, get_preset
from .priors import PRIORS
from .results import InferenceResult
from .solvers import SOLVERS, Solver

__all__ = [
    "PRESETS",
    "PRIORS",
    "SOLVERS",
    "Amortiser",
    "AmortiserConfig",
    "CheckpointError",
    "ConfigError",
    "ImageError",
    "InferenceResult",
    "LearningConfig",
    "LevelConfig",
    "ModelConfig",
    "PCModel",
    "PreprocessConfig",
    "Solver",
    "UnstableStepError",
    "create",
    "get_preset",
    "load",
    "shipped_models",
]

DEFAULT_MODEL = "conv-rgb"  # what "default" names


def _shipped_path(name: str) -> Path:
    return Path(str(resources.files("pcmodel") / "weights" / f"{name}.safetensors"))


def shipped_models() -> dict[str, str]:
    """Names `load` accepts besides paths, each with what it resolves to."""
    names = {"default": DEFAULT_MODEL, **{n: n for n in PRESETS}}
    return {
        name: (
            f"shipped checkpoint {target}" if _shipped_path(target).is_file() else f"untrained preset {target} (seed 0)"
        )
        for name, target in names.items()
    }


def create(preset_or_config: str | ModelConfig, seed: int = 0, *, allow_unstable: bool = False) -> PCModel:
    """A fresh model, each parameter drawn from N(0, init_std^2) in declared order (pcmodel.parameters) from
    `seed` (deterministic on CPU: U_l ~ N(0, init_std_l^2), level 1 first, as always); on levels
    with a column_norm each column is then rescaled to it, so learning starts on its constraint. A config
    that starts from the amortised guess gets a fresh amortiser, which guesses zero until it is fitted."""
    config = get_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    if not isinstance(config, ModelConfig):
        raise TypeError(f"create takes a preset name or a ModelConfig, got {type(config).__name__}")
    generator = torch.Generator().manual_seed(seed)
    params = {
        spec.name: torch.randn(spec.shape, generator=generator) * spec.init_std for spec in parameter_specs(config)
    }
    constrain_weights(config, level_weights(config, params))
    amortiser = Amortiser.create(config, seed=seed) if config.initial_latents == "amortised" else None
    provenance = {"source": "create", "seed": seed}
    return PCModel(config, params, allow_unstable=allow_unstable, provenance=provenance, amortiser=amortiser)


def load(
    path_or_name: str | os.PathLike[str] = "default",
    *,
    device: torch.device | str | None = None,
    allow_unstable: bool = False,
) -> PCModel:
    """A model from a checkpoint path, or by name: `default` (conv-rgb) or a preset name.

    A name loads the checkpoint shipped in the package, or, where none is shipped, the preset
    initialised with seed 0. Raises CheckpointError for a bad file, UnstableStepError when k1 is
    above the model's stability bound (unless allow_unstable).
    """
    text = os.fspath(path_or_name)
    names = shipped_models()
    if text in names and not Path(text).is_file():
        target = DEFAULT_MODEL if text == "default" else text
        path = _shipped_path(target)
        if not path.is_file():
            model = create(target, seed=0, allow_unstable=allow_unstable)
            return model.to(device) if device is not None else model
    else:
        path = Path(text)
        if not path.is_file():
            reason = not_a_file(path)
            if not path.exists():
                reason += f", and not a model name ({', '.join(names)})"
            raise CheckpointError(f"{text}: {reason}")
    ckpt = _load_checkpoint(path)
    return PCModel(
        ckpt.config,
        ckpt.params,
        allow_unstable=allow_unstable,
        device=device,
        provenance=ckpt.provenance,
        amortiser=ckpt.amortiser,
    )
