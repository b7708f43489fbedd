"""The Open Inference Protocol (KServe v2) against a real server, with the protocol's real clients
(tritonclient.http and tritonclient.grpc): health, metadata, inference with binary and JSON tensors,
async calls, every error, and results bit for bit equal to /encode's for the same image and options."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import queue
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

import pcmodel
from pcmodel import SOLVERS
from service.client import EncoderClient, ServiceError

from .conftest import API_KEY, metric, png
from .test_bad_input import png_header_only

ROOT = Path(__file__).resolve().parents[2]
MODEL = "conv-rgb"
OUTPUTS = ("latent_1", "latent_2", "input", "reconstruction", "error_map", "energy")


@pytest.fixture(scope="module")
def version() -> str:
    return pcmodel.load("default").sha256[:12]


@pytest.fixture(scope="module")
def rest(server):
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"), concurrency=4)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc_target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def encoder(server):
    with EncoderClient(server.url) as c:
        yield c


def image_input(module, *files: bytes, binary: bool = True):
    tensor = module.InferInput("image", [len(files)], "BYTES")
    if module is httpclient:
        tensor.set_data_from_numpy(np.array(files, dtype=object), binary_data=binary)
    else:
        tensor.set_data_from_numpy(np.array(files, dtype=object))
    return tensor


def _json_image(data: bytes) -> dict:
    """An `image` input in JSON: the file base64-encoded."""
    return {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}


def code(error: InferenceServerException) -> str:
    return str(error.status())


# ---- health and metadata --------------------------------------------------------------------------


def test_health_matches_livez_and_readyz(server, rest, grpc, version):
    assert server.get("/livez").status_code == 200 and server.get("/readyz").status_code == 200
    assert rest.is_server_live() and rest.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    for client in (rest, grpc):
        assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, version)
    assert not rest.is_model_ready("no-such-model")  # 404
    assert not rest.is_model_ready(MODEL, "0" * 12)
    assert grpc.is_model_ready("no-such-model") is False  # ready: false, as Triton answers (not NOT_FOUND)


def test_server_and_model_metadata(rest, grpc, version):
    server = rest.get_server_metadata()
    assert server["name"] == "predictive-coding" and "binary_tensor_data" in server["extensions"]
    assert grpc.get_server_metadata(as_json=True)["name"] == "predictive-coding"
    for meta in (rest.get_model_metadata(MODEL), rest.get_model_metadata(MODEL, version)):
        assert meta["name"] == MODEL and meta["versions"] == [version] and meta["platform"] == "pytorch"
        assert meta["inputs"] == [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "x", "datatype": "FP32", "shape": [-1, 3, -1, -1]},  # full mode's sizes too
            {"name": "start_latent_1", "datatype": "FP32", "shape": [-1, 8, -1, -1]},  # a warm start (optional)
            {"name": "start_latent_2", "datatype": "FP32", "shape": [-1, 10, -1, -1]},
        ]
        outputs = {o["name"]: o for o in meta["outputs"]}
        assert list(outputs) == [*OUTPUTS[:2], "input", "reconstruction", "error_map", "energy", "trace"]
        assert outputs["latent_1"]["shape"] == [-1, 8, -1, -1] and outputs["energy"]["shape"] == [-1, 2]
    meta = grpc.get_model_metadata(MODEL, as_json=True)
    assert meta["versions"] == [version] and [int(n) for n in meta["inputs"][1]["shape"]] == [-1, 3, -1, -1]
    assert [i["name"] for i in meta["inputs"]] == ["image", "x", "start_latent_1", "start_latent_2"]
    for call in (lambda: rest.get_model_metadata("nope"), lambda: grpc.get_model_metadata(MODEL, "abc")):
        with pytest.raises(InferenceServerException, match="this server serves 'conv-rgb'"):
            call()


# ---- results: bit for bit /encode's ----------------------------------------------------------------


def assert_same_as_encode(result, encoding, index: int = 0) -> None:
    """Every array of the v2 result's image `index` equals /encode's, bit for bit."""
    for level, latent in enumerate(encoding.latents, start=1):
        np.testing.assert_array_equal(result.as_numpy(f"latent_{level}")[index], latent)
    for name in ("input", "reconstruction", "error_map"):
        np.testing.assert_array_equal(result.as_numpy(name)[index], getattr(encoding, name))
    energy = result.as_numpy("energy")[index]
    assert energy.dtype == np.float32
    assert energy.tolist() == [np.float32(encoding.energy_initial), np.float32(encoding.energy_final)]


@pytest.mark.parametrize(("mode", "steps"), [("resize", 20), ("tile", 5), ("full", 20)])
def test_binary_infer_equals_encode(server, rest, grpc, encoder, china_jpeg, mode, steps):
    encoding = encoder.encode(china_jpeg, steps=steps, size_mode=mode)
    parameters = {"steps": steps, "size_mode": mode}
    before = server.metrics()
    ok = metric(before, "pc_grpc_requests_total", method="ModelInfer", code="OK")
    rest_ok = metric(before, "pc_v2_rest_requests_total", method="ModelInfer", code="200")
    for module, client in ((httpclient, rest), (grpcclient, grpc)):
        result = client.infer(MODEL, [image_input(module, china_jpeg)], parameters=parameters)
        assert sorted(o["name"] if isinstance(o, dict) else o.name for o in _outputs(result)) == sorted(OUTPUTS)
        assert_same_as_encode(result, encoding)
    after = server.metrics()
    assert metric(after, "pc_grpc_requests_total", method="ModelInfer", code="OK") == ok + 1
    assert metric(after, "pc_v2_rest_requests_total", method="ModelInfer", code="200") == rest_ok + 1
    assert metric(after, "pc_v2_rest_request_duration_seconds_count", method="ModelInfer") >= rest_ok + 1
    if mode == "tile":  # every output's first axis is the image: a tiled image's latents keep the tile axis
        assert result.as_numpy("latent_1").shape == (1, 35, 8, 7, 7)


def _outputs(result):
    response = result.get_response()
    return response["outputs"] if isinstance(response, dict) else response.outputs


def test_only_requested_outputs_and_trace(rest, grpc, encoder, astronaut64):
    encoding = encoder.encode(astronaut64, steps=20, outputs=["trace", "reconstruction"])
    for module, client in ((httpclient, rest), (grpcclient, grpc)):
        wanted = [module.InferRequestedOutput(n) for n in ("trace", "reconstruction")]
        result = client.infer(MODEL, [image_input(module, astronaut64)], outputs=wanted, parameters={"steps": 20})
        assert [o["name"] if isinstance(o, dict) else o.name for o in _outputs(result)] == ["trace", "reconstruction"]
        np.testing.assert_array_equal(result.as_numpy("trace")[0], encoding.energy_trace.astype(np.float32))
        np.testing.assert_array_equal(result.as_numpy("reconstruction")[0], encoding.reconstruction)


def test_json_tensors_both_ways(server, rest, encoder, astronaut64, version):
    encoding = encoder.encode(astronaut64, size_mode="resize")
    # `x`: /encode's preprocessed input, sent as JSON numbers; outputs asked for as JSON.
    x = httpclient.InferInput("x", [1, 3, 32, 32], "FP32")
    x.set_data_from_numpy(encoding.input[None], binary_data=False)
    wanted = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("latent_2", "error_map", "energy")]
    result = rest.infer(MODEL, [x], outputs=wanted, model_version=version)
    assert all("data" in o for o in result.get_response()["outputs"])
    np.testing.assert_array_equal(result.as_numpy("latent_2")[0], encoding.latents[1])
    np.testing.assert_array_equal(result.as_numpy("error_map")[0], encoding.error_map)
    # `image` in JSON: the file base64-encoded; a plain JSON answer when no output asks for binary.
    body = {
        "id": "req-7",
        "inputs": [_json_image(astronaut64)],
        "parameters": {"size_mode": "resize"},
        "outputs": [{"name": "latent_1"}, {"name": "energy"}],
    }
    response = server.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    answer = response.json()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (MODEL, version, "req-7")
    assert answer["parameters"] == {"solver": encoding.solver, "init": encoding.init}  # what ran, as /encode says
    latent = answer["outputs"][0]
    assert latent["shape"] == [1, 8, 7, 7]
    np.testing.assert_array_equal(np.asarray(latent["data"], dtype=np.float32).reshape(8, 7, 7), encoding.latents[0])


def test_x_at_a_full_mode_size_in_a_large_json_body(rest, encoder, astronaut):
    """`x` may have a full-mode bucket's size; a JSON body of ~1 MB (parsed on a thread, charged to the
    decoding budget) gives /encode's full-mode numbers for those rows."""
    photo = png(Image.fromarray(astronaut).resize((88, 88)))
    encoding = encoder.encode(photo, size_mode="full", steps=10)
    assert encoding.input.shape == (3, 88, 88)  # 88 is full mode's smallest bucket: no padding
    rows = np.stack([encoding.input] * 3)
    x = httpclient.InferInput("x", list(rows.shape), "FP32")
    x.set_data_from_numpy(rows, binary_data=False)
    wanted = [httpclient.InferRequestedOutput("latent_2")]
    result = rest.infer(MODEL, [x], outputs=wanted, parameters={"steps": 10})
    latents = result.as_numpy("latent_2")
    assert latents.shape == (3, *encoding.latents[1].shape)
    for row in latents:  # three rows in one model call, /encode's one alone: equal up to float32 rounding
        np.testing.assert_allclose(row, encoding.latents[1], rtol=0, atol=1e-5)


