"""The Python client (service.client) against a real pc-serve: what it sends for every kind of image and argument
it takes, the arguments it refuses before any request, Retry-After on a real 503, snapshots and model_input;
and against a stand-in for a misbehaving proxy (http.server in a thread), answers that are not the service's."""

from __future__ import annotations

import concurrent.futures
import email.utils
import http.server
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.launch import free_port
from service.client import EncoderClient, Encoding, MalformedResponse, ServiceError, Snapshot
from service.options import OUTPUTS

from .conftest import API_KEY, png


@pytest.fixture(scope="module")
def client(server):
    with EncoderClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def small(astronaut) -> Image.Image:
    return Image.fromarray(astronaut).resize((48, 40))


# ---- PIL images in every mode: the pixels the service would decode from the file ------------------------------


def _files(small: Image.Image, folder) -> list:
    """Files in modes a PNG cannot hold (and two it can), as Pillow writes them."""
    gray = np.asarray(small.convert("L"))
    wide = Image.fromarray(gray.astype(np.int32) * 250)  # mode I, values over 255: scaled from 16 bits
    assert wide.mode == "I"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    paletted = small.convert("P").convert("PA")
    paletted.putalpha(Image.linear_gradient("L").resize(small.size))
    made = {
        "cmyk.jpg": (small.convert("CMYK"), {"quality": 95}),
        "ycbcr.tif": (small.convert("YCbCr"), {}),
        "lab.tif": (small.convert("LAB"), {}),
        "int32.tif": (wide, {}),
        "float.tif": (Image.fromarray(gray.astype(np.float32) / 255), {}),
        "gray16.png": (Image.fromarray(gray.astype(np.uint16) * 257), {}),
        "pa.tif": (paletted, {}),
        "turned.jpg": (small, {"exif": exif, "quality": 95}),
    }
    paths = []
    for name, (image, options) in made.items():
        image.save(folder / name, **options)
        paths.append(folder / name)
    return paths


def test_a_pil_image_is_sent_as_the_service_would_decode_its_file(client, small, tmp_path):
    """Image.open(path) gives exactly what the path gives: CMYK, YCbCr, LAB, 32-bit integer, float, 16-bit, PA,
    and an EXIF orientation (before, a PIL image was re-saved as PNG: 'cannot write mode CMYK as PNG', and a
    turned JPEG was sent unturned)."""
    paths = _files(small, tmp_path)
    opened = [Image.open(p) for p in paths]
    assert [im.mode for im in opened] == ["CMYK", "YCbCr", "LAB", "I", "F", "I;16", "PA", "RGB"]
    by_path = client.encode_batch(paths, steps=1, outputs=["input", "latents"])
    by_image = client.encode_batch(opened, steps=1, outputs=["input", "latents"])
    for path, a, b in zip(paths, by_path, by_image, strict=True):
        assert isinstance(a, Encoding) and isinstance(b, Encoding), (path.name, a, b)
        np.testing.assert_array_equal(a.input, b.input, err_msg=path.name)
        np.testing.assert_array_equal(a.latents[0], b.latents[0], err_msg=path.name)
    assert by_image[-1].input.shape == (3, 48, 40)  # turned upright, as the file is
    one = client.encode(Image.open(tmp_path / "cmyk.jpg"), steps=1, outputs=["input"])
    np.testing.assert_array_equal(one.input, by_path[0].input)


@pytest.mark.parametrize(("mode", "as_"), [("HSV", "RGB"), ("RGBX", "RGB"), ("RGBa", "RGBA"), ("La", "LA")])
def test_modes_no_file_holds_are_sent_as_pil_converts_them(client, small, mode, as_):
    image = small.convert("RGBA") if "a" in mode.lower() else small
    image = image.convert(mode)
    got = client.encode(image, steps=1, outputs=["input"])
    want = client.encode(image.convert(as_), steps=1, outputs=["input"])
    np.testing.assert_array_equal(got.input, want.input)


# ---- what else an image may be ---------------------------------------------------------------------------------


def test_bytes_like_files_and_arrays_are_sent(client, small, tmp_path):
    """bytearray, memoryview and binary files are read; uint16 and float arrays and (H, W, 4) are accepted, as
    pcmodel reads them: the same pixels as the uint8 array (before: AttributeError ... 'save', Pillow's TypeError)."""
    data = png(small)
    want = client.encode(data, steps=1, outputs=["input"]).input
    (tmp_path / "a.png").write_bytes(data)
    with open(tmp_path / "a.png", "rb") as f:
        given = [bytearray(data), memoryview(data), io.BytesIO(data), f]
        for image in given:
            np.testing.assert_array_equal(client.encode(image, steps=1, outputs=["input"]).input, want)
    pixels = np.asarray(small)
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])
    for array in (pixels.astype(np.uint16) * 257, pixels / 255.0, (pixels / 255.0).astype(np.float32), rgba):
        got = client.encode(array, steps=1, outputs=["input"])
        np.testing.assert_array_equal(got.input, want, err_msg=f"{array.dtype} {array.shape}")


