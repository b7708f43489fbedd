"""The Open Inference Protocol (KServe v2, Triton's protocol): metadata, and one inference request's tensors
checked, encoded through the worker's Pipeline and turned into output tensors.

The transports only frame these: REST with JSON and the binary tensor data extension (service/v2_rest.py)
and gRPC (service/v2_grpc.py). The model's name is its config's name; its one version is the first 12
hex digits of its sha256.

Inputs, one per request:
- `image`, BYTES [N]: N encoded image files (PNG, JPEG, ...), decoded and preprocessed exactly as /encode
  does, with its limits and reasons (in REST's JSON `data`, each file base64-encoded: images are not text).
- `x`, FP32 [N, C, H, W]: rows already preprocessed, at the native size (or a full-mode size).
And optionally a warm start, as /encode's `start` part is: `start_latent_1`..`start_latent_L`, FP32, all
levels, each shaped as the output `latent_l` of the same images (a previous response's latents, sent back).

Parameters: `steps`, `size_mode`, `solver`, `init` (every option /encode's form takes but `outputs` and
`arrays`), parsed by service.options as /encode's fields are. Outputs (only those asked for are computed and sent;
none asked for: all but `trace`): latent_1..latent_L, reconstruction, error_map, input, energy
FP32 [N, 2] (before and after), trace FP32 [N, steps + 1]. Every output's first axis is the image; an
image's arrays are /encode's, bit for bit (service.responses.image_arrays), so in tile mode a latent is
[N, tiles, causes, h, w]. N images must give arrays of one shape: images whose sizes differ in full or
tile mode are refused (400) with the advice to send them separately or use size_mode=resize.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import struct
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch

from pcmodel.config import has_whole_map_level, level_shapes

from .errors import RequestError, rejection
from .forms import Part
from .host import ModelHost
from .inputs import Prepared
from .options import OPTION_FIELDS, given_floats, parse_options
from .pipeline import Decoded, Pipeline
from .responses import MAPS, image_arrays

SERVER_NAME = "predictive-coding"
EXTENSIONS = ("binary_tensor_data",)  # REST: Inference-Header-Content-Length, binary_data_size, binary_data_output
# Request parameters that are options (service.options), and the protocol's own.
OPTION_PARAMETERS = tuple(f for f in OPTION_FIELDS if f not in ("outputs", "arrays"))
PROTOCOL_PARAMETERS = ("binary_data_output",)
START_PREFIX = "start_latent_"  # the optional inputs of a warm start: start_latent_1..start_latent_L


def server_version() -> str:
    try:
        return metadata.version("predictive-coding")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "0"


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def model_version(host: ModelHost) -> str:
    return host.sha256[:12]


def find_model(pipeline: Pipeline, name: str, version: str | None) -> ModelHost:
    """The loaded model when `name` (and `version`, if given) are this service's; else 404 (or 503 loading)."""
    host = pipeline.host
    if name != host.config.name or (version not in (None, "") and version != model_version(host)):
        asked = name if version in (None, "") else f"{name} version {version}"
        raise RequestError(
            404,
            "not_found",
            f"there is no model {asked[:200]!r} here; this server serves {host.config.name!r} version "
            f"{model_version(host)!r} (GET /v2/models/{host.config.name})",
        )
    return host


def output_names(host: ModelHost) -> tuple[str, ...]:
    levels = len(host.config.levels)
    return (*(f"latent_{i}" for i in range(1, levels + 1)), *MAPS, "energy", "trace")


def model_metadata(host: ModelHost) -> dict:
    """Inputs and outputs with datatype and shape (-1 for a variable axis); see the module docstring. The
    protocol's metadata has no way to say that an input is optional: a request sends `image` or `x`, and the
    start_latent_* inputs (shaped as the latent_* outputs) only for a warm start."""
    c, h, w = host.config.input_shape
    sized = not has_whole_map_level(host.config)  # convolutional: full and tile mode give other sizes
    side = [-1, -1] if sized else [h, w]
    latents = [
        {"name": f"latent_{i}", "datatype": "FP32", "shape": [-1, g.latent[0], *(side if sized else g.latent[1:])]}
        for i, g in enumerate(level_shapes(host.config), start=1)
    ]
    maps = [{"name": name, "datatype": "FP32", "shape": [-1, c, *side]} for name in MAPS]
    return {
        "name": host.config.name,
        "versions": [model_version(host)],
        "platform": "pytorch",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "x", "datatype": "FP32", "shape": [-1, c, *side]},
            *({**t, "name": START_PREFIX + t["name"].removeprefix("latent_")} for t in latents),
        ],
        "outputs": [
            *latents,
            *maps,
            {"name": "energy", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "trace", "datatype": "FP32", "shape": [-1, -1]},
        ],
    }


