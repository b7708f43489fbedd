"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on PC_GRPC_PORT (0: off).

It runs inside each worker process, on the worker's event loop (grpc.aio), so it shares the worker's
model, batcher, memory budgets, limits and metrics with the HTTP routes; requests of both kinds batch
together. The stubs are generated from service/v2proto/grpc_predict_v2.proto (the command is there).
Inputs come as `contents` or `raw_input_contents`; outputs go back as `raw_output_contents`.

Limits: a ModelInfer message over PC_MAX_BODY_BYTES is refused (RESOURCE_EXHAUSTED) and counted as
`too_large`, as /encode's 413 is. gRPC reads a message whole before the handler runs, so it lets in messages up
to MESSAGE_CEILING times the limit for the handler to refuse; a larger one gRPC refuses itself from its length
prefix, reading none of it (RESOURCE_EXHAUSTED, uncounted: the handler never runs, and on the server it cannot
be told from a client that goes away mid-message). Metadata over PC_MAX_HEADER_BYTES is refused by gRPC
(RESOURCE_EXHAUSTED). A request is charged to the body budget as /encode's body is. Errors
carry the HTTP routes' messages with the protocol's codes: INVALID_ARGUMENT (400), NOT_FOUND (404),
RESOURCE_EXHAUSTED (413), UNAVAILABLE (503), counted in pc_request_errors_total like theirs.

With PC_API_KEY: every call but ServerLive and ServerReady needs the metadata `authorization: Bearer <key>`
(UNAUTHENTICATED otherwise, counted as `unauthorized`).

Stopping: on SIGTERM the server stops taking new calls at once, while HTTP stops listening, and the calls
in flight finish (up to PC_REQUEST_TIMEOUT_S) before the worker exits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Callable

import grpc
import numpy as np

from . import metrics, v2
from .budget import Budget
from .errors import RequestError, refusal
from .health import NotLoaded
from .middleware import bearer_matches
from .pipeline import Pipeline
from .settings import Settings
from .v2proto import grpc_predict_v2_pb2 as pb
from .v2proto import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

