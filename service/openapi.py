"""GET /docs.json: BentoML's OpenAPI spec, completed with our request forms, responses and GET routes.

BentoML generates the spec from the API methods' signatures, but our methods read their multipart
form themselves (see service.forms), and GET /model lives in a mounted ASGI app that BentoML does not
describe (nor the explorer page at /, the API browser at /docs and the basis at /model/basis). So
the spec BentoML builds (health, readiness, metrics and the API routes) is taken whole and these
parts are written over it, with the Open Inference Protocol's REST routes (/v2/...).
"""

from __future__ import annotations

import copy
from typing import Any

from pcmodel import SOLVERS

from .metrics import REASONS
from .middleware import is_open
from .options import ARRAYS, INITS, OUTPUTS, SIZE_MODES
from .settings import Settings

ARRAY = {
    "type": "object",
    "description": "A float32 or float16 array: base64 of its little-endian bytes in C order, with its shape.",
    "properties": {
        "shape": {"type": "array", "items": {"type": "integer"}},
        "dtype": {"type": "string", "enum": ["float32", "float16"]},
        "data": {"type": "string", "format": "byte"},
    },
    "required": ["shape", "dtype", "data"],
}
MAP = {
    "type": "object",
    "description": "A (C, H, W) map: a PNG for display and its array (float32 or float16; none under arrays=none).",
    "properties": {"png": {"type": "string", "format": "byte"}, "array": {"$ref": "#/components/schemas/PCArray"}},
    "required": ["png"],
}
MODEL_REF = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "preset": {"type": "string"}, "sha256": {"type": "string"}},
    "required": ["name", "preset", "sha256"],
}
RESULT = {
    "type": "object",
    "description": (
        "One encoded image. `input` is the image as the model saw it after preprocessing, so "
        "input.array - reconstruction.array = error_map.array exactly. Maps and latents appear when "
        "`outputs` asks for them (default: all but trace)."
    ),
    "properties": {
        "model": {"$ref": "#/components/schemas/PCModelRef"},
        "steps": {"type": "integer", "description": "inference steps used"},
        "size_mode": {"type": "string", "enum": list(SIZE_MODES)},
        "solver": {"type": "string", "description": "the dynamics that ran, e.g. gradient or nesterov(0.7)"},
        "init": {"type": "string", "description": "where inference started: zero, amortised, feedforward"},
        "energy": {
            "type": "object",
            "properties": {
                "initial": {"type": "number"},
                "final": {"type": "number"},
                "trace": {"type": "array", "items": {"type": "number"}, "description": "steps + 1 values"},
            },
            "required": ["initial", "final"],
        },
        "latents": {
            "type": "array",
            "description": (
                "r per level, level 1 first: (causes, H_l, W_l); in tile mode with a leading tile axis; in full "
                "mode at the padded size `model_input`. float32, or float16 under arrays=float16 or none"
            ),
            "items": {"$ref": "#/components/schemas/PCArray"},
        },
        "level_errors": {
            "type": "array",
            "description": (
                "outputs=level_errors: e_l = r_(l-1) - level l's prediction per level, level 1 first (level 1's "
                "is the image's), as the energy sums them: convolutional levels (C_(l-1), H, W), module levels "
                "one patch per module; laid out as latents (tile axis, padded size). dtype as latents"
            ),
            "items": {"$ref": "#/components/schemas/PCArray"},
        },
        "tile_grid": {
            "type": "object",
            "description": (
                "tile mode only: native-size tiles every `stride` pixels, row-major, the first at `origin` "
                "(negative: the image is padded by reflection); overlapping outputs are blended with a Hann "
                "window; `image` is (H, W) of the original. The energy is the sum over all tiles, each once"
            ),
            "properties": {
                "rows": {"type": "integer"},
                "cols": {"type": "integer"},
                "tile": {"type": "array", "items": {"type": "integer"}},
                "stride": {"type": "array", "items": {"type": "integer"}},
                "origin": {"type": "array", "items": {"type": "integer"}},
                "image": {"type": "array", "items": {"type": "integer"}},
            },
        },
        "padded": {
            "type": "array",
            "items": {"type": "integer"},
            "description": (
                "full mode only: [top, bottom, left, right] pixels of reflection added around the scaled image "
                "to reach `model_input`; the maps are cropped back, latents and level errors are not"
            ),
        },
        "model_input": {
            "type": "array",
            "items": {"type": "integer"},
            "description": "full mode only: (H, W) the model ran at, one of the server's bucket sizes",
        },
        "input": {"$ref": "#/components/schemas/PCMap"},
        "reconstruction": {"$ref": "#/components/schemas/PCMap"},
        "error_map": {"$ref": "#/components/schemas/PCMap"},
    },
    "required": ["model", "steps", "size_mode", "energy"],
}
INFO = (
    "Rao & Ballard (1999) predictive-coding image encoder: a photo in, its latent causes, reconstruction, "
    "error map and energy out. The explorer page at `/` shows them; the README documents every route."
)
ERROR_REASONS = tuple(dict.fromkeys((*REASONS, "load_failed", "not_found", "method_not_allowed")))
ERROR = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "what was wrong and what to send instead"},
        "reason": {
            "type": "string",
            "enum": list(ERROR_REASONS),
            "description": "the reason label of pc_request_errors_total; load_failed: the model failed to load "
            "(the worker restarts), not_found and method_not_allowed: a path or method the service has not",
        },
    },
    "required": ["error"],
    "description": "An error: every error of the service carries its reason (BentoML's own 429 and 504 do not).",
}
ITEM_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "status": {"type": "integer"}, "reason": {"type": "string"}},
    "required": ["error", "status", "reason"],
}
BATCH_RESULT = {
    "type": "object",
    "properties": {
        "model": {"$ref": "#/components/schemas/PCModelRef"},
        "results": {
            "type": "array",
            "description": "one entry per image, in order: a result, or that image's error",
            "items": {
                "oneOf": [{"$ref": "#/components/schemas/PCEncodeResult"}, {"$ref": "#/components/schemas/PCItemError"}]
            },
        },
    },
    "required": ["model", "results"],
}
MODEL_CARD = {
    "type": "object",
    "description": "The model this service runs, its device and backend, the steps and limits it accepts.",
    "properties": {
        "name": {"type": "string"},
        "preset": {"type": "string"},
        "source": {"type": "string"},
        "sha256": {"type": "string"},
        "device": {"type": "string"},
        "backend": {"type": "string"},
        "backends": {"type": "object", "additionalProperties": {"type": "string"}},
        "steps": {"type": "object"},
        "input": {"type": "object"},
        "outputs": {"type": "object"},
        "limits": {"type": "object"},
        "batching": {"type": "object"},
        "config": {"type": "object"},
        "provenance": {"type": "object"},
    },
    "required": ["name", "preset", "sha256", "device", "backend", "steps", "config", "provenance"],
}