# A client whose URL nothing answers: an argument that reached a request would fail with httpx.ConnectError.
@pytest.fixture
def nowhere():
    with EncoderClient(f"http://127.0.0.1:{free_port()}", timeout=5) as c:
        yield c


@pytest.mark.parametrize(
    ("image", "error", "words"),
    [
        (None, TypeError, "image must be a path"),
        (42, TypeError, "got int"),
        (io.StringIO("text"), TypeError, "binary mode"),
        (np.zeros((3, 32, 32), np.uint8), ValueError, "shape (3, 32, 32), dtype uint8; channels first"),
        (np.zeros((32, 32), np.int64), ValueError, "dtype int64"),
        (np.full((32, 32, 3), 200.0), ValueError, "in [0, 1], got 200 to 200"),
        (np.full((32, 32), np.nan, np.float32), ValueError, "NaN"),
        (np.zeros((32, 32, 2), np.uint8), ValueError, "shape (32, 32, 2)"),
    ],
)
def test_an_image_of_the_wrong_kind_is_refused_before_any_request(nowhere, image, error, words):
    with pytest.raises(error) as caught:
        nowhere.encode(image)
    assert words in str(caught.value)


def test_wrong_arguments_are_refused_before_any_request(nowhere, small):
    with pytest.raises(TypeError, match=r"encode_batch takes a list of images.*got a str"):
        nowhere.encode_batch("frame0.png")
    with pytest.raises(TypeError, match="list"):
        nowhere.encode_batch(small)
    with pytest.raises(ValueError, match="at least one image"):
        nowhere.encode_batch([])
    with pytest.raises(TypeError, match=r"images\[1\] must be"):
        nowhere.encode_batch([b"x", None])
    with pytest.raises(TypeError, match=r"start must be .*got dict.*the Encoding itself"):
        nowhere.encode(b"x", start={"latents": []})
    with pytest.raises(TypeError, match=r"start\[0\] must be an array of numbers"):
        nowhere.encode(b"x", start=["a"])
    with pytest.raises(TypeError, match="outputs must be"):
        nowhere.encode(b"x", outputs=[1])
    with pytest.raises(ValueError, match="outputs names no output"):
        nowhere.encode(b"x", outputs=[])
    with pytest.raises(TypeError, match="steps must be an int"):
        nowhere.encode(b"x", steps="50")
    with pytest.raises(ValueError, match=r"must be an http:// or https:// URL.*'http://localhost:3731'"):
        EncoderClient("localhost:3731")


def test_outputs_as_one_string(client, astronaut64):
    """outputs="latents" is the output latents (before: joined to 'l,a,t,e,n,t,s', refused with 422)."""
    only = client.encode(astronaut64, steps=2, outputs="latents")
    assert only.latents and only.input is None and only.images == {}
    two = client.encode(astronaut64, steps=2, outputs="latents, trace")
    assert two.latents and two.energy_trace is not None and len(two.energy_trace) == 3


def test_a_warm_start_from_an_npz(client, astronaut64, tmp_path):
    """start= an .npz's path, bytes or file (a saved response's latents) goes as it is (before: 'could not
    convert string to float')."""
    first = client.encode(astronaut64, size_mode="resize", steps=20)
    path = tmp_path / "prev.npz"
    np.savez(path, **{f"latent_{i}": r for i, r in enumerate(first.latents, 1)})
    with open(path, "rb") as f:
        for start in (path, str(path), path.read_bytes(), f):
            again = client.encode(astronaut64, size_mode="resize", steps=1, start=start)
            assert again.init == "given"
            assert again.energy_initial == pytest.approx(first.energy_final, rel=1e-4)
    with pytest.raises(ServiceError) as refused:
        client.encode(astronaut64, start=b"not an npz")
    assert refused.value.status == 422 and "start" in refused.value.message