PipelineFn = Callable[[], Pipeline | None]
# gRPC's own message limit, in multiples of PC_MAX_BODY_BYTES: messages up to it reach the handler, which refuses
# and counts those over the limit; the memory one such call holds for a moment is at most this many limits.
MESSAGE_CEILING = 2
GRPC_INT_MAX = 2**31 - 1  # gRPC's integer channel arguments are C ints

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def _parameter(value: pb.InferParameter) -> object:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def read_inputs(request: pb.ModelInferRequest) -> list[v2.InputTensor]:
    """The inputs as the protocol module takes them, from `raw_input_contents` or each input's `contents`."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise v2.bad(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input")
    out = []
    for i, t in enumerate(request.inputs):
        shape = tuple(t.shape)
        if any(n < 0 for n in shape):
            raise v2.bad(f"input {t.name!r}: shape must be non-negative integers")
        # binary_data_size: KServe's gRPC client sends it with raw contents (the REST extension's name; no effect here)
        v2.check_tensor_parameters(f"input {t.name!r}", t.parameters, ("binary_data_size",))
        if raw and t.HasField("contents"):
            raise v2.bad(f"input {t.name!r} has both contents and raw_input_contents; send its data once")
        data: list[bytes] | np.ndarray
        if raw:
            data = v2.split_bytes(raw[i], t.name) if t.datatype == "BYTES" else v2.fp32_from_raw(raw[i], t.name)
        elif t.datatype == "BYTES":
            data = list(t.contents.bytes_contents)
        else:
            data = np.asarray(t.contents.fp32_contents, dtype=np.float32)
        out.append(v2.InputTensor(t.name, t.datatype, shape, data))
    return out


def _measured(call: Callable) -> Callable:
    """Count the call in pc_grpc_requests_total{method, code} and time it in pc_grpc_request_duration_seconds."""
    name = call.__name__

    @functools.wraps(call)
    async def measured(self, request, context):
        started = time.perf_counter()
        code = "OK"
        try:
            return await call(self, request, context)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed: not a bug
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except BaseException:
            code = (context.code() or grpc.StatusCode.UNKNOWN).name  # what abort() set; UNKNOWN for a bug
            raise
        finally:
            metrics.GRPC_REQUESTS.labels(method=name, code=code).inc()
            metrics.GRPC_DURATION.labels(method=name).observe(time.perf_counter() - started)

    return measured


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six calls of the protocol, over the worker's Pipeline."""

    def __init__(self, pipeline: PipelineFn, bodies: Budget, max_message_bytes: int, key: bytes | None = None) -> None:
        self._pipeline = pipeline
        self._bodies = bodies
        self._max_message_bytes = max_message_bytes
        self._key = key

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        """With an API key: UNAUTHENTICATED unless the call's metadata has `authorization: Bearer <key>`."""
        if self._key is None:
            return
        header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        if not bearer_matches(header, self._key):
            metrics.count_error("unauthorized")
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this service needs an API key: send the metadata `authorization: Bearer <key>`",
            )

    def _current(self) -> Pipeline:
        found = self._pipeline()
        if found is None:
            raise RequestError(503, "loading", "the service is starting; retry in a few seconds")
        return found

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException, probe: bool = False) -> None:
        """Abort with the protocol's code; counted unless a `probe` (metadata) meets a loading model."""
        if isinstance(exc, NotLoaded):
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        error = refusal(exc)  # a bug: INTERNAL, its traceback logged
        if not (probe and error.reason == "loading"):
            metrics.count_error(error.reason)
        status = v2.protocol_status(error)
        await context.abort(CODES.get(status, grpc.StatusCode.INTERNAL), error.message)

    @_measured
    async def ServerLive(self, request, context):  # the protocol names its calls
        found = self._pipeline()
        return pb.ServerLiveResponse(live=found is None or found.alive)

    @_measured
    async def ServerReady(self, request, context):
        found = self._pipeline()
        return pb.ServerReadyResponse(ready=found is not None and found.ready)

    @_measured
    async def ModelReady(self, request, context):
        await self._authorize(context)
        try:
            found = self._current()
            v2.find_model(found, request.name, request.version)
        except RequestError as exc:
            if exc.reason in ("loading", "not_found"):  # as Triton answers: not ready, no error
                return pb.ModelReadyResponse(ready=False)
            await self._fail(context, exc)
        except Exception as exc:
            await self._fail(context, exc)
        return pb.ModelReadyResponse(ready=found.ready)

    @_measured
    async def ServerMetadata(self, request, context):
        await self._authorize(context)
        return pb.ServerMetadataResponse(**v2.server_metadata())

    @_measured
    async def ModelMetadata(self, request, context):
        await self._authorize(context)
        try:
            host = v2.find_model(self._current(), request.name, request.version)
        except Exception as exc:
            await self._fail(context, exc, probe=True)
        meta = v2.model_metadata(host)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    @_measured
    async def ModelInfer(self, request, context):
        await self._authorize(context)
        length = request.ByteSize()  # the message's length on the wire
        size = 2 * length  # the message, and the tensors read from it (as BodyGate charges a body)
        held = 0
        try:
            if length > self._max_message_bytes:
                raise RequestError(
                    413,
                    "too_large",
                    f"the request message is {length} bytes, over the limit of {self._max_message_bytes} bytes "
                    "(PC_MAX_BODY_BYTES); send a smaller image or fewer images",
                )
            await self._bodies.acquire(size, "this request")
            held = size
            found = self._current()
            host = v2.find_model(found, request.model_name, request.model_version)
            parameters = {k: _parameter(v) for k, v in request.parameters.items()}
            for o in request.outputs:  # only what this server does: no classification, no shared memory
                v2.check_tensor_parameters(f"output {o.name!r}", o.parameters, ("binary_data",))
            wanted = [o.name for o in request.outputs] or None
            done = await v2.infer(found, read_inputs(request), parameters, wanted)
        except Exception as exc:
            await self._fail(context, exc)
        finally:
            if held:
                self._bodies.release(held)
        return pb.ModelInferResponse(
            model_name=host.config.name,
            model_version=v2.model_version(host),
            id=request.id,
            parameters={k: pb.InferParameter(string_param=v) for k, v in done.parameters.items()},
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=list(t.array.shape))
                for t in done.outputs
            ],
            raw_output_contents=[t.raw() for t in done.outputs],
        )


class GrpcServer:
    """The gRPC server of one worker: started on the running event loop, stopped gracefully."""

    def __init__(self, pipeline: PipelineFn, settings: Settings, bodies: Budget, key: bytes | None = None) -> None:
        options = [
            ("grpc.max_receive_message_length", min(MESSAGE_CEILING * settings.max_body_bytes, GRPC_INT_MAX)),
            ("grpc.max_send_message_length", -1),  # what we send is bounded by what the limits let in
            ("grpc.max_metadata_size", settings.max_header_bytes),
            # Several workers share the port as they share HTTP's (the kernel spreads the connections); one
            # worker binds it alone, so a port already in use fails the start loudly.
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ]
        self.server = grpc.aio.server(options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            Servicer(pipeline, bodies, settings.max_body_bytes, key), self.server
        )
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.port = self.server.add_insecure_port(f"{host}:{settings.grpc_port}")
        self.grace_s = settings.request_timeout_s
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        logger.info("gRPC (the Open Inference Protocol) on port %d", self.port)
        # uvicorn's own SIGTERM/SIGINT handler stops HTTP; chained to it, this stops gRPC taking new calls
        # at the same moment, so the drain waits for both kinds of requests in flight, once.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if callable(previous):
                signal.signal(sig, self._chained(loop, previous))

    def _chained(self, loop: asyncio.AbstractEventLoop, previous: Callable) -> Callable:
        def handler(signum: int, frame: object) -> None:
            previous(signum, frame)
            loop.call_soon_threadsafe(self.begin_stop)

        return handler

    def begin_stop(self) -> None:
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self.server.stop(self.grace_s))

    async def stop(self) -> None:
        """Stop taking calls; wait for those in flight (at most the request timeout)."""
        self.begin_stop()
        assert self._stopping is not None
        await self._stopping
