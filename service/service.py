"""PCEncoder: the image-encoding service (BentoML 1.4). `bentoml serve service.service:PCEncoder`.

Thin transport over the model: in, the form (forms) -> validated options (options) -> preprocessed
rows (inputs); the host's batched `model.infer`; out, JSON with arrays and PNGs (responses). Settings
come from PC_* environment variables (service.settings); `pc-serve` sets them from its flags.

Routes, typed, in one FastAPI app (APP) mounted into the service: POST /encode and POST /encode_batch
(handlers that call this worker's PCEncoder, bentoml.get_current_service()), GET / (the explorer page), GET /docs
(Swagger UI, BentoML's copy without its trackers), GET /model, GET /model/basis, GET /docs.json (the
OpenAPI document generated from the routes' models, service.openapi) and the Open Inference Protocol under
/v2 (service.v2_rest.add_routes); the protocol over gRPC on PC_GRPC_PORT (service.v2_grpc, started in each
worker); and BentoML's /livez, /readyz and /metrics. The model loads on a thread
(service.health), so the probes answer at once: /readyz 503 until the model is loaded, moved to its
device and warmed up, then 200; /livez 200 unless the load failed or the batcher's task has died (then
503, so Kubernetes restarts the pod). BentoML's request metrics name a request's path only when it is one of
these (the served model's own /v2 paths once it has loaded); any other path is "/(unknown)" there
(service.endpoints, filled here; pc-serve's protocol sets the label, endpoints.RestorePath undoes it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import bentoml
import torch
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from pcmodel import PCModel

from . import endpoints, jsonbody, metrics, openapi, schemas, v2, v2_rest
from .batching import Settled
from .budget import Budget
from .errors import refusal
from .forms import Part
from .health import ModelLoader, NotLoaded
from .host import ModelHost
from .inputs import Prepared
from .middleware import BODY_KEY, CONTENT_TYPE_KEY, ApiKey, BodyGate, HeadLimit, JsonErrors, router_error
from .options import MAX_SNAPSHOTS, EncodeOptions, read_request, start_latents
from .pipeline import Pipeline, run
from .responses import encode_result, snapshot_payload, snapshot_steps
from .settings import Settings
from .v2_grpc import GrpcServer

logger = logging.getLogger(__name__)

# BentoML wraps every request in OpenTelemetry spans (about a dozen per request) even with no exporter
# configured; with the SDK off they cost nothing (~0.5 ms less per request on 2 cores). The SDK reads
# this when the app builds its tracers, after this import. Set OTEL_SDK_DISABLED=false to trace.
os.environ.setdefault("OTEL_SDK_DISABLED", "true")
# With the SDK off, BentoML's tracing middleware still reads every request's URL, headers and attributes
# for spans that go nowhere (~0.15 ms a request, measured side by side): a URL it excludes skips all that.
# Tracing needs the SDK on anyway: with OTEL_SDK_DISABLED=false this sets nothing and BentoML's tracing config applies.
TRACING = {"excluded_urls": [".*"]} if os.environ["OTEL_SDK_DISABLED"].strip().lower() == "true" else {}

SETTINGS = Settings.from_env()
API_ROUTES = ("/encode", "/encode_batch")
_pipelines: list[Pipeline] = []  # this worker process's one Pipeline, once built (for the mounted routes)
# This worker's memory budgets (service.budget): request bodies held, images being decoded.
BODIES = Budget("bodies", SETTINGS.inflight_bytes, SETTINGS.budget_wait_ms / 1000)
DECODING = Budget("decoding", SETTINGS.decoding_bytes, SETTINGS.budget_wait_ms / 1000, trim=True)


# Every route of ours, typed, in one FastAPI app mounted into the service; GET /docs.json is generated from
# it (service.openapi). Its own /docs, /redoc and /openapi.json are off: ours load nothing from other hosts.
APP = FastAPI(title="PCEncoder", description=openapi.INFO, openapi_url=None, docs_url=None, redoc_url=None)
_SERVICE_TAG = ["Service APIs"]
_PAGE_TAG = ["Infrastructure"]


@APP.exception_handler(StarletteHTTPException)
async def _router_error(request: Request, exc: StarletteHTTPException) -> Response:
    """The router's 404 and 405 (a path we have, another method) as every other error body of ours."""
    if exc.status_code in (404, 405):
        body = router_error(exc.status_code, request.method, request.url.path)
    else:
        body = {"error": str(exc.detail), "reason": "bad_request"}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