def test_grpc_contents_without_raw(server, encoder, astronaut64):
    """Tensors in `contents` (the protocol's other way besides raw_input_contents), with Triton's own stubs."""
    import grpc as grpclib

    encoding = encoder.encode(astronaut64, size_mode="resize")
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 3, 32, 32])
    tensor.contents.fp32_contents.extend(encoding.input.ravel().tolist())
    request.outputs.add(name="latent_1")
    with grpclib.insecure_channel(server.grpc_target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert [o.name for o in response.outputs] == ["latent_1"] and list(response.outputs[0].shape) == [1, 8, 7, 7]
    latent = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(8, 7, 7)
    np.testing.assert_array_equal(latent, encoding.latents[0])


_DUMP = """
import json, sys
from service.v2proto import grpc_predict_v2_pb2 as pb
def fields(d):
    out = {d.full_name: sorted((f.name, f.number, f.type, f.is_repeated) for f in d.fields)}
    for n in d.nested_types:
        out.update(fields(n))
    return out
out = {}
for d in pb.DESCRIPTOR.message_types_by_name.values():
    out.update(fields(d))
methods = [m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]
print(json.dumps({"messages": out, "methods": methods}))
"""


def test_our_proto_is_the_protocols():
    """Our stubs' messages, field for field, are those of Triton's superset of the protocol (tritonclient's
    stubs): the same names, numbers and types, so both sides agree on the wire. In a subprocess: both
    register the package `inference` in protobuf's default pool, so they cannot share a process."""
    out = subprocess.run([sys.executable, "-c", _DUMP], capture_output=True, text=True, check=True, cwd=ROOT)
    ours = json.loads(out.stdout)
    theirs = service_pb2.DESCRIPTOR
    service = theirs.services_by_name["GRPCInferenceService"]
    assert set(ours["methods"]) <= {m.name for m in service.methods}
    assert len(ours["methods"]) == 6
    for name, fields in ours["messages"].items():
        descriptor = theirs.pool.FindMessageTypeByName(name)
        expected = sorted((f.name, f.number, f.type, f.is_repeated) for f in descriptor.fields)
        assert [list(f) for f in expected] == fields, name


def test_several_images_one_request(rest, grpc, encoder, astronaut, astronaut64):
    other = png(Image.fromarray(astronaut).resize((50, 70)))
    result = rest.infer(MODEL, [image_input(httpclient, astronaut64, other)], parameters={"size_mode": "resize"})
    assert result.as_numpy("input").shape == (2, 3, 32, 32)
    assert_same_as_encode(result, encoder.encode(other, size_mode="resize"), index=1)
    # In full mode two sizes would give two shapes: one request, one shape, so they are refused.
    with pytest.raises(InferenceServerException, match="separate requests") as caught:
        rest.infer(MODEL, [image_input(httpclient, astronaut64, other)], parameters={"size_mode": "full"})
    assert code(caught.value) == "400"


def _start_inputs(module, latents: list[np.ndarray]) -> list:
    """A warm start: a previous response's latent_1..latent_L sent back as start_latent_1..start_latent_L."""
    tensors = []
    for level, array in enumerate(latents, start=1):
        tensor = module.InferInput(f"start_latent_{level}", list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_warm_start_as_encode(rest, grpc, encoder, astronaut64, mode):
    """start_latent_*: a run starts from a previous response's latents, as /encode's `start` does: its first
    energy is the previous run's last, it ends lower than the cold run of the same steps (gradient steps from a
    stable step size only go down), and its arrays are /encode's with the same start, bit for bit."""
    parameters = {"steps": 5, "size_mode": mode}
    cold = rest.infer(MODEL, [image_input(httpclient, astronaut64)], parameters=parameters)
    latents = [cold.as_numpy("latent_1"), cold.as_numpy("latent_2")]
    encoding = encoder.encode(astronaut64, steps=5, size_mode=mode, start=[a[0] for a in latents])
    assert encoding.init == "given"
    (cold_before, cold_after) = cold.as_numpy("energy")[0]
    for module, client in ((httpclient, rest), (grpcclient, grpc)):
        inputs = [image_input(module, astronaut64), *_start_inputs(module, latents)]
        warm = client.infer(MODEL, inputs, parameters=parameters)
        before, after = warm.as_numpy("energy")[0]
        assert before == pytest.approx(cold_after, rel=1e-4) and before < cold_before
        assert after <= cold_after
        assert_same_as_encode(warm, encoding)
        response = warm.get_response(as_json=True) if module is grpcclient else warm.get_response()
        assert response["parameters"]["init"] in ("given", {"string_param": "given"})


def test_warm_start_refusals(server, rest, grpc, astronaut64):
    """A warm start with a missing level, a wrong shape or datatype, or with `init` too: 400 / INVALID_ARGUMENT,
    counted as bad_parameter."""
    resize = {"size_mode": "resize"}
    cold = rest.infer(MODEL, [image_input(httpclient, astronaut64)], parameters={"steps": 5, **resize})
    latents = [cold.as_numpy("latent_1"), cold.as_numpy("latent_2")]
    cases = [
        (lambda m: _start_inputs(m, latents[:1]), {}, "every level"),
        (lambda m: _start_inputs(m, [latents[0][:, :3], latents[1]]), {}, "for these images it is FP32 [1, 8, 7, 7]"),
        (lambda m: _start_inputs(m, [np.concatenate([latents[0]] * 2), latents[1]]), {}, "for these images"),
        (
            lambda m: [_fp32(m, "start_latent_1", [1, 8, 7, 7]), *_start_inputs(m, latents)[1:]],
            {"init": "zero"},
            "not both",
        ),
        (
            lambda m: [_fp32(m, "start_latent_1", [1, 8, 7, 7], "INT32"), *_start_inputs(m, latents)[1:]],
            {},
            "must be FP32",
        ),
        # far beyond any settled code: the energy would overflow float32 (it was a 500 not_finite)
        (lambda m: _start_inputs(m, [latents[0] + 1e30, latents[1]]), {}, "within +-10000"),
    ]
    before = metric(server.metrics(), "pc_request_errors_total", reason="bad_parameter")
    for make, parameters, text in cases:
        for module, client, expected in ((httpclient, rest, "400"), (grpcclient, grpc, "StatusCode.INVALID_ARGUMENT")):
            with pytest.raises(InferenceServerException, match=re.escape(text)) as caught:
                client.infer(
                    MODEL, [image_input(module, astronaut64), *make(module)], parameters={**resize, **parameters}
                )
            assert code(caught.value) == expected
    assert metric(server.metrics(), "pc_request_errors_total", reason="bad_parameter") == before + 2 * len(cases)


def test_async_infer(rest, grpc, astronaut64):
    pending = rest.async_infer(MODEL, [image_input(httpclient, astronaut64)], parameters={"steps": 20})
    done: queue.Queue = queue.Queue()
    grpc.async_infer(
        MODEL,
        [image_input(grpcclient, astronaut64)],
        lambda result, error: done.put((result, error)),
        parameters={"steps": 20},
    )
    first = pending.get_result(timeout=60)
    second, error = done.get(timeout=30)
    assert error is None
    np.testing.assert_array_equal(first.as_numpy("latent_2"), second.as_numpy("latent_2"))


# ---- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "status", "grpc_code", "reason", "text"),
    [
        (lambda m, img: ("nope", [image_input(m, img)], {}), "404", "NOT_FOUND", "not_found", "no model"),
        (
            lambda m, img: (MODEL, [image_input(m, img)], {"steps": 0}),
            "400",
            "INVALID_ARGUMENT",
            "bad_parameter",
            "steps",
        ),
        (
            lambda m, img: (MODEL, [image_input(m, img)], {"size_mode": "big"}),
            "400",
            "INVALID_ARGUMENT",
            "bad_parameter",
            "size_mode",
        ),
        (
            lambda m, img: (MODEL, [image_input(m, img)], {"colour": "red"}),
            "400",
            "INVALID_ARGUMENT",
            "bad_parameter",
            "unknown parameter",
        ),
        (
            lambda m, img: (MODEL, [image_input(m, b"not an image")], {}),
            "400",
            "INVALID_ARGUMENT",
            "bad_image",
            "not an image",
        ),
        (
            lambda m, img: (MODEL, [_fp32(m, "image", [1])], {}),
            "400",
            "INVALID_ARGUMENT",
            "bad_request",
            "BYTES [N]",
        ),
        (
            lambda m, img: (MODEL, [_fp32(m, "x", [1, 3, 30, 30])], {}),
            "400",
            "INVALID_ARGUMENT",
            "bad_request",
            "the model takes",
        ),
        (lambda m, img: (MODEL, [_fp32(m, "y", [1])], {}), "400", "INVALID_ARGUMENT", "bad_request", "send one input"),
        (
            lambda m, img: (MODEL, [image_input(m, png_header_only(6000, 6000))], {}),
            "413",
            "RESOURCE_EXHAUSTED",
            "too_large",
            "over the limit",
        ),
        (
            lambda m, img: (MODEL, [image_input(m, *[img] * 33)], {}),
            "413",
            "RESOURCE_EXHAUSTED",
            "too_large",
            "at most 32",
        ),
    ],
    ids=[
        "unknown-model",
        "steps",
        "size-mode",
        "unknown-parameter",
        "bad-image",
        "datatype",
        "x-shape",
        "input-name",
        "bomb",
        "too-many",
    ],
)
def test_errors(server, rest, grpc, astronaut64, make, status, grpc_code, reason, text):
    samples = server.metrics()
    before = metric(samples, "pc_request_errors_total", reason=reason)
    calls = metric(samples, "pc_grpc_requests_total", method="ModelInfer", code=grpc_code)
    rest_calls = metric(samples, "pc_v2_rest_requests_total", method="ModelInfer", code=status)
    for module, client, expected in ((httpclient, rest, status), (grpcclient, grpc, f"StatusCode.{grpc_code}")):
        model, inputs, parameters = make(module, astronaut64)
        with pytest.raises(InferenceServerException, match=re.escape(text)) as caught:
            client.infer(model, inputs, parameters=parameters)
        assert code(caught.value) == expected
    samples = server.metrics()
    assert metric(samples, "pc_request_errors_total", reason=reason) == before + 2
    assert metric(samples, "pc_grpc_requests_total", method="ModelInfer", code=grpc_code) == calls + 1
    assert metric(samples, "pc_v2_rest_requests_total", method="ModelInfer", code=status) == rest_calls + 1


def _fp32(module, name: str, shape: list[int], datatype: str = "FP32"):
    tensor = module.InferInput(name, shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=np.float32 if datatype == "FP32" else np.int32))
    return tensor


