"""A diverging checkpoint on two workers: NaN/Inf is a clear, counted error, and metrics add up across workers."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from .conftest import metric, png


@pytest.mark.slow  # a fresh interpreter imports torch: a few seconds
def test_pc_serve_refuses_an_unstable_checkpoint_unless_allowed(unstable_checkpoint):
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "--check", "--model", str(unstable_checkpoint)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "stable" in run.stderr and "allow_unstable" in run.stderr


@pytest.mark.slow
def test_diverging_inference_is_a_counted_error_on_every_worker(unstable_server, astronaut):
    image = png(astronaut[:64, :64])
    # /readyz answered 200 from one worker; the other may still be loading (503, reason loading) a moment longer.
    deadline = time.monotonic() + 60
    while (response := unstable_server.get("/model")).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.3)
    card = response.json()
    assert card["name"] == "diverging" and card["preset"] == "custom"

    def encode(_: int) -> httpx.Response:
        # A fresh connection each time, so the kernel spreads them over both workers. A worker still
        # loading answers 503 (reason loading) and is asked again: that is its documented answer, not
        # the error counted here.
        until = time.monotonic() + 60
        while True:
            response = httpx.post(unstable_server.url + "/encode", files={"image": ("a.png", image)}, timeout=120)
            loading = response.status_code == 503 and response.json().get("reason") == "loading"
            if not loading or time.monotonic() > until:
                return response
            time.sleep(0.3)

    sent = 0
    before = unstable_server.metrics()
    pids: set[str] = set()
    for _ in range(6):  # until both workers have answered (normally within two rounds)
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(encode, range(8)))
        sent += len(responses)
        for response in responses:
            assert response.status_code == 500
            body = response.json()
            assert set(body) == {"error", "reason"} and body["reason"] == "not_finite" and "NaN or Inf" in body["error"]
        samples = unstable_server.metrics()
        pids = {
            dict(labels)["pid"]
            for (name, labels) in samples
            if name == "bentoml_service_last_request_timestamp_seconds"
        }
        if len(pids) >= 2:
            break
    assert len(pids) == 2, "both workers should have served requests"
    after = unstable_server.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    # Each worker counts its own; /metrics shows the sum over both.
    assert delta("pc_request_errors_total", reason="not_finite") == sent
    assert delta("pc_batch_size_sum") == sent
    assert delta("pc_inference_duration_seconds_count") == delta("pc_batch_size_count") >= 2
    assert delta("pc_images_total") == 0
    info = [dict(labels) for (name, labels), v in after.items() if name == "pc_model_info" and v == 1]
    assert len(info) == 1 and info[0]["name"] == "diverging"  # one series, not one per worker

    batch = unstable_server.post("/encode_batch", files=[("images", ("a.png", image)), ("images", ("b", b"junk"))])
    assert batch.status_code == 200
    first, second = batch.json()["results"]
    assert first["status"] == 500 and first["reason"] == "not_finite"
    assert second["status"] == 400 and second["reason"] == "bad_image"
    assert unstable_server.get("/readyz").status_code == 200


@pytest.mark.slow
def test_diverging_inference_over_v2_is_the_same_counted_error(unstable_server, astronaut):
    """Over the Open Inference Protocol on two workers (both serve gRPC on one port): 500 not_finite, and
    gRPC INTERNAL with the same message, counted like /encode's."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    image = png(astronaut[:64, :64])
    before = metric(unstable_server.metrics(), "pc_request_errors_total", reason="not_finite")
    rest = httpclient.InferenceServerClient(unstable_server.url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(unstable_server.grpc_target)
    for module, client, code in ((httpclient, rest, "500"), (grpcclient, grpc, "StatusCode.INTERNAL")):
        tensor = module.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=object))
        deadline = time.monotonic() + 60
        while True:  # a worker still loading answers 503 / UNAVAILABLE (reason loading): ask again
            with pytest.raises(InferenceServerException) as caught:
                client.infer("diverging", [tensor])
            if "loading" not in str(caught.value) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert str(caught.value.status()) == code and "NaN or Inf" in str(caught.value)
    rest.close()
    grpc.close()
    assert metric(unstable_server.metrics(), "pc_request_errors_total", reason="not_finite") == before + 2
