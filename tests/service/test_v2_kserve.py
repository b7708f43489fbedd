"""KServe's Python SDK clients (kserve.InferenceRESTClient, kserve.InferenceGRPCClient) against a real server:
health, model readiness, model metadata, and inference with an image BYTES input, whose arrays equal /encode's
bit for bit (as tests/service/test_v2.py checks with tritonclient).

kserve is not in the test extra (docs/DEPLOY.md, "KServe", says why): the README's test command installs it in
a virtual environment of its own and names its Python in PC_KSERVE_PYTHON (the clients need nothing of ours);
without it, and without kserve in this one, this module is skipped. Its gRPC stubs and tritonclient's (and
ours) register the protobuf package `inference` in the default pool, so kserve cannot be imported in a process
that imported one of them: the clients run in a subprocess that prints what they got as JSON. kserve 0.21's
clients have no metadata call: model metadata goes through the gRPC stub kserve ships (kserve.protocol.grpc)."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pcmodel
from service.client import EncoderClient

# A Python with kserve: the README's test command makes one (PC_KSERVE_PYTHON), or this one if it has kserve.
KSERVE_PYTHON = os.environ.get("PC_KSERVE_PYTHON") or (sys.executable if importlib.util.find_spec("kserve") else None)
pytestmark = pytest.mark.skipif(KSERVE_PYTHON is None, reason="no Python with kserve (PC_KSERVE_PYTHON unset)")

ROOT = Path(__file__).resolve().parents[2]
MODEL = "conv-rgb"

_CLIENTS = r"""
import asyncio, base64, json, sys

import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb, grpc_predict_v2_pb2_grpc as pb_grpc

job = json.load(sys.stdin)
url, target, model, parameters = job["url"], job["grpc"], job["model"], job["parameters"]
image = base64.b64decode(job["image"])


def arrays(response):
    raw = {o.name: o.as_numpy().astype("<f4").tobytes() for o in response.outputs}
    return {o.name: [o.shape, base64.b64encode(raw[o.name]).decode()] for o in response.outputs}


def request(binary):
    tensor = InferInput("image", [1], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array([image], dtype=object), binary_data=True)
    else:  # in JSON each element is a string: the file base64-encoded, as the service takes it
        tensor.set_data_from_numpy(np.array([base64.b64encode(image).decode()], dtype=object), binary_data=False)
    return InferRequest(model_name=model, infer_inputs=[tensor], parameters=parameters)


async def main():
    out = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    out["rest_health"] = [
        await rest.is_server_live(url),
        await rest.is_server_ready(url),
        await rest.is_model_ready(url, model),
        await rest.is_model_ready(url, "no-such-model"),
    ]
    out["rest_binary"] = arrays(await rest.infer(url, request(True), model_name=model))
    out["rest_json"] = arrays(await rest.infer(url, request(False), model_name=model))
    try:
        await rest.infer(url, request(True), model_name="no-such-model")
    except Exception as exc:
        out["rest_unknown"] = [type(exc).__name__, exc.response.status_code, str(exc)]
    await rest.close()

    client = InferenceGRPCClient(target, retries=0)
    out["grpc_health"] = [
        await client.is_server_live(), await client.is_server_ready(), await client.is_model_ready(model)
    ]
    out["grpc"] = arrays(await client.infer(request(True)))
    try:
        out["grpc_unknown"] = await client.is_model_ready("no-such-model")
    except grpc.RpcError as exc:
        out["grpc_unknown"] = [exc.code().name, exc.details()]
    await client.close()

    async with grpc.aio.insecure_channel(target) as channel:
        meta = await pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name=model))
    out["metadata"] = {
        "name": meta.name,
        "versions": list(meta.versions),
        "inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
        "outputs": [[t.name, t.datatype, list(t.shape)] for t in meta.outputs],
    }
    print(json.dumps(out))


asyncio.run(main())
"""


def _kserve(server, image: bytes, parameters: dict) -> dict:
    job = {
        "url": server.url,
        "grpc": server.grpc_target,
        "model": MODEL,
        "parameters": parameters,
        "image": base64.b64encode(image).decode(),
    }
    done = subprocess.run(
        [KSERVE_PYTHON, "-c", _CLIENTS], input=json.dumps(job), capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _array(entry: list) -> np.ndarray:
    shape, data = entry
    return np.frombuffer(base64.b64decode(data), dtype="<f4").reshape(shape)


def test_kserve_clients_health_metadata_and_infer_equal_encode(server, astronaut64):
    parameters = {"steps": 20, "size_mode": "resize"}
    with EncoderClient(server.url) as encoder:
        encoding = encoder.encode(astronaut64, **parameters)
    got = _kserve(server, astronaut64, parameters)

    assert got["rest_health"] == [True, True, True, False]
    assert got["grpc_health"] == [True, True, True]
    assert got["grpc_unknown"] is False  # ready: false for a model it does not serve, as Triton answers
    name, status, message = got["rest_unknown"]
    assert (name, status) == ("HTTPStatusError", 404) and "this server serves 'conv-rgb'" in message

    meta = got["metadata"]
    assert meta["name"] == MODEL and meta["versions"] == [pcmodel.load("default").sha256[:12]]
    assert meta["inputs"][:2] == [["image", "BYTES", [-1]], ["x", "FP32", [-1, 3, -1, -1]]]
    assert [o[0] for o in meta["outputs"]] == [
        "latent_1",
        "latent_2",
        "input",
        "reconstruction",
        "error_map",
        "energy",
        "trace",
    ]

    for way in ("rest_binary", "rest_json", "grpc"):
        outputs = got[way]
        assert sorted(outputs) == sorted(["latent_1", "latent_2", "input", "reconstruction", "error_map", "energy"])
        for level, latent in enumerate(encoding.latents, start=1):
            np.testing.assert_array_equal(_array(outputs[f"latent_{level}"])[0], latent, err_msg=way)
        for name in ("input", "reconstruction", "error_map"):
            np.testing.assert_array_equal(_array(outputs[name])[0], getattr(encoding, name), err_msg=way)
        energy = _array(outputs["energy"])[0]
        assert energy.tolist() == [np.float32(encoding.energy_initial), np.float32(encoding.energy_final)], way
