"""The Open Inference Protocol's REST routes under /v2: a FastAPI router, included in the service's app.

JSON both ways, and the binary tensor data extension both ways: a request whose JSON header is
followed by the inputs' bytes says the header's length in `Inference-Header-Content-Length` and each
binary input's length in its `binary_data_size` parameter; outputs asked for with `binary_data: true`
(or all of them, with the request's `binary_data_output: true`, what tritonclient sends when it names
no outputs) come back the same way. The body arrives through BodyGate, as /encode's does: the same
size limit (413 before it is read), body budget and body deadline. Errors are {"error", "reason"} with
the protocol's statuses (400, 404, 413, 503 with Retry-After), counted like /encode's.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
import zlib
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from . import metrics, openapi, schemas, v2
from .errors import RequestError, refusal
from .health import NotLoaded
from .middleware import BODY_KEY
from .pipeline import Pipeline, run

logger = logging.getLogger(__name__)

INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")  # the bodies BodyGate reads
CONTENT_ENCODING = "content-encoding"
HEADER_LENGTH = "inference-header-content-length"
INLINE_VALUES = 1 << 16  # JSON answers with fewer output values are written on the event loop
INLINE_BODY_BYTES = 1 << 16  # request bodies up to this are parsed on the event loop, uncharged
# Peak bytes while parsing, per body byte: 15 MB of JSON floats (x [32, 3, 88, 88]) peaked at 2.6x as Python
# floats, their list and the float32 array (tracemalloc).
JSON_PARSE_FACTOR = 3

PipelineFn = Callable[[], Pipeline | None]
Handler = Callable[..., Awaitable[Response]]


def measured(method: str) -> Callable[[Handler], Handler]:
    """Count a route's calls in pc_v2_rest_requests_total{method, code} and time them in
    pc_v2_rest_request_duration_seconds; `method` is the protocol's name for the call (gRPC's)."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)  # FastAPI reads the handler's parameters through __wrapped__
        async def timed(*args: object, **kwargs: object) -> Response:
            started = time.perf_counter()
            code = "500"  # a bug: the exception goes on to the server, which answers 500
            try:
                response = await handler(*args, **kwargs)
                code = str(response.status_code)
                return response
            finally:
                metrics.V2_REST_REQUESTS.labels(method=method, code=code).inc()
                metrics.V2_REST_DURATION.labels(method=method).observe(time.perf_counter() - started)

        return timed

    return wrap


def error_response(exc: BaseException, probe: bool = False) -> Response:
    """The protocol's error answer for an exception a request raised (a bug: 500 `internal`). A `probe`
    (metadata, model ready) answered 503 while the model loads is not a request error, as GET /model's is not."""
    if isinstance(exc, NotLoaded):  # /livez fails too: the pod is restarted; not a request error
        return JSONResponse({"error": str(exc), "reason": "load_failed"}, status_code=503, headers={"Retry-After": "1"})
    error = refusal(exc)
    if not (probe and error.reason == "loading"):
        metrics.count_error(error.reason)
    status = v2.protocol_status(error)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": error.message, "reason": error.reason}, status_code=status, headers=headers)


_TAG = ["Open Inference Protocol (KServe v2)"]
_UNKNOWN = {404: "no model of that name (or version) here", 503: "the model is still loading"}
_INFER_ERRORS = {
    400: "a bad tensor, datatype, shape, parameter or image; images of different sizes in full or tile mode",
    404: _UNKNOWN[404],
    408: "the request body did not arrive in time",
    413: "body, pixels, tiles or images over the limit",
    500: "inference produced NaN or Inf (an unstable checkpoint)",
    503: "overloaded, or the model still loading; retry after Retry-After",
}
_MODEL_NOT_READY = {
    "description": "the model is still loading (an error body) or not ready",
    "content": {
        "application/json": {
            "schema": {"anyOf": [{"$ref": f"#/components/schemas/{m}"} for m in ("PCError", "V2ModelReady")]}
        }
    },
}
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_INFER_BODY = {  # read by parse_request (JSON, or JSON then the binary tensors), not by FastAPI
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}}, **_BINARY},
}