@dataclass(frozen=True)
class InputTensor:
    """One input as a transport read it: BYTES as a list of elements, FP32 as a flat float32 array."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: list[bytes] | np.ndarray


@dataclass(frozen=True)
class Inference:
    """A request's outputs, and the response's parameters: the dynamics that ran (solver, init)."""

    outputs: list[OutputTensor]
    parameters: dict[str, str]


@dataclass(frozen=True)
class OutputTensor:
    name: str
    array: np.ndarray  # float32, C order
    datatype: str = "FP32"

    def raw(self) -> bytes:
        """The little-endian bytes, as the binary extension and gRPC's raw_output_contents carry them."""
        return self.array.astype("<f4", copy=False).tobytes()


def protocol_status(error: RequestError) -> int:
    """The protocol answers a bad parameter or an unreadable image format with 400 (/encode: 422, 415)."""
    return 400 if error.status in (415, 422) else error.status


def bad(message: str, reason: str = "bad_request") -> RequestError:
    return RequestError(400, reason, message)


# Tensor parameters of extensions this server does not have: named in the refusal, so a client that asks for
# classification or shared memory learns why, instead of getting a plain tensor or nothing in its region.
EXTENSION_PARAMETERS = {
    "classification": "the classification extension",
    "shared_memory_region": "shared memory",
    "shared_memory_byte_size": "shared memory",
    "shared_memory_offset": "shared memory",
}


def check_tensor_parameters(what: str, parameters, allowed: tuple[str, ...]) -> None:
    """400 for a tensor's parameters other than `allowed` (its keys: a JSON object or a protobuf map)."""
    unknown = sorted(set(parameters) - set(allowed))
    if unknown:
        extensions = sorted({EXTENSION_PARAMETERS[k] for k in unknown if k in EXTENSION_PARAMETERS})
        why = f"this server does not support {' or '.join(extensions)}" if extensions else "unknown"
        took = f"; it takes {', '.join(allowed)}" if allowed else ""
        raise bad(f"{what}: parameter(s) {', '.join(unknown)[:120]}: {why}{took}")