def test_unknown_output_and_malformed_requests(server, rest, astronaut64):
    wanted = [httpclient.InferRequestedOutput("latent_9")]
    with pytest.raises(InferenceServerException, match="the outputs are: latent_1"):
        rest.infer(MODEL, [image_input(httpclient, astronaut64)], outputs=wanted)
    url = f"/v2/models/{MODEL}/infer"
    cases = [
        (b"not json", {}, "not JSON"),
        (b'{"inputs": 3}', {}, '"inputs" list'),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}', {}, "base64"),
        (b'{"inputs": []}xyz', {"Inference-Header-Content-Length": "14"}, "beyond the inputs"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}, "within the body"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "\u00b2".encode("latin-1")}, "within the body"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "9" * 5000}, "within the body"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": 3}]}', {}, "object"),
        (b'{"inputs": [], "outputs": [{"name": "energy", "parameters": "x"}]}', {}, "object"),
        (b'{"inputs": [], "parameters": {"binary_data_output": "false"}}', {}, "true or false"),
        (b'{"inputs": [], "outputs": [{"name": "energy", "parameters": {"binary_data": 1}}]}', {}, "true or false"),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1' + b"0" * 400 + b"]}]}",
            {},
            "too large for a float",
        ),
    ]
    for body, headers, text in cases:
        response = server.post(url, content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert text in response.json()["error"] and response.json()["reason"] == "bad_request"
    # Finite but far beyond any preprocessed image: the energy would overflow (it was a 500 not_finite).
    x = {"name": "x", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [3e38] * (3 * 32 * 32)}
    response = server.post(url, json={"inputs": [x]})
    assert response.status_code == 400 and response.json()["reason"] == "bad_parameter", response.text
    assert "within +-10000" in response.json()["error"]


KEY = API_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}  # tritonclient.http adds its own headers to the dict it gets: pass a copy
GRPC_AUTH = {"authorization": f"Bearer {KEY}"}  # gRPC metadata keys are lower case


