"""Every client mistake against the real server: the right status, a flat {"error", "reason"} body, the error
counter up by exactly one for the right reason, and the server still serving. Odd but valid images
(16-bit, CMYK, palette, alpha, ...) are accepted and converted."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from service.metrics import REASONS

from .conftest import metric, png


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_file(data: bytes, name: str = "photo.png", content_type: str = "image/png") -> dict:
    return {"image": (name, data, content_type)}


def photo(size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


GOOD = png(photo())


def chunked(data: bytes):
    for start in range(0, len(data), 1 << 20):
        yield data[start : start + (1 << 20)]


# (id, path, request kwargs for httpx, expected status, expected reason)
def start_file(data: bytes) -> dict:
    return {"files": {**image_file(GOOD), "start": ("start.npz", data, "application/octet-stream")}}


def npz(value: float, dtype) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, latent_1=np.full((1, 8, 7, 7), value, dtype), latent_2=np.full((1, 10, 3, 3), value, dtype))
    return buffer.getvalue()


def npz_claiming_too_much() -> bytes:
    """latent_1.npy's header says (10^6, 10^6) float32 (3.6 TiB), followed by 16 bytes."""
    member = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}
    np.lib.format.write_array_header_1_0(member, header)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("latent_1.npy", member.getvalue() + b"\0" * 16)
        archive.writestr("latent_2.npy", member.getvalue() + b"\0" * 16)
    return buffer.getvalue()


