"""The HTTP surface's request and response models. FastAPI builds GET /docs.json from them (service.openapi).

Responses are written by service.responses and service.v2_rest (fast paths that splice base64 into the
JSON), not serialised through these models: tests/service/test_api.py and test_v2.py validate real answers
against the schemas generated here, so the two cannot drift apart. The multipart forms are parsed by
service.forms (BentoML's and Starlette's parsers were measured to misbehave, docs/ARCHITECTURE.md); their
models here describe them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pcmodel import SOLVERS

from .metrics import REASONS
from .options import ARRAYS, INITS, OUTPUTS, SIZE_MODES
from .settings import Settings

# Every reason an error body can carry: the labels of pc_request_errors_total and the router's own.
ERROR_REASONS = tuple(dict.fromkeys((*REASONS, "load_failed", "not_found", "method_not_allowed")))
Base64 = Field(json_schema_extra={"format": "byte"})  # a string field holding base64


class PCArray(BaseModel):
    """A float32 or float16 array: base64 of its little-endian bytes in C order, with its shape."""

    shape: list[int]
    dtype: Literal["float32", "float16"]
    data: str = Base64


class PCMap(BaseModel):
    """A (C, H, W) map: a PNG for display and its array (float32 or float16; none under arrays=none)."""

    png: str = Base64
    array: PCArray | None = None


class PCModelRef(BaseModel):
    name: str
    preset: str
    sha256: str


class PCEnergy(BaseModel):
    initial: float
    final: float
    trace: list[float] | None = Field(None, description="steps + 1 values (outputs=trace)")


class PCTileGrid(BaseModel):
    """Tile mode only: native-size tiles every `stride` pixels, row-major, the first at `origin` (negative: the
    image is padded by reflection); overlapping outputs are blended with a Hann window; `image` is (H, W) of the
    original. The energy is the sum over all tiles, each once."""

    rows: int
    cols: int
    tile: list[int]
    stride: list[int]
    origin: list[int]
    image: list[int]


class PCSnapshot(BaseModel):
    """outputs=snapshots: the exact state after `step` steps from the same start with the same dynamics (the
    latents float16)."""

    step: int
    energy: float
    reconstruction: str = Field(description="the reconstruction's PNG, base64", json_schema_extra={"format": "byte"})
    error_map: str = Field(description="the error map's PNG, base64", json_schema_extra={"format": "byte"})
    latents: list[PCArray]


class PCEncodeResult(BaseModel):
    """One encoded image. `input` is the image as the model saw it after preprocessing, so
    input.array - reconstruction.array = error_map.array exactly. Maps and latents appear when `outputs` asks
    for them (default: latents, reconstruction, error_map and input)."""

    model: PCModelRef
    steps: int = Field(description="inference steps used")
    size_mode: Literal[SIZE_MODES]  # type: ignore[valid-type]
    solver: str | None = Field(None, description="the dynamics that ran, e.g. gradient, nesterov(0.7) or anderson(5)")
    init: str | None = Field(None, description="where inference started: zero, amortised or given")
    energy: PCEnergy
    latents: list[PCArray] | None = Field(
        None,
        description="r per level, level 1 first: (causes, H_l, W_l); in tile mode with a leading tile axis; in "
        "full mode at the padded size `model_input`. float32, or float16 under arrays=float16 or none",
    )
    level_errors: list[PCArray] | None = Field(
        None,
        description="outputs=level_errors: e_l = r_(l-1) - level l's prediction per level, level 1 first (level "
        "1's is the image's), as the energy sums them; laid out as latents (tile axis, padded size)",
    )
    tile_grid: PCTileGrid | None = None
    padded: list[int] | None = Field(
        None,
        description="full mode only: [top, bottom, left, right] pixels of reflection added around the scaled "
        "image to reach `model_input`; the maps are cropped back, latents and level errors are not",
    )
    model_input: list[int] | None = Field(
        None, description="full mode only: (H, W) the model ran at, one of the server's bucket sizes"
    )
    input: PCMap | None = None
    reconstruction: PCMap | None = None
    error_map: PCMap | None = None
    snapshots: list[PCSnapshot] | None = None


class PCItemError(BaseModel):
    """One image of /encode_batch that could not be encoded (the others still are)."""

    error: str
    status: int
    reason: str


class PCBatchResult(BaseModel):
    model: PCModelRef
    results: list[PCEncodeResult | PCItemError] = Field(
        description="one entry per image, in order: a result, or that image's error"
    )


class PCError(BaseModel):
    """An error: every error of the service carries its reason (BentoML's own 429 and 504 do not)."""

    error: str = Field(description="what was wrong and what to send instead")
    reason: Literal[ERROR_REASONS] = Field(  # type: ignore[valid-type]
        None,  # left out (BentoML's own errors), never null
        json_schema_extra=lambda schema: schema.pop("default", None),
        description="the reason label of pc_request_errors_total; load_failed: the model failed to load (the "
        "worker restarts), not_found and method_not_allowed: a path or method the service has not",
    )


class PCModelCard(BaseModel):
    """The model this service runs, its device and backend, the steps and limits it accepts."""

    model_config = ConfigDict(extra="allow")
    name: str
    preset: str
    source: str | None = None
    sha256: str
    device: str
    backend: str
    backends: dict[str, str] | None = None
    steps: dict[str, Any]
    input: dict[str, Any] | None = None
    solver: dict[str, Any] | None = None  # {default, choices}, as init, outputs and arrays
    init: dict[str, Any] | None = None
    outputs: dict[str, Any] | None = None
    arrays: dict[str, Any] | None = None
    limits: dict[str, int] | None = None
    batching: dict[str, Any] | None = None
    config: dict[str, Any]
    provenance: dict[str, Any]


# ---- the multipart forms (parsed by service.forms; described here) ----------------------------------


class EncodeOptionsForm(BaseModel):
    steps: int | None = Field(None, ge=1, description="inference steps (default: the model's)")
    size_mode: Literal[SIZE_MODES] | None = Field(  # type: ignore[valid-type]
        None,
        description="resize to the native size; tile (overlapping native-size tiles, blended); or full "
        "(convolutional models: scaled to at most PC_FULL_MAX_SIDE on the longer side, one inference on the whole "
        "image). Default: the model's",
    )
    arrays: Literal[ARRAYS] | None = Field(  # type: ignore[valid-type]
        None,
        description="dtype of the maps' arrays: float32 (default), float16, or none (PNGs only; latents and level "
        "errors then float16)",
    )
    outputs: str | None = Field(
        None, description=f"comma-separated subset of {','.join(OUTPUTS)} (default: all but trace)"
    )
    solver: Literal[SOLVERS] | None = Field(  # type: ignore[valid-type]
        None,
        description="the dynamics: gradient (the paper's), momentum, nesterov or anderson (default: the model's)",
    )
    init: Literal[INITS] | None = Field(  # type: ignore[valid-type]
        None, description="where inference starts: zero or amortised (default: the model's)"
    )


class EncodeForm(EncodeOptionsForm):
    image: bytes = Field(description="PNG, JPEG, WebP, TIFF, BMP or GIF (first frame); the bytes decide")
    start: bytes | None = Field(
        None,
        description="a warm start: an .npz of a previous result's latent_1..latent_L, shaped as that response gave "
        "them, with or without a leading axis of 1 (pc-encode's encoding.npz too); refused where its optional "
        "size_mode / image_size arrays differ from this image's (not with init)",
    )


class EncodeBatchForm(EncodeOptionsForm):
    images: list[bytes] = Field(description="repeat the field, one file each")


def form_body(form: type[BaseModel], settings: Settings) -> dict[str, Any]:
    """An OpenAPI requestBody for a multipart form described by `form`, with this server's limits."""
    schema = _plain(form.model_json_schema())
    properties = schema["properties"]
    properties["steps"]["maximum"] = settings.max_steps
    if "images" in properties:
        properties["images"]["maxItems"] = settings.max_batch_images
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


def _plain(schema: dict[str, Any]) -> dict[str, Any]:
    """A form field's schema as multipart clients read it: `T | None` as T (a field left out is the default),
    bytes as binary files, no titles."""
    schema.pop("title", None)
    for field in schema.get("properties", {}).values():
        options = field.pop("anyOf", None)
        if options is not None:
            field.update(next(o for o in options if o.get("type") != "null"))
        if field.get("default", 0) is None:
            del field["default"]
        field.pop("title", None)
        for part in (field, field.get("items", {})):
            if part.get("format") == "binary" or part.get("contentMediaType") == "application/octet-stream":
                part.pop("contentMediaType", None)
                part["format"] = "binary"
    return schema


# ---- the Open Inference Protocol (KServe v2) --------------------------------------------------------


class V2Tensor(BaseModel):
    name: str
    datatype: Literal["BYTES", "FP32"]
    shape: list[int]
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: the tensor's bytes follow the JSON header (binary tensor data extension)"
    )
    data: list[Any] | None = Field(None, description="the values, flat or nested; BYTES elements base64-encoded")


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true sends it as bytes after the JSON")


class V2InferRequest(BaseModel):
    """The images: `image` BYTES [N] (encoded image files) or `x` FP32 [N, C, H, W] (preprocessed); optionally a
    warm start, `start_latent_1`..`start_latent_L` FP32 shaped as the `latent_*` outputs. Parameters: steps,
    size_mode, solver, init, binary_data_output. With binary tensors, the body is this JSON followed by their
    bytes and Inference-Header-Content-Length says the JSON's length."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = Field(
        None,
        description="latent_1..latent_L, input, reconstruction, error_map, energy, trace (default: all but trace)",
    )


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="solver and init: the dynamics that ran")
    outputs: list[V2Tensor]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    """Ready (200) or not yet (503): the model's name and whether it is ready."""

    name: str
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: Literal["BYTES", "FP32"]
    shape: list[int] = Field(description="-1 for a variable axis")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


REQUEST_MODELS = (V2InferRequest,)  # described by openapi_extra, so the document adds their schemas itself
