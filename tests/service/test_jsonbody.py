"""The response body writer: the same JSON as json.dumps, with the base64 payloads spliced in."""

from __future__ import annotations

import base64
import json
import random

from service.jsonbody import MARK, Base64, dumps


def test_the_same_json_as_json_dumps_on_random_payloads():
    rng = random.Random(0)

    def value(depth: int):
        kind = rng.randrange(7 if depth < 3 else 4)
        if kind == 0:
            return Base64.of(rng.randbytes(rng.randrange(0, 50)))
        if kind == 1:
            return rng.choice(["plain", "ünïcödé", 'quote " and \\ slash', f"a {MARK}0{MARK} lookalike", "\x00\n"])
        if kind == 2:
            return rng.choice([0, -3, 2.5, 1e-30, True, None])
        if kind == 3:
            return ""
        if kind in (4, 5):
            return {f"k{i}": value(depth + 1) for i in range(rng.randrange(4))}
        return [value(depth + 1) for _ in range(rng.randrange(4))]

    def plain(v):  # what the client sees: Base64 as its text; the marker character replaced
        if isinstance(v, Base64):
            return v.decode("ascii")
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v.replace(MARK, "\ufffd") if isinstance(v, str) else v

    for _ in range(300):
        payload = {"top": value(0), "list": [value(1) for _ in range(3)]}
        assert json.loads(dumps(payload)) == plain(payload)


def test_payload_bytes_are_base64_of_the_data():
    data = bytes(range(256)) * 100
    body = json.loads(dumps({"data": Base64.of(data)}))
    assert base64.b64decode(body["data"]) == data
