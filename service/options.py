"""What an encode request asks for: its form's fields checked, its image parts, and its options parsed from text."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pcmodel import SOLVERS, ModelConfig, starts
from pcmodel.config import has_whole_map_level
from pcmodel.starts import Start

from .errors import RequestError
from .forms import Part, parse_form
from .settings import Settings

SIZE_MODES = ("resize", "tile", "full")
OUTPUTS = ("latents", "reconstruction", "error_map", "input", "trace", "level_errors", "snapshots")
MAX_SNAPSHOTS = 20  # outputs=snapshots: the states inference passes through, at most this many after the start
DEFAULT_OUTPUTS = ("latents", "reconstruction", "error_map", "input")
ARRAYS = ("float32", "float16", "none")
OPTION_FIELDS = ("steps", "size_mode", "outputs", "arrays", "solver", "init")
START_FIELD = "start"  # /encode: a previous result's latents as an .npz (latent_1..latent_L), a warm start
INITS = ("zero", "amortised")  # where inference starts when a request names it (pcmodel's model.infer `init`)


@dataclass(frozen=True)
class EncodeOptions:
    """What a request asks for; the defaults come from the model and the settings."""

    steps: int
    size_mode: str
    outputs: tuple[str, ...]
    arrays: str = "float32"  # float32 | float16 | none: the dtype of the maps' arrays (none: PNGs only)
    full_max_side: int = 256  # full mode: the longer side an image is scaled down to (PC_FULL_MAX_SIDE)
    solver: str | None = None  # the dynamics (pcmodel.solvers); None: the model's own
    init: str | None = None  # zero | amortised; None: the model's own start
    start: Start | None = None  # /encode's `start` part: given latents (level 1 first) and where they came from


def read_request(
    body: bytes, content_type: str, image_field: str, max_images: int, config: ModelConfig, settings: Settings
) -> tuple[list[Part], EncodeOptions]:
    """The image parts and the options of an /encode (image_field="image", max_images=1) or
    /encode_batch (image_field="images") form."""
    images_wanted = "one `image`" if max_images == 1 else f"at most {max_images} `{image_field}` files"
    expected = f"{images_wanted} and each option field once"
    form = parse_form(body, content_type, max_images + len(OPTION_FIELDS) + 2, image_field, expected)
    known = (image_field, *OPTION_FIELDS, *((START_FIELD,) if max_images == 1 else ()))
    unknown = sorted(set(form) - set(known))
    if unknown:
        raise RequestError(
            400, "bad_request", f"unknown form field(s) {', '.join(unknown)}; the fields are: {', '.join(known)}"
        )
    images = form.get(image_field, [])
    if not images:
        raise RequestError(400, "missing_field", f"the form has no `{image_field}` field: attach the image file")
    if len(images) > max_images:
        raise RequestError(
            413 if max_images > 1 else 400,
            "too_large" if max_images > 1 else "bad_request",
            f"the form has {len(images)} `{image_field}` parts; send {images_wanted}"
            + (" (use /encode_batch for several)" if max_images == 1 else ""),
        )
    values: dict[str, str] = {}
    for name in OPTION_FIELDS:
        given = form.get(name, [])
        if len(given) > 1:
            raise RequestError(400, "bad_request", f"the form field `{name}` is given {len(given)} times; send it once")
        if given:
            values[name] = _text(given[0])
    options = parse_options(values, config, settings)
    starts = form.get(START_FIELD, [])
    if len(starts) > 1:
        raise RequestError(400, "bad_request", f"the form field `{START_FIELD}` is given {len(starts)} times")
    if starts:
        if options.init is not None:
            raise RequestError(422, "bad_parameter", "send either `init` or a `start`, not both")
        start = read_start(starts[0].data, len(config.levels), settings.max_body_bytes)
        options = dataclasses.replace(options, start=start)
    return images, options


def read_start(data: bytes, levels: int, max_bytes: int) -> Start:
    """A `start` part: an .npz of latent_1..latent_L float arrays, as a previous response (saved with numpy's
    savez) or pc-encode's encoding.npz has them, read by pcmodel.starts (no pickle; at most `max_bytes`, the
    body limit, unpacked); checked against the image once it is prepared (`start_latents`)."""
    try:
        return starts.read_start(data, levels, max_bytes, f"`{START_FIELD}`")
    except starts.StartError as exc:
        raise RequestError(422, "bad_parameter", str(exc)[:400]) from None


def start_latents(
    start: Start, size_mode: str, image_size: Sequence[int], shapes: Sequence[Sequence[int]]
) -> list[np.ndarray]:
    """A `start`'s latents shaped `shapes` (rows, causes, H_l, W_l) for an image encoded in `size_mode` whose
    size is `image_size` (H, W) as the model sees it; a 422 if the start was made another way, from an image
    of another size, or has other shapes."""
    try:
        return start.fit(size_mode, image_size, shapes, f"`{START_FIELD}`")
    except starts.StartError as exc:
        raise RequestError(422, "bad_parameter", str(exc)[:400]) from None


def given_floats(values: np.ndarray, what: str, status: int) -> np.ndarray:
    """A client's float array as float32 (a copy the service owns), refused with `status` bad_parameter unless
    every value is finite and within +-pcmodel.starts.MAX_GIVEN_VALUE once in float32."""
    try:
        return starts.finite_floats(values, what)
    except ValueError as exc:
        raise RequestError(status, "bad_parameter", str(exc)) from None


def _text(part: Part) -> str:
    try:
        return part.data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise RequestError(422, "bad_parameter", f"the form field `{part.name}` is not UTF-8 text") from None


def parse_options(values: dict[str, str], config: ModelConfig, settings: Settings) -> EncodeOptions:
    """steps (1..max_steps), size_mode (resize|tile|full), outputs (a comma-separated subset), arrays
    (float32|float16|none), solver (gradient|momentum|nesterov|anderson) and init (zero|amortised) from text."""
    steps = config.steps
    if "steps" in values:
        text = values["steps"]
        # The length first: int() of a long string is slow, and Python refuses one over 4,300 digits.
        if not (text.isascii() and text.isdigit() and len(text) <= 9) or not 1 <= int(text) <= settings.max_steps:
            raise RequestError(
                422, "bad_parameter", f"steps must be an integer from 1 to {settings.max_steps}, got {text[:40]!r}"
            )
        steps = int(text)
    size_mode = values.get("size_mode", config.preprocess.size_mode)
    if size_mode not in SIZE_MODES:
        raise RequestError(
            422, "bad_parameter", f"size_mode must be one of {', '.join(SIZE_MODES)}, got {size_mode[:40]!r}"
        )
    if size_mode == "full" and has_whole_map_level(config):
        raise RequestError(
            422,
            "bad_parameter",
            f"size_mode=full needs a convolutional model; {config.name} has a dense level, which takes only its "
            f"native size {config.input_shape[1]}x{config.input_shape[2]}: use size_mode=tile or resize",
        )
    if size_mode == "full" and settings.full_max_side == 0:
        raise RequestError(
            422, "bad_parameter", "size_mode=full is turned off on this server (PC_FULL_MAX_SIDE=0): use tile or resize"
        )
    outputs = DEFAULT_OUTPUTS
    if "outputs" in values:
        names = tuple(dict.fromkeys(n.strip() for n in values["outputs"].split(",")))
        bad = [n for n in names if n not in OUTPUTS]
        if bad or not names:
            raise RequestError(
                422,
                "bad_parameter",
                f"outputs must be a comma-separated subset of {','.join(OUTPUTS)}, got {values['outputs'][:80]!r}",
            )
        outputs = names
    arrays = values.get("arrays", "float32")
    if arrays not in ARRAYS:
        raise RequestError(422, "bad_parameter", f"arrays must be one of {', '.join(ARRAYS)}, got {arrays[:40]!r}")
    solver = values.get("solver")
    if solver is not None and solver not in SOLVERS:
        raise RequestError(422, "bad_parameter", f"solver must be one of {', '.join(SOLVERS)}, got {solver[:40]!r}")
    init = values.get("init")
    if init is not None and init not in INITS:
        raise RequestError(422, "bad_parameter", f"init must be one of {', '.join(INITS)}, got {init[:40]!r}")
    return EncodeOptions(
        steps=steps,
        size_mode=size_mode,
        outputs=outputs,
        arrays=arrays,
        full_max_side=settings.full_max_side,
        solver=solver,
        init=init,
    )