def test_limits_overload_and_batching_with_encode(guarded_server, astronaut64):
    """413 before the body is read (gRPC: RESOURCE_EXHAUSTED), 503 with Retry-After from a full queue, and
    v2 requests in the same model calls as /encode's."""
    s = guarded_server
    rest = httpclient.InferenceServerClient(s.url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(s.grpc_target)
    big = b"\x00" * 150_000
    with pytest.raises(InferenceServerException) as caught:
        rest.infer(MODEL, [image_input(httpclient, big)], headers=dict(AUTH))
    assert code(caught.value) == "413" and "over the limit of 100000 bytes" in str(caught.value)
    with pytest.raises(InferenceServerException) as caught:
        grpc.infer(MODEL, [image_input(grpcclient, big)], headers=GRPC_AUTH)
    assert code(caught.value) == "StatusCode.RESOURCE_EXHAUSTED"

    files = {"image": ("a.png", astronaut64)}
    parameters = {"steps": 20, "size_mode": "resize"}
    body = {"inputs": [_json_image(astronaut64)], "parameters": parameters}
    shared = []  # (model calls, rows) per attempt; a cold first attempt may miss the 300 ms window
    for _ in range(3):
        before = s.metrics()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # httpx: tritonclient.http's gevent needs one thread
            v2_call = pool.submit(s.post, f"/v2/models/{MODEL}/infer", json=body, headers=AUTH)
            encode_call = pool.submit(s.post, "/encode", files=files, data=parameters, headers=AUTH)
            assert encode_call.result().status_code == 200 and v2_call.result().status_code == 200
        after = s.metrics()
        shared.append(tuple(metric(after, n) - metric(before, n) for n in ("pc_batch_size_count", "pc_batch_size_sum")))
        if shared[-1] == (1, 2):
            break
    assert shared[-1] == (1, 2), shared  # one model call for both requests

    body = {"inputs": [_json_image(astronaut64)], "parameters": {"steps": 500, "size_mode": "resize"}}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: s.post(f"/v2/models/{MODEL}/infer", json=body, headers=AUTH), range(8)))
    refused = [a for a in answers if a.status_code == 503]
    assert refused and all(a.status_code in (200, 503) for a in answers)
    assert refused[0].headers["retry-after"] == "1" and refused[0].json()["reason"] == "overloaded"
    assert json.loads(refused[0].text)["error"].startswith("the model's queue is full")
    rest.close()
    grpc.close()