@pytest.mark.parametrize(
    ("mode", "made_from", "used_for"),
    [("tile", (100, 120), (120, 100)), ("full", (160, 256), (256, 160)), ("resize", (40, 48), (48, 40))],
)
def test_an_encodings_start_says_where_it_came_from(client, astronaut, mode, made_from, used_for):
    """An Encoding as start carries its size mode and image size (pcmodel.starts): the latents of an image of
    another size whose shapes agree (72 tiles each; the 256 bucket each) are refused, not taken as given."""
    first = client.encode(png(astronaut[: made_from[0], : made_from[1]]), size_mode=mode, steps=2)
    same = client.encode(png(astronaut[: made_from[0], : made_from[1]]), size_mode=mode, steps=1, start=first)
    assert same.init == "given" and same.energy_initial == pytest.approx(first.energy_final, rel=1e-4)
    other = png(astronaut[: used_for[0], : used_for[1]])
    if mode == "resize":  # every image is resized to the native size: any size's start fits
        assert client.encode(other, size_mode=mode, steps=1, start=first).init == "given"
    else:
        with pytest.raises(ServiceError) as refused:
            client.encode(other, size_mode=mode, steps=1, start=first)
        assert refused.value.status == 422 and "same size" in refused.value.message
    with pytest.raises(ServiceError) as refused:  # an encoding made in one size mode, used in another
        client.encode(
            png(astronaut[: made_from[0], : made_from[1]]),
            size_mode="resize" if mode != "resize" else "tile",
            steps=1,
            start=first,
        )
    assert refused.value.status == 422 and "size mode" in refused.value.message


# ---- what comes back -------------------------------------------------------------------------------------------


def test_snapshots_and_model_input(client, astronaut64, small):
    """Encoding.snapshots and .model_input, parsed (before: in `raw` only)."""
    result = client.encode(astronaut64, size_mode="resize", steps=10, outputs=["snapshots", "trace"])
    assert isinstance(result.snapshots[0], Snapshot) and result.snapshots[0].step == 0
    assert [s.step for s in result.snapshots] == sorted(s["step"] for s in result.raw["snapshots"])
    last = result.snapshots[-1]
    assert last.step == 10 and last.energy == pytest.approx(result.energy_final, rel=1e-4)
    assert set(last.images) == {"reconstruction", "error_map"} and last.images["reconstruction"].size == (32, 32)
    assert [r.dtype for r in last.latents] == [np.float32, np.float32] and last.latents[0].ndim == 3
    assert result.energy_trace.dtype == np.float64  # the JSON's numbers, as the docstring says
    assert (result.energy_trace[0], result.energy_trace[-1]) == (result.energy_initial, result.energy_final)
    assert result.model_input is None and client.encode(astronaut64, steps=1, size_mode="resize").snapshots is None
    full = client.encode(small, steps=1, outputs=["latents"])  # full mode: padded to a bucket
    assert full.model_input == full.raw["model_input"]
    assert full.model_input[0] >= 40 and full.model_input[1] >= 48  # [H, W], around the 48 x 40 image


def test_the_documentation_names_what_the_service_sends():
    assert all(name in EncoderClient.encode.__doc__ for name in OUTPUTS)
    assert "given" in Encoding.__doc__ and "float64" in Encoding.__doc__
    assert "httpx.ConnectError" in EncoderClient.encode.__doc__


def test_an_unreachable_service_raises_httpx_transport_errors(nowhere, astronaut64):
    with pytest.raises(httpx.ConnectError):  # as documented: not wrapped
        nowhere.encode(astronaut64)
    assert nowhere.ready() is False


# ---- 503 and Retry-After ---------------------------------------------------------------------------------------


def test_retry_after_of_a_real_503(guarded_server, astronaut64):
    """A full queue (PC_MAX_QUEUE=4) answers 503 overloaded with Retry-After: 1, kept as retry_after."""
    with EncoderClient(guarded_server.url, api_key=API_KEY) as c:

        def call(_):
            try:
                return c.encode(astronaut64, steps=500, size_mode="resize", outputs=["latents"])
            except ServiceError as exc:
                return exc

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(call, range(12)))
    refused = [a for a in answers if isinstance(a, ServiceError)]
    assert refused, "no 503 from 12 requests at once against a queue of 4"
    assert all(a.status == 503 and a.reason == "overloaded" for a in refused), refused
    assert all(a.retry_after == 1.0 for a in refused)
    with EncoderClient(guarded_server.url) as keyless, pytest.raises(ServiceError) as caught:
        keyless.encode(astronaut64)
    assert caught.value.status == 401 and caught.value.retry_after is None