def split_bytes(raw: bytes, name: str) -> list[bytes]:
    """A BYTES tensor's raw data: each element as a 4-byte little-endian length and its bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise bad(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise bad(f"input {name!r}: a BYTES element says {n} bytes, but only {len(raw) - at - 4} follow")
        out.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    return out


def fp32_from_raw(raw: bytes, name: str) -> np.ndarray:
    if len(raw) % 4:
        raise bad(f"input {name!r}: FP32 data of {len(raw)} bytes is not a whole number of 4-byte floats")
    return np.frombuffer(raw, dtype="<f4")


def base64_elements(values: list, name: str) -> list[bytes]:
    """REST JSON `data` of `image`: each element a base64 string (image files are not text)."""
    out = []
    for i, value in enumerate(_flatten(values)):
        if not isinstance(value, str):
            raise bad(f"input {name!r}: element {i} is not a string; send each image file base64-encoded")
        try:
            out.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise bad(f"input {name!r}: element {i} is not base64; send each image file base64-encoded") from None
    return out


def fp32_from_list(values: list, name: str) -> np.ndarray:
    flat = list(_flatten(values))
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
        raise bad(f"input {name!r}: FP32 data must be numbers")
    try:
        return np.asarray(flat, dtype=np.float32)
    except OverflowError:  # an integer beyond any float (a float beyond float32 becomes Inf, refused later)
        raise bad(f"input {name!r}: FP32 data holds a number too large for a float") from None


def _flatten(values: object):
    if isinstance(values, list):
        for v in values:
            yield from _flatten(v)
    else:
        yield values


def _parameter_text(name: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RequestError(400, "bad_parameter", f"parameter {name!r} must be an integer or a string, got {value!r}")
    return str(value)


async def infer(
    pipeline: Pipeline, inputs: list[InputTensor], parameters: dict, outputs: list[str] | None
) -> Inference:
    """Run one request: the outputs asked for (`outputs`; None: all but trace), in that order."""
    host = pipeline.host
    config, settings = host.config, pipeline.settings
    unknown = sorted(set(parameters) - {*OPTION_PARAMETERS, *PROTOCOL_PARAMETERS})
    if unknown:
        known = ", ".join((*OPTION_PARAMETERS, *PROTOCOL_PARAMETERS))
        raise RequestError(400, "bad_parameter", f"unknown parameter(s) {', '.join(unknown)}; the parameters: {known}")
    names = output_names(host)
    wanted = [n for n in names if n != "trace"] if not outputs else list(dict.fromkeys(outputs))
    strange = [n for n in wanted if n not in names]
    if strange:
        raise bad(f"unknown output(s) {', '.join(strange)[:200]}; the outputs are: {', '.join(names)}")
    needed = {"trace"} & set(wanted) | set(MAPS) & set(wanted)
    if any(n.startswith("latent_") for n in wanted):
        needed.add("latents")
    values = {k: _parameter_text(k, v) for k, v in parameters.items() if k in OPTION_PARAMETERS}
    starts = _start_inputs([t for t in inputs if t.name.startswith(START_PREFIX)], len(config.levels))
    inputs = [t for t in inputs if not t.name.startswith(START_PREFIX)]
    if len(inputs) != 1 or inputs[0].name not in ("image", "x"):
        given = ", ".join(repr(t.name) for t in inputs) or "none"
        raise bad(
            f"send one input, `image` (BYTES [N], image files) or `x` (FP32 [N, C, H, W]), and for a warm start "
            f"{START_PREFIX}1..{START_PREFIX}{len(config.levels)}; got {given}"
        )
    tensor = inputs[0]
    if starts and "init" in values:
        raise RequestError(400, "bad_parameter", f"send either `init` or a warm start ({START_PREFIX}*), not both")
    if tensor.name == "x" and "size_mode" in values:
        raise RequestError(400, "bad_parameter", "size_mode applies to `image`; `x` is already at a model size")
    try:
        options = parse_options(values, config, settings)
    except RequestError as error:  # 422 in /encode's form; the protocol says 400 for a bad parameter
        raise RequestError(400, error.reason, error.message) from None
    options = dataclasses.replace(options, outputs=tuple(sorted(needed)))
    images = await (_from_images(pipeline, tensor, options) if tensor.name == "image" else _from_rows(tensor, host))
    shapes = {_shapes(prepared) for prepared in images}
    if len(shapes) > 1:
        raise bad(
            f"these {len(images)} images give arrays of different shapes in size_mode={options.size_mode} (their "
            "sizes differ); send them in separate requests, or use size_mode=resize"
        )
    start = _starts(starts, images, host) if starts else [None] * len(images)
    settled = await asyncio.gather(*(pipeline.settle(p.rows, options, r) for p, r in zip(images, start)))
    arrays = [image_arrays(p, s, options.outputs) for p, s in zip(images, settled)]
    out = []
    for name in wanted:
        if name.startswith("latent_"):
            per_image = [a["latents"][int(name.split("_")[1]) - 1] for a in arrays]
        elif name == "energy":
            per_image = [torch.stack([a["energy"][0], a["energy"][-1]]) for a in arrays]
        elif name == "trace":
            per_image = [a["energy"] for a in arrays]
        else:
            per_image = [a[name] for a in arrays]
        out.append(OutputTensor(name, np.stack([t.detach().to("cpu", torch.float32).numpy() for t in per_image])))
    return Inference(out, host.dynamics(options.solver, "given" if starts else options.init))


def _start_inputs(tensors: list[InputTensor], levels: int) -> list[InputTensor]:
    """A warm start's inputs, level 1 first: every level's or none; each FP32 (their shapes are checked once the
    images are decoded)."""
    if not tensors:
        return []
    names = [f"{START_PREFIX}{level}" for level in range(1, levels + 1)]
    given = [t.name for t in tensors]
    if sorted(given) != sorted(names):
        raise RequestError(
            400,
            "bad_parameter",
            f"a warm start is every level's latents, once each: {', '.join(names)} (a previous response's latent_1.."
            f"latent_{levels}); got {', '.join(given)[:200]}",
        )
    for t in tensors:
        if t.datatype != "FP32" or not isinstance(t.data, np.ndarray):
            raise RequestError(400, "bad_parameter", f"input {t.name!r} must be FP32, got {t.datatype[:20]}")
    by_name = {t.name: t for t in tensors}
    return [by_name[n] for n in names]


def _starts(tensors: list[InputTensor], images: list[Prepared], host: ModelHost) -> list[list[torch.Tensor]]:
    """Per image, its starting latents as the host takes them (rows first). Each input must be shaped as that
    level's output for these images: [N, causes, h, w], or [N, tiles, causes, h, w] in tile mode."""
    rows = images[0].rows  # every image's rows have one shape (checked before)
    tiled = images[0].grid is not None
    n = len(images)
    out: list[list[torch.Tensor]] = [[] for _ in images]
    for t, shape in zip(tensors, host.model.latent_shapes(tuple(rows.shape[-2:]))):
        expected = [n, *(rows.shape[:1] if tiled else ()), *shape]
        if list(t.shape) != expected or t.data.size != int(np.prod(expected)):
            raise RequestError(
                400,
                "bad_parameter",
                f"input {t.name!r} has shape {list(t.shape)} and {t.data.size} values; for these images it is "
                f"FP32 {expected}, as latent_{t.name.removeprefix(START_PREFIX)} of their response",
            )
        array = given_floats(t.data, f"input {t.name!r}", 400).reshape(expected)
        for i in range(n):
            out[i].append(torch.from_numpy(array[i] if tiled else array[i][None]))  # (rows, causes, h, w)
    return out


