"""BodyGate: the request-size limit, and the body handed to our routes in the ASGI scope.

BentoML 1.4 has no request-size limit, so a client could make a worker buffer any amount. For the
routes that take a body (/encode, /encode_batch, /v2/.../infer) this middleware answers 413 when
Content-Length is over the limit (before reading any of the body), or as soon as a streamed body passes
it. Otherwise it reads the body once and keeps it in the ASGI scope, where the route's handler takes it
(forms.parse_form parses a form, v2_rest a v2 request); what runs after it sees an empty JSON object as
the body, so no framework parser (BentoML's or FastAPI's) ever reads untrusted bytes.

The bodies held at once are bounded too (service.budget, PC_MAX_INFLIGHT_BYTES): each is charged
twice its size (the bytes and the parsed form's copy) from before it is read until the response
is sent; Content-Length is charged up front, a streamed body chunk by chunk. Beyond the budget: 503.

A client that disconnects before its body has arrived ends its request at once (counted as `disconnected`;
a body whose chunked framing broke ends the same way, counted by service.headguard as `bad_http`).
A body that has not fully arrived within `body_timeout_s` (a slow or stalled client) gets 408,
counted as reason `timeout`: the client's fault, so neither BentoML's 504 nor a server error.

HeadLimit, outermost (after service.endpoints.RestorePath, which gives the scope its real path back), answers
431 to a request head over PC_MAX_HEADER_BYTES or MAX_HEADER_FIELDS fields.
ApiKey, next when PC_API_KEY is set, answers 401 to a request without `Authorization: Bearer <key>`
before its body is read (the health probes, /metrics and the static pages are open).

JsonErrors, on the whole app, gives the 404 and 405 that Starlette's router answers in plain text
the service's JSON error body, so every error a client can get reads the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from . import metrics
from .budget import Budget, NeverFits, OverBudget

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_KEY = "pc.body"  # scope keys the routes' handlers read
CONTENT_TYPE_KEY = "pc.content_type"
BAD_HTTP_KEY = "pc.bad_http"  # set by service.headguard when the body's framing broke: answered, counted there


class BodyGate:
    """ASGI middleware for POST `paths` (and paths matching `pattern`): 413 above `max_bytes`, else the body
    moves into the scope."""

    def __init__(
        self,
        app: ASGIApp,
        paths: Iterable[str],
        max_bytes: int,
        budget: Budget,
        body_timeout_s: float,
        pattern: re.Pattern[str] | None = None,
    ) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.pattern = pattern
        self.max_bytes = max_bytes
        self.budget = budget
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not self._gated(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not (length.isdigit() and len(length) <= 18) or int(length) > self.max_bytes):
            await self._too_large(send)
            return
        held = 0  # bytes charged to the budget for this request
        try:
            if length is not None:
                await self.budget.acquire(2 * int(length), "this request body")
                held = 2 * int(length)
            chunks = []
            size = 0
            deadline = time.monotonic() + self.body_timeout_s
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    await self._timed_out(send)
                    return
                if message["type"] == "http.disconnect":
                    # The client went away mid-body: end the request now. The answer reaches no one (uvicorn drops
                    # it), but it is the first message BentoML's timeout middleware waits for; without it the
                    # request would live on until PC_REQUEST_TIMEOUT_S, and a SIGTERM drain would wait for it.
                    if not scope.get(BAD_HTTP_KEY):  # else headguard answered 400 `bad_http` and counted it
                        metrics.count_error("disconnected")
                    await _reply(send, 499, "disconnected", "the client closed the connection before its body arrived")
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    await self._too_large(send)
                    return
                if 2 * size > held:  # a streamed body (or one longer than it said): charge as it comes
                    await self.budget.acquire(2 * size - held, "this request body", wait=False)
                    held = 2 * size
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            inner = dict(scope)
            inner[BODY_KEY] = b"".join(chunks)
            del chunks
            inner[CONTENT_TYPE_KEY] = headers.get(b"content-type", b"").decode("latin-1")
            inner["headers"] = [
                (k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")
            ] + [(b"content-type", b"application/json"), (b"content-length", b"2")]
            handed_over = False

            async def replay() -> Message:
                nonlocal handed_over
                if not handed_over:
                    handed_over = True
                    return {"type": "http.request", "body": b"{}", "more_body": False}
                return await receive()  # later calls wait for the disconnect, as the server would

            await self.app(inner, replay, send)
        except OverBudget as exc:
            metrics.count_error("over_budget")
            # Read (not keep) the rest, so that the client sees the 503 and retries; a stalled client gets
            # the 503 and a closed connection.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_discard(receive), self.body_timeout_s)
            await _reply(send, 503, "over_budget", str(exc), ((b"retry-after", b"1"),))
        except NeverFits as exc:
            metrics.count_error("too_large")
            await _reply(send, 413, "too_large", str(exc))
        finally:
            if held:
                self.budget.release(held)

    def _gated(self, path: str) -> bool:
        return path in self.paths or (self.pattern is not None and self.pattern.match(path) is not None)

    async def _too_large(self, send: Send) -> None:
        metrics.count_error("too_large")
        message = f"the request body is over the limit of {self.max_bytes} bytes; send a smaller image or fewer images"
        await _reply(send, 413, "too_large", message)

    async def _timed_out(self, send: Send) -> None:
        metrics.count_error("timeout")
        message = f"the request body did not arrive within {self.body_timeout_s:g} s; send it faster, or a smaller one"
        await _reply(send, 408, "timeout", message)


MAX_HEADER_FIELDS = 100  # header fields in one request head; more get 431


class HeadLimit:
    """ASGI middleware: 431 when a request's head (path, query and headers) is over `max_bytes` or has more
    than MAX_HEADER_FIELDS fields, and the connection closes, so no client keeps a large head in memory."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_fields: int = MAX_HEADER_FIELDS) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_fields = max_fields

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            target = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b""))
            size = target + sum(len(k) + len(v) + 4 for k, v in headers)  # "name: value\r\n"
            if len(headers) > self.max_fields or size > self.max_bytes:
                metrics.count_error("header_too_large")
                message = (
                    f"the request head has {len(headers)} header fields and {size} bytes; the limits are "
                    f"{self.max_fields} fields and {self.max_bytes} bytes (PC_MAX_HEADER_BYTES)"
                )
                await _reply(send, 431, "header_too_large", message)
                return
        await self.app(scope, receive, send)


