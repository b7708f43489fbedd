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


def test_base64_is_the_standard_librarys_encoding():
    """Base64.of (pybase64's encoder) writes exactly what base64.b64encode writes, at every length mod 3."""
    rng = random.Random(1)
    for size in [*range(0, 70), 1000, 65_537, 3_000_001]:
        data = rng.randbytes(size)
        assert Base64.of(data) == base64.b64encode(data)


def test_check_finite_finds_every_nan_and_inf_and_nothing_else():
    """check_finite sums in float64 instead of building isfinite masks: the same answer, on random tensors with
    a NaN or an Inf anywhere, and with finite values as large as float32 holds (whose float32 sum would not be)."""
    import pytest
    import torch

    from service.batching import Settled
    from service.errors import NotFinite
    from service.responses import check_finite

    gen = torch.Generator().manual_seed(0)

    def settled() -> Settled:
        latents = [torch.randn(2, 8, 13, 13, generator=gen), torch.randn(2, 10, 5, 5, generator=gen)]
        recon, energy = torch.randn(2, 3, 40, 40, generator=gen), torch.rand(6, 2, generator=gen)
        return Settled(latents, [], recon, energy, torch.tensor([5, 5]), "torch")

    for trial in range(60):
        s = settled()
        tensors = [*s.latents, s.reconstruction, s.energy]
        target = tensors[trial % len(tensors)].view(-1)
        if trial % 3 == 0:
            target.fill_(3.0e38 * (-1) ** trial)  # finite, huge: still fine
            check_finite(s)
            continue
        bad = [float("nan"), float("inf"), -float("inf")][trial // 3 % 3]
        target[torch.randint(target.numel(), (1,), generator=gen)] = bad
        with pytest.raises(NotFinite):
            check_finite(s)
        check_finite(settled())  # and a fresh one passes