def add_routes(api: FastAPI, pipeline: PipelineFn) -> None:
    """Adds the /v2 routes to `api`; `pipeline()` is the worker's Pipeline once the service has built it.
    (Added to the app itself, not as an included router: BentoML's route listing reads the app's routes.)"""

    def current() -> Pipeline:
        found = pipeline()
        if found is None:
            raise RequestError(503, "loading", "the service is starting; retry in a few seconds")
        return found

    @api.get(
        "/v2",
        summary="Server metadata",
        tags=_TAG,
        operation_id="v2_server_metadata",
        response_model=schemas.V2ServerMetadata,
    )
    @measured("ServerMetadata")
    async def server_metadata() -> Response:
        return JSONResponse(v2.server_metadata())

    # The health answers: the status says it (tritonclient and Kubernetes read only that), and the body says it
    # as KServe's protocol document writes it ({"live": bool}, {"ready": bool}), which kserve's
    # InferenceRESTClient parses (an empty body made its is_server_live raise JSONDecodeError).
    @api.get(
        "/v2/health/live",
        summary="Live (as /livez)",
        tags=_TAG,
        operation_id="v2_live",
        response_model=schemas.V2Live,
        responses={503: {"model": schemas.V2Live, "description": "not live"}},
    )
    @measured("ServerLive")
    async def live() -> Response:
        found = pipeline()
        alive = found is None or found.alive
        return JSONResponse({"live": alive}, status_code=200 if alive else 503)

    @api.get(
        "/v2/health/ready",
        summary="Ready (as /readyz)",
        tags=_TAG,
        operation_id="v2_ready",
        response_model=schemas.V2Ready,
        responses={503: {"model": schemas.V2Ready, "description": "not ready"}},
    )
    @measured("ServerReady")
    async def ready() -> Response:
        found = pipeline()
        up = found is not None and found.ready
        return JSONResponse({"ready": up}, status_code=200 if up else 503)

    @measured("ModelMetadata")
    async def model_metadata(request: Request, name: str, version: str | None) -> Response:
        try:
            host = v2.find_model(current(), name, version)
        except Exception as exc:
            return error_response(exc, probe=True)
        return JSONResponse(v2.model_metadata(host))

    @measured("ModelReady")
    async def model_ready(request: Request, name: str, version: str | None) -> Response:
        try:
            found = current()
            v2.find_model(found, name, version)
        except Exception as exc:
            return error_response(exc, probe=True)
        return JSONResponse({"name": name, "ready": found.ready}, status_code=200 if found.ready else 503)

    @measured("ModelInfer")
    async def infer(request: Request, name: str, version: str | None) -> Response:
        try:
            found = current()
            host = v2.find_model(found, name, version)
            body = request.scope.get(BODY_KEY, b"")
            limit = found.settings.max_body_bytes
            # JSON numbers become Python objects before they are an array: a large body is parsed on a thread,
            # charged to the decoding budget (BodyGate charged the body itself); so is a compressed one.
            if len(body) <= INLINE_BODY_BYTES and CONTENT_ENCODING not in request.headers:
                header, inputs, wanted, binary = parse_request(body, request.headers, limit)
            else:
                size = limit if CONTENT_ENCODING in request.headers else len(body)
                async with found.decoding.hold(JSON_PARSE_FACTOR * size, "parsing this request"):
                    header, inputs, wanted, binary = await run(False, parse_request, body, request.headers, limit)
            done = await v2.infer(found, inputs, header.get("parameters") or {}, wanted)
        except Exception as exc:
            return error_response(exc)
        answer = {"model_name": host.config.name, "model_version": v2.model_version(host)}
        if "id" in header:
            answer["id"] = header["id"]
        answer["parameters"] = done.parameters
        inline = sum(t.array.size for t in done.outputs) <= INLINE_VALUES
        return await run(inline, encode_response, answer, done.outputs, binary)

    # Each model route twice: without and with a version.
    for path, tag in (("/v2/models/{name}", ""), ("/v2/models/{name}/versions/{version}", "_version")):
        versioned = bool(tag)
        api.get(
            path,
            summary="Model metadata",
            tags=_TAG,
            operation_id=f"v2_model_metadata{tag}",
            response_model=schemas.V2ModelMetadata,
            responses=openapi.errors(_UNKNOWN),
        )(_path_parameters(model_metadata, versioned))
        api.get(
            path + "/ready",
            summary="Model ready",
            tags=_TAG,
            operation_id=f"v2_model_ready{tag}",
            response_model=schemas.V2ModelReady,
            responses={**openapi.errors({404: _UNKNOWN[404]}), 503: _MODEL_NOT_READY},
        )(_path_parameters(model_ready, versioned))
        api.post(
            path + "/infer",
            summary="Inference",
            tags=_TAG,
            operation_id=f"v2_infer{tag}",
            response_model=schemas.V2InferResponse,
            responses={
                200: {
                    "description": "the outputs; with binary outputs the JSON is followed by their bytes",
                    "content": _BINARY,
                },
                **openapi.errors(_INFER_ERRORS),
            },
            openapi_extra={"requestBody": _INFER_BODY},
        )(_path_parameters(infer, versioned))


def _path_parameters(handler: Handler, versioned: bool) -> Handler:
    """handler(request, name, version) as a route whose parameters are its path's: FastAPI documents a
    handler's parameters, and a path parameter cannot be optional."""
    if versioned:

        async def call(request: Request, name: str, version: str) -> Response:
            return await handler(request, name, version)

    else:

        async def call(request: Request, name: str) -> Response:  # type: ignore[misc]
            return await handler(request, name, None)

    return call


