"""Open Inference Protocol (KServe v2) REST requests and answers as tritonclient.http writes and reads them,
for pc-serve-loadtest and pc-serve-soak: an `image` BYTES input in the binary tensor data extension or in
JSON (each file base64-encoded), outputs asked for as binary or JSON, and an answer's tensors read back
and checked (energy falls, input - reconstruction = error_map exactly, latents finite, steps)."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import numpy as np

# What the load test and the soak ask for: enough to check an encoding, and the trace that says the steps.
OUTPUTS = ("input", "reconstruction", "error_map", "energy", "trace", "latent_1")
HEADER_LENGTH = "inference-header-content-length"


def infer_path(model: str) -> str:
    return f"/v2/models/{model}/infer"


def bytes_elements(files: list[bytes]) -> bytes:
    """A BYTES tensor's raw data: each element its 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(f)) + f for f in files)


def encode(header: dict, raw: bytes | None = None) -> tuple[bytes, dict[str, str]]:
    """The request body and headers: JSON alone (`raw` None), or the JSON header followed by the inputs'
    binary data with its length in Inference-Header-Content-Length (the binary tensor data extension)."""
    head = json.dumps(header).encode()
    if raw is None:
        return head, {"content-type": "application/json"}
    return head + raw, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def image_request(
    files: list[bytes],
    parameters: dict[str, object] | None = None,
    outputs: tuple[str, ...] = OUTPUTS,
    binary: bool = True,
) -> tuple[bytes, dict[str, str]]:
    """An infer request with input `image` BYTES [len(files)], as tritonclient sends it: binary (the
    inputs' bytes after the JSON header, the outputs asked for as binary) or JSON both ways."""
    if binary:
        raw: bytes | None = bytes_elements(files)
        sizes = {"binary_data_size": len(raw)}
        tensor = {"name": "image", "datatype": "BYTES", "shape": [len(files)], "parameters": sizes}
    else:
        raw = None
        data = [base64.b64encode(f).decode() for f in files]
        tensor = {"name": "image", "datatype": "BYTES", "shape": [len(files)], "data": data}
    header = {
        "inputs": [tensor],
        "outputs": [{"name": n, "parameters": {"binary_data": binary}} for n in outputs],
        "parameters": dict(parameters or {}),
    }
    return encode(header, raw)


def read_outputs(response: httpx.Response) -> tuple[dict, dict[str, np.ndarray]]:
    """An infer answer's JSON header and its FP32 outputs by name, binary or JSON `data` alike."""
    content = response.content
    length = response.headers.get(HEADER_LENGTH)
    if length is None:
        header, blob = json.loads(content), b""
    else:
        header, blob = json.loads(content[: int(length)]), content[int(length) :]
    arrays, at = {}, 0
    for out in header["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[out["name"]] = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        else:
            arrays[out["name"]] = np.frombuffer(blob[at : at + size], "<f4").reshape(out["shape"])
            at += size
    if at != len(blob):
        raise ValueError(f"{len(blob) - at} bytes of binary data beyond the outputs' binary_data_size")
    return header, arrays


def check(
    response: httpx.Response, steps: int | None, images: int = 1, outputs: tuple[str, ...] = OUTPUTS
) -> str | None:
    """None if `response` is a valid encoding of `images` images at `steps` (None: not checked) with
    `outputs`, else what is wrong."""
    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]}"
    try:
        _, arrays = read_outputs(response)
        if sorted(arrays) != sorted(outputs):
            return f"outputs {sorted(arrays)}, asked for {sorted(outputs)}"
        if any(a.shape[0] != images for a in arrays.values()):
            return f"first axes {[a.shape[0] for a in arrays.values()]}, sent {images} images"
        if "trace" in arrays and steps is not None and arrays["trace"].shape != (images, steps + 1):
            return f"trace shape {arrays['trace'].shape}, asked for {steps} steps"
        if "energy" in arrays and not (arrays["energy"][:, 1] < arrays["energy"][:, 0]).all():
            return f"energy did not fall: {arrays['energy'].tolist()}"
        maps = {"input", "reconstruction", "error_map"}
        if maps <= set(arrays) and not np.array_equal(arrays["input"] - arrays["reconstruction"], arrays["error_map"]):
            return "input - reconstruction != error_map"
        if not all(np.isfinite(a).all() for n, a in arrays.items() if n.startswith("latent_")):
            return "latents not finite"
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        return f"malformed response: {exc!r}"
    return None
