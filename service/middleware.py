"""BodyGate: the request-size limit, and the body handed to our API methods past BentoML's parser.

BentoML 1.4 has no request-size limit, so a client could make a worker buffer any amount. For the
API routes this middleware answers 413 when Content-Length is over the limit (before reading any
of the body), or as soon as a streamed body passes it. Otherwise it reads the body once, keeps it
in the ASGI scope for the API method (codec.parse_form parses it), and gives BentoML an empty JSON
object to parse instead, so BentoML's form handling never sees untrusted bytes.

A body that has not fully arrived within `body_timeout_s` (a slow or stalled client) gets 408,
counted as reason `timeout`: the client's fault, so neither BentoML's 504 nor a server error.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from . import metrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_KEY = "pc.body"  # scope keys the API methods read
CONTENT_TYPE_KEY = "pc.content_type"


class BodyGate:
    """ASGI middleware for POST `paths`: 413 above `max_bytes`, else the body moves into the scope."""

    def __init__(self, app: ASGIApp, paths: Iterable[str], max_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._too_large(send)
            return
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
                return  # the client went away: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        inner = dict(scope)
        inner[BODY_KEY] = b"".join(chunks)
        inner[CONTENT_TYPE_KEY] = headers.get(b"content-type", b"").decode("latin-1")
        inner["headers"] = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")] + [
            (b"content-type", b"application/json"),
            (b"content-length", b"2"),
        ]
        handed_over = False

        async def replay() -> Message:
            nonlocal handed_over
            if not handed_over:
                handed_over = True
                return {"type": "http.request", "body": b"{}", "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the server would

        await self.app(inner, replay, send)

    async def _too_large(self, send: Send) -> None:
        metrics.count_error("too_large")
        message = f"the request body is over the limit of {self.max_bytes} bytes; send a smaller image or fewer images"
        await _error(send, 413, message)

    async def _timed_out(self, send: Send) -> None:
        metrics.count_error("timeout")
        message = f"the request body did not arrive within {self.body_timeout_s:g} s; send it faster, or a smaller one"
        await _error(send, 408, message)


async def _error(send: Send, status: int, message: str) -> None:
    """A flat JSON error; the connection closes after it (the rest of the body is never read)."""
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
