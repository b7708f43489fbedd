"""/metrics on a real server: our counters and histograms move by exactly what the requests did."""

from __future__ import annotations

import pytest

import pcmodel
from service.host import pick_device
from service.metrics import REASONS

from .conftest import metric


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def test_counters_and_histograms_move_by_the_right_amounts(server, astronaut64, china_jpeg):
    before = server.metrics()
    one = server.post("/encode", files={"image": ("a.png", astronaut64)}, data={"steps": "20"}).json()
    tiled = server.post(
        "/encode", files={"image": ("c.jpg", china_jpeg)}, data={"steps": "30", "size_mode": "tile"}
    ).json()  # 5 x 7 = 35 overlapping tiles (96x64 in 32x32 tiles every 16 px)
    batch = server.post(
        "/encode_batch",
        files=[("images", ("a.png", astronaut64)), ("images", ("x.png", b"junk")), ("images", ("c.jpg", china_jpeg))],
        data={"steps": "10"},
    ).json()["results"]
    after = server.metrics()
    finals = [
        one["energy"]["final"],
        tiled["energy"]["final"],
        batch[0]["energy"]["final"],
        batch[2]["energy"]["final"],
    ]

    assert delta(before, after, "pc_images_total") == 4
    assert delta(before, after, "pc_inference_iterations_count") == 4
    assert delta(before, after, "pc_inference_iterations_sum") == 20 + 30 + 10 + 10
    assert delta(before, after, "pc_inference_iterations_bucket", le="20.5") == 3  # 20, 10 and 10 steps
    # Bounds at n +- 0.5: each count has a bucket of its own (18-step requests had read p95 19.5 between 10 and 20)
    assert delta(before, after, "pc_inference_iterations_bucket", le="19.5") == 2
    assert delta(before, after, "pc_inference_iterations_bucket", le="10.5") == 2
    assert delta(before, after, "pc_inference_iterations_bucket", le="9.5") == 0
    assert delta(before, after, "pc_final_energy_count") == 4
    assert delta(before, after, "pc_final_energy_sum") == pytest.approx(sum(finals), rel=1e-6)
    # Rows through the model: 1 + 35 tiles (two calls: PC_MAX_BATCH_SIZE is 32) + 2; the batch's two images
    # may share one call.
    assert delta(before, after, "pc_batch_size_sum") == 1 + 35 + 2
    calls = delta(before, after, "pc_batch_size_count")
    assert calls in (4, 5)
    assert delta(before, after, "pc_inference_duration_seconds_count") == calls
    assert delta(before, after, "pc_inference_duration_seconds_sum") > 0
    for reason in REASONS:
        assert delta(before, after, "pc_request_errors_total", reason=reason) == (1 if reason == "bad_image" else 0)
    # BentoML's own request metrics sit beside ours.
    assert delta(before, after, "bentoml_service_request_total", **_bentoml_labels(after, "/encode", "200")) == 2


def _bentoml_labels(samples: dict, endpoint: str, code: str) -> dict:
    for name, labels in samples:
        d = dict(labels)
        if (
            name == "bentoml_service_request_total"
            and d.get("endpoint") == endpoint
            and d["http_response_code"] == code
        ):
            return d
    raise AssertionError(f"no bentoml_service_request_total for {endpoint} {code}")


def test_model_info_names_the_model(server):
    samples = server.metrics()
    info = [dict(labels) for (name, labels), value in samples.items() if name == "pc_model_info" and value == 1]
    card = server.get("/model").json()
    assert info == [
        {
            "name": "conv-rgb",
            "preset": "conv-rgb",
            "sha256": pcmodel.load("default").sha256,
            "device": str(pick_device("auto")),
            "backend": card["backend"].split(" ")[0],
        }
    ]


def test_error_reasons_exist_from_the_start(server):
    samples = server.metrics()
    for reason in REASONS:
        assert ("pc_request_errors_total", (("reason", reason),)) in samples