def test_grpc_message_over_the_limit_is_counted(guarded_server):
    """A ModelInfer message over PC_MAX_BODY_BYTES: RESOURCE_EXHAUSTED, counted as `too_large` as HTTP's 413 is.
    One over gRPC's own ceiling (service.v2_grpc.MESSAGE_CEILING = 2 limits; not imported: its stubs and
    tritonclient's cannot share a process) is refused by gRPC from its length prefix, unread and uncounted."""
    s = guarded_server
    grpc = grpcclient.InferenceServerClient(s.grpc_target)
    samples = s.metrics()
    too_large = metric(samples, "pc_request_errors_total", reason="too_large")
    calls = metric(samples, "pc_grpc_requests_total", method="ModelInfer", code="RESOURCE_EXHAUSTED")
    with pytest.raises(InferenceServerException, match="over the limit of 100000 bytes") as caught:
        grpc.infer(MODEL, [image_input(grpcclient, b"\x00" * 150_000)], headers=GRPC_AUTH)
    assert code(caught.value) == "StatusCode.RESOURCE_EXHAUSTED"
    samples = s.metrics()
    assert metric(samples, "pc_request_errors_total", reason="too_large") == too_large + 1
    assert metric(samples, "pc_grpc_requests_total", method="ModelInfer", code="RESOURCE_EXHAUSTED") == calls + 1
    with pytest.raises(InferenceServerException, match="larger than max") as caught:
        grpc.infer(MODEL, [image_input(grpcclient, b"\x00" * (2 * 100_000 + 1))], headers=GRPC_AUTH)
    assert code(caught.value) == "StatusCode.RESOURCE_EXHAUSTED"
    assert metric(s.metrics(), "pc_request_errors_total", reason="too_large") == too_large + 1
    grpc.close()