def npz_bomb() -> bytes:
    """64 MiB of zeros per level, deflated to ~64 KiB each: more than a body may hold (20 MiB)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("latent_1.npy", "latent_2.npy"):
            with archive.open(name, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.zeros(16 << 20, np.float32))
    return buffer.getvalue()


Case = tuple[str, str, Callable[[], dict], int, str]
CASES: list[Case] = [
    ("not an image", "/encode", lambda: {"files": image_file(b"hello, this is text, not pixels")}, 400, "bad_image"),
    ("truncated png", "/encode", lambda: {"files": image_file(GOOD[: len(GOOD) // 2])}, 400, "bad_image"),
    ("zero-byte file", "/encode", lambda: {"files": image_file(b"")}, 400, "bad_image"),
    ("zero-size image", "/encode", lambda: {"files": image_file(png_header_only(0, 0))}, 400, "bad_image"),
    ("1x1 image", "/encode", lambda: {"files": image_file(png(photo((1, 1))))}, 400, "too_small"),
    (
        "full mode: 5000x8 scales to 256x0.4",
        "/encode",
        lambda: {"files": image_file(png(photo((5000, 8))))},
        400,
        "too_small",
    ),
    ("empty body", "/encode", lambda: {"content": b""}, 400, "missing_field"),
    ("missing image field", "/encode", lambda: {"files": {"steps": (None, "10")}}, 400, "missing_field"),
    (
        "bomb past PIL's limit",
        "/encode",
        lambda: {"files": image_file(png_header_only(100_000, 100_000))},
        413,
        "too_large",
    ),
    ("bomb past our limit", "/encode", lambda: {"files": image_file(png_header_only(6000, 6000))}, 413, "too_large"),
    ("body over 20 MiB", "/encode", lambda: {"files": image_file(b"\0" * (21 << 20))}, 413, "too_large"),
    (
        "chunked body over 20 MiB",
        "/encode",
        lambda: {
            "content": chunked(b"\0" * (21 << 20)),
            "headers": {"content-type": "multipart/form-data; boundary=x"},
        },
        413,
        "too_large",
    ),
    (
        "unsupported format (PPM)",
        "/encode",
        lambda: {"files": image_file(png(photo(), "PPM"))},
        415,
        "unsupported_format",
    ),
    (
        "URL instead of a file",
        "/encode",
        lambda: {"files": {"image": (None, "https://example.com/cat.png")}},
        400,
        "bad_image",
    ),
    (
        "steps not a number",
        "/encode",
        lambda: {"files": image_file(GOOD), "data": {"steps": "abc"}},
        422,
        "bad_parameter",
    ),
    ("steps zero", "/encode", lambda: {"files": image_file(GOOD), "data": {"steps": "0"}}, 422, "bad_parameter"),
    ("steps negative", "/encode", lambda: {"files": image_file(GOOD), "data": {"steps": "-3"}}, 422, "bad_parameter"),
    (
        "steps fractional",
        "/encode",
        lambda: {"files": image_file(GOOD), "data": {"steps": "1.5"}},
        422,
        "bad_parameter",
    ),
    (
        "steps of 5,000 digits",
        "/encode",
        lambda: {"files": image_file(GOOD), "data": {"steps": "9" * 5000}},
        422,
        "bad_parameter",
    ),
    (
        "start: a header claiming 10^12 floats",
        "/encode",
        lambda: start_file(npz_claiming_too_much()),
        422,
        "bad_parameter",
    ),
    ("start: a zip bomb", "/encode", lambda: start_file(npz_bomb()), 422, "bad_parameter"),
    ("start: float64 beyond float32", "/encode", lambda: start_file(npz(1e300, np.float64)), 422, "bad_parameter"),
    ("start: float32 far too large", "/encode", lambda: start_file(npz(1e30, np.float32)), 422, "bad_parameter"),
    ("steps over max", "/encode", lambda: {"files": image_file(GOOD), "data": {"steps": "1001"}}, 422, "bad_parameter"),
    ("steps empty", "/encode", lambda: {"files": image_file(GOOD), "data": {"steps": ""}}, 422, "bad_parameter"),
    (
        "steps not UTF-8",
        "/encode",
        lambda: {"files": {**image_file(GOOD), "steps": ("s.bin", b"\xff\xfe\x00", "application/octet-stream")}},
        422,
        "bad_parameter",
    ),
    (
        "bad size_mode",
        "/encode",
        lambda: {"files": image_file(GOOD), "data": {"size_mode": "zoom"}},
        422,
        "bad_parameter",
    ),
    (
        "bad outputs",
        "/encode",
        lambda: {"files": image_file(GOOD), "data": {"outputs": "latents,x"}},
        422,
        "bad_parameter",
    ),
    ("empty outputs", "/encode", lambda: {"files": image_file(GOOD), "data": {"outputs": ""}}, 422, "bad_parameter"),
    (
        "too many tiles",
        "/encode",
        lambda: {"files": image_file(png(Image.new("RGB", (2000, 2000)))), "data": {"size_mode": "tile"}},
        413,
        "too_large",
    ),
    ("unknown field", "/encode", lambda: {"files": {**image_file(GOOD), "file": ("a.png", GOOD)}}, 400, "bad_request"),
    (
        "two images to /encode",
        "/encode",
        lambda: {"files": [("image", ("a.png", GOOD)), ("image", ("b.png", GOOD))]},
        400,
        "bad_request",
    ),
    ("JSON body", "/encode", lambda: {"json": {"image": "aGVsbG8="}}, 415, "bad_request"),
    (
        "raw image body",
        "/encode",
        lambda: {"content": GOOD, "headers": {"content-type": "image/png"}},
        415,
        "bad_request",
    ),
    (
        "multipart without boundary",
        "/encode",
        lambda: {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
        400,
        "bad_request",
    ),
    (
        "malformed multipart",
        "/encode",
        lambda: {
            "content": b"--x\r\nno headers here\r\n\r\n",
            "headers": {"content-type": "multipart/form-data; boundary=x"},
        },
        400,
        "bad_request",
    ),
    (
        "multipart cut short (no closing boundary)",
        "/encode",
        lambda: {
            "content": b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + GOOD,
            "headers": {"content-type": "multipart/form-data; boundary=x"},
        },
        400,
        "bad_request",
    ),
    (
        "33 images to /encode_batch",
        "/encode_batch",
        lambda: {"files": [("images", (f"{i}.png", GOOD)) for i in range(33)]},
        413,
        "too_large",
    ),
    ("/encode_batch without images", "/encode_batch", lambda: {"files": {"steps": (None, "5")}}, 400, "missing_field"),
    (
        "/encode_batch bad steps",
        "/encode_batch",
        lambda: {"files": [("images", ("a.png", GOOD))], "data": {"steps": "x"}},
        422,
        "bad_parameter",
    ),
]


@pytest.mark.parametrize(("path", "make", "status", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_counted_4xx(server, path, make, status, reason):
    assert reason in REASONS
    before = server.metrics()
    response = server.post(path, **make())
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error", "reason"} and isinstance(body["error"], str)
    assert body["error"] and body["reason"] == reason
    after = server.metrics()
    for r in REASONS:
        delta = metric(after, "pc_request_errors_total", reason=r) - metric(before, "pc_request_errors_total", reason=r)
        assert delta == (1 if r == reason else 0), (r, delta)
    assert server.get("/readyz").status_code == 200


def test_form_messages_name_the_routes_own_fields(server):
    """An empty /encode_batch body had been told to send an `image` field, and 40 or more images had lost the
    message that says how many to send."""
    empty = server.post("/encode_batch", content=b"", headers={"content-type": "multipart/form-data; boundary=x"})
    assert empty.status_code == 400 and "`images` file field" in empty.json()["error"]
    for count in (33, 60):
        many = server.post("/encode_batch", files=[("images", (f"{i}.png", GOOD)) for i in range(count)])
        assert many.status_code == 413 and "at most 32 `images` files" in many.json()["error"], many.text
    twice = server.post("/encode", files=[("image", ("a.png", GOOD))] * 12)
    assert twice.status_code in (400, 413) and "one `image`" in twice.json()["error"], twice.text


def test_url_is_never_fetched(server):
    response = server.post("/encode", files={"image": (None, "http://127.0.0.1:1/never-fetched.png")})
    assert response.status_code == 400
    assert "never fetches" in response.json()["error"]


def test_server_keeps_serving_after_bad_input(server):
    response = server.post("/encode", files=image_file(GOOD), data={"steps": "3", "outputs": "latents"})
    assert response.status_code == 200 and response.json()["steps"] == 3


def rgba_transparent() -> Image.Image:
    return Image.new("RGBA", (40, 40), (255, 0, 0, 0))


def gradient16() -> Image.Image:
    ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (40, 1))
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    return image


ACCEPTED = [
    ("16-bit PNG", lambda: png(gradient16())),
    ("CMYK JPEG", lambda: png(photo().convert("CMYK"), "JPEG")),
    ("palette PNG", lambda: png(photo().convert("P", palette=Image.Palette.ADAPTIVE))),
    ("alpha PNG", lambda: png(rgba_transparent())),
    ("gray+alpha PNG", lambda: png(photo().convert("LA"))),
    ("grayscale PNG", lambda: png(photo().convert("L"))),
    ("1-bit PNG", lambda: png(photo().convert("1"))),
    ("animated GIF", lambda: png(photo(), "GIF", save_all=True, append_images=[photo((48, 40)).rotate(90)])),
]


@pytest.mark.parametrize("make", [a[1] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_odd_images_are_converted(server, make):
    data = {"steps": "2", "outputs": "input", "size_mode": "resize"}
    response = server.post("/encode", files=image_file(make()), data=data)
    assert response.status_code == 200, response.text
    assert response.json()["input"]["array"]["shape"] == [3, 32, 32]


def test_conversions_are_the_documented_ones(server):
    from service.client import decode_array

    def encoded_input(data: bytes) -> np.ndarray:
        response = server.post("/encode", files=image_file(data), data={"steps": "1", "outputs": "input"})
        assert response.status_code == 200, response.text
        return decode_array(response.json()["input"]["array"])

    white = encoded_input(png(rgba_transparent()))  # alpha is composited onto white: 255 -> 1.0
    np.testing.assert_allclose(white, 1.0, atol=1e-6)
    ramp = encoded_input(png(gradient16()))  # 16 bits scaled to 8, not clipped: the ramp spans -1..1
    assert ramp.min() < -0.9 and ramp.max() > 0.9


def test_the_bytes_decide_the_format(server):
    for name, content_type in [("x.jpg", "image/jpg"), ("x", "application/octet-stream"), ("x" * 300, "text/plain")]:
        response = server.post("/encode", files=image_file(GOOD, name, content_type), data={"steps": "1"})
        assert response.status_code == 200, (content_type, response.text)


@pytest.mark.parametrize(
    ("method", "path", "status", "reason"),
    [
        ("GET", "/no/such/page", 404, "not_found"),
        ("POST", "/nothing-here", 404, "not_found"),
        ("GET", "/static_content/no-such-file.js", 404, "not_found"),
        ("GET", "/encode", 405, "method_not_allowed"),
        ("POST", "/model", 405, "method_not_allowed"),
    ],
)
def test_unknown_paths_and_methods_get_the_json_error_body(server, method, path, status, reason):
    response = server.get(path) if method == "GET" else server.post(path, content=b"x")
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "reason"} and body["reason"] == reason
    assert path in body["error"] and "/docs.json" in body["error"]
    assert server.get("/readyz").status_code == 200


def test_the_client_reports_the_reason(server):
    from service.client import EncoderClient, ServiceError

    with EncoderClient(server.url) as client, pytest.raises(ServiceError) as caught:
        client.encode(b"plain text, not an image")
    assert caught.value.status == 400 and caught.value.reason == "bad_image"
    assert caught.value.message == server.post("/encode", files=image_file(b"plain text, not an image")).json()["error"]


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (npz_bomb, "unpack to more than"),  # refused from the zip's header: nothing unpacked
        (npz_claiming_too_much, "claims more values than it holds"),  # numpy would allocate 3.6 TiB
        (lambda: npz(1e300, np.float64), "within +-10000"),  # Inf once in float32
        (lambda: npz(1e30, np.float32), "within +-10000"),  # finite, but the energy would overflow
    ],
    ids=["zip bomb", "header claims too much", "float64 beyond float32", "float32 far too large"],
)
def test_a_start_is_checked_before_it_is_unpacked_or_used(server, make, text):
    response = server.post("/encode", **start_file(make()))
    assert response.status_code == 422 and text in response.json()["error"], response.text


def test_a_bug_becomes_a_500_with_reason_internal_and_its_traceback_only_in_the_log(caplog):
    """Every protocol answers an unexpected exception through service.errors.refusal: a JSON 500 counted as
    `internal`, never the exception's text (it may hold internals), and the traceback in the log."""
    from service.errors import refusal

    try:
        raise KeyError("secret-internal-detail")
    except KeyError as exc:
        error = refusal(exc)
    assert (error.status, error.reason) == (500, "internal") and "internal" in REASONS
    assert "secret-internal-detail" not in error.message
    assert any(r.exc_info and "secret-internal-detail" in str(r.exc_info[1]) for r in caplog.records)