@bentoml.service(
    name="PCEncoder",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.request_timeout_s, "max_concurrency": SETTINGS.max_concurrency or None},
    tracing=TRACING,
    logging={"access": {"enabled": SETTINGS.access_log}},
)
class PCEncoder:
    """Encodes images with a Rao & Ballard predictive-coding network: latents, reconstruction, error map."""

    def __init__(self) -> None:
        self.settings = SETTINGS
        # Load, move to the device, warm up on a thread: /readyz waits for this.
        self.pipeline = Pipeline(SETTINGS, ModelLoader(_load_host), DECODING)
        _pipelines.append(self.pipeline)
        self.grpc: GrpcServer | None = None  # started on the event loop (start_grpc)

    @property
    def host(self) -> ModelHost:
        return self.pipeline.host

    def __is_ready__(self) -> bool:
        return self.pipeline.ready

    def __is_alive__(self) -> bool:
        return self.pipeline.alive

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        """The Open Inference Protocol over gRPC, on this worker's event loop (service.v2_grpc)."""
        if SETTINGS.grpc_port:
            self.grpc = GrpcServer(lambda: self.pipeline, SETTINGS, BODIES, SETTINGS.secret())
            await self.grpc.start()

    @bentoml.on_shutdown
    async def close(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop()
        if self.pipeline.loader.loaded:
            # On the loop (the batcher's task is cancelled from its own loop); it may wait for the stability check,
            # a second at most after start, when nothing is served any more.
            self.host.close()

    async def encode(self, request: Request) -> Response:
        """POST /encode."""
        started = time.perf_counter()
        try:
            images, options = read_request(*_body(request), "image", 1, self.host.config, self.settings)
            result, settled, small = await self._encode(images[0], options)
        except Exception as exc:
            return _error_response(exc)
        response = await _json_response(result, inline=small)
        # Where the time went, for clients and the benchmark (the model's own time vs. the service's).
        response.headers["Server-Timing"] = (
            f"queue;dur={settled.wait_seconds * 1000:.3f}, model;dur={settled.model_seconds * 1000:.3f}, "
            f"total;dur={(time.perf_counter() - started) * 1000:.3f}"
        )
        return response

    async def encode_batch(self, request: Request) -> Response:
        """POST /encode_batch."""
        try:
            images, options = read_request(
                *_body(request), "images", self.settings.max_batch_images, self.host.config, self.settings
            )
        except Exception as exc:
            return _error_response(exc)
        results = await asyncio.gather(*(self._encode_item(part, options) for part in images))
        return await _json_response({"model": self.host.ref, "results": results})

    async def _encode(self, part: Part, options: EncodeOptions) -> tuple[dict, Settled, bool]:
        decoded = await self.pipeline.decode(part, options)
        start = _start_rows(options, decoded.prepared, self.host.model)
        settled = await self.pipeline.settle(decoded.prepared.rows, options, start)
        host = self.host
        result = await run(decoded.small, encode_result, decoded.prepared, settled, options, host.ref, host.config)
        result.update(host.dynamics(options.solver, "given" if start is not None else options.init))
        if "snapshots" in options.outputs:
            result["snapshots"] = await self._snapshots(decoded.prepared, options, start, decoded.small)
        return result, settled, decoded.small

    async def _snapshots(
        self, prepared: Prepared, options: EncodeOptions, start: list[torch.Tensor] | None, small: bool
    ) -> list[dict]:
        """outputs=snapshots: the state after each of up to MAX_SNAPSHOTS step counts, each an exact run of
        that many steps from the same start with the same dynamics (a momentum solver's velocity is part of
        its state, so a run cannot be resumed from latents alone); at most ~10x the request's own steps."""
        out = []
        for step in snapshot_steps(options.steps, min(MAX_SNAPSHOTS, options.steps)):
            settled = await self.host.infer(prepared.rows, step, options.solver, options.init, start)
            out.append(await run(small, snapshot_payload, prepared, settled, self.host.config))
        return out

    async def _encode_item(self, part: Part, options: EncodeOptions) -> dict:
        try:
            return (await self._encode(part, options))[0]
        except Exception as exc:
            error = refusal(exc)
            metrics.count_error(error.reason)
            return {"error": error.message, "status": error.status, "reason": error.reason}


def _load_host() -> ModelHost:
    """The worker's model (on the loading thread); its /v2 routes, with its name and version, become known paths
    (service.endpoints: BentoML's request metrics label them as themselves from now on)."""
    host = ModelHost(SETTINGS)
    endpoints.KNOWN.add(
        endpoints.route_paths(APP.routes, "/v2/models/", name=host.config.name, version=v2.model_version(host))
    )
    return host


# ---- the routes (typed handlers of APP; the methods above do the work) -----------------------------


def _service() -> PCEncoder:
    """This worker's service object (BentoML makes one per worker, before it serves)."""
    return bentoml.get_current_service()


@APP.post(
    "/encode",
    summary="Encode one image",
    operation_id="encode",
    tags=_SERVICE_TAG,
    response_model=schemas.PCEncodeResult,
    responses={200: {"headers": openapi.SERVER_TIMING}, **openapi.errors(openapi.ENCODE_ERRORS)},
    openapi_extra={"requestBody": schemas.form_body(schemas.EncodeForm, SETTINGS)},
)
async def encode(request: Request) -> Response:
    """Encode one image: its latents, reconstruction, error map and energy (multipart form)."""
    return await _service().encode(request)


@APP.post(
    "/encode_batch",
    summary="Encode several images; per-image errors are data",
    operation_id="encode_batch",
    tags=_SERVICE_TAG,
    response_model=schemas.PCBatchResult,
    responses=openapi.errors(openapi.ENCODE_ERRORS),
    openapi_extra={"requestBody": schemas.form_body(schemas.EncodeBatchForm, SETTINGS)},
)
async def encode_batch(request: Request) -> Response:
    """Encode several images (`images`, repeated) with shared options; a bad image is an entry, not a failure."""
    return await _service().encode_batch(request)


def _start_rows(options: EncodeOptions, prepared: Prepared, model: PCModel) -> list[torch.Tensor] | None:
    """The `start` part's latents shaped as the rows' (a leading axis of 1 added where the start left it out),
    refused with a 422 where its geometry or shapes differ from this image's (options.start_latents)."""
    if options.start is None:
        return None
    rows = prepared.rows
    shapes = [(rows.shape[0], *s) for s in model.latent_shapes(tuple(rows.shape[-2:]))]
    return [
        torch.from_numpy(a) for a in start_latents(options.start, options.size_mode, prepared.shown.shape[-2:], shapes)
    ]


def _body(request: Request) -> tuple[bytes, str]:
    """The body BodyGate read (and checked against the limits) and its content type."""
    scope = request.scope
    return scope.get(BODY_KEY, b""), scope.get(CONTENT_TYPE_KEY, "")


def _error_response(exc: Exception) -> Response:
    """A flat {"error": ..., "reason": ...} body with the error's status, counted by reason."""
    if isinstance(exc, NotLoaded):  # /livez fails too: not a request error, the pod is restarted
        return JSONResponse({"error": str(exc), "reason": "load_failed"}, status_code=503)
    error = refusal(exc)
    metrics.count_error(error.reason)
    if error.status >= 500:
        _warn_limited(error.reason, error.message)
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse({"error": error.message, "reason": error.reason}, status_code=error.status, headers=headers)


_WARN_EVERY_S = 10.0
_warned: dict[str, tuple[float, int]] = {}  # reason -> (when last logged, how many not logged since)


def _warn_limited(reason: str, message: str) -> None:
    """A WARNING per reason at most every _WARN_EVERY_S: an overload makes hundreds of 503s a second,
    which pc_request_errors_total counts; the log only needs to say that it is happening."""
    now = time.monotonic()
    last, suppressed = _warned.get(reason, (-_WARN_EVERY_S, 0))
    if now - last < _WARN_EVERY_S:
        _warned[reason] = (last, suppressed + 1)
        return
    more = f" (and {suppressed} more like it in the last {now - last:.0f} s)" if suppressed else ""
    logger.warning("%s: %s%s", reason, message, more)
    _warned[reason] = (now, 0)


async def _json_response(payload: dict, inline: bool = False) -> Response:
    return Response(await run(inline, jsonbody.dumps, payload), media_type="application/json")


# ---- the pages, the model card and the document ---------------------------------------------------

STATIC = Path(__file__).parent / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}
# The pages load nothing from another host and run no inline script or style: everything comes from
# this server, and images from the page's own blob: and data: URLs (the PNGs of a response).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# The files are a few kilobytes: read once, and looked up by name only (no paths from the request).
_STATIC_FILES = {
    path.name: (path.read_bytes(), _MEDIA_TYPES[path.suffix])
    for path in STATIC.iterdir()
    if path.is_file() and path.suffix in _MEDIA_TYPES
}