# ---- answers that are not the service's ------------------------------------------------------------------------


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers every request to a path with the (status, headers, body) set for it: a misbehaving proxy."""

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._answer()

    def _answer(self) -> None:
        status, headers, body = self.server.answers[self.path]  # type: ignore[attr-defined]
        self.send_response(status)
        for name, value in {"content-type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def proxy():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    httpd.answers = {}  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    with EncoderClient(f"http://127.0.0.1:{httpd.server_address[1]}") as c:
        yield httpd.answers, c  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()
    thread.join()


HTML = b"<html><body><h1>Welcome to nginx!</h1>" + b"<p>filler</p>" * 100 + b"</body></html>"
GOOD = {"model": {"name": "m"}, "steps": 1, "size_mode": "resize", "energy": {"initial": 2.0, "final": 1.0}}


def test_answers_that_are_not_the_services_are_malformed_responses(proxy):
    """A 200 with HTML, or JSON without a field the service always sends: MalformedResponse (a ServiceError)
    naming what is wrong (before: JSONDecodeError, KeyError)."""
    answers, c = proxy
    cases = [
        ("/encode", (200, {"content-type": "text/html"}, HTML), "not JSON (text/html: '<html><body><h1>Welcome"),
        ("/encode", (200, {}, json.dumps([GOOD]).encode()), "is a list, not a JSON object"),
        ("/encode", (200, {}, json.dumps({k: v for k, v in GOOD.items() if k != "energy"}).encode()), "no `energy`"),
        ("/encode", (200, {}, json.dumps({**GOOD, "energy": {"initial": 1}}).encode()), "`energy` has no `final`"),
        ("/encode", (200, {}, json.dumps({**GOOD, "steps": "1"}).encode()), "`steps` is a str"),
        ("/encode", (200, {}, json.dumps({**GOOD, "latents": [{"dtype": "float32"}]}).encode()), "`latents[0]`"),
        ("/encode", (200, {}, json.dumps({**GOOD, "input": {"array": {}}}).encode()), "`input` has no `png`"),
        ("/encode_batch", (200, {}, json.dumps({"model": {}}).encode()), "no `results` list"),
        ("/encode_batch", (200, {}, json.dumps({"results": [{"error": "x"}]}).encode()), "results[0] has no `status`"),
        ("/encode_batch", (200, {}, json.dumps({"results": [{"steps": 1}]}).encode()), "results[0] has no `energy`"),
        ("/encode_batch", (200, {}, json.dumps({"results": [GOOD, GOOD]}).encode()), "2 results for 1 images"),
        ("/model", (200, {"content-type": "text/plain"}, b"ok"), "not JSON"),
    ]
    for path, answer, words in cases:
        answers.clear()
        answers[path] = answer
        call = {"/encode": lambda: c.encode(b"x"), "/encode_batch": lambda: c.encode_batch([b"x"])}.get(path, c.model)
        with pytest.raises(MalformedResponse) as caught:
            call()
        assert isinstance(caught.value, ServiceError) and caught.value.status == 200
        assert words in caught.value.message, (words, caught.value.message)
    answers["/encode"] = (200, {"server-timing": "queue;dur=x, model;dur=2"}, json.dumps(GOOD).encode())
    result = c.encode(b"x")
    assert (result.energy_initial, result.timing) == (2.0, {"model": 2.0})


def test_error_answers_keep_retry_after_and_stay_short(proxy):
    answers, c = proxy
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    for header, want in (("2.5", 2.5), (later, 30), ("soon", None), (None, None)):
        headers = {} if header is None else {"retry-after": header}
        answers["/encode"] = (503, headers, b'{"error": "busy", "reason": "overloaded"}')
        with pytest.raises(ServiceError) as caught:
            c.encode(b"x")
        assert (caught.value.status, caught.value.reason, caught.value.message) == (503, "overloaded", "busy")
        if want is None:
            assert caught.value.retry_after is None
        else:
            assert caught.value.retry_after == pytest.approx(want, abs=2)
    answers["/encode"] = (502, {"content-type": "text/html", "retry-after": "7"}, HTML)
    with pytest.raises(ServiceError) as caught:
        c.encode(b"x")
    assert caught.value.status == 502 and caught.value.retry_after == 7.0 and caught.value.reason is None
    assert caught.value.message.startswith("<html><body><h1>Welcome to nginx!") and len(caught.value.message) < 300
    answers["/encode_batch"] = (200, {"retry-after": "3"}, b'{"results": [{"error": "full", "status": 503}]}')
    [entry] = c.encode_batch([b"x"])
    assert isinstance(entry, ServiceError) and entry.retry_after == 3.0