def parse_request(
    body: bytes, headers, limit: int
) -> tuple[dict, list[v2.InputTensor], list[str] | None, dict[str, bool]]:
    """(the JSON header, the inputs, the outputs asked for or None, binary or not per output name). A gzip or
    deflate body (tritonclient's request_compression_algorithm) is decompressed first, to at most `limit`
    bytes."""
    body = _decompressed(body, headers.get(CONTENT_ENCODING, ""), limit)
    length_text = headers.get(HEADER_LENGTH)
    if length_text is None:
        header_bytes, binary = body, b""
    else:
        digits = length_text.isascii() and length_text.isdigit() and len(length_text) <= 18
        if not digits or int(length_text) > len(body):
            raise v2.bad(f"Inference-Header-Content-Length {length_text[:20]!r} is not a length within the body")
        header_bytes, binary = body[: int(length_text)], body[int(length_text) :]
    if not header_bytes:
        raise v2.bad("the request body is empty: send the inference request's JSON")
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, ValueError) as exc:
        raise v2.bad(f"the request is not JSON ({exc})"[:300]) from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise v2.bad('the request must be a JSON object with an "inputs" list')
    if not isinstance(header.get("parameters") or {}, dict):
        raise v2.bad('"parameters" must be an object')
    if not isinstance(header.get("id", ""), str):
        raise v2.bad('"id" must be a string')
    inputs, at = [], 0
    for item in header["inputs"]:
        tensor, used = _input(item, binary, at)
        inputs.append(tensor)
        at += used
    if at != len(binary):
        raise v2.bad(f"the binary data has {len(binary) - at} bytes beyond the inputs' binary_data_size")
    default = _flag(header.get("parameters") or {}, "binary_data_output", False)
    wanted, binary_outputs = None, {}
    if header.get("outputs") is not None:
        if not isinstance(header["outputs"], list) or not all(isinstance(o, dict) for o in header["outputs"]):
            raise v2.bad('"outputs" must be a list of objects with a "name"')
        wanted = [str(o.get("name")) for o in header["outputs"]]
        for o in header["outputs"]:
            what = f"output {str(o.get('name'))[:40]!r}"
            parameters = _parameters(o, what)
            v2.check_tensor_parameters(what, parameters, ("binary_data",))
            binary_outputs[str(o.get("name"))] = _flag(parameters, "binary_data", default)
    return header, inputs, wanted, _Default(binary_outputs, default)


def _decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise v2.bad(f"Content-Encoding {encoding[:40]!r} is not supported: send gzip, deflate or none")
    inflate = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # a gzip or a zlib stream, told by its header
    try:
        out = inflate.decompress(body, limit + 1)  # never more than the limit, however the stream is made
    except zlib.error as exc:
        raise v2.bad(f"the {encoding} body cannot be decompressed ({exc})") from None
    if len(out) > limit:
        raise RequestError(
            413, "too_large", f"the request body decompresses to more than {limit} bytes (PC_MAX_BODY_BYTES)"
        )
    return out


def _parameters(item: dict, what: str) -> dict:
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise v2.bad(f'{what}: "parameters" must be an object')
    return parameters


def _flag(parameters: dict, name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise v2.bad(f"parameter {name!r} must be true or false, got {str(value)[:40]!r}")
    return value


class _Default(dict):
    """Per-output binary flags with the request's binary_data_output for outputs not named."""

    def __init__(self, flags: dict[str, bool], default: bool) -> None:
        super().__init__(flags)
        self.default = default

    def __missing__(self, key: str) -> bool:
        return self.default


def _input(item: object, binary: bytes, at: int) -> tuple[v2.InputTensor, int]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise v2.bad('each input must be an object with "name", "datatype", "shape" and "data"')
    name = item["name"]
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise v2.bad(f"input {name!r}: shape must be a list of non-negative integers")
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise v2.bad(f"input {name!r}: datatype must be a string (BYTES or FP32)")
    parameters = _parameters(item, f"input {name!r}")
    v2.check_tensor_parameters(f"input {name!r}", parameters, ("binary_data_size",))
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or at + size > len(binary):
            raise v2.bad(f"input {name!r}: binary_data_size {size!r} is not within the binary data")
        raw = binary[at : at + size]
        data = v2.split_bytes(raw, name) if datatype == "BYTES" else v2.fp32_from_raw(raw, name)
        return v2.InputTensor(name, datatype, tuple(shape), data), size
    if not isinstance(item.get("data"), list):
        raise v2.bad(f'input {name!r} has neither a "data" list nor a binary_data_size parameter')
    values = item["data"]
    data = v2.base64_elements(values, name) if datatype == "BYTES" else v2.fp32_from_list(values, name)
    return v2.InputTensor(name, datatype, tuple(shape), data), 0


def encode_response(answer: dict, outputs: list[v2.OutputTensor], binary: dict[str, bool]) -> Response:
    """JSON, or JSON followed by the binary outputs' bytes (the binary tensor data extension)."""
    blobs = []
    described = []
    for t in outputs:
        out = {"name": t.name, "datatype": t.datatype, "shape": list(t.array.shape)}
        if binary[t.name]:
            raw = t.raw()
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            out["data"] = t.array.ravel().tolist()
        described.append(out)
    head = json.dumps({**answer, "outputs": described}, separators=(",", ":")).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
