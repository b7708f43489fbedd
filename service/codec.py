"""HTTP <-> tensors: the multipart form, its validation, the model's input, and the JSON response.

Requests are parsed here rather than by BentoML's form handling, which in 1.4 downloads a URL
given in place of a file, answers 500 for non-UTF-8 text fields or odd file names, and returns
list-shaped error bodies. Every client mistake becomes a RequestError: an HTTP status, a reason
(one of service.metrics.REASONS) and a message that says what to send instead.

Arrays in responses are {"shape": [...], "dtype": "float32" or "float16", "data": base64 of the
little-endian bytes}. `arrays` chooses them: float32 (the default), float16 (half the bytes) or none
(maps as PNGs only; latents and level errors, which have no PNG, as float16). `input` is the image as
the model saw it after its preprocessing (resized, scaled in full mode, scaled to the config's value
range, filtered), so input - reconstruction = error_map exactly in float32.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from pcmodel import ModelConfig
from pcmodel.images import (
    Fit,
    ImageError,
    TileGrid,
    display_scale,
    full_size,
    has_dense_level,
    open_image,
    prepare_image,
    tile_count,
    to_display,
)

from .batching import Overloaded, Settled
from .budget import NeverFits, OverBudget
from .decoding import decoded_bytes, draft_for, load_uint8
from .settings import Settings

SIZE_MODES = ("resize", "tile", "full")
OUTPUTS = ("latents", "reconstruction", "error_map", "input", "trace", "level_errors")
DEFAULT_OUTPUTS = ("latents", "reconstruction", "error_map", "input")
ARRAYS = ("float32", "float16", "none")
OPTION_FIELDS = ("steps", "size_mode", "outputs", "arrays")
IMAGE_STATUS = {"bad_image": 400, "too_small": 400, "too_large": 413, "unsupported_format": 415}


class RequestError(Exception):
    """A request (or one image of a batch) the service refuses: HTTP status, metric reason, message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class NotFinite(RuntimeError):
    """Inference produced NaN or Inf: the checkpoint is unstable for this input (not the client's fault)."""


def rejection(exc: BaseException) -> RequestError | None:
    """The RequestError for an exception a request can raise, or None for a bug (a real 500)."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, ImageError):
        return RequestError(IMAGE_STATUS.get(exc.reason, 400), exc.reason, str(exc))
    if isinstance(exc, Overloaded):
        return RequestError(503, "overloaded", str(exc))
    if isinstance(exc, OverBudget):
        return RequestError(503, "over_budget", str(exc))
    if isinstance(exc, NeverFits):
        return RequestError(413, "too_large", str(exc))
    if isinstance(exc, NotFinite):
        return RequestError(500, "not_finite", str(exc))
    return None


# ---- the form ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None for a text field
    data: bytes


def parse_form(body: bytes, content_type: str, max_parts: int) -> dict[str, list[Part]]:
    """A multipart/form-data body as {field name: [parts in order]}."""
    if not body:
        raise RequestError(
            400, "missing_field", "the request body is empty: send a multipart form with an `image` file field"
        )
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1") or "none"
        raise RequestError(
            415,
            "bad_request",
            f"the request content type is {shown}; send multipart/form-data (curl -F image=@photo.png URL)",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "bad_request", "the multipart content type has no boundary parameter")

    parts: list[Part] = []
    headers: dict[bytes, bytes] = {}
    field_name = bytearray()
    field_value = bytearray()
    chunks: list[bytes] = []

    def on_part_begin() -> None:
        headers.clear()
        chunks.clear()
        if len(parts) >= max_parts:
            raise RequestError(413, "too_large", f"the form has more than {max_parts} parts")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        field_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(field_name).lower()] = bytes(field_value)
        field_name.clear()
        field_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        disposition, options = parse_options_header(headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise RequestError(400, "bad_request", "a form part has no Content-Disposition: form-data; name=...")
        name = options[b"name"].decode("latin-1")
        filename = options[b"filename"].decode("latin-1") if b"filename" in options else None
        parts.append(Part(name, filename, b"".join(chunks)))

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise RequestError(400, "bad_request", f"the multipart form is malformed ({exc})") from None
    form: dict[str, list[Part]] = {}
    for part in parts:
        form.setdefault(part.name, []).append(part)
    return form


@dataclass(frozen=True)
class EncodeOptions:
    """What a request asks for; the defaults come from the model and the settings."""

    steps: int
    size_mode: str
    outputs: tuple[str, ...]
    arrays: str = "float32"  # float32 | float16 | none: the dtype of the maps' arrays (none: PNGs only)
    full_max_side: int = 256  # full mode: the longer side an image is scaled down to (PC_FULL_MAX_SIDE)


def read_request(
    body: bytes, content_type: str, image_field: str, max_images: int, config: ModelConfig, settings: Settings
) -> tuple[list[Part], EncodeOptions]:
    """The image parts and the options of an /encode (image_field="image", max_images=1) or
    /encode_batch (image_field="images") form."""
    form = parse_form(body, content_type, max_parts=max_images + len(OPTION_FIELDS) + 1)
    known = (image_field, *OPTION_FIELDS)
    unknown = sorted(set(form) - set(known))
    if unknown:
        raise RequestError(
            400, "bad_request", f"unknown form field(s) {', '.join(unknown)}; the fields are: {', '.join(known)}"
        )
    images = form.get(image_field, [])
    if not images:
        raise RequestError(400, "missing_field", f"the form has no `{image_field}` field: attach the image file")
    if len(images) > max_images:
        what = "one `image`" if max_images == 1 else f"at most {max_images} `{image_field}` files"
        raise RequestError(
            413 if max_images > 1 else 400,
            "too_large" if max_images > 1 else "bad_request",
            f"the form has {len(images)} `{image_field}` parts; send {what}"
            + (" (use /encode_batch for several)" if max_images == 1 else ""),
        )
    values: dict[str, str] = {}
    for name in OPTION_FIELDS:
        given = form.get(name, [])
        if len(given) > 1:
            raise RequestError(400, "bad_request", f"the form field `{name}` is given {len(given)} times; send it once")
        if given:
            values[name] = _text(given[0])
    return images, parse_options(values, config, settings)


def _text(part: Part) -> str:
    try:
        return part.data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise RequestError(422, "bad_parameter", f"the form field `{part.name}` is not UTF-8 text") from None


def parse_options(values: dict[str, str], config: ModelConfig, settings: Settings) -> EncodeOptions:
    """steps (1..max_steps), size_mode (resize|tile|full), outputs (a comma-separated subset) and arrays
    (float32|float16|none) from text."""
    steps = config.steps
    if "steps" in values:
        text = values["steps"]
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= settings.max_steps:
            raise RequestError(
                422, "bad_parameter", f"steps must be an integer from 1 to {settings.max_steps}, got {text[:40]!r}"
            )
        steps = int(text)
    size_mode = values.get("size_mode", config.preprocess.size_mode)
    if size_mode not in SIZE_MODES:
        raise RequestError(
            422, "bad_parameter", f"size_mode must be one of {', '.join(SIZE_MODES)}, got {size_mode[:40]!r}"
        )
    if size_mode == "full" and has_dense_level(config):
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
    return EncodeOptions(
        steps=steps, size_mode=size_mode, outputs=outputs, arrays=arrays, full_max_side=settings.full_max_side
    )


# ---- the model's input ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """One image as the model takes it: rows for the batcher, and what `input` shows."""

    rows: torch.Tensor  # (n, C, h, w): the image at the native size (n = 1), its tiles, or padded (full)
    shown: torch.Tensor  # (C, H, W): the preprocessed image (the stitched tiles' area in tile mode)
    grid: TileGrid | None  # tile mode only
    fit: Fit | None = None  # full mode only: the padding to the bucket size


_URL_PREFIXES = (b"http://", b"https://", b"ftp://", b"file://", b"data:", b"s3://", b"gs://")
SMALL_PIXELS = 256 * 256  # images up to this size are decoded and encoded on the event loop (< ~1 ms)


def is_small(part: Part) -> bool:
    """Whether the image header says at most SMALL_PIXELS pixels (reads the header only)."""
    try:
        with Image.open(io.BytesIO(part.data)) as image:
            width, height = image.size
    except Exception:  # not an image, or a bomb: prepare() says which, quickly
        return len(part.data) <= 1 << 20
    return width * height <= SMALL_PIXELS


@dataclass(frozen=True)
class Planned:
    """An image opened and checked from its header, not yet decoded, and what decoding it will cost."""

    image: Image.Image  # lazy: no pixel decoded yet (a JPEG already set to decode reduced, in resize mode)
    cost: int  # bytes its decoding and preprocessing may hold at once (the decoding budget's charge)


def plan(part: Part, options: EncodeOptions, config: ModelConfig, settings: Settings) -> Planned:
    """Check an image from its header alone: format, pixels, sides, decoded bytes, tiles (all before decoding)."""
    if part.data[:16].strip().lower().startswith(_URL_PREFIXES):
        raise RequestError(
            400,
            "bad_image",
            f"the `{part.name}` field holds a URL; this service never fetches URLs: upload the image file itself "
            f"(curl -F {part.name}=@photo.jpg)",
        )
    image = open_image(part.data, max_pixels=settings.max_pixels, min_side=settings.min_side)
    width, height = image.size
    channels = config.input_shape[0]
    if options.size_mode == "tile":
        tiles = tile_count(config, height, width)
        # The batcher queues at most max_queue rows: an image with more tiles could never be admitted.
        limit = min(settings.max_tiles, settings.max_queue)
        if tiles > limit:
            native = config.input_shape[1:]
            raise RequestError(
                413,
                "too_large",
                f"in tile mode this {width}x{height} image needs {tiles} tiles of {native[0]}x{native[1]}, over "
                f"the limit of {limit}; send a smaller image or use size_mode=resize",
            )
    # Resize and full mode scale the image down first: a JPEG may decode at a reduced size.
    scaled = {"resize": config.input_shape[1:], "full": full_size(height, width, options.full_max_side)}
    draft_for(image, config.preprocess.color, scaled.get(options.size_mode))
    raw = decoded_bytes(image)
    if raw > settings.max_image_bytes:
        raise RequestError(
            413,
            "too_large",
            f"this {width}x{height} {image.mode} image decodes to {raw} bytes, over the limit of "
            f"{settings.max_image_bytes}; send fewer pixels or 8 bits per sample",
        )
    width, height = image.size  # after a JPEG's draft
    # The decoded pixels plus one 8-bit copy (palette and 1-bit images expand to RGB(A) to be reduced).
    # Resize and full mode convert to the model's channels after reducing and scale before filtering; tile
    # mode converts the whole image and holds it as float32 with the filter's temporaries (about six
    # copies) over the model's channels.
    per_pixel = 4 if image.mode in ("P", "PA", "1") else len(image.getbands())
    if options.size_mode == "tile":
        per_pixel = max(per_pixel, channels) + 6 * 4 * channels
    return Planned(image=image, cost=raw + width * height * per_pixel)


def prepare(planned: Planned, options: EncodeOptions, config: ModelConfig) -> Prepared:
    """Decode a planned image and preprocess it exactly as training does (pcmodel.images)."""
    width, height = planned.image.size
    scaled = {"resize": config.input_shape[1:], "full": full_size(height, width, options.full_max_side)}
    try:
        pixels = load_uint8(planned.image, config.preprocess.color, scaled.get(options.size_mode))
    finally:
        planned.image.close()  # frees the decoded pixels now, not when the last reference goes
    if options.size_mode == "full":  # the size from the original image: a JPEG's draft must not change it
        pixels = np.asarray(Image.fromarray(pixels).resize(scaled["full"][::-1], Image.Resampling.BICUBIC))
    rows, shown, placement = prepare_image(pixels, config, options.size_mode, options.full_max_side)
    return Prepared(rows=rows, shown=shown, grid=placement.grid, fit=placement.fit)


# ---- the response --------------------------------------------------------------------------------


def check_finite(settled: Settled) -> None:
    """Raise NotFinite unless every number a response would carry is finite."""
    tensors = [*settled.latents, settled.reconstruction, settled.energy]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise NotFinite(
            "inference diverged (NaN or Inf) for this image: the model's step size k1 is unstable. The operator "
            "serves it with PC_ALLOW_UNSTABLE; serve a stable checkpoint instead"
        )


def array_payload(t: torch.Tensor, dtype: str = "float32") -> dict:
    """{"shape", "dtype": float32 or float16, "data": base64 of the little-endian bytes in C order}."""
    a = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy(), dtype="<f4" if dtype == "float32" else "<f2")
    return {"shape": list(a.shape), "dtype": dtype, "data": base64.b64encode(a.tobytes()).decode("ascii")}


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit gray (H, W) or RGB (H, W, 3) array as PNG: no row filter, fast zlib.

    A third of the time Pillow's encoder takes for small maps (it tries a filter per row): these
    PNGs are for display, so speed beats size. Pillow (or any viewer) reads them.
    """
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = np.zeros((height, 1 + width * channels), dtype=np.uint8)  # a 0 byte per row: filter "none"
    rows[:, 1:] = pixels.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)),
            _chunk(b"IEND", b""),
        )
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_payload(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(np.asarray(image))).decode("ascii")


def encode_result(
    prepared: Prepared, settled: Settled, options: EncodeOptions, model_ref: dict, config: ModelConfig
) -> dict:
    """The JSON object for one encoded image (see the module docstring and README)."""
    check_finite(settled)
    energy = settled.energy.sum(dim=1, dtype=torch.float64)  # (steps + 1,): the sum over tiles
    out: dict = {
        "model": model_ref,
        "steps": int(settled.steps.max()),
        "size_mode": options.size_mode,
        "energy": {"initial": float(energy[0]), "final": float(energy[-1])},
    }
    if "trace" in options.outputs:
        out["energy"]["trace"] = energy.tolist()
    grid, fit = prepared.grid, prepared.fit
    # Latents and level errors have no PNG: `arrays=none` still sends them, as float16.
    per_row = "float32" if options.arrays == "float32" else "float16"
    if "latents" in options.outputs:
        out["latents"] = [array_payload(r if grid is not None else r[0], per_row) for r in settled.latents]
    if "level_errors" in options.outputs:
        out["level_errors"] = [array_payload(e if grid is not None else e[0], per_row) for e in settled.errors]
    if grid is not None:
        out["tile_grid"] = {
            "rows": grid.rows,
            "cols": grid.cols,
            "tile": list(grid.tile),
            "stride": list(grid.stride),
            "origin": [-grid.margin[0], -grid.margin[1]],
            "image": list(grid.original),
        }
    if fit is not None:
        out["padded"] = [fit.top, fit.bottom, fit.left, fit.right]
        out["model_input"] = list(fit.fitted)
    maps = [m for m in ("input", "reconstruction", "error_map") if m in options.outputs]
    if maps:
        shown = prepared.shown.to("cpu", torch.float32)
        if grid is not None:
            reconstruction = grid.stitch(settled.reconstruction)[0]
        elif fit is not None:
            reconstruction = fit.undo(settled.reconstruction)[0]
        else:
            reconstruction = settled.reconstruction[0]
        error = shown - reconstruction  # (C, H, W): exactly input - reconstruction in float32
        pre = config.preprocess
        scale = display_scale(shown, pre)
        centred = not (pre.filter == "none" and pre.normalize == "none")
        tensors = {"input": shown, "reconstruction": reconstruction, "error_map": error}
        for name in maps:
            t = tensors[name]
            picture = to_display(t, pre, scale, centred=centred or name == "error_map")
            out[name] = {"png": png_payload(picture)}
            if options.arrays != "none":
                out[name]["array"] = array_payload(t, options.arrays)
    return out
