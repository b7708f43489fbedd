"""pc-train's command line: the parser, and the model config and run options its flags give.

`apply_settings` (the `--set key.path=value` overrides) is pc-study's too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import pcmodel
from pcmodel import ConfigError, ModelConfig, PCModel
from pcmodel.amortiser import FIT_FLOOR
from pcmodel.cliargs import (
    ArgumentParser,
    batch_size,
    config_file,
    device_name,
    existing_file,
    existing_folder,
    output_folder,
    positive_float,
    positive_int,
    random_seed,
    read_config,
    step_count,
    thread_count,
)

from .amortise import TARGET_POOL, TARGETS
from .run_config import PRESET_TRAINING, DataSpec, RunState, TrainConfig

# The paper's schedule: k2 divided by 1.015 every 40 single inputs.
PAPER_SCHEDULE = {"k2_decay": 1.015, "k2_decay_every": 40, "k2_decay_unit": "inputs"}


def apply_settings(config: ModelConfig, settings: Sequence[str]) -> ModelConfig:
    """Apply `--set key.path=value` overrides (e.g. levels.0.alpha=0.5, learning.k2=0.01) to a config."""
    tree = json.loads(json.dumps(config.to_dict()))  # plain lists and dicts, every field present
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep:
            raise ConfigError(f"--set {setting!r}: write key=value, e.g. --set levels.0.alpha=0.5")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        except RecursionError:  # thousands of nested brackets
            raise ConfigError(f"--set {key}: the value is nested too deeply; no setting is more than a list") from None
        node: Any = tree
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    raise ConfigError(f"--set {key}: {part!r} is not an index 0..{len(node) - 1} (levels count from 0)")
                node = node[int(part)]
            else:
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                raise ConfigError(f"--set {key}: no such setting; see --print-config for the names")
        last = parts[-1]
        if isinstance(node, list) and last.isdigit():
            node[int(last)] = value
        elif isinstance(node, dict) and last in node:
            node[last] = value
        else:
            raise ConfigError(f"--set {key}: no such setting; see --print-config for the names")
    try:
        return ModelConfig.from_dict(tree)
    except ConfigError as exc:
        if not settings:
            raise
        raise ConfigError(f"--set {' '.join(settings)}: {exc}") from None


def _scales(text: str) -> tuple[float, ...]:
    """--scales: comma-separated factors in (0, 1]."""
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give factors like 1,0.5,0.25") from None
    if not all(0 < s <= 1 for s in scales):
        raise argparse.ArgumentTypeError(f"{text!r}: every factor must be in (0, 1], e.g. 1,0.5,0.25")
    return scales


def build_parser() -> argparse.ArgumentParser:
    """pc-train's flags; a wrong one is one line on stderr and exit status 2 (pcmodel.cliargs)."""
    parser = ArgumentParser(
        prog="pc-train",
        description="Train a predictive-coding network on natural images (see docs/TRAINING.md).",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=list(pcmodel.PRESETS), help="a preset (default: conv-rgb)")
    source.add_argument(
        "--config",
        metavar="FILE",
        type=config_file,
        help="a model config as JSON, written with --print-config (default: none)",
    )
    source.add_argument(
        "--resume",
        metavar="CKPT",
        type=existing_file,
        help="continue a run from its checkpoint, exactly (default: a new run)",
    )
    source.add_argument(
        "--amortise",
        metavar="CKPT",
        type=existing_file,
        help="fit an amortised start to this checkpoint's model, U unchanged, and write it with the model "
        "(default: train the model)",
    )
    parser.add_argument(
        "--amortiser",
        action="store_true",
        help="a new run also learns an amortised start alongside U, from each batch's settled latents; U's "
        "course is the same with or without it (default: off)",
    )
    parser.add_argument(
        "--amortise-lr",
        metavar="X",
        type=positive_float,
        default=3e-3,
        help="the amortiser's Adam step, decayed along a cosine over the updates (default: %(default)s)",
    )
    parser.add_argument(
        "--amortise-hidden",
        metavar="N",
        type=positive_int,
        default=32,
        help="hidden channels of the amortiser's maps (default: %(default)s)",
    )
    parser.add_argument(
        "--amortise-targets",
        choices=TARGETS,
        default="hybrid",
        help="with --amortise, what the amortiser is fitted to: hybrid, each batch settled by T steps from its "
        "guess; fixed-point, a pool of windows settled once to the fixed point (default: %(default)s)",
    )
    parser.add_argument(
        "--target-pool",
        metavar="N",
        type=positive_int,
        default=TARGET_POOL,
        help="with --amortise-targets fixed-point, the windows settled once (default: %(default)s)",
    )
    parser.add_argument(
        "--amortise-floor",
        metavar="X",
        type=positive_float,
        default=FIT_FLOOR,
        help="with --amortise, the fit's loss per window is its squared error over its latents' squared size plus "
        "X times the batch's mean size; near 1 the high-contrast windows weigh in (default: %(default)s)",
    )
    parser.add_argument(
        "--augment",
        action="store_true",
        help="with --amortise, also sample each photo turned by quarter turns and mirrored (default: off)",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        type=existing_folder,
        help="folder of training images (default: scikit-image's bundled photos)",
    )
    parser.add_argument(
        "--held-out",
        metavar="DIR",
        type=existing_folder,
        help="folder of held-out images (default: scikit-learn's sample photos)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=output_folder,
        help="output folder (default: runs/<model name>; on --resume, the run's folder)",
    )
    parser.add_argument(
        "--updates",
        metavar="N",
        type=positive_int,
        help="learning steps in all, one per batch (default: the preset's, 3000; --amortise: 1500)",
    )
    parser.add_argument(
        "--batch-size",
        metavar="N",
        type=batch_size,
        help="inputs per learning step, over all processes (default: the preset's: 100 paper, 64 conv-rgb)",
    )
    parser.add_argument(
        "--infer-steps",
        metavar="T",
        type=step_count,
        help="inference steps T per batch, at most 100000 (default: the model's steps; with --amortise: 100 plain "
        "gradient steps)",
    )
    parser.add_argument(
        "--seed", metavar="S", type=random_seed, help="seed for the initial weights and the batches (default: 0)"
    )
    parser.add_argument(
        "--scales",
        metavar="LIST",
        type=_scales,
        help="also sample photos resized by these factors, e.g. 1,0.5,0.25 (default: the preset's: 1 paper, "
        "1,0.5,0.25,0.125 conv-rgb)",
    )
    parser.add_argument(
        "--k1",
        metavar="X",
        type=positive_float,
        help="inference step size, below the stability bound (default: the config's)",
    )
    parser.add_argument("--k2", metavar="X", type=positive_float, help="initial learning rate (default: the config's)")
    parser.add_argument(
        "--k2-schedule",
        choices=("preset", "paper", "constant"),
        default="preset",
        help="preset: the config's; paper: /1.015 every 40 inputs; constant (default: %(default)s)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (default: none)"
    )
    parser.add_argument(
        "--checkpoint-every",
        metavar="N",
        type=positive_int,
        help="updates between checkpoints (default: the preset's, 500)",
    )
    parser.add_argument(
        "--eval-every",
        metavar="N",
        type=positive_int,
        help="updates between held-out evaluations (default: the preset's, 100)",
    )
    parser.add_argument(
        "--log-every",
        metavar="N",
        type=positive_int,
        help="updates between metrics-log lines (default: the preset's, 10)",
    )
    parser.add_argument(
        "--check-every",
        metavar="N",
        type=positive_int,
        help="updates between stability checks (default: the preset's, 50)",
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=thread_count,
        default=1,
        help="torch intra-op CPU threads per process (default: %(default)s, which suits a shared machine: on a "
        "loaded 2-core machine one thread ran 10x faster than torch's choice; raise it on cores of your own)",
    )
    parser.add_argument(
        "--device", type=device_name, help="auto, cpu, cuda or cuda:N (default: auto, cuda when available)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar, log lines only (default: off)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures at the end (default: off)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the model config as JSON and exit (default: off)"
    )
    return parser


