"""Model configuration: frozen dataclasses, JSON-serialisable, validated at construction.

A `ModelConfig` describes the whole network: the native input, its preprocessing, the hierarchy of
levels, the inference settings (k1, steps, initial r) and the learning settings (k2 and its
schedule). It is stored inside every checkpoint, so the checkpoint alone rebuilds the model and
prepares images exactly as training did. Shapes follow docs/MODEL.md: level l predicts level l-1
(level 0 is the image) through f(U_l r_l).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .kinds import LEVEL_KINDS, LevelKind
from .priors import PRIORS as PRIOR_OBJECTS
from .solvers import (
    DEFAULT_MOMENTUM,
    DEFAULT_WINDOW,
    GRADIENT,
    MAX_WINDOW,
    SOLVERS,
    Solver,
    checked_level_steps,
    solver_for,
)

NONLINEARITIES = ("identity", "tanh")
PRIORS = tuple(PRIOR_OBJECTS)  # pcmodel.priors: each prior's energy, gradient and step written once
INITIAL_LATENTS = ("zeros", "feedforward", "amortised")  # amortised: the model's amortiser (pcmodel.amortiser)
COLORS = ("gray", "rgb")
FILTERS = ("none", "dog", "whiten")
NORMALIZATIONS = ("none", "image_std")
SIZE_MODES = ("resize", "tile", "full")  # full: convolutional models only (pcmodel.images)
K2_UNITS = ("inputs", "updates")
# Level fields added after format 1, with the value that leaves a model as it was: a checkpoint that
# lacks one reads as this value, and the canonical JSON leaves it out while it holds it (same hash).
NEUTRAL_LEVEL_FIELDS = {"k1_scale": 1.0, "k2_scale": 1.0, "column_norm": None}
NEUTRAL_MODEL_FIELDS = {"solver": "gradient", "momentum": DEFAULT_MOMENTUM, "window": DEFAULT_WINDOW, "level_steps": ()}
# The weights and latents are float32 (largest 3.4e38): a rate or scale beyond this, or a product of two
# (k2 * k2_scale is one float32 step), would not convert at all; nothing that learns sits anywhere near it.
MAX_VALUE = 1e30
MAX_CAUSES = 65536  # per position; our models have tens, and far more would not fit in memory
# Inference steps T, wherever a count of them is given (a config's `steps`, pc-train --infer-steps, pc-analyze's
# and pc-study's step flags): 20x the most any default asks (pc-analyze's 5,000-step steady state), 8x the
# longest inference any document records (12,000 steps, docs/PERFORMANCE.md).
# Each step's energy is kept, and the torch backend (training's) keeps each step's state too: about 7 KiB per
# input per step for both presets (measured at 1,000 and 2,000 steps), so a batch of 64 at the cap needs about
# 45 GiB; 10**23 had grown memory until the process was killed. At the cap pc-analyze's settling (250,000
# states per call) still infers two windows per call.
MAX_STEPS = 100_000


class ConfigError(ValueError):
    """A configuration that cannot describe a working network; the message names the fix."""


def _pair(value: Any, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        pair = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or min(pair) < 1:
        raise ConfigError(f"{name} must be one or two positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _choice(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")


def _positive(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= MAX_VALUE):
        raise ConfigError(f"{name} must be a positive finite number, at most {MAX_VALUE:g}, got {value!r}")


def _non_negative(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= MAX_VALUE):
        raise ConfigError(f"{name} must be a finite number >= 0, at most {MAX_VALUE:g}, got {value!r}")


@dataclass(frozen=True)
class LevelConfig:
    """One level of the hierarchy: causes r_l and the weights U_l that predict the level below."""

    causes: int  # units per position (modules: per module)
    kind: str = "convolutional"  # modules | convolutional | dense (kernel = whole lower map)
    kernel: tuple[int, int] | None = None  # (kh, kw); None for dense, resolved from the lower map
    stride: tuple[int, int] | None = None  # defaults to the kernel (no overlap)
    f: str = "identity"  # identity | tanh: the prediction is f(U_l r_l)
    sigma2: float = 1.0  # variance of this level's prediction error of the level below
    prior: str = "gaussian"  # gaussian: alpha*sum r^2; cauchy: alpha*sum log(1+r^2)
    alpha: float = 0.0  # prior strength on r_l
    lam: float = 0.0  # weight decay lambda*||U_l||^2
    window_sigma: float | None = None  # modules only: Gaussian window (px) on each lower patch
    init_std: float | None = None  # U ~ N(0, init_std^2); None -> 1/sqrt(lower patch size)
    # Per-level rates (checkpoint format 2): this level's inference step is k1 * k1_scale (a diagonal
    # preconditioner: docs/MODEL.md section 2) and its learning rate k2 * k2_scale (section 3).
    k1_scale: float = 1.0
    k2_scale: float = 1.0
    # Format 3: learning keeps each cause's field (one column of U_l) at this Euclidean norm, the
    # constraint of Olshausen & Field's sparse coding (docs/MODEL.md section 3); None: weight decay alone.
    column_norm: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel", _pair(self.kernel, "kernel"))
        object.__setattr__(self, "stride", _pair(self.stride, "stride"))
        if not isinstance(self.causes, int) or isinstance(self.causes, bool) or not 1 <= self.causes <= MAX_CAUSES:
            raise ConfigError(f"causes must be a positive int, at most {MAX_CAUSES}, got {self.causes!r}")
        _choice(self.kind, tuple(LEVEL_KINDS), "level kind")
        _choice(self.f, NONLINEARITIES, "nonlinearity f")
        _choice(self.prior, PRIORS, "prior")
        _positive(self.sigma2, "sigma2")
        _non_negative(self.alpha, "alpha")
        _non_negative(self.lam, "lam")
        if self.kind_info.whole_map:
            if self.kernel is not None or self.stride is not None:
                raise ConfigError(f"a {self.kind} level covers the whole lower map: leave kernel and stride unset")
        elif self.kernel is None:
            raise ConfigError(f"a {self.kind} level needs a kernel, e.g. kernel=(8, 8)")
        if self.stride is None and self.kernel is not None:
            object.__setattr__(self, "stride", self.kernel)
        if self.window_sigma is not None:
            if not self.kind_info.window:
                raise ConfigError("window_sigma applies to modules levels only; remove it or use kind='modules'")
            _positive(self.window_sigma, "window_sigma")
        if self.init_std is not None:
            _positive(self.init_std, "init_std")
        _positive(self.k1_scale, "k1_scale")
        _positive(self.k2_scale, "k2_scale")
        if self.column_norm is not None:
            _positive(self.column_norm, "column_norm")

    @property
    def kind_info(self) -> LevelKind:
        return LEVEL_KINDS[self.kind]


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the model's input x. Training and serving both call this, from the checkpoint."""

    color: str = "rgb"  # gray | rgb
    value_range: tuple[float, float] = (-1.0, 1.0)  # uint8 0..255 maps linearly onto this range
    filter: str = "none"  # none | dog (retina/LGN centre-surround) | whiten (Olshausen-Field 1/f)
    dog_sigmas: tuple[float, float] = (1.3, 2.6)  # centre, surround (px)
    whiten_cutoff: float = 0.4  # whitening roll-off, in cycles/pixel (Nyquist = 0.5)
    normalize: str = "none"  # none | image_std: divide each filtered image by its own std
    gain: float = 1.0  # multiplies the result (after normalisation)
    size_mode: str = "resize"  # default for images of another size: resize to native, or tile

    def __post_init__(self) -> None:
        object.__setattr__(self, "value_range", tuple(float(v) for v in self.value_range))
        object.__setattr__(self, "dog_sigmas", tuple(float(v) for v in self.dog_sigmas))
        _choice(self.color, COLORS, "color")
        _choice(self.filter, FILTERS, "filter")
        _choice(self.normalize, NORMALIZATIONS, "normalize")
        _choice(self.size_mode, SIZE_MODES, "size_mode")
        lo, hi = self.value_range
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ConfigError(f"value_range must be (low, high) with high > low, got {self.value_range}")
        centre, surround = self.dog_sigmas
        _positive(centre, "dog_sigmas[0]")
        if not surround > centre:
            raise ConfigError(f"dog_sigmas must be (centre, surround) with surround > centre, got {self.dog_sigmas}")
        if not 0 < self.whiten_cutoff <= 0.5:
            raise ConfigError(f"whiten_cutoff must be in (0, 0.5] cycles/pixel, got {self.whiten_cutoff}")
        _positive(self.gain, "gain")

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3


