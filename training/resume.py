"""pc-train --resume: the saved run a checkpoint carries, checked against the flags that may not change it.

The checkpoint's provenance (written by training/train.py's Trainer) holds the run's options, its
state and its photos' fingerprint; the run continues exactly, bit for bit, from them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pcmodel
from pcmodel import ConfigError, PCModel

from . import data
from .run_config import DataSpec, RunState, TrainConfig
from .train_args import train_config


def load_run(args: argparse.Namespace) -> tuple[PCModel, TrainConfig, RunState, DataSpec]:
    """The run that checkpoint args.resume carries, under the flags that leave its weights' course alone.

    ConfigError for a checkpoint pc-train did not write, or for a flag that would change the run (the
    model config, k1, k2, --set, the batch size, T, the seed, the scales).
    """
    try:
        model = pcmodel.load(args.resume)
    except (pcmodel.CheckpointError, pcmodel.UnstableStepError) as exc:
        raise ConfigError(f"--resume {exc}") from None
    training = model.provenance.get("training")
    if not isinstance(training, dict) or "options" not in training:
        raise ConfigError(f"--resume {args.resume}: this checkpoint was not written by pc-train (no training state)")
    fixed = ("preset", "config", "k1", "k2", "set")
    given = [f"--{n.replace('_', '-')}" for n in fixed if getattr(args, n, None) not in (None, [], False)]
    if args.k2_schedule != "preset":
        given.append("--k2-schedule")
    saved = TrainConfig(**{**training["options"], "scales": tuple(training["options"]["scales"])})
    for name in TrainConfig.WEIGHT_FIELDS:
        value = getattr(args, name)
        if value is not None and value != getattr(saved, name):
            given.append(f"--{name.replace('_', '-')}")
    if given:
        raise ConfigError(
            f"--resume continues the saved run exactly, so {', '.join(given)} cannot change; "
            f"start a new run (--preset or --config) to train with other settings"
        )
    if getattr(args, "amortiser", False) and saved.amortiser_lr is None:
        raise ConfigError(
            f"--resume {args.resume}: this run learns no amortiser, and --amortiser cannot add one to a run under "
            "way; fit one afterwards with pc-train --amortise CHECKPOINT"
        )
    options = train_config(args, saved)
    saved_state = training.get("state", {})
    state = RunState(
        step=int(training["step"]),
        energy_average=saved_state.get("energy_average"),
        energy_lowest=saved_state.get("energy_lowest"),
        commands=list(saved_state.get("commands", [])),
        seconds=float(saved_state.get("seconds", 0.0)),
    )
    saved_data = training.get("data", {})
    spec = DataSpec(
        source=str(args.data) if args.data else saved_data.get("source", "default"),
        held_out=str(args.held_out) if args.held_out else saved_data.get("held_out", "default"),
    )
    return model, options, state, spec


def check_same_photos(model: PCModel, spec: DataSpec, photos: list[data.Photo]) -> None:
    """DataError unless the photos are the ones the run was trained on (their fingerprint, where saved)."""
    saved = model.provenance["training"].get("data", {}).get("fingerprint")
    if saved is not None and saved != data.fingerprint(photos):
        raise data.DataError(
            f"--resume: the training images differ from the run's (source {spec.source}); "
            "give the same --data to continue it, or start a new run"
        )


def run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to: its folder, or the one above checkpoints/."""
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder
