"""A small Python client for the encoding service: numpy arrays and PIL images back.

    from service.client import EncoderClient
    with EncoderClient("http://localhost:3000") as client:
        result = client.encode("photo.jpg", steps=50)
        result.latents[0].shape, result.reconstruction.shape, result.images["error_map"].size

Only httpx, numpy and Pillow: no torch, so it installs anywhere.
"""

from __future__ import annotations

import base64
import email.utils
import io
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

import httpx
import numpy as np
from PIL import ExifTags, Image, ImageOps

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image | np.ndarray


class ServiceError(Exception):
    """The service refused a request (or one image of a batch): HTTP status, message, reason, and retry_after,
    the seconds its `Retry-After` header asks a client to wait before retrying (a 503 `overloaded`,
    `over_budget` or `loading`), None where the answer has none."""

    def __init__(self, status: int, message: str, reason: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.reason = reason
        self.retry_after = retry_after


class MalformedResponse(ServiceError):
    """An answer that is not the service's: not JSON (e.g. a proxy's HTML page), or JSON without a field the
    service always sends. `status` is the HTTP status it came with (200 from parse_encoding); `reason` is None."""

    def __init__(self, message: str, status: int = 200) -> None:
        super().__init__(status, message)


@dataclass
class Snapshot:
    """One state inference passed through (outputs=snapshots): the state after `step` steps."""

    step: int
    energy: float
    latents: list[np.ndarray] = field(default_factory=list)  # level 1 first, float32 (float16 on the wire)
    images: dict[str, Image.Image] = field(default_factory=dict)  # reconstruction, error_map


@dataclass
class Encoding:
    """One encoded image. The maps (`input`, `reconstruction`, `error_map`), `latents` and `level_errors` are
    float32 numpy arrays (float16 on the wire is widened, exactly); `energy_trace` is float64, the numbers as
    the JSON has them (its first and last are `energy_initial` and `energy_final`). `images` holds the PNGs as
    PIL images. Under arrays="none" the maps are in `images` only. `init` is where inference started: zero,
    amortised, or given (a `start` was sent)."""

    model: dict[str, str]
    steps: int
    size_mode: str
    energy_initial: float
    energy_final: float
    energy_trace: np.ndarray | None = None  # (steps + 1,) float64, when outputs include trace
    latents: list[np.ndarray] = field(default_factory=list)  # level 1 first
    level_errors: list[np.ndarray] = field(default_factory=list)  # level 1 first, when outputs include level_errors
    input: np.ndarray | None = None  # (C, H, W) as the model saw it
    reconstruction: np.ndarray | None = None
    error_map: np.ndarray | None = None  # = input - reconstruction
    images: dict[str, Image.Image] = field(default_factory=dict)  # input, reconstruction, error_map
    tile_grid: dict[str, Any] | None = None
    padded: list[int] | None = None  # full mode: [top, bottom, left, right] around the scaled image
    model_input: list[int] | None = None  # full mode: [H, W], the padded size the model ran on
    snapshots: list[Snapshot] | None = None  # when outputs include snapshots: step 0 (the start) first
    timing: dict[str, float] = field(default_factory=dict)  # /encode's Server-Timing: queue, model, total (ms)
    solver: str = ""  # the dynamics that ran, e.g. "gradient" (the paper's), "nesterov(0.7)" or "anderson(5)"
    init: str = ""  # where inference started: zero, amortised or given (a `start` was sent)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the JSON as received


# What `start` takes: a previous Encoding, its latents (level 1 first), or an .npz of latent_1..latent_L as a
# path, bytes or a binary file (a saved response's latents, pc-encode's encoding.npz).
StartInput = Encoding | Sequence[np.ndarray] | str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


def decode_array(payload: dict[str, Any]) -> np.ndarray:
    """{"shape", "dtype": "float32" or "float16", "data": base64 little-endian} -> float32 numpy array."""
    wire = {"float32": "<f4", "float16": "<f2"}.get(payload.get("dtype"))  # type: ignore[arg-type]
    if wire is None:
        raise ValueError(f"unexpected dtype {payload.get('dtype')!r}")
    data = base64.b64decode(payload["data"])
    return np.frombuffer(data, dtype=wire).reshape(payload["shape"]).astype(np.float32)


def decode_png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def parse_encoding(data: dict[str, Any], where: str = "the response") -> Encoding:
    """An /encode response (or one /encode_batch entry) as an Encoding. MalformedResponse, naming the field,
    where a field the service always sends is missing or cannot be decoded (`where` names `data` in it)."""
    if not isinstance(data, dict):
        raise MalformedResponse(f"{where} is {_kind(data)}, not a JSON object")
    energy = _field(data, "energy", dict, where)
    trace = energy.get("trace")
    result = Encoding(
        model=_field(data, "model", dict, where),
        steps=_field(data, "steps", int, where),
        size_mode=_field(data, "size_mode", str, where),
        energy_initial=_field(energy, "initial", (int, float), f"{where}'s `energy`"),
        energy_final=_field(energy, "final", (int, float), f"{where}'s `energy`"),
        energy_trace=None if trace is None else _decoded(f"{where}'s `energy.trace`", _floats, trace),
        latents=_arrays(data, "latents", where),
        level_errors=_arrays(data, "level_errors", where),
        tile_grid=data.get("tile_grid"),
        padded=data.get("padded"),
        model_input=data.get("model_input"),
        solver=data.get("solver", ""),
        init=data.get("init", ""),
        raw=data,
    )
    for name in ("input", "reconstruction", "error_map"):
        if name in data:
            part = data[name]
            if not isinstance(part, dict) or "png" not in part:
                raise MalformedResponse(f"{where}'s `{name}` has no `png`")
            if "array" in part:
                setattr(result, name, _decoded(f"{where}'s `{name}.array`", decode_array, part["array"]))
            result.images[name] = _decoded(f"{where}'s `{name}.png`", decode_png, part["png"])
    if "snapshots" in data:
        snapshots = data["snapshots"]
        if not isinstance(snapshots, list):
            raise MalformedResponse(f"{where}'s `snapshots` is {_kind(snapshots)}, not a list")
        result.snapshots = [_snapshot(s, f"{where}'s `snapshots[{i}]`") for i, s in enumerate(snapshots)]
    return result


def _snapshot(data: Any, where: str) -> Snapshot:
    if not isinstance(data, dict):
        raise MalformedResponse(f"{where} is {_kind(data)}, not a JSON object")
    snapshot = Snapshot(
        step=_field(data, "step", int, where),
        energy=_field(data, "energy", (int, float), where),
        latents=_arrays(data, "latents", where),
    )
    for name in ("reconstruction", "error_map"):
        if name in data:
            snapshot.images[name] = _decoded(f"{where}'s `{name}`", decode_png, data[name])
    return snapshot


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """data[name], which must be there and of `kind` (a bool is no number here), else MalformedResponse."""
    if name not in data:
        raise MalformedResponse(f"{where} has no `{name}`")
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise MalformedResponse(f"{where}'s `{name}` is {_kind(value)}")
    return value


def _arrays(data: dict[str, Any], name: str, where: str) -> list[np.ndarray]:
    payloads = data.get(name, [])
    if not isinstance(payloads, list):
        raise MalformedResponse(f"{where}'s `{name}` is {_kind(payloads)}, not a list")
    return [_decoded(f"{where}'s `{name}[{i}]`", decode_array, a) for i, a in enumerate(payloads)]


def _floats(values: Any) -> np.ndarray:
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError("not a list of numbers")
    return np.asarray(values, dtype=np.float64)


def _decoded(where: str, decode: Any, value: Any) -> Any:
    """decode(value), any failure as a MalformedResponse naming the field."""
    try:
        return decode(value)
    except Exception as exc:
        raise MalformedResponse(f"{where} cannot be decoded ({exc.__class__.__name__}: {exc})"[:300]) from exc


def _kind(value: Any) -> str:
    """'null', 'a str', 'an int': a JSON value's type, for a message."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def server_timing(header: str) -> dict[str, float]:
    """'queue;dur=0.1, model;dur=12.5' -> {"queue": 0.1, "model": 12.5} (milliseconds); parts that are not
    `name;dur=<number>` are skipped."""
    out = {}
    for part in header.split(","):
        name, _, value = part.strip().partition(";dur=")
        try:
            out[name] = float(value.split(";")[0])
        except ValueError:
            continue
    out.pop("", None)
    return out


def retry_after(header: str | None) -> float | None:
    """A Retry-After header's wait in seconds: a number of seconds, or an HTTP date (the seconds until then, at
    least 0); None where there is none or it is neither."""
    if header is None:
        return None
    text = header.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


# ---- what is sent --------------------------------------------------------------------------------------------

_OCTETS = "application/octet-stream"
_BYTES_LIKE = (bytes, bytearray, memoryview)
# PIL modes a PNG holds exactly (an "I;16B" image comes back as "I;16", the same values).
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"})
# Modes a TIFF holds exactly, sent as one (the service decodes TIFF): the compression that keeps them exact.
_TIFF_MODES = {"CMYK": "tiff_adobe_deflate", "LAB": "tiff_adobe_deflate", "I": "tiff_adobe_deflate"}
_TIFF_MODES.update({"F": "tiff_adobe_deflate", "PA": "tiff_adobe_deflate", "YCbCr": "raw"})  # deflate: YCbCr -> RGB
# Modes no image file holds, as PIL converts them: HSV's colours, premultiplied alpha undone, padding dropped.
_CONVERTED = {"HSV": "RGB", "RGBa": "RGBA", "RGBX": "RGB", "La": "LA"}
IMAGE_TYPES = (
    "a path (str or os.PathLike), bytes-like, a binary file object, a PIL image, or a numpy array (H, W), "
    "(H, W, 3) or (H, W, 4) of uint8, uint16 or floats in [0, 1]"
)


def _file(image: ImageInput, name: str, what: str = "image") -> tuple[str, bytes, str]:
    """One image as a form part (filename, bytes, content type). Files and bytes go as they are: the service
    decodes them (any format it takes, any mode, EXIF orientation). A PIL image goes losslessly in its own mode
    (PNG, or TIFF for CMYK, LAB, YCbCr, 32-bit integer and float), upright, so that the service decodes the same
    pixels it would from the file; an array as `_array_image` reads it. TypeError or ValueError, naming `what`,
    for anything else."""
    if isinstance(image, _BYTES_LIKE):
        return (name, bytes(image), _OCTETS)
    if isinstance(image, (str, os.PathLike)):
        path = os.fsdecode(image)
        with open(path, "rb") as f:
            return (os.path.basename(path) or name, f.read(), _OCTETS)
    if isinstance(image, Image.Image):
        return _pil_file(image, name, what)
    if isinstance(image, np.ndarray):
        return _pil_file(_array_image(image, what), name, what)
    if callable(getattr(image, "read", None)):
        return (_file_name(image, name), _read(image, what), _OCTETS)
    raise TypeError(f"{what} must be {IMAGE_TYPES}; got {type(image).__name__}")


def _read(f: Any, what: str) -> bytes:
    """All of a binary file object's bytes from where it stands."""
    data = f.read()
    if isinstance(data, str):
        raise TypeError(f"{what} is a file opened in text mode: open it in binary mode, open(path, 'rb')")
    if not isinstance(data, _BYTES_LIKE):
        raise TypeError(f"{what}: its read() gave {type(data).__name__}, not bytes")
    return bytes(data)


def _file_name(f: Any, default: str) -> str:
    name = getattr(f, "name", None)
    return (os.path.basename(name) or default) if isinstance(name, str) else default


def _pil_file(image: Image.Image, name: str, what: str) -> tuple[str, bytes, str]:
    image = _upright(image)
    mode = image.mode
    if mode in _CONVERTED:
        image = image.convert(_CONVERTED[mode])
    elif mode.startswith("I;16") and mode not in _PNG_MODES:  # I;16L, I;16N: the same 16-bit values
        image = Image.fromarray(np.asarray(image).astype("<u2"))
    stem = os.path.splitext(name)[0]
    buffer = io.BytesIO()
    try:
        if image.mode in _TIFF_MODES:
            try:
                image.save(buffer, format="TIFF", compression=_TIFF_MODES[image.mode])
            except OSError:  # a Pillow built without libtiff writes uncompressed TIFF only
                buffer = io.BytesIO()
                image.save(buffer, format="TIFF")
            return (f"{stem}.tiff", buffer.getvalue(), "image/tiff")
        image.save(buffer, format="PNG")
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"{what}: a PIL image in mode {mode} cannot be sent losslessly ({exc}); convert it first, e.g. "
            "image.convert('RGB')"
        ) from None
    return (f"{stem}.png", buffer.getvalue(), "image/png")


def _upright(image: Image.Image) -> Image.Image:
    """The image as it displays: its EXIF orientation applied, as the service applies a file's."""
    try:
        turned = image.getexif().get(ExifTags.Base.Orientation, 1) not in (None, 1)
    except Exception:  # a malformed EXIF block: the pixels as they are
        return image
    return ImageOps.exif_transpose(image) if turned else image


def _array_image(array: np.ndarray, what: str) -> Image.Image:
    """An image array as pcmodel reads one (pcmodel.images.to_uint8): (H, W) gray, (H, W, 1), (H, W, 3) RGB or
    (H, W, 4) RGBA (alpha onto white, in the service); uint8 as it is, uint16 scaled to 8 bits (round(v / 257)),
    floats in [0, 1] as round(v * 255). ValueError, naming shape and dtype, for any other."""
    shape, dtype = array.shape, array.dtype
    described = f"shape {shape}, dtype {dtype}"
    layout = array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3, 4))
    if not layout or 0 in shape:
        hint = ""
        if array.ndim == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4):
            hint = "; channels first? pass array.transpose(1, 2, 0)"
        raise ValueError(f"{what}: an image array is (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {described}{hint}")
    if array.ndim == 3 and shape[2] == 1:
        array = array[:, :, 0]
    if dtype == np.uint8:
        pixels = array
    elif dtype == np.uint16:
        pixels = np.round(array / 257.0).astype(np.uint8)
    elif np.issubdtype(dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{what}: the image array holds NaN or Inf ({described})")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise ValueError(
                f"{what}: a float image array holds values in [0, 1], got {low:g} to {high:g} ({described}); "
                "for 0-255 values pass array.astype(np.uint8)"
            )
        pixels = np.round(array * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"{what}: an image array is uint8, uint16 or float in [0, 1], got {described}")
    return Image.fromarray(np.ascontiguousarray(pixels))


def _start_file(start: StartInput) -> tuple[str, bytes, str]:
    """`start` as the service's `start` part: an .npz of latent_1..latent_L. An .npz given (a path, bytes, a
    binary file) goes as it is; an Encoding's latents or a list of arrays are packed as float32."""
    geometry: dict[str, np.ndarray] = {}
    if isinstance(start, Encoding):
        latents = start.latents
        geometry = _geometry(start)
    elif isinstance(start, _BYTES_LIKE):
        return ("start.npz", bytes(start), _OCTETS)
    elif isinstance(start, (str, os.PathLike)):
        path = os.fsdecode(start)
        with open(path, "rb") as f:
            return (os.path.basename(path) or "start.npz", f.read(), _OCTETS)
    elif callable(getattr(start, "read", None)):
        return (_file_name(start, "start.npz"), _read(start, "start"), _OCTETS)
    elif isinstance(start, Iterable) and not isinstance(start, (dict, np.ndarray)):
        latents = []
        for i, latent in enumerate(start):
            try:
                array = None if isinstance(latent, (str, *_BYTES_LIKE)) else np.asarray(latent)
            except ValueError:  # ragged nested lists
                array = None
            if array is None or array.dtype.kind not in "fiu" or array.ndim == 0:
                shown = type(latent).__name__ if array is None else f"{type(latent).__name__} of {array.dtype}"
                raise TypeError(f"start[{i}] must be an array of numbers (the level {i + 1} latents), got {shown}")
            latents.append(array)
    else:
        hint = (
            " (a response's JSON? pass the Encoding itself, or parse_encoding(it))" if isinstance(start, dict) else ""
        )
        hint = hint or (" (one array: pass a list, one array per level)" if isinstance(start, np.ndarray) else "")
        raise TypeError(
            "start must be an Encoding, a list of latent arrays (level 1 first), or an .npz of latent_1..latent_L "
            f"(a path, bytes or a binary file); got {type(start).__name__}{hint}"
        )
    if not latents:
        raise ValueError("start has no latents: ask the previous encode for outputs including latents")
    buffer = io.BytesIO()
    arrays = {f"latent_{i}": np.asarray(r, dtype=np.float32) for i, r in enumerate(latents, 1)}
    np.savez(buffer, **arrays, **geometry)
    return ("start.npz", buffer.getvalue(), _OCTETS)


def _geometry(encoding: Encoding) -> dict[str, np.ndarray]:
    """Where an Encoding's latents came from, as the service reads it beside a start's latents (pcmodel.starts):
    its size mode and the image's size as the model saw it, so that the latents of an image of another size whose
    shapes happen to agree (a 120x100 and a 100x120 image both have 72 tiles) are refused, not taken."""
    out = {"size_mode": np.array(encoding.size_mode)}
    if encoding.tile_grid is not None:
        out["image_size"] = np.array(encoding.tile_grid["image"], dtype=np.int64)
    elif encoding.model_input is not None and encoding.padded is not None:  # full mode: the scaled image, unpadded
        top, bottom, left, right = encoding.padded
        out["image_size"] = np.array(
            [encoding.model_input[0] - top - bottom, encoding.model_input[1] - left - right], dtype=np.int64
        )
    return out  # resize mode: every image is resized to the native size; the size mode says it all


def _options(
    steps: int | None,
    size_mode: str | None,
    outputs: str | Iterable[str] | None,
    arrays: str | None,
    solver: str | None = None,
    init: str | None = None,
) -> dict[str, str]:
    """The form's option fields; TypeError or ValueError, naming the argument, for a value of the wrong kind."""
    data = {}
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise TypeError(f"steps must be an int, got {type(steps).__name__}")
        data["steps"] = str(int(steps))
    for name, value in (("size_mode", size_mode), ("arrays", arrays), ("solver", solver), ("init", init)):
        if value is not None:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
            data[name] = value
    if outputs is not None:
        data["outputs"] = _outputs(outputs)
    return data


def _outputs(outputs: str | Iterable[str]) -> str:
    """outputs as the form's comma-separated text: a name ("latents"), names joined by commas
    ("latents,trace"), or an iterable of names."""
    if isinstance(outputs, str):
        parts = [outputs]
    elif isinstance(outputs, Iterable) and not isinstance(outputs, (*_BYTES_LIKE, dict)):
        parts = list(outputs)
        for part in parts:
            if not isinstance(part, str):
                raise TypeError(f"outputs must be names (str), e.g. ['latents', 'trace']; got {type(part).__name__}")
    else:
        raise TypeError(
            f"outputs must be a str ('latents' or 'latents,trace') or a list of str, got {type(outputs).__name__}"
        )
    names = [n.strip() for part in parts for n in part.split(",") if n.strip()]
    if not names:
        raise ValueError("outputs names no output; name at least one, e.g. outputs=['latents']")
    return ",".join(names)


# ---- the client -----------------------------------------------------------------------------------------------


class EncoderClient:
    """Talks to one service URL over HTTP (httpx), keeping the connection open between calls.

    Every call raises TypeError or ValueError, before any request, for an argument it cannot send; ServiceError
    when the service refuses (4xx or 5xx: status, message, reason, retry_after); MalformedResponse (a
    ServiceError) for an answer that is not the service's (not JSON, or a field missing: e.g. a proxy's page);
    and httpx's own exceptions where no answer comes: httpx.TransportError (httpx.ConnectError,
    httpx.TimeoutException such as httpx.ReadTimeout after `timeout` seconds, ...), all httpx.HTTPError.
    """

    def __init__(self, url: str = "http://localhost:3000", timeout: float = 120.0, api_key: str | None = None) -> None:
        """`url`: the service's, with its scheme (http:// or https://); `api_key`: the service's PC_API_KEY, when
        it has one (sent as `Authorization: Bearer <key>`)."""
        if not isinstance(url, str):
            raise TypeError(f"url must be a str such as 'http://localhost:3000', got {type(url).__name__}")
        if not re.match(r"https?://[^/?#]", url, re.IGNORECASE):
            hint = f"'http://{url}'" if "://" not in url else "'http://localhost:3000'"
            raise ValueError(f"url {url!r} must be an http:// or https:// URL with a host, e.g. {hint}")
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def __enter__(self) -> EncoderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def encode(
        self,
        image: ImageInput,
        steps: int | None = None,
        size_mode: str | None = None,
        outputs: str | Iterable[str] | None = None,
        arrays: str | None = None,
        solver: str | None = None,
        init: str | None = None,
        start: StartInput | None = None,
    ) -> Encoding:
        """Encode one image: a path, bytes-like, a binary file object, a PIL image (any mode: sent losslessly,
        upright, so the service sees the pixels it would from the file) or a numpy array ((H, W), (H, W, 3) or
        (H, W, 4); uint8, uint16, or floats in [0, 1]).

        size_mode: resize, tile or full; outputs: a subset of latents, reconstruction, error_map, input, trace,
        level_errors, snapshots (a list, or one str of names joined by commas); arrays: float32, float16 or
        none; solver: gradient (the paper's dynamics), momentum, nesterov or anderson; init: zero or amortised
        (the service's defaults where None); start: where inference starts (a warm start, e.g. from the
        previous frame of a video): a previous Encoding, its latents (level 1 first), or an .npz of
        latent_1..latent_L (a path, bytes or a binary file; pc-encode's encoding.npz works), sent as it is.

        Raises TypeError or ValueError before any request for an argument it cannot send; ServiceError on a
        4xx or 5xx answer (`retry_after`: the seconds Retry-After asks for, on a 503); MalformedResponse (a
        ServiceError) for an answer that is not the service's; httpx.TransportError (httpx.ConnectError,
        httpx.ReadTimeout, ...) when the service cannot be reached or does not answer within the timeout."""
        options = _options(steps, size_mode, outputs, arrays, solver, init)
        files = {"image": _file(image, "image.png")}
        if start is not None:
            files["start"] = _start_file(start)
        response = self._http.post("/encode", files=files, data=options)
        result = parse_encoding(_json(response, "/encode"))
        result.timing = server_timing(response.headers.get("server-timing", ""))
        return result

    def encode_batch(
        self,
        images: Iterable[ImageInput],
        steps: int | None = None,
        size_mode: str | None = None,
        outputs: str | Iterable[str] | None = None,
        arrays: str | None = None,
        solver: str | None = None,
        init: str | None = None,
    ) -> list[Encoding | ServiceError]:
        """Encode several images (a list of what `encode` takes) in one request; a refused image comes back as
        its ServiceError. Raises as `encode` does."""
        single = (str, os.PathLike, *_BYTES_LIKE, Image.Image, np.ndarray, dict)
        if isinstance(images, single) or callable(getattr(images, "read", None)) or not isinstance(images, Iterable):
            raise TypeError(
                f"encode_batch takes a list of images (each {IMAGE_TYPES}); got a {type(images).__name__}: for one "
                "image call encode()"
                + (", for an (N, H, W[, C]) array pass list(array)" if isinstance(images, np.ndarray) else "")
            )
        options = _options(steps, size_mode, outputs, arrays, solver, init)
        files = [("images", _file(image, f"image{i}.png", f"images[{i}]")) for i, image in enumerate(images)]
        if not files:
            raise ValueError("encode_batch needs at least one image, got none")
        response = self._http.post("/encode_batch", files=files, data=options)
        results = _json(response, "/encode_batch").get("results")
        if not isinstance(results, list):
            raise MalformedResponse(f"the /encode_batch response has no `results` list ({_kind(results)})")
        if len(results) != len(files):
            raise MalformedResponse(f"the /encode_batch response has {len(results)} results for {len(files)} images")
        wait = retry_after(response.headers.get("retry-after"))
        return [_batch_entry(item, f"results[{i}]", wait) for i, item in enumerate(results)]

    def model(self) -> dict[str, Any]:
        """The model card (GET /model)."""
        return _json(self._http.get("/model"), "/model")

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False


def _batch_entry(item: Any, where: str, wait: float | None) -> Encoding | ServiceError:
    if isinstance(item, dict) and "error" in item:
        status = _field(item, "status", int, where)
        return ServiceError(status, str(item["error"]), item.get("reason"), wait if status == 503 else None)
    return parse_encoding(item, where)


def _json(response: httpx.Response, route: str) -> dict[str, Any]:
    """A 2xx answer's JSON object; ServiceError for any other status, MalformedResponse where it is not JSON."""
    status = response.status_code
    if not 200 <= status < 300:
        wait = retry_after(response.headers.get("retry-after"))
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            reason = body.get("reason")
            raise ServiceError(status, body["error"], reason if isinstance(reason, str) else None, wait)
        message = _excerpt(response) or response.reason_phrase
        if 300 <= status < 400 and "location" in response.headers:
            message = f"redirected to {response.headers['location']}: use that URL"
        raise ServiceError(status, message, None, wait)
    try:
        body = response.json()
    except ValueError:
        kind = response.headers.get("content-type", "no content type")
        raise MalformedResponse(
            f"the answer to {route} is not JSON ({kind}: {_excerpt(response)!r}); is {response.request.url} the "
            "encoding service's, not another server's or a proxy's page?",
            status,
        ) from None
    if not isinstance(body, dict):
        raise MalformedResponse(f"the answer to {route} is {_kind(body)}, not a JSON object", status)
    return body


def _excerpt(response: httpx.Response, limit: int = 200) -> str:
    text = " ".join(response.text.split())
    return text if len(text) <= limit else text[:limit] + "..."