# Swagger UI (GET /docs, BentoML's copy) sets inline styles on its own elements; it runs no inline script.
DOCS_HEADERS = {
    **PAGE_HEADERS,
    "Content-Security-Policy": PAGE_HEADERS["Content-Security-Policy"] + "; style-src 'self' 'unsafe-inline'",
}


def _page_response(name: str, headers: dict[str, str] = PAGE_HEADERS) -> Response:
    found = _STATIC_FILES.get(name)
    if found is None:
        return JSONResponse({"error": f"there is no file {name[:100]!r} here", "reason": "not_found"}, 404)
    content, media_type = found
    return Response(content, media_type=media_type, headers={**headers, "Cache-Control": "no-cache"})


_HTML = {200: {"description": "an HTML page", "content": {"text/html": {}}}}
_LOADING = openapi.errors({503: "the model is still loading"})


@APP.get(
    "/",
    summary="The explorer page: encode a photo and see its maps, latents and energy",
    tags=_PAGE_TAG,
    operation_id="page_index",
    response_class=Response,
    responses=_HTML,
)
async def _explorer() -> Response:
    return _page_response("index.html")


@APP.get(
    "/docs",
    summary="This API in Swagger UI",
    tags=_PAGE_TAG,
    operation_id="page_docs",
    response_class=Response,
    responses=_HTML,
)
async def _api_browser() -> Response:
    return _page_response("docs.html", DOCS_HEADERS)