def _form(settings: Settings, image_field: str, many: bool) -> dict[str, Any]:
    file = {"type": "string", "format": "binary"}
    image = (
        {"type": "array", "items": file, "maxItems": settings.max_batch_images, "description": "repeat the field"}
        if many
        else {**file, "description": "PNG, JPEG, WebP, TIFF, BMP or GIF (first frame); the bytes decide"}
    )
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        image_field: image,
                        "steps": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": settings.max_steps,
                            "description": "inference steps (default: the model's)",
                        },
                        "size_mode": {
                            "type": "string",
                            "enum": list(SIZE_MODES),
                            "description": (
                                "resize to the native size; tile (overlapping native-size tiles, blended); or "
                                "full (convolutional models: scaled to at most PC_FULL_MAX_SIDE on the longer "
                                "side, one inference on the whole image). Default: the model's"
                            ),
                        },
                        "arrays": {
                            "type": "string",
                            "enum": list(ARRAYS),
                            "description": (
                                "dtype of the maps' arrays: float32 (default), float16, or none (PNGs only; "
                                "latents and level errors then float16)"
                            ),
                        },
                        "outputs": {
                            "type": "string",
                            "description": f"comma-separated subset of {','.join(OUTPUTS)} (default: all but trace)",
                        },
                        "solver": {
                            "type": "string",
                            "enum": list(SOLVERS),
                            "description": "the dynamics: gradient (the paper's), momentum or nesterov (default: the "
                            "model's)",
                        },
                        "init": {
                            "type": "string",
                            "enum": list(INITS),
                            "description": "where inference starts: zero or amortised (default: the model's)",
                        },
                        **(
                            {}
                            if many
                            else {
                                "start": {
                                    **file,
                                    "description": "a warm start: an .npz of a previous result's latent_1.."
                                    "latent_L, shaped as that response gave them (not with init)",
                                }
                            }
                        ),
                    },
                    "required": [image_field],
                }
            }
        },
    }


