"""A small Python client for the encoding service: numpy arrays and PIL images back.

    from service.client import EncoderClient
    with EncoderClient("http://localhost:3000") as client:
        result = client.encode("photo.jpg", steps=50)
        result.latents[0].shape, result.reconstruction.shape, result.images["error_map"].size

Only httpx, numpy and Pillow: no torch, so it installs anywhere.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


class ServiceError(Exception):
    """The service refused a request (or one image of a batch): HTTP status, message, reason."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.reason = reason


@dataclass
class Encoding:
    """One encoded image. Arrays are float32 numpy arrays (float16 on the wire is widened, exactly); `images`
    holds the PNGs as PIL images. Under arrays="none" the maps are in `images` only."""

    model: dict[str, str]
    steps: int
    size_mode: str
    energy_initial: float
    energy_final: float
    energy_trace: np.ndarray | None = None  # (steps + 1,) when outputs include trace
    latents: list[np.ndarray] = field(default_factory=list)  # level 1 first
    level_errors: list[np.ndarray] = field(default_factory=list)  # level 1 first, when outputs include level_errors
    input: np.ndarray | None = None  # (C, H, W) as the model saw it
    reconstruction: np.ndarray | None = None
    error_map: np.ndarray | None = None  # = input - reconstruction
    images: dict[str, Image.Image] = field(default_factory=dict)  # input, reconstruction, error_map
    tile_grid: dict[str, Any] | None = None
    padded: list[int] | None = None  # full mode: [top, bottom, left, right] around the scaled image
    timing: dict[str, float] = field(default_factory=dict)  # /encode's Server-Timing: queue, model, total (ms)
    solver: str = ""  # the dynamics that ran, e.g. "gradient" (the paper's), "nesterov(0.7)" or "anderson(5)"
    init: str = ""  # where inference started: zero, amortised, feedforward
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the JSON as received


def decode_array(payload: dict[str, Any]) -> np.ndarray:
    """{"shape", "dtype": "float32" or "float16", "data": base64 little-endian} -> float32 numpy array."""
    wire = {"float32": "<f4", "float16": "<f2"}.get(payload.get("dtype"))  # type: ignore[arg-type]
    if wire is None:
        raise ValueError(f"unexpected dtype {payload.get('dtype')!r}")
    data = base64.b64decode(payload["data"])
    return np.frombuffer(data, dtype=wire).reshape(payload["shape"]).astype(np.float32)


def decode_png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def parse_encoding(data: dict[str, Any]) -> Encoding:
    """An /encode response (or one /encode_batch entry) as an Encoding."""
    energy = data["energy"]
    result = Encoding(
        model=data["model"],
        steps=data["steps"],
        size_mode=data["size_mode"],
        energy_initial=energy["initial"],
        energy_final=energy["final"],
        energy_trace=np.asarray(energy["trace"]) if "trace" in energy else None,
        latents=[decode_array(a) for a in data.get("latents", [])],
        level_errors=[decode_array(a) for a in data.get("level_errors", [])],
        tile_grid=data.get("tile_grid"),
        padded=data.get("padded"),
        solver=data.get("solver", ""),
        init=data.get("init", ""),
        raw=data,
    )
    for name in ("input", "reconstruction", "error_map"):
        if name in data:
            if "array" in data[name]:
                setattr(result, name, decode_array(data[name]["array"]))
            result.images[name] = decode_png(data[name]["png"])
    return result


def server_timing(header: str) -> dict[str, float]:
    """'queue;dur=0.1, model;dur=12.5' -> {"queue": 0.1, "model": 12.5} (milliseconds)."""
    out = {}
    for part in header.split(","):
        name, _, value = part.strip().partition(";dur=")
        if name and value:
            out[name] = float(value)
    return out


def _file(image: ImageInput, name: str) -> tuple[str, bytes, str]:
    if isinstance(image, bytes):
        return (name, image, "application/octet-stream")
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return (os.path.basename(os.fspath(image)), f.read(), "application/octet-stream")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return (name, buffer.getvalue(), "image/png")