@dataclass(frozen=True)
class LearningConfig:
    """The slow timescale: U <- U - (k2/2) dE/dU per batch, with k2 decaying on a schedule.

    k2 at count n is k2 / k2_decay ** floor(n / k2_decay_every), n counting single inputs (the
    paper: /1.015 every 40 inputs) or updates (one per batch). k2_decay = 1 keeps k2 constant.
    """

    k2: float = 0.1
    k2_decay: float = 1.0
    k2_decay_every: int = 1
    k2_decay_unit: str = "updates"  # inputs | updates
    k2_min: float = 0.0  # floor for the decayed k2

    def __post_init__(self) -> None:
        _positive(self.k2, "k2")
        if not (math.isfinite(self.k2_decay) and self.k2_decay >= 1.0):
            raise ConfigError(f"k2_decay must be >= 1 (1 = constant k2), got {self.k2_decay}")
        if not isinstance(self.k2_decay_every, int) or self.k2_decay_every < 1:
            raise ConfigError(f"k2_decay_every must be a positive int, got {self.k2_decay_every!r}")
        _choice(self.k2_decay_unit, K2_UNITS, "k2_decay_unit")
        _non_negative(self.k2_min, "k2_min")

    def k2_at(self, updates: int, inputs: int) -> float:
        """k2 after `updates` learning steps that have seen `inputs` single inputs."""
        count = inputs if self.k2_decay_unit == "inputs" else updates
        try:
            decayed = self.k2 / self.k2_decay ** (count // self.k2_decay_every)
        except OverflowError:  # decayed past any float: k2 is 0, or its floor
            decayed = 0.0
        return max(decayed, self.k2_min)


@dataclass(frozen=True)
class ModelConfig:
    """The whole network. Level 1 predicts the image; level l predicts level l-1's causes."""

    name: str
    input_shape: tuple[int, int, int]  # native (C, H, W); convolutional levels accept other tilings
    levels: tuple[LevelConfig, ...]
    k1: float  # inference step: r_l <- r_l - (k1 k1_scale_l / 2) dE/dr_l, below the stability bound
    steps: int = 100  # default number of inference steps T
    initial_latents: str = "zeros"  # zeros | feedforward (r_l = U_l^T r_{l-1}, bottom up) | amortised (A_l)
    solver: str = "gradient"  # the served dynamics: gradient (the paper's) | momentum | nesterov | anderson
    momentum: float = DEFAULT_MOMENTUM  # beta of the momentum and nesterov solvers (pcmodel.solvers)
    window: int = DEFAULT_WINDOW  # m of the anderson solver
    level_steps: tuple[float, ...] = ()  # the served solver's plain-step multiplier per level, () for 1 (not gradient)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)

    def __post_init__(self) -> None:
        levels = tuple(lv if isinstance(lv, LevelConfig) else LevelConfig(**lv) for lv in self.levels)
        object.__setattr__(self, "levels", levels)
        try:
            shape = tuple(int(v) for v in self.input_shape)
        except (TypeError, ValueError):
            raise ConfigError(f"input_shape must be (C, H, W), got {self.input_shape!r}") from None
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"input_shape must be three positive ints (C, H, W), got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", shape)
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("name must be a non-empty string")
        if not levels:
            raise ConfigError("a model needs at least one level")
        _positive(self.k1, "k1")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"steps must be a positive int, at most {MAX_STEPS}, got {self.steps!r}")
        _choice(self.initial_latents, INITIAL_LATENTS, "initial_latents")
        _choice(self.solver, SOLVERS, "solver")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be a number in [0, 1), got {self.momentum!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 1 <= self.window <= MAX_WINDOW:
            raise ConfigError(f"window must be an int in [1, {MAX_WINDOW}], got {self.window!r}")
        try:
            level_steps = checked_level_steps(self.level_steps)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if level_steps and len(level_steps) != len(levels):
            raise ConfigError(f"level_steps needs one multiplier per level ({len(levels)}), got {self.level_steps!r}")
        if level_steps and self.solver == "gradient":
            raise ConfigError("the gradient solver takes no level_steps: its per-level steps are k1_scale")
        object.__setattr__(self, "level_steps", level_steps)
        if shape[0] != self.preprocess.channels:
            raise ConfigError(
                f"input_shape has {shape[0]} channel(s) but preprocess.color={self.preprocess.color!r} "
                f"gives {self.preprocess.channels}; make them agree"
            )
        k2 = max(self.learning.k2, self.learning.k2_min)
        for i, lv in enumerate(levels):
            # Each level steps by these products, in float32: each factor alone is checked above.
            for rate, value in (("k1 * k1_scale", self.k1 * lv.k1_scale), ("k2 * k2_scale", k2 * lv.k2_scale)):
                if value > MAX_VALUE:
                    raise ConfigError(f"levels.{i}: {rate} = {value:g} is above {MAX_VALUE:g}; lower one of them")
        level_shapes(self, shape[1:])  # raises if the native input does not tile

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @functools.cached_property  # every call that names no solver asks (a frozen config: made once)
    def served_solver(self) -> Solver:
        """The dynamics `model.infer` runs when a call does not name one."""
        return solver_for(self.solver, GRADIENT, self.momentum, self.window, self.level_steps)

    def to_json(self) -> str:
        """Canonical JSON (stored in checkpoints and hashed into their identity). Fields added after
        format 1 are left out while they hold their neutral value, so an older model keeps its hash."""
        data = self.to_dict()
        for key, neutral in NEUTRAL_MODEL_FIELDS.items():
            if data[key] == neutral:
                del data[key]
        for level in data["levels"]:
            for key, neutral in NEUTRAL_LEVEL_FIELDS.items():
                if level[key] == neutral:
                    del level[key]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict (e.g. parsed JSON); unknown keys are an error, not silently dropped."""
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        _check_keys(cls, data, "model config")
        levels = data.get("levels")
        if not isinstance(levels, (list, tuple)):
            raise ConfigError("levels must be a list of level objects")
        parsed = []
        for i, lv in enumerate(levels, 1):
            if not isinstance(lv, dict):
                raise ConfigError(f"level {i} must be an object")
            _check_keys(LevelConfig, lv, f"level {i}")
            parsed.append(_build(LevelConfig, lv, f"level {i} (levels.{i - 1})"))
        data["levels"] = tuple(parsed)
        for key, sub in (("preprocess", PreprocessConfig), ("learning", LearningConfig)):
            if key in data:
                if not isinstance(data[key], dict):
                    raise ConfigError(f"{key} must be an object")
                _check_keys(sub, data[key], key)
                data[key] = _build(sub, data[key], key)
        return _build(cls, data, "model config")

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config is not valid JSON: {exc}") from None
        except RecursionError:  # thousands of nested brackets: no model config is more than a few deep
            raise ConfigError("model config JSON is nested too deeply; a model config is a few levels deep") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _build(cls: type, data: dict[str, Any], what: str) -> Any:
    """cls(**data), where a missing field or a value of the wrong type (a list for a number) is a ConfigError."""
    try:
        return cls(**data)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:  # checks that compare or convert a value of another type
        raise ConfigError(f"{what} is incomplete or has a value of the wrong type: {exc}") from None


def _check_keys(cls: type, data: dict[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) in {what}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class LevelGeometry:
    """Resolved shapes of one level for one input size."""

    lower: tuple[int, int, int]  # (C, H, W) of the map this level predicts
    kernel: tuple[int, int]
    stride: tuple[int, int]
    latent: tuple[int, int, int]  # (causes, H_l, W_l): for modules, the grid of modules

    @property
    def patch_size(self) -> int:
        return self.lower[0] * self.kernel[0] * self.kernel[1]


def level_shapes(config: ModelConfig, input_hw: tuple[int, int] | None = None) -> list[LevelGeometry]:
    """The geometry of every level for an input of size input_hw (default: native)."""
    channels = config.input_shape[0]
    h, w = config.input_shape[1:] if input_hw is None else input_hw
    lower = (channels, int(h), int(w))
    native = _native_lower_shapes(config) if input_hw is not None else None
    out = []
    for i, lv in enumerate(config.levels):
        if lv.kind_info.whole_map:
            if native is not None and lower != native[i]:
                raise ConfigError(
                    f"level {i + 1} is dense over a {native[i][1]}x{native[i][2]} map, so the input must be "
                    f"{config.input_shape[1]}x{config.input_shape[2]}; got {h}x{w} (resize or tile it)"
                )
            kernel, stride = lower[1:], lower[1:]
        else:
            kernel, stride = lv.kernel, lv.stride
        assert kernel is not None and stride is not None
        dims = []
        for axis, (n, k, s) in enumerate(zip(lower[1:], kernel, stride)):
            if n < k or (n - k) % s:
                what = "input" if i == 0 else f"level {i} map"
                side = "height" if axis == 0 else "width"
                valid = k if n < k else n - (n - k) % s
                raise ConfigError(
                    f"level {i + 1} does not tile the {what}: {side} {n} with kernel {k} and stride {s} "
                    f"needs {side} = {k} + {s}*n (nearest: {valid} or {valid + s}); change the kernel, "
                    f"stride or input size"
                )
            dims.append((n - k) // s + 1)
        geometry = LevelGeometry(lower=lower, kernel=tuple(kernel), stride=tuple(stride), latent=(lv.causes, *dims))
        out.append(geometry)
        lower = geometry.latent
    return out


def weight_shapes(config: ModelConfig) -> list[tuple[int, int, int, int]]:
    """Shape of each U_l: (causes, C_below, kh, kw), from the config alone (checkpoints check against it)."""
    return [(lc.causes, g.lower[0], *g.kernel) for lc, g in zip(config.levels, level_shapes(config))]


def _native_lower_shapes(config: ModelConfig) -> list[tuple[int, int, int]]:
    return [g.lower for g in level_shapes(config)]


def valid_sizes(config: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """Input sizes the hierarchy tiles exactly: per axis (first, period), size = first + period*n.

    A model with a dense level accepts its native size only (period 0).
    """
    if has_whole_map_level(config):
        h, w = config.input_shape[1:]
        return (h, 0), (w, 0)
    out = []
    for axis in range(2):
        first, period = 1, 1  # at the top: one position, any count of positions
        for lv in reversed(config.levels):
            k, s = lv.kernel[axis], lv.stride[axis]  # type: ignore[index]
            first, period = (first - 1) * s + k, period * s
        out.append((first, period))
    return out[0], out[1]


def has_whole_map_level(config: ModelConfig) -> bool:
    """Whether a level covers its whole lower map (dense): the model then takes its native size only."""
    return any(lv.kind_info.whole_map for lv in config.levels)
