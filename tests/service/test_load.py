"""A bounded load test (small size): concurrent clients, zero 5xx, every response valid, and batching
that groups requests correctly. The full-size run (32 clients, 2,000 requests) is pc-serve-loadtest."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from benchmarks import loadtest
from service.client import decode_array

from .conftest import metric

# The service may run another backend or batch size than the local reference: pcmodel promises
# agreement within 1e-4 between its backends in float32.
TOL = 1e-4


@pytest.mark.slow
def test_small_load_has_no_server_errors_and_valid_responses(server):
    before = server.metrics()
    report = loadtest.run(server.url, clients=8, requests=64, warmup=8, rss=server.rss_bytes)
    after = server.metrics()
    assert report.server_errors == 0 and report.invalid == 0, report.problems
    assert report.statuses == {"200": 64}
    assert report.rss_after_mb > 0 and report.rss_ratio is not None
    rows = metric(after, "pc_batch_size_sum") - metric(before, "pc_batch_size_sum")
    calls = metric(after, "pc_batch_size_count") - metric(before, "pc_batch_size_count")
    assert rows / calls > 1.5, "8 concurrent clients should share model calls"


@pytest.mark.slow
def test_small_load_over_v2_has_no_server_errors_and_valid_responses(server):
    """pc-serve-loadtest --protocol v2: the same mixed load through the Open Inference Protocol's REST infer."""
    before = server.metrics()
    report = loadtest.run(server.url, clients=8, requests=48, warmup=0, protocol="v2")
    after = server.metrics()
    assert report.server_errors == 0 and report.invalid == 0, report.problems
    assert report.statuses == {"200": 48}
    assert metric(after, "pc_images_total") - metric(before, "pc_images_total") == 48


@pytest.mark.slow
def test_concurrent_requests_get_the_same_answers_as_sequential_ones(server):
    images = loadtest.photos(64)[:2]
    specs = [
        loadtest.Spec(images[0]),
        loadtest.Spec(images[1], steps=40),
        loadtest.Spec(images[0], steps=40, size_mode="tile"),
        loadtest.Spec(images[1], steps=7),
    ]

    def send(spec: loadtest.Spec) -> dict:
        response = httpx.post(
            server.url + "/encode", files={"image": ("i.png", spec.image)}, data=spec.form(), timeout=120
        )
        assert response.status_code == 200, response.text
        return response.json()

    alone = [send(spec) for spec in specs]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(send, specs * 3))
    for i, got in enumerate(together):
        want = alone[i % len(specs)]
        assert got["steps"] == want["steps"] and got["size_mode"] == want["size_mode"]
        for a, b in zip(got["latents"], want["latents"]):
            np.testing.assert_allclose(decode_array(a), decode_array(b), atol=TOL)
        np.testing.assert_allclose(
            decode_array(got["reconstruction"]["array"]), decode_array(want["reconstruction"]["array"]), atol=TOL
        )


@pytest.mark.slow
def test_a_short_soak_agrees_with_the_metrics(server):
    """pc-serve-soak for a few seconds: mixed good and bad traffic, each answer as expected, and /metrics
    moved by exactly the client's counts (images, rejections by reason, responses per endpoint and status)."""
    import asyncio

    from benchmarks import soak

    report = asyncio.run(soak.soak(server.url, server.process.pid, minutes=0.1, clients=4, seed=0))
    assert report["invalid"] == 0 and report["server_errors"] == 0, report["problems"]
    assert report["metrics_agree"], report["mismatches"]
    assert {"200", "400"} <= set(report["statuses"]) and report["requests"] >= 10
    assert report["resources"] and all(s["rss_mib"] > 100 and s["open_files"] > 0 for s in report["resources"])


@pytest.mark.slow
def test_a_short_mixed_soak_over_encode_and_v2_agrees_with_the_metrics(server):
    """pc-serve-soak --protocol mixed for a few seconds: /encode's mix and the Open Inference Protocol's (binary and
    JSON tensors; bad datatype, shape, parameter and image; unknown model; 413 before the body; binary data cut
    short) in one run, and /metrics (pc_request_errors_total by reason, pc_v2_rest_requests_total by method and
    code, /encode's responses) moved by exactly the client's counts."""
    import asyncio

    from benchmarks import soak

    report = asyncio.run(soak.soak(server.url, server.process.pid, minutes=0.1, clients=4, seed=1, protocol="mixed"))
    assert report["invalid"] == 0 and report["server_errors"] == 0, report["problems"]
    assert report["metrics_agree"], report["mismatches"]
    by_protocol = report["statuses_by_protocol"]
    assert "200" in by_protocol["encode"] and "200" in by_protocol["v2"], by_protocol
    assert set(by_protocol["v2"]) - {"200", "503"}, by_protocol  # some of v2's bad requests were sent
    assert report["requests"] >= 10


def test_soak_agreement_finds_a_wrong_count():
    """soak.agreement: empty when /metrics moved by the client's counts; a line for each count that differs,
    including a reason or v2 code the client never counted."""
    from collections import Counter

    from benchmarks import soak

    def samples(images, bad_image, not_found, infer_200, infer_404, encode_200):
        return {
            ("pc_images_total", ()): images,
            ("pc_request_errors_total", (("reason", "bad_image"),)): bad_image,
            ("pc_request_errors_total", (("reason", "not_found"),)): not_found,
            ("pc_request_errors_total", (("reason", "overloaded"),)): 0,
            ("pc_v2_rest_requests_total", (("code", "200"), ("method", "ModelInfer"))): infer_200,
            ("pc_v2_rest_requests_total", (("code", "404"), ("method", "ModelInfer"))): infer_404,
            (
                "bentoml_service_request_total",
                (("endpoint", "/encode"), ("http_response_code", "200"), ("service_name", "PCEncoder")),
            ): encode_200,
        }

    before = samples(10, 1, 0, 5, 0, 5)
    after = samples(16, 3, 1, 8, 1, 8)
    tally = soak.Tally(
        responses=Counter({("/encode", 200): 3}),
        v2_calls=Counter({("ModelInfer", "200"): 3, ("ModelInfer", "404"): 1}),
        images=6,
        errors=Counter({"bad_image": 2, "not_found": 1}),
    )
    assert soak.agreement(before, after, tally) == []

    tally.v2_calls[("ModelInfer", "200")] = 2  # the client saw one infer fewer than the server counted
    tally.errors["bad_image"] = 1
    del tally.errors["not_found"]  # a reason that moved and the client never counted
    problems = soak.agreement(before, after, tally)
    assert "v2 ModelInfer 200: pc_v2_rest_requests_total moved 3, client 2" in problems
    assert "errors bad_image: /metrics 2, client 1" in problems
    assert "errors not_found: /metrics 1, client 0" in problems
    assert len(problems) == 3, problems


def test_soak_mixes():
    from benchmarks import soak

    for protocol in soak.PROTOCOLS:
        mix = soak.kinds(protocol, "conv-rgb", 1000)
        assert abs(sum(k.weight for k in mix) - 1) < 1e-9
        assert {k.protocol for k in mix} == ({"encode", "v2"} if protocol == "mixed" else {protocol})
    v2 = {k.name: k for k in soak.kinds("v2", "conv-rgb", 1000)}
    assert v2["v2_oversize"].declared_length == 1001 and v2["v2_oversize"].v2_method is None
    assert v2["v2_unknown_model"].status == 404 and v2["v2_unknown_model"].reasons == ("not_found",)