class EncoderClient:
    """Talks to one service URL over HTTP (httpx), keeping the connection open between calls."""

    def __init__(self, url: str = "http://localhost:3000", timeout: float = 120.0, api_key: str | None = None) -> None:
        """`api_key`: the service's PC_API_KEY, when it has one (sent as `Authorization: Bearer <key>`)."""
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def __enter__(self) -> EncoderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def encode(
        self,
        image: ImageInput,
        steps: int | None = None,
        size_mode: str | None = None,
        outputs: Sequence[str] | None = None,
        arrays: str | None = None,
        solver: str | None = None,
        init: str | None = None,
        start: Encoding | Sequence[np.ndarray] | None = None,
    ) -> Encoding:
        """Encode one image (a path, bytes, a PIL image or a uint8 array). Raises ServiceError on 4xx/5xx.

        size_mode: resize, tile or full; outputs: a subset of latents, reconstruction, error_map, input, trace,
        level_errors; arrays: float32, float16 or none; solver: gradient (the paper's dynamics), momentum,
        nesterov or anderson; init: zero or amortised (the service's defaults where None); start: a previous
        Encoding (or its latents, level 1 first) to start from, e.g. the previous frame of a video (a warm
        start)."""
        options = _options(steps, size_mode, outputs, arrays, solver, init)
        files = {"image": _file(image, "image.png")}
        if start is not None:
            files["start"] = ("start.npz", _latents_npz(start), "application/octet-stream")
        response = self._http.post("/encode", files=files, data=options)
        result = parse_encoding(_json(response))
        result.timing = server_timing(response.headers.get("server-timing", ""))
        return result

    def encode_batch(
        self,
        images: Iterable[ImageInput],
        steps: int | None = None,
        size_mode: str | None = None,
        outputs: Sequence[str] | None = None,
        arrays: str | None = None,
        solver: str | None = None,
        init: str | None = None,
    ) -> list[Encoding | ServiceError]:
        """Encode several images in one request; a refused image comes back as its ServiceError."""
        files = [("images", _file(image, f"image{i}.png")) for i, image in enumerate(images)]
        options = _options(steps, size_mode, outputs, arrays, solver, init)
        response = self._http.post("/encode_batch", files=files, data=options)
        return [
            ServiceError(item["status"], item["error"], item.get("reason")) if "error" in item else parse_encoding(item)
            for item in _json(response)["results"]
        ]

    def model(self) -> dict[str, Any]:
        """The model card (GET /model)."""
        return _json(self._http.get("/model"))

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False


def _latents_npz(start: Encoding | Sequence[np.ndarray]) -> bytes:
    """Latents as the service's `start` part: an .npz of latent_1..latent_L (float32)."""
    latents = start.latents if isinstance(start, Encoding) else list(start)
    if not latents:
        raise ValueError("start has no latents: ask the previous encode for outputs including latents")
    buffer = io.BytesIO()
    np.savez(buffer, **{f"latent_{i}": np.asarray(r, dtype=np.float32) for i, r in enumerate(latents, 1)})
    return buffer.getvalue()


def _options(
    steps: int | None,
    size_mode: str | None,
    outputs: Sequence[str] | None,
    arrays: str | None,
    solver: str | None = None,
    init: str | None = None,
) -> dict[str, str]:
    data = {}
    if solver is not None:
        data["solver"] = solver
    if init is not None:
        data["init"] = init
    if steps is not None:
        data["steps"] = str(steps)
    if size_mode is not None:
        data["size_mode"] = size_mode
    if outputs is not None:
        data["outputs"] = ",".join(outputs)
    if arrays is not None:
        data["arrays"] = arrays
    return data


def _json(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "error" in body:
            raise ServiceError(response.status_code, body["error"], body.get("reason"))
        raise ServiceError(response.status_code, response.text)
    return response.json()