def _shapes(prepared: Prepared) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(prepared.rows.shape), tuple(prepared.shown.shape)


def _count(tensor: InputTensor, limit: int) -> int:
    n = tensor.shape[0] if tensor.shape else 0
    if n < 1:
        raise bad(f"input {tensor.name!r} has shape {list(tensor.shape)}; its first axis counts the images, 1 or more")
    if n > limit:
        raise RequestError(413, "too_large", f"{n} images in one request; send at most {limit} (PC_MAX_BATCH_IMAGES)")
    return n


async def _from_images(pipeline: Pipeline, tensor: InputTensor, options) -> list[Prepared]:
    if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
        raise bad(f"input 'image' must be BYTES [N], got {tensor.datatype} {list(tensor.shape)}")
    n = _count(tensor, pipeline.settings.max_batch_images)
    if not isinstance(tensor.data, list) or len(tensor.data) != n:
        got = len(tensor.data) if isinstance(tensor.data, list) else "no"
        raise bad(f"input 'image' has shape [{n}] but {got} elements")
    decoded = await asyncio.gather(
        *(pipeline.decode(Part("image", None, data), options) for data in tensor.data), return_exceptions=True
    )
    for i, result in enumerate(decoded):
        if isinstance(result, BaseException):
            error = rejection(result)
            if error is None:
                raise result
            prefix = f"image {i + 1} of {n}: " if n > 1 else ""
            raise RequestError(error.status, error.reason, prefix + error.message)
    return [d.prepared for d in decoded if isinstance(d, Decoded)]


async def _from_rows(tensor: InputTensor, host: ModelHost) -> list[Prepared]:
    config = host.config
    c, h, w = config.input_shape
    sizes = [(h, w), *(b for b in host.buckets if b != (h, w))]
    if tensor.datatype != "FP32" or len(tensor.shape) != 4:
        raise bad(f"input 'x' must be FP32 [N, {c}, H, W], got {tensor.datatype} {list(tensor.shape)}")
    n = _count(tensor, host.settings.max_batch_images)
    if tensor.shape[1] != c or tuple(tensor.shape[2:]) not in sizes:
        shown = " or ".join(f"[N, {c}, {a}, {b}]" for a, b in sizes)
        raise bad(f"input 'x' has shape {list(tensor.shape)}; the model takes {shown}")
    data = tensor.data
    if not isinstance(data, np.ndarray) or data.size != n * c * tensor.shape[2] * tensor.shape[3]:
        raise bad(f"input 'x' has shape {list(tensor.shape)} but {getattr(data, 'size', 0)} values")
    x = torch.from_numpy(given_floats(data, "input 'x'", 400).reshape(tensor.shape))  # (N, C, H, W)
    return [Prepared(rows=x[i : i + 1], shown=x[i], grid=None) for i in range(n)]