def test_openapi_document_covers_the_v2_routes(server, astronaut64):
    """GET /docs.json describes every /v2 route the app serves, and real answers match its schemas."""
    import jsonschema
    from fastapi import FastAPI

    from service.v2_rest import add_routes

    spec = server.get("/docs.json").json()
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    add_routes(app, lambda: None)
    served = {(route.path, method.lower()) for route in app.routes for method in route.methods - {"HEAD"}}
    documented = {(path, method) for path, item in spec["paths"].items() if path.startswith("/v2") for method in item}
    assert served == documented

    def valid(instance: object, schema: str) -> None:
        jsonschema.validate(instance, {"$ref": f"#/components/schemas/{schema}", "components": spec["components"]})

    valid(server.get("/v2").json(), "V2ServerMetadata")
    valid(server.get(f"/v2/models/{MODEL}").json(), "V2ModelMetadata")
    request = {"inputs": [_json_image(astronaut64)], "outputs": [{"name": "energy"}]}
    valid(request, "V2InferRequest")
    valid(server.post(f"/v2/models/{MODEL}/infer", json=request).json(), "V2InferResponse")
    error = server.post("/v2/models/nope/infer", json=request)
    assert error.status_code == 404
    valid(error.json(), "PCError")


def test_api_key(guarded_server, astronaut64):
    """With PC_API_KEY(_FILE): 401 / UNAUTHENTICATED without the key or with another, counted as `unauthorized`;
    the probes, /metrics and the pages stay open; the key is never logged."""
    s = guarded_server
    before = metric(s.metrics(), "pc_request_errors_total", reason="unauthorized")
    for path in ("/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready", "/", "/docs.json"):
        assert s.get(path).status_code == 200, path
    files = {"image": ("a.png", astronaut64)}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/model"), ("POST", "/encode"), ("GET", f"/v2/models/{MODEL}")):
            response = httpx.request(method, s.url + path, files=files if method == "POST" else None, headers=headers)
            assert response.status_code == 401 and response.json()["reason"] == "unauthorized", path
            assert response.headers["www-authenticate"] == "Bearer" and KEY not in response.text
    assert s.post("/encode", files=files, data={"steps": "5"}, headers=AUTH).status_code == 200
    document = s.get("/docs.json").json()  # Swagger UI's Authorize sends the key where it is needed
    assert document["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "PC_API_KEY",
    }
    assert document["security"] == [{"apiKey": []}] and document["paths"]["/readyz"]["get"]["security"] == []
    assert "security" not in document["paths"]["/encode"]["post"]
    with EncoderClient(s.url, api_key=KEY) as client:
        assert client.encode(astronaut64, steps=5).steps == 5

    rest = httpclient.InferenceServerClient(s.url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(s.grpc_target)
    assert rest.is_server_ready() and grpc.is_server_live() and grpc.is_server_ready()  # probes need no key
    with pytest.raises(InferenceServerException) as caught:
        rest.infer(MODEL, [image_input(httpclient, astronaut64)])
    assert code(caught.value) == "401"
    with pytest.raises(InferenceServerException) as caught:
        grpc.infer(MODEL, [image_input(grpcclient, astronaut64)], headers={"authorization": "Bearer wrong"})
    assert code(caught.value) == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException):
        grpc.get_model_metadata(MODEL)
    parameters = {"steps": 5}
    ok = rest.infer(MODEL, [image_input(httpclient, astronaut64)], parameters=parameters, headers=dict(AUTH))
    same = grpc.infer(MODEL, [image_input(grpcclient, astronaut64)], parameters=parameters, headers=GRPC_AUTH)
    np.testing.assert_array_equal(ok.as_numpy("latent_1"), same.as_numpy("latent_1"))
    rest.close()
    grpc.close()
    # 9 HTTP refusals above, then tritonclient's HTTP infer, gRPC's infer and gRPC's metadata.
    assert metric(s.metrics(), "pc_request_errors_total", reason="unauthorized") == before + 12
    assert KEY not in s.log.read_text()


