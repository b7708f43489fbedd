"""What a training run is, apart from its model: the options that decide it (TrainConfig, with each
preset's defaults), how far it has come (RunState) and where its photos come from (DataSpec).

A checkpoint's provenance records all three (training/train.py writes it) and --resume reads them back
(training/resume.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pcmodel import ConfigError
from pcmodel.cliargs import MAX_BATCH_SIZE, MAX_SEED
from pcmodel.config import MAX_STEPS

from . import data

log = logging.getLogger(__name__)

# TrainConfig's fields that count something: whole numbers from 1
COUNTS = ("updates", "batch_size", "checkpoint_every", "eval_every", "log_every", "check_every", "held_out_count")


@dataclass(frozen=True)
class TrainConfig:
    """Everything besides the model's config that decides a run. Saved in every checkpoint's provenance.

    The fields above the line decide the weights; those below only what is watched and written.
    """

    updates: int = 3000  # learning steps, one per global batch
    batch_size: int = 100  # global batch (split evenly across torchrun processes)
    infer_steps: int | None = None  # T inference steps per batch; None: the model's own (config.steps)
    seed: int = 0  # initial U and every batch
    scales: tuple[float, ...] = (1.0,)  # photos are also sampled resized by these factors
    # The amortiser's Adam step where the run learns one alongside U (pc-train --amortiser), else None. It
    # never moves U: the fields above decide U's course whatever this says.
    amortiser_lr: float | None = None
    # ---
    checkpoint_every: int = 500  # updates between checkpoints (and one at the end)
    eval_every: int = 100  # updates between held-out evaluations
    log_every: int = 10  # updates between lines of the metrics log
    check_every: int = 50  # updates between stability-bound checks (and at each checkpoint)
    held_out_count: int = 256  # held-out windows evaluated at each eval
    stability_margin: float = 0.9  # stop when k1 >= margin x the stability bound
    blowup_factor: float = 10.0  # stop when the energy's moving average exceeds this x its lowest

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        for name in COUNTS:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.batch_size > MAX_BATCH_SIZE:
            raise ConfigError(f"batch_size must be at most {MAX_BATCH_SIZE}, got {self.batch_size}")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be an int from 0 to {MAX_SEED}, got {self.seed!r}")
        steps = self.infer_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS):
            raise ConfigError(f"infer_steps must be a positive int, at most {MAX_STEPS}, got {steps!r}")
        if not self.scales or not all(0 < s <= 1 for s in self.scales):
            raise ConfigError(f"scales must be factors in (0, 1], got {self.scales}")
        if not isinstance(self.stability_margin, (int, float)) or not 0 < self.stability_margin <= 1:
            raise ConfigError(f"stability_margin must be in (0, 1], got {self.stability_margin!r}")
        if not isinstance(self.blowup_factor, (int, float)) or not 1 < self.blowup_factor < float("inf"):
            raise ConfigError(f"blowup_factor must be a finite number above 1, got {self.blowup_factor!r}")
        lr = self.amortiser_lr
        if lr is not None and (not isinstance(lr, (int, float)) or not 0 < lr < float("inf")):
            raise ConfigError(f"amortiser_lr must be a positive finite number or None, got {lr!r}")

    WEIGHT_FIELDS = ("batch_size", "infer_steps", "seed", "scales")  # may not change on --resume


# Per-preset training defaults, chosen and measured as docs/TRAINING.md records.
PRESET_TRAINING: dict[str, TrainConfig] = {
    "rao-ballard-1999": TrainConfig(updates=3000, batch_size=100),
    # Crops of the photos at full size and resized by 1/2, 1/4 and 1/8, so the model also knows the
    # coarser structure of a whole photo resized to 32x32 (the service's default for this preset).
    "conv-rgb": TrainConfig(updates=3000, batch_size=64, scales=(1.0, 0.5, 0.25, 0.125)),
}


@dataclass
class RunState:
    """What a checkpoint must carry, besides the weights, for --resume to continue exactly."""

    step: int = 0  # updates done
    energy_average: float | None = None  # moving average of the batch energy (blow-up watch)
    energy_lowest: float | None = None  # its lowest value so far
    commands: list[str] = field(default_factory=list)  # every command that contributed, in order
    seconds: float = 0.0  # training time so far, over all commands


@dataclass(frozen=True)
class DataSpec:
    """Where the photos come from, as provenance records it."""

    source: str  # "default" (scikit-image's photos) or a folder path
    held_out: str  # "default" (scikit-learn's sample photos) or a folder path

    def load(self) -> tuple[list[data.Photo], list[data.Photo]]:
        photos = data.default_photos() if self.source == "default" else _folder(self.source, "--data")
        held = data.held_out_photos() if self.held_out == "default" else _folder(self.held_out, "--held-out")
        return photos, held


def _folder(path: str, option: str) -> list[data.Photo]:
    """The readable images of a folder; the unreadable ones are listed in the log and skipped."""
    photos, skipped = data.folder_photos(path, option=option)
    for line in skipped:
        log.warning("%s: skipped unreadable image %s", option, line)
    log.info("%s: %d image(s) from %s (%d skipped)", option, len(photos), path, len(skipped))
    return photos
