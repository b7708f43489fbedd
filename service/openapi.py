"""GET /docs.json: the OpenAPI document FastAPI generates from the typed routes (service.service's APP),
with the few parts it cannot know: BentoML's own routes (the probes, /metrics, described by BentoML),
the request bodies our code parses itself (their models are in service.schemas) and the API key's scheme.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from . import schemas
from .middleware import is_open
from .settings import Settings

INFO = (
    "Rao & Ballard (1999) predictive-coding image encoder: a photo in, its latent causes, reconstruction, "
    "error map and energy out. The explorer page at `/` shows them; the README documents every route."
)
SERVER_TIMING = {
    "Server-Timing": {
        "description": "queue;dur=, model;dur=, total;dur= in milliseconds: waiting for the model, the model calls "
        "this image was in, and the whole request inside the server",
        "schema": {"type": "string"},
    }
}
ENCODE_ERRORS = {
    400: "undecodable image, missing or unknown field, malformed form, image too small",
    408: "the request body did not arrive in time",
    413: "body, pixel count, tile count or number of images over the limit",
    415: "unsupported image format, or not a multipart form",
    422: "bad steps, size_mode, outputs or arrays value; size_mode=full for a model with a dense level",
    500: "inference produced NaN or Inf (an unstable checkpoint)",
    503: "overloaded (the model's queue or a memory budget is full) or the model still loading; retry",
}
BENTOML_ROUTES = ("/livez", "/readyz", "/metrics")  # served and described by BentoML


def errors(codes: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses` for error statuses: each a PCError body."""
    return {code: {"model": schemas.PCError, "description": text} for code, text in codes.items()}


@cache
def _generated(app: FastAPI) -> dict[str, Any]:
    spec = copy.deepcopy(app.openapi())
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    # Bodies described with openapi_extra (our code parses them) refer to models no route signature names.
    _, defs = models_json_schema(
        [(model, "validation") for model in schemas.REQUEST_MODELS], ref_template="#/components/schemas/{model}"
    )
    components.update(defs.get("$defs", {}))
    # FastAPI adds a 422 to every route with parameters; ours never answer it where they did not say so.
    for item in spec["paths"].values():
        for operation in item.values():
            answer = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in str(answer):
                del operation["responses"]["422"]
    if "HTTPValidationError" not in str(spec["paths"]):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
    return spec


def document(app: FastAPI, bentoml_spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The whole document: `app`'s routes, generated, with BentoML's probes and /metrics from `bentoml_spec`."""
    spec = copy.deepcopy(_generated(app))
    # BentoML's description is badges and links to other hosts, which GET /docs would fetch.
    spec["info"] = {
        "title": "PCEncoder",
        "version": bentoml_spec.get("info", {}).get("version", ""),
        "description": INFO,
    }
    paths = spec["paths"]
    for path in BENTOML_ROUTES:
        if path in bentoml_spec.get("paths", {}):
            paths[path] = copy.deepcopy(bentoml_spec["paths"][path])
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
