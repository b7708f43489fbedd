"""uvicorn's httptools protocol with the request head bounded while it arrives.

httptools keeps a header line it has not finished in its own buffer, and uvicorn keeps every finished one,
with no limit on either: an endless header line or header block pins memory on the connection until the
client stops. middleware.HeadLimit answers 431 for a head over the limits, but only once the whole head
has arrived. This protocol counts a head's bytes as they come: past PC_MAX_HEADER_BYTES (plus the request
line's method and version) without the head being complete, it answers the same 431 and closes the
connection, so at most one read (uvicorn reads up to 256 KiB at a time) is ever held beyond the limit.
HeadLimit stays: it counts the fields, and it holds where this protocol does not run (`bentoml serve`).

It also answers what httptools cannot parse (a request line of garbage, TLS sent to this plain-HTTP port, an
invalid or repeated Content-Length, Content-Length with chunked encoding, broken chunks) as the service answers
every other client mistake: 400 with the JSON error body, reason `bad_http`, counted in pc_request_errors_total.
uvicorn answers those itself, with a plain-text "Invalid HTTP request received.", through the protocol's
send_400_response, the one method this class replaces for it; the parser's own words for what was wrong
(e.g. "Duplicate Content-Length") go into the message. A request whose body's framing breaks after its head
was accepted is marked in its scope, so that BodyGate does not count it again as `disconnected`.

And it wraps the application it calls, BentoML's app, in service.endpoints.LabelPaths (one wrapper per worker,
shared by its connections): a path the service does not have reaches BentoML's request metrics as the one
label "/(unknown)" instead of itself, so that distinct unknown paths cannot grow the metrics without limit;
service.endpoints.RestorePath, inside BentoML's app, gives the rest of the app the real path back.

service.worker makes it uvicorn's "auto" protocol in each pc-serve worker (BentoML's worker gives no way to
choose uvicorn's protocol).
"""

from __future__ import annotations

import json
import sys
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import metrics
from .endpoints import LabelPaths
from .middleware import BAD_HTTP_KEY
from .settings import Settings

REQUEST_LINE_SLACK = 64  # the method, the version and the line ends, beyond what HeadLimit counts


class BoundedHead(HttpToolsProtocol):
    """HttpToolsProtocol that answers 431 once a head's bytes pass the limit before the head is complete."""

    max_head_bytes = Settings.from_env().max_header_bytes + REQUEST_LINE_SLACK
    _labelled: ClassVar[LabelPaths | None] = None  # the app, wrapped once per worker

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True  # a connection starts with a head
        outer = BoundedHead._labelled
        if outer is None or outer.app is not self.app:
            outer = BoundedHead._labelled = LabelPaths(self.app)
        self.app = outer  # what uvicorn calls for each request on this connection

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        # Bytes received while this head is incomplete. A read that also ends a previous body counts whole:
        # an over-count of at most one read, on a connection that pipelines requests.
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            self._refuse()

    def send_400_response(self, msg: str) -> None:
        """What uvicorn calls when httptools cannot parse the request (`msg` is its generic message): our JSON
        400, counted, then the connection closes, as uvicorn's plain-text one does."""
        metrics.count_error("bad_http")
        error = sys.exc_info()[1]  # uvicorn calls this while it handles the parser's error
        detail = f" ({error})" if error is not None and str(error) else ""
        if self.cycle is not None and not self.cycle.response_complete:  # its head was accepted: BodyGate sees it
            self.cycle.scope[BAD_HTTP_KEY] = True  # end as a disconnect, which it must not count again
        message = f"the request is not valid HTTP/1.1{detail}; send a well-formed request"
        self._answer(b"400 Bad Request", "bad_http", message)

    def _refuse(self) -> None:
        metrics.count_error("header_too_large")
        message = (
            f"the request head is over {self.max_head_bytes - REQUEST_LINE_SLACK} bytes (PC_MAX_HEADER_BYTES) "
            "and still arriving"
        )
        self._answer(b"431 Request Header Fields Too Large", "header_too_large", message)

    def _answer(self, status: bytes, reason: str, message: str) -> None:
        """The service's JSON error body with `status`, then the connection closes."""
        body = json.dumps({"error": message, "reason": reason}).encode()
        head = [b"HTTP/1.1 " + status + b"\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()
