"""The service's settings: one frozen dataclass, read from PC_* environment variables.

`pc-serve` turns its flags into these variables before it starts BentoML, and the BentoML worker
processes read them again at import, so `bentoml serve service.service:PCEncoder` and `pc-serve`
configure the same service the same way. Every field's variable is PC_<FIELD NAME IN CAPITALS>.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pcmodel.decoding import Limits
from pcmodel.engines import MAX_PREPARED_STEPS

LIMITS = Limits()  # the decoding limits' defaults, shared with pc-encode's collections


class SettingsError(ValueError):
    """A PC_* variable with a value the service cannot use; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Everything an operator can set. Defaults serve one CPU machine; limits protect it from clients."""

    model: str = "default"  # checkpoint path, or a name pcmodel.load knows (default = conv-rgb)
    host: str = "0.0.0.0"  # BentoML's default too: reachable from outside a container
    port: int = 3000
    grpc_port: int = 8001  # the Open Inference Protocol over gRPC (service/v2_grpc.py); 0 turns it off
    workers: int = 1  # processes, each with its own model copy and event loop (the Python work per request)
    device: str = "auto"  # auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...
    torch_threads: int = 0  # intra-op threads per worker; 0 = cores / workers - 1 (a core for the event loop)
    allow_unstable: bool = False  # serve a checkpoint whose k1 is above its stability bound (diverges)
    max_steps: int = 1000  # largest `steps` a request may ask for
    warmup_steps: tuple[int, ...] = ()  # step counts with fast programs besides the model's default
    max_body_bytes: int = 20 * 1024 * 1024  # request bodies above this get 413 before they are read
    # A request's head (request line and headers; gRPC: its metadata): more bytes, or more than
    # MAX_HEADER_FIELDS fields, get 431 (gRPC: RESOURCE_EXHAUSTED)
    max_header_bytes: int = 16 * 1024
    max_pixels: int = LIMITS.max_pixels  # decoded image size limit (a decompression bomb gets 413)
    max_image_bytes: int = LIMITS.max_image_bytes  # pixels x bands x bytes per sample of one decoded image; more: 413
    # Memory budgets per worker (service.budget); 0 = a quarter of the memory the service may use
    # (the cgroup's memory.max, else physical memory) divided by the workers. Beyond them: 503.
    max_inflight_bytes: int = 0  # request bodies held at once (each counted twice: bytes and parsed form)
    max_decoding_bytes: int = 0  # images being decoded and preprocessed at once (their estimated peak bytes)
    budget_wait_ms: float = 1000.0  # how long a request waits for room in a budget before it gets 503
    min_side: int = LIMITS.min_side  # smaller images get 400: there is nothing to encode in a 1x1 image
    # tile mode: native-size tiles one image may need, counting the overlapping tiles (about 4x the
    # non-overlapping count: tiles overlap by half); cost grows with area
    max_tiles: int = LIMITS.max_tiles
    # full mode: the longer side an image is scaled down to (never up); the padded sizes (buckets) derive
    # from it and are warmed at start-up. 0 turns full mode off.
    full_max_side: int = 256
    max_batch_images: int = 32  # images in one /encode_batch request
    max_batch_size: int = 32  # images (or tiles) per model call; 1 turns batching off
    batch_wait_ms: float = 0.0  # extra wait for a batch to fill; 0 = run as soon as the model is free
    max_queue: int = 8192  # native-size images (or tiles) worth of pixels waiting for the model; more gets 503
    request_timeout_s: float = 60.0  # BentoML's traffic.timeout: a request still running gets 504
    max_concurrency: int = 0  # requests in flight per service before 429; 0 = no limit
    access_log: bool = True  # BentoML's access log: a line per request (~0.1 ms of the event loop's time each)
    # An optional API key: every route but the health probes, /metrics and the static pages then needs
    # `Authorization: Bearer <key>` (gRPC: the same metadata). PC_API_KEY_FILE holds it for Kubernetes
    # Secrets (mounted as a file); never both. Not shown in repr, never logged.
    api_key: str = field(default="", repr=False)
    api_key_file: str = ""

    def __post_init__(self) -> None:
        at_least_one = ("port", "workers", "max_steps", "max_body_bytes", "max_pixels", "min_side")
        for name in (*at_least_one, "max_tiles", "max_batch_images", "max_batch_size", "max_queue"):
            if getattr(self, name) < 1:
                raise SettingsError(f"PC_{name.upper()} must be at least 1, got {getattr(self, name)}")
        if self.port > 65535:
            raise SettingsError(f"PC_PORT must be a TCP port (1..65535), got {self.port}")
        if not 0 <= self.grpc_port <= 65535 or self.grpc_port == self.port:
            raise SettingsError(
                f"PC_GRPC_PORT must be a TCP port other than PC_PORT (0 turns gRPC off), got {self.grpc_port}"
            )
        if self.max_header_bytes < 1024:
            raise SettingsError(f"PC_MAX_HEADER_BYTES must be at least 1024, got {self.max_header_bytes}")
        if self.torch_threads < 0 or self.max_concurrency < 0 or self.batch_wait_ms < 0:
            raise SettingsError("PC_TORCH_THREADS, PC_MAX_CONCURRENCY and PC_BATCH_WAIT_MS must be >= 0")
        if min(self.max_image_bytes, self.max_inflight_bytes + 1, self.max_decoding_bytes + 1) < 1:
            raise SettingsError("PC_MAX_IMAGE_BYTES must be >= 1; PC_MAX_INFLIGHT_BYTES, PC_MAX_DECODING_BYTES >= 0")
        if self.full_max_side < 0:
            raise SettingsError(f"PC_FULL_MAX_SIDE must be >= 0 (0 turns full mode off), got {self.full_max_side}")
        if self.budget_wait_ms < 0:
            raise SettingsError(f"PC_BUDGET_WAIT_MS must be >= 0, got {self.budget_wait_ms}")
        if not self.request_timeout_s > 0:
            raise SettingsError(f"PC_REQUEST_TIMEOUT_S must be > 0 seconds, got {self.request_timeout_s}")
        if any(not 1 <= s <= self.max_steps for s in self.warmup_steps):
            raise SettingsError(f"PC_WARMUP_STEPS must be step counts in 1..{self.max_steps}, got {self.warmup_steps}")
        if len(set(self.warmup_steps)) > MAX_PREPARED_STEPS - 1:  # the model's default steps take one place
            raise SettingsError(
                f"PC_WARMUP_STEPS takes at most {MAX_PREPARED_STEPS - 1} step counts (fast programs stay bounded), "
                f"got {len(set(self.warmup_steps))}"
            )
        if self.max_queue < self.max_batch_size:
            raise SettingsError("PC_MAX_QUEUE must be at least PC_MAX_BATCH_SIZE")
        if self.api_key and self.api_key_file:
            raise SettingsError("set PC_API_KEY or PC_API_KEY_FILE, not both")

    def secret(self) -> bytes | None:
        """The API key's bytes (from PC_API_KEY, or the file PC_API_KEY_FILE names, stripped), or None."""
        text = self.api_key
        if self.api_key_file:
            try:
                text = Path(self.api_key_file).read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise SettingsError(f"PC_API_KEY_FILE={self.api_key_file} cannot be read ({exc})") from None
            if not text:
                raise SettingsError(f"PC_API_KEY_FILE={self.api_key_file} is empty")
        return text.encode() if text else None

    @property
    def inflight_bytes(self) -> int:
        """PC_MAX_INFLIGHT_BYTES, or its default: a quarter of the memory limit per worker."""
        return self.max_inflight_bytes or memory_limit() // 4 // self.workers

    @property
    def tile_limit(self) -> int:
        """The tiles one image may need in tile mode: PC_MAX_TILES, or PC_MAX_QUEUE where smaller (the batcher
        queues at most that many rows, so an image with more tiles could never be admitted)."""
        return min(self.max_tiles, self.max_queue)

    @property
    def decoding_bytes(self) -> int:
        """PC_MAX_DECODING_BYTES, or its default: a quarter of the memory limit per worker."""
        return self.max_decoding_bytes or memory_limit() // 4 // self.workers

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from PC_* variables (unset ones keep their defaults); `overrides` win over both."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            text = environ.get(env_name(f.name))
            if text is not None and text.strip() != "":
                values[f.name] = _parse(f, text.strip())
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The PC_* variables that reproduce these settings in another process."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = ",".join(str(v) for v in value)
            else:
                text = str(value)
            out[env_name(f.name)] = text
        return out


def memory_limit(cgroup: Path = Path("/sys/fs/cgroup/memory.max")) -> int:
    """Bytes this process may use: the cgroup v2 limit when there is one ("max" is none), else physical memory."""
    with contextlib.suppress(OSError, ValueError):
        text = cgroup.read_text().strip()
        if text != "max":
            return int(text)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def env_name(field_name: str) -> str:
    return f"PC_{field_name.upper()}"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(f: dataclasses.Field, text: str) -> object:
    name = env_name(f.name)
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if text.lower() not in _TRUE | _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind.startswith("tuple"):
            return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        expected = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(
            kind, "comma-separated integers"
        )
        raise SettingsError(f"{name}={text!r} is not valid: expected {expected}") from None
    return text