# Open without the key: the probes and /metrics (Kubernetes and Prometheus hold no key), and the pages,
# which hold no data (the explorer asks for the key, then sends it with every request).
OPEN_PATHS = frozenset(
    ("/livez", "/readyz", "/healthz", "/metrics", "/v2/health/live", "/v2/health/ready", "/", "/docs", "/docs.json")
)
OPEN_PREFIXES = ("/static/", "/static_content/")


def bearer_matches(header: bytes | str | None, key: bytes) -> bool:
    """Whether an Authorization value is `Bearer <key>`, compared in constant time."""
    if isinstance(header, str):
        header = header.encode("latin-1", "replace")
    scheme, _, given = (header or b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), key)


class ApiKey:
    """ASGI middleware: 401 {"error", "reason": "unauthorized"} unless the request carries the key."""

    def __init__(self, app: ASGIApp, key: bytes) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if bearer_matches(header, self.key):
            await self.app(scope, receive, send)
            return
        metrics.count_error("unauthorized")
        message = "this service needs an API key: send the header `Authorization: Bearer <key>`"
        if header is not None:
            message = "the API key is not this service's; send `Authorization: Bearer <key>` with the right key"
        await _reply(send, 401, "unauthorized", message, ((b"www-authenticate", b"Bearer"),))


def is_open(path: str) -> bool:
    """Whether a path is served without the API key (the probes, /metrics, the pages)."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


async def _discard(receive: Receive) -> None:
    """Read a request body to its end without keeping it (at most max_bytes arrive: BodyGate checked)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def _reply(
    send: Send, status: int, reason: str, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """A flat {"error": message, "reason": reason} answer; the connection closes (the body may not have been read)."""
    body = json.dumps({"error": message, "reason": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [*extra, (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# Starlette's router answers these in plain text ("Not Found", "Method Not Allowed"), FastAPI's as {"detail"}.
_ROUTER_ERRORS = {
    404: ("not_found", "there is nothing at {method} {path}; the routes are listed at GET /docs.json"),
    405: ("method_not_allowed", "{path} does not take {method}; the routes and their methods are at GET /docs.json"),
}


def router_error(status: int, method: str, path: str) -> dict[str, str]:
    """Our body for a router's 404 or 405."""
    reason, template = _ROUTER_ERRORS[status]
    return {"error": template.format(method=method, path=path[:200]), "reason": reason}


class JsonErrors:
    """ASGI middleware: a plain-text 404 or 405 becomes {"error": ..., "reason": "not_found" or
    "method_not_allowed"}; JSON answers (ours, with their own message) pass unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replacing = False

        async def send_json_errors(message: Message) -> None:
            nonlocal replacing
            if message["type"] == "http.response.start" and message["status"] in _ROUTER_ERRORS:
                headers = dict(message.get("headers", []))
                replacing = not headers.get(b"content-type", b"").startswith(b"application/json")
                if replacing:
                    body = json.dumps(router_error(message["status"], scope["method"], scope["path"])).encode()
                    kept = [(k, v) for k, v in message.get("headers", []) if k not in _REPLACED_HEADERS]
                    kept += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                    await send({**message, "headers": kept})
                    await send({"type": "http.response.body", "body": body})
                    return
            if replacing and message["type"] == "http.response.body":
                return  # the plain-text body: already answered
            await send(message)

        await self.app(scope, receive, send_json_errors)


_REPLACED_HEADERS = (b"content-type", b"content-length")