def test_solver_and_init_parameters_as_encode(rest, encoder, astronaut64):
    """`solver` and `init` are /encode's options too: the same numbers where /encode runs them, the same
    refusal (400 here, 422 there) where it does not."""
    ran = []
    for solver in SOLVERS:
        for init in ("zero", "amortised"):
            parameters = {"steps": 20, "size_mode": "resize", "solver": solver, "init": init}
            try:
                encoding = encoder.encode(astronaut64, steps=20, size_mode="resize", solver=solver, init=init)
            except ServiceError as refused:
                assert refused.status == 422
                with pytest.raises(InferenceServerException) as caught:
                    rest.infer(MODEL, [image_input(httpclient, astronaut64)], parameters=parameters)
                assert code(caught.value) == "400" and refused.message in str(caught.value)
                continue
            result = rest.infer(MODEL, [image_input(httpclient, astronaut64)], parameters=parameters)
            assert_same_as_encode(result, encoding)
            assert result.get_response()["parameters"] == {"solver": encoding.solver, "init": encoding.init}
            ran.append((solver, init))
    assert ("gradient", "zero") in ran and len(ran) >= 2, ran


def test_what_real_clients_ask_beyond_the_basics(server, rest, grpc, astronaut64):
    """Extensions this server does not have are refused by name (a classification output had come back as a
    plain tensor, a shared-memory output inline); tritonclient's request compression works (it was "not
    JSON"); gRPC's ModelReady of an unknown model is `false`, as Triton answers (it raised NOT_FOUND); data
    given twice over gRPC, and a REST `id` that is not a string, are refused."""
    parameters = {"steps": 5, "size_mode": "resize"}
    for module, client, expected in ((httpclient, rest, "400"), (grpcclient, grpc, "StatusCode.INVALID_ARGUMENT")):
        classify = module.InferRequestedOutput("energy", class_count=1)
        with pytest.raises(InferenceServerException, match="does not support the classification extension") as e:
            client.infer(MODEL, [image_input(module, astronaut64)], outputs=[classify], parameters=parameters)
        assert code(e.value) == expected
    shared = httpclient.InferRequestedOutput("energy")
    shared.set_shared_memory("region", 8)
    with pytest.raises(InferenceServerException, match="does not support shared memory"):
        rest.infer(MODEL, [image_input(httpclient, astronaut64)], outputs=[shared], parameters=parameters)

    plain = rest.infer(MODEL, [image_input(httpclient, astronaut64)], parameters=parameters)
    for algorithm in ("gzip", "deflate"):
        packed = rest.infer(
            MODEL,
            [image_input(httpclient, astronaut64)],
            parameters=parameters,
            request_compression_algorithm=algorithm,
        )
        np.testing.assert_array_equal(packed.as_numpy("latent_1"), plain.as_numpy("latent_1"))
    url = f"/v2/models/{MODEL}/infer"
    body = json.dumps({"inputs": [_json_image(astronaut64)]}).encode()
    refused = server.post(url, content=body, headers={"Content-Encoding": "br"})
    assert refused.status_code == 400 and "not supported" in refused.json()["error"]
    bomb = zlib.compress(b" " * (21 << 20))  # 21 MiB of spaces: over the body limit unpacked
    refused = server.post(url, content=bomb, headers={"Content-Encoding": "deflate"})
    assert refused.status_code == 413 and refused.json()["reason"] == "too_large"
    refused = server.post(url, json={"id": 5, "inputs": [_json_image(astronaut64)]})
    assert refused.status_code == 400 and '"id" must be a string' in refused.json()["error"]

    assert grpc.is_model_ready("no-such-model") is False and rest.is_model_ready("no-such-model") is False
    import grpc as grpc_module

    with grpc_module.insecure_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name=MODEL)
        tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(b"garbage")
        request.raw_input_contents.append(len(astronaut64).to_bytes(4, "little") + astronaut64)
        with pytest.raises(grpc_module.RpcError) as caught:
            stub.ModelInfer(request)
        assert caught.value.code() == grpc_module.StatusCode.INVALID_ARGUMENT
        assert "both contents and raw_input_contents" in caught.value.details()


def test_a_grpc_call_the_client_gives_up_on_is_not_counted_as_a_bug(server, grpc, astronaut):
    """A client's deadline passing mid-call is DEADLINE_EXCEEDED (or CANCELLED) in pc_grpc_requests_total, not
    UNKNOWN, the code a bug gets."""
    before = server.metrics()
    with pytest.raises(InferenceServerException):
        grpc.infer(MODEL, [image_input(grpcclient, png(astronaut))], parameters={"steps": 1000}, client_timeout=0.3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = server.metrics()
        moved = {
            c: metric(after, "pc_grpc_requests_total", method="ModelInfer", code=c)
            - metric(before, "pc_grpc_requests_total", method="ModelInfer", code=c)
            for c in ("DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN")
        }
        if any(moved.values()):
            break
        time.sleep(0.2)
    assert moved["UNKNOWN"] == 0 and moved["DEADLINE_EXCEEDED"] + moved["CANCELLED"] == 1, moved
