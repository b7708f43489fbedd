"""pc-train --resume: the saved run a checkpoint carries, checked against the flags that may not change it.

The checkpoint's provenance (written by training/train.py's Trainer) holds the run's options, its
state and its photos' fingerprint; the run continues exactly, bit for bit, from them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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
    provenance = model.provenance
    training = provenance.get("training") if isinstance(provenance, dict) else None
    if not isinstance(training, dict) or "options" not in training:
        raise ConfigError(f"--resume {args.resume}: this checkpoint was not written by pc-train (no training state)")
    saved, state, saved_data = _saved_run(training, args.resume)
    fixed = ("preset", "config", "k1", "k2", "set")
    given = [f"--{n.replace('_', '-')}" for n in fixed if getattr(args, n, None) not in (None, [], False)]
    if args.k2_schedule != "preset":
        given.append("--k2-schedule")
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
    spec = DataSpec(
        source=str(args.data) if args.data else saved_data.get("source", "default"),
        held_out=str(args.held_out) if args.held_out else saved_data.get("held_out", "default"),
    )
    return model, options, state, spec


def _saved_run(training: dict[str, Any], checkpoint: Path) -> tuple[TrainConfig, RunState, dict[str, Any]]:
    """The options, state and data record a checkpoint's training record holds, each checked.

    Train.py writes them, but the file may have been edited or damaged since: anything missing or of the
    wrong type is a ConfigError, before the run starts, rather than a crash part of the way into it.
    """
    try:
        options = training["options"]
        saved = TrainConfig(**{**options, "scales": tuple(options["scales"])})
        step = training["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step is {step!r}, not a count of updates")
        record = training.get("state", {})
        saved_data = training.get("data", {})
        if not isinstance(record, dict) or not isinstance(saved_data, dict):
            raise TypeError("state and data must be objects")
        energies = [record.get(k) for k in ("energy_average", "energy_lowest")]
        if not all(e is None or _is_number(e) for e in energies):
            raise TypeError(f"the energies {energies} are not numbers")
        commands, seconds = record.get("commands", []), record.get("seconds", 0.0)
        if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
            raise TypeError("commands must be a list of strings")
        if not _is_number(seconds):
            raise TypeError(f"seconds is {seconds!r}, not a number")
        if not all(isinstance(saved_data.get(k, ""), str) for k in ("source", "held_out")):
            raise TypeError("the data source and held_out must be strings")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # ConfigError (a ValueError) from TrainConfig too
        reason = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError(
            f"--resume {checkpoint}: the checkpoint's training record is damaged ({reason}); resume from another "
            "checkpoint of the run or start a new one"
        ) from None
    state = RunState(step, energies[0], energies[1], list(commands), float(seconds))
    return saved, state, saved_data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