def _errors(codes: dict[int, str]) -> dict[str, Any]:
    return {
        str(code): {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PCError"}}},
        }
        for code, text in codes.items()
    }


_ENCODE_ERRORS = {
    400: "undecodable image, missing or unknown field, malformed form, image too small",
    408: "the request body did not arrive in time",
    413: "body, pixel count, tile count or number of images over the limit",
    415: "unsupported image format, or not a multipart form",
    422: "bad steps, size_mode, outputs or arrays value; size_mode=full for a model with a dense level",
    500: "inference produced NaN or Inf (an unstable checkpoint)",
    503: "overloaded (the model's queue or a memory budget is full) or the model still loading; retry",
}


_TENSOR = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": ["BYTES", "FP32"]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "parameters": {
            "type": "object",
            "description": "binary_data_size: the tensor's bytes follow the JSON header (binary tensor data extension)",
        },
        "data": {
            "type": "array",
            "description": "the values, flat or nested; BYTES elements (image files) base64-encoded",
        },
    },
    "required": ["name", "datatype", "shape"],
}
V2_SCHEMAS = {
    "V2Tensor": _TENSOR,
    "V2InferRequest": {
        "type": "object",
        "description": (
            "The images: `image` BYTES [N] (encoded image files) or `x` FP32 [N, C, H, W] (preprocessed); optionally "
            "a warm start, `start_latent_1`..`start_latent_L` FP32 shaped as the `latent_*` outputs. Parameters: "
            "steps, size_mode, solver, init, binary_data_output. With binary tensors, the body is this JSON followed "
            "by their bytes and Inference-Header-Content-Length says the JSON's length."
        ),
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/V2Tensor"}},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                    "required": ["name"],
                },
                "description": "latent_1..latent_L, input, reconstruction, error_map, energy, trace (default: all "
                "but trace); parameters.binary_data: true sends it as bytes after the JSON",
            },
        },
        "required": ["inputs"],
    },
    "V2InferResponse": {
        "type": "object",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": {"type": "object", "description": "solver and init: the dynamics that ran"},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/V2Tensor"}},
        },
        "required": ["model_name", "model_version", "outputs"],
    },
    "V2ServerMetadata": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "version", "extensions"],
    },
    "V2ModelMetadata": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/V2Tensor"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/V2Tensor"}},
        },
        "required": ["name", "versions", "platform", "inputs", "outputs"],
    },
}
_V2_TAG = ["Open Inference Protocol (KServe v2)"]


