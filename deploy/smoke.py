"""Smoke-check a running pc-encoder from outside: /readyz, an /encode of a real photo, /metrics.

    python deploy/smoke.py http://127.0.0.1:3000 [--timeout 300]

Waits for /readyz, encodes scikit-image's astronaut photo (public domain) and checks the response
(input - reconstruction = error_map exactly, the energy fell), sends one non-image and checks the
flat 400, then checks that /metrics counted both. Prints one line per check; exits 1 on the first
failure. Needs the project's Python environment (httpx, numpy, Pillow, scikit-image); used by
deploy/container.sh and tests/deploy.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


class SmokeError(Exception):
    """A check that failed; the message says which and what was seen."""


def wait_ready(url: str, timeout_s: float) -> float:
    """Seconds until /readyz answered 200 (it hangs, rather than failing, while the model loads)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SmokeError(f"/readyz did not answer 200 within {timeout_s:.0f} s")


def photo_png(side: int = 128) -> bytes:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_array(payload: dict) -> np.ndarray:
    if payload.get("dtype") != "float32":
        raise SmokeError(f"array dtype is {payload.get('dtype')!r}, expected float32")
    return np.frombuffer(base64.b64decode(payload["data"]), dtype="<f4").reshape(payload["shape"])


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def check_encode(url: str) -> dict:
    response = httpx.post(f"{url}/encode", files={"image": ("astronaut.png", photo_png(), "image/png")}, timeout=120)
    if response.status_code != 200:
        raise SmokeError(f"/encode answered {response.status_code}: {response.text[:300]}")
    body = response.json()
    x = decode_array(body["input"]["array"])
    reconstruction = decode_array(body["reconstruction"]["array"])
    error = decode_array(body["error_map"]["array"])
    if not (x.shape == reconstruction.shape == error.shape and np.array_equal(x - reconstruction, error)):
        raise SmokeError("/encode: input - reconstruction != error_map")
    if not body["latents"]:
        raise SmokeError("/encode returned no latents")
    if not body["energy"]["final"] < body["energy"]["initial"]:
        raise SmokeError(f"/encode: the energy did not fall: {body['energy']}")
    return body


def check_bad_image(url: str) -> None:
    response = httpx.post(f"{url}/encode", files={"image": ("x.png", b"not an image", "image/png")}, timeout=60)
    if response.status_code != 400 or "error" not in response.json():
        raise SmokeError(f"a non-image got {response.status_code} {response.text[:200]}, expected 400 {{'error': ...}}")


def check_metrics(url: str, sha256: str) -> dict:
    samples = metric_values(httpx.get(f"{url}/metrics", timeout=30).text)
    for key in (("pc_images_total", ()), ("pc_request_errors_total", (("reason", "bad_image"),))):
        if samples.get(key, 0) < 1:
            raise SmokeError(f"/metrics: {key[0]}{dict(key[1])} is {samples.get(key, 0)}, expected >= 1")
    encode_ok = sum(
        value
        for (name, labels), value in samples.items()
        if name == "bentoml_service_request_total"
        and ("endpoint", "/encode") in labels
        and ("http_response_code", "200") in labels
    )
    if encode_ok < 1:
        raise SmokeError("/metrics: bentoml_service_request_total{endpoint='/encode', http_response_code='200'} < 1")
    info = [dict(labels) for (name, labels), value in samples.items() if name == "pc_model_info" and value == 1]
    if not any(labels.get("sha256") == sha256 for labels in info):
        raise SmokeError(f"/metrics: no pc_model_info with sha256 {sha256}: {info}")
    return info[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the service's base URL, e.g. http://127.0.0.1:3000")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for /readyz (default 300)")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    try:
        print(f"smoke: /readyz 200 after {wait_ready(url, args.timeout):.1f} s", flush=True)
        started = time.perf_counter()
        body = check_encode(url)
        shapes = [latent["shape"] for latent in body["latents"]]
        print(f"smoke: /encode 200 in {time.perf_counter() - started:.2f} s, {body['steps']} steps, latents {shapes}")
        check_bad_image(url)
        print("smoke: a non-image gets 400 with a JSON error")
        info = check_metrics(url, body["model"]["sha256"])
        print(f"smoke: /metrics counted both; model {info['name']} on {info['device']} ({info['backend']})")
    except (SmokeError, httpx.HTTPError, KeyError, ValueError) as exc:
        print(f"smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