def model_config(args: argparse.Namespace) -> ModelConfig:
    """A new run's model config: the preset or --config file, then --k2-schedule, --k2, --k1 and --set."""
    if args.config is not None:
        text = read_config(args.config)
        try:
            config = ModelConfig.from_json(text)
        except (ValueError, TypeError, KeyError) as exc:  # not JSON, or not a model config
            raise ConfigError(
                f"--config {args.config}: not a model config ({exc}); write one with --print-config"
            ) from None
    else:
        config = pcmodel.get_preset(args.preset or "conv-rgb")
    learning = config.learning
    if args.k2_schedule == "paper":
        learning = dataclasses.replace(learning, **PAPER_SCHEDULE)
    elif args.k2_schedule == "constant":
        learning = dataclasses.replace(learning, k2_decay=1.0)
    if args.k2 is not None:
        learning = dataclasses.replace(learning, k2=args.k2)
    config = config.replace(learning=learning)
    if args.k1 is not None:
        config = config.replace(k1=args.k1)
    return apply_settings(config, args.set)


def train_config(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    """`base` with the run options given on the command line."""
    changes = {
        name: getattr(args, name)
        for name in ("updates", "batch_size", "infer_steps", "seed", "checkpoint_every", "eval_every", "log_every")
        if getattr(args, name) is not None
    }
    if args.check_every is not None:
        changes["check_every"] = args.check_every
    if getattr(args, "amortiser", False):
        changes["amortiser_lr"] = args.amortise_lr
    if args.scales is not None:
        changes["scales"] = args.scales
    return dataclasses.replace(base, **changes)


def new_run(args: argparse.Namespace, config: ModelConfig) -> tuple[PCModel, TrainConfig, RunState, DataSpec]:
    """A new run of `config`: the preset's run options (a --config file: the defaults) under the flags."""
    base = PRESET_TRAINING.get(config.name, TrainConfig()) if args.config is None else TrainConfig()
    options = train_config(args, base)
    try:
        model = pcmodel.create(config, seed=options.seed)
        if options.amortiser_lr is not None:
            model.amortiser = pcmodel.Amortiser.create(
                config, pcmodel.AmortiserConfig(hidden=args.amortise_hidden), seed=options.seed
            )
    except RuntimeError:  # torch's allocator (OutOfMemoryError is one too): a model too large to hold
        causes = ", ".join(str(lv.causes) for lv in config.levels)
        hidden = f", amortiser hidden {args.amortise_hidden}" if options.amortiser_lr is not None else ""
        raise ConfigError(
            f"the model's weights cannot be allocated in memory (causes per level {causes}, input "
            f"{'x'.join(map(str, config.input_shape))}{hidden}): make them smaller"
        ) from None
    spec = DataSpec(
        source=str(args.data) if args.data else "default",
        held_out=str(args.held_out) if args.held_out else "default",
    )
    return model, options, RunState(), spec