def _v2_paths() -> dict[str, Any]:
    """The Open Inference Protocol's REST routes (service/v2_rest.py)."""

    def get(summary: str, schema: str | None, errors: dict[int, str], op: str) -> dict[str, Any]:
        ok: dict[str, Any] = {"description": "true" if schema is None else "the metadata"}
        if schema is not None:
            ok["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
        return {
            "get": {"summary": summary, "operationId": op, "tags": _V2_TAG, "responses": {"200": ok, **_errors(errors)}}
        }

    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    unknown = {404: "no model of that name (or version) here", 503: "the model is still loading"}
    infer_errors = {
        400: "a bad tensor, datatype, shape, parameter or image; images of different sizes in full or tile mode",
        404: unknown[404],
        408: "the request body did not arrive in time",
        413: "body, pixels, tiles or images over the limit",
        500: "inference produced NaN or Inf (an unstable checkpoint)",
        503: "overloaded, or the model still loading; retry after Retry-After",
    }
    paths: dict[str, Any] = {
        "/v2": get("Server metadata", "V2ServerMetadata", {}, "v2_server_metadata"),
        "/v2/health/live": get("Live (as /livez)", None, {503: "not live"}, "v2_live"),
        "/v2/health/ready": get("Ready (as /readyz)", None, {503: "not ready"}, "v2_ready"),
    }
    for prefix, parameters, tag in (
        ("/v2/models/{name}", [name], ""),
        ("/v2/models/{name}/versions/{version}", [name, version], "_version"),
    ):
        paths[prefix] = get("Model metadata", "V2ModelMetadata", unknown, f"v2_model_metadata{tag}")
        paths[prefix + "/ready"] = get("Model ready", None, unknown, f"v2_model_ready{tag}")
        paths[prefix + "/infer"] = {
            "post": {
                "summary": "Inference",
                "operationId": f"v2_infer{tag}",
                "tags": _V2_TAG,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    "200": {
                        "description": "the outputs; with binary outputs the JSON is followed by their bytes",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/V2InferResponse"}},
                            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    **_errors(infer_errors),
                },
            }
        }
        for method in ("get", "post"):
            for route in (prefix, prefix + "/ready", prefix + "/infer"):
                if method in paths[route]:
                    paths[route][method]["parameters"] = parameters
    return paths


def complete(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """BentoML's spec (a dict) with our forms, responses and GET /model written in."""
    spec = copy.deepcopy(spec)
    # BentoML's description is badges and links to other hosts, which GET /docs would fetch.
    spec["info"] = {
        "title": "PCEncoder",
        "version": spec.get("info", {}).get("version", ""),
        "description": INFO,
    }
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(
        {
            "PCArray": ARRAY,
            "PCMap": MAP,
            "PCModelRef": MODEL_REF,
            "PCEncodeResult": RESULT,
            "PCItemError": ITEM_ERROR,
            "PCBatchResult": BATCH_RESULT,
            "PCError": ERROR,
            "PCModelCard": MODEL_CARD,
            **V2_SCHEMAS,
        }
    )
    paths = spec.setdefault("paths", {})
    for route, field, many, result, summary in (
        ("/encode", "image", False, "PCEncodeResult", "Encode one image"),
        ("/encode_batch", "images", True, "PCBatchResult", "Encode several images; per-image errors are data"),
    ):
        post = paths.setdefault(route, {}).setdefault("post", {})
        post["summary"] = summary
        post["requestBody"] = _form(settings, field, many)
        ok: dict[str, Any] = {
            "description": "the encoding",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{result}"}}},
        }
        if not many:
            ok["headers"] = {
                "Server-Timing": {
                    "description": "queue;dur=, model;dur=, total;dur= in milliseconds: waiting for the model, the "
                    "model calls this image was in, and the whole request inside the server",
                    "schema": {"type": "string"},
                }
            }
        post["responses"] = {"200": ok, **_errors(_ENCODE_ERRORS)}
    paths["/docs.json"] = {
        "get": {
            "summary": "This OpenAPI spec",
            "operationId": "PCEncoder__docs",
            "tags": ["Infrastructure"],
            "responses": {"200": {"description": "OpenAPI 3 JSON", "content": {"application/json": {}}}},
        }
    }
    for route, summary, media in (
        ("/", "The explorer page: encode a photo and see its maps, latents and energy", "text/html"),
        ("/docs", "This spec in Swagger UI", "text/html"),
    ):
        paths[route] = {
            "get": {
                "summary": summary,
                "operationId": f"PCEncoder__page_{route.strip('/') or 'index'}",
                "tags": ["Infrastructure"],
                "responses": {"200": {"description": "an HTML page", "content": {media: {}}}},
            }
        }
    paths["/model/basis"] = {
        "get": {
            "summary": "The level-1 receptive fields as a PNG grid, each on its own scale, zero at mid-grey",
            "operationId": "PCEncoder__basis",
            "tags": ["Service APIs"],
            "responses": {
                "200": {
                    "description": "a PNG",
                    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                },
                **_errors({503: "the model is still loading"}),
            },
        }
    }
    paths["/model"] = {
        "get": {
            "summary": "The model card",
            "operationId": "PCEncoder__model",
            "tags": ["Service APIs"],
            "responses": {
                "200": {
                    "description": "the model card",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PCModelCard"}}},
                },
                **_errors({503: "the model is still loading"}),
            },
        }
    }
    paths.update(_v2_paths())
    if settings.api_key or settings.api_key_file:
        # Swagger UI's "Authorize" then sends the key; the open routes say they need none.
        schemes = spec["components"].setdefault("securitySchemes", {})
        schemes["apiKey"] = {"type": "http", "scheme": "bearer", "description": "PC_API_KEY"}
        spec["security"] = [{"apiKey": []}]
        for path, item in paths.items():
            if is_open(path):
                for operation in item.values():
                    operation["security"] = []
    return spec
