"""uvicorn's httptools protocol with the request head bounded while it arrives.

httptools keeps a header line it has not finished in its own buffer, and uvicorn keeps every finished one,
with no limit on either: an endless header line or header block pins memory on the connection until the
client stops. middleware.HeadLimit answers 431 for a head over the limits, but only once the whole head
has arrived. This protocol counts a head's bytes as they come: past PC_MAX_HEADER_BYTES (plus the request
line's method and version) without the head being complete, it answers the same 431 and closes the
connection, so at most one read (uvicorn reads up to 256 KiB at a time) is ever held beyond the limit.
HeadLimit stays: it counts the fields, and it holds where this protocol does not run (`bentoml serve`).

service.worker makes it uvicorn's "auto" protocol in each pc-serve worker (BentoML's worker gives no way to
choose uvicorn's protocol).
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import metrics
from .settings import Settings

REQUEST_LINE_SLACK = 64  # the method, the version and the line ends, beyond what HeadLimit counts


class BoundedHead(HttpToolsProtocol):
    """HttpToolsProtocol that answers 431 once a head's bytes pass the limit before the head is complete."""

    max_head_bytes = Settings.from_env().max_header_bytes + REQUEST_LINE_SLACK

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True  # a connection starts with a head

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

    def _refuse(self) -> None:
        metrics.count_error("header_too_large")
        message = (
            f"the request head is over {self.max_head_bytes - REQUEST_LINE_SLACK} bytes (PC_MAX_HEADER_BYTES) "
            "and still arriving"
        )
        body = json.dumps({"error": message, "reason": "header_too_large"}).encode()
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        self.transport.close()
