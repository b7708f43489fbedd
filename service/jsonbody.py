"""A response body as JSON bytes, with its base64 payloads spliced in rather than encoded by json.

A response's arrays and PNGs are base64 text, most of its bytes (about 3 MB for a 256 px photo with the
default outputs). json.dumps scans every character of every string for escaping and builds one more
copy; base64 has nothing to escape. So the payloads travel as `Base64` (the encoded bytes), json.dumps
writes only the small skeleton around a placeholder for each, and the bytes are joined in: the same
JSON, without the scan and the copies (docs/PERFORMANCE.md, the service's time outside the model).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pybase64


class Base64(bytes):
    """Base64 text (ASCII bytes) that a response body carries as a JSON string."""

    @classmethod
    def of(cls, data: bytes) -> Base64:
        # pybase64's SIMD encoder: the standard alphabet, padded, as base64.b64encode writes it, 3.5 ms -> under
        # 0.1 ms for a 256 px photo's 2.3 MB of arrays and PNGs (docs/PERFORMANCE.md)
        return cls(pybase64.b64encode(data))


MARK = "\ue000"  # a private-use character: json.dumps(ensure_ascii=False) writes it as is (3 bytes of UTF-8)
_PLACEHOLDER = re.compile(b'"' + MARK.encode() + rb"(\d+)" + MARK.encode() + b'"')


def dumps(payload: Any) -> bytes:
    """JSON of `payload` (dicts, lists, str, numbers, None, Base64) as UTF-8 bytes, compact."""
    pieces: list[bytes] = []

    def swap(value: Any) -> Any:
        if isinstance(value, Base64):
            pieces.append(value)
            return f"{MARK}{len(pieces) - 1}{MARK}"
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [swap(v) for v in value]
        if isinstance(value, str) and MARK in value:  # text from a request: never mistaken for a placeholder
            return value.replace(MARK, "\ufffd")
        return value

    skeleton = json.dumps(swap(payload), separators=(",", ":"), ensure_ascii=False).encode()
    parts = _PLACEHOLDER.split(skeleton)  # text, index, text, index, ..., text
    out = []
    for i, part in enumerate(parts):
        out += (b'"', pieces[int(part)], b'"') if i % 2 else (part,)
    return b"".join(out)