@APP.get("/static/{name}", include_in_schema=False)
async def _static(name: str) -> Response:
    return _page_response(name)


def _loaded_host() -> ModelHost | None:
    return _pipelines[0].loader.value if _pipelines else None


def _still_loading() -> Response:
    return JSONResponse({"error": "the model is still loading", "reason": "loading"}, status_code=503)


@APP.get(
    "/model",
    summary="The model card",
    tags=_SERVICE_TAG,
    operation_id="model_card",
    response_model=schemas.PCModelCard,
    responses=_LOADING,
)
async def _model_card() -> Response:
    host = _loaded_host()
    if host is None:
        return _still_loading()
    return JSONResponse(host.card())


@APP.get(
    "/model/basis",
    summary="The level-1 receptive fields as a PNG grid, each on its own scale, zero at mid-grey",
    tags=_SERVICE_TAG,
    operation_id="model_basis",
    response_class=Response,
    responses={
        200: {"description": "a PNG", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
        **_LOADING,
    },
)
async def _basis() -> Response:
    host = _loaded_host()
    if host is None:
        return _still_loading()
    png = await asyncio.to_thread(host.basis_png)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})


@APP.get(
    "/docs.json",
    summary="This OpenAPI document",
    tags=_PAGE_TAG,
    operation_id="openapi_document",
    response_class=JSONResponse,
    responses={200: {"description": "OpenAPI 3 JSON"}},
)
async def _docs() -> Response:
    return JSONResponse(openapi.document(APP, PCEncoder.openapi_spec.asdict(), SETTINGS))


# The Open Inference Protocol's REST routes, /v2/...
v2_rest.add_routes(APP, lambda: _pipelines[0] if _pipelines else None)
# Mounted at "/", it answers only its own routes (BentoML's PassiveMount passes anything else on), and
# it is matched before BentoML's own / (its API browser, which loads a tag manager from another host)
# and /docs.json, which it replaces.
PCEncoder.mount_asgi_app(APP, path="/", name="pc-routes")
# The paths BentoML's request metrics may name (service.endpoints; the model's /v2 paths once it has loaded):
# our routes without parameters and the static files; any other path is labelled "/(unknown)".
endpoints.KNOWN.add(endpoints.route_paths(APP.routes) | {f"/static/{name}" for name in _STATIC_FILES})
# Ours run in this order. First: the real path back where service.headguard put the label in its place.
PCEncoder.add_asgi_middleware(endpoints.RestorePath)
PCEncoder.add_asgi_middleware(HeadLimit, max_bytes=SETTINGS.max_header_bytes)
# The key is checked before any body is read; a missing key never reaches BodyGate.
if (_KEY := SETTINGS.secret()) is not None:
    PCEncoder.add_asgi_middleware(ApiKey, key=_KEY)
# The body must arrive a little before BentoML's request timeout (its 504) would fire: 408 instead.
PCEncoder.add_asgi_middleware(
    BodyGate,
    paths=API_ROUTES,
    pattern=v2_rest.INFER_PATH,
    max_bytes=SETTINGS.max_body_bytes,
    budget=BODIES,
    body_timeout_s=SETTINGS.request_timeout_s * 0.9,
)
PCEncoder.add_asgi_middleware(JsonErrors)  # Starlette's plain-text 404 and 405 as our JSON error body
