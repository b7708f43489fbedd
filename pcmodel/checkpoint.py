"""Checkpoints: one .safetensors file holding the weights, the full config and provenance. Never pickle.

Layout: one tensor per named parameter (pcmodel.parameters: `level1.U`, `level2.U`, ..., float32); string
metadata `format` = "pcmodel-checkpoint", `format_version`, `config` (JSON), `provenance` (JSON)
and `sha256`, the content hash over the config and the U tensors (not the provenance), which
identifies the model. Format 4 may add an amortiser (pcmodel.amortiser): its tensors `level1.A.in.weight`,
... beside the U's, its architecture as JSON in `amortiser` and `amortiser_sha256` over both. The
amortiser only decides where inference starts, so the content hash leaves it out: fitting one to a model
keeps the model's hash (the file's own hash changes). Files are untrusted: the header is parsed and checked
by hand before any tensor is read, and every failure is one sentence saying what is wrong with the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .amortiser import Amortiser, AmortiserConfig
from .atomic import write_bytes
from .config import ConfigError, ModelConfig
from .parameters import Params, amortiser_specs, as_params, parameter_specs

FORMAT = "pcmodel-checkpoint"
# 2: per-level k1_scale / k2_scale in the config; 3: per-level column_norm. Fields a file lacks read as
# their neutral values (config.NEUTRAL_LEVEL_FIELDS), so older files load as before.
# 4: an optional amortiser (its tensors and the `amortiser`, `amortiser_sha256` metadata); files without
# one read as before, with no amortiser.
FORMAT_VERSION = 4
READABLE_VERSIONS = ("1", "2", "3", "4")
MAX_CHECKPOINT_BYTES = 256 * 1024 * 1024  # our models are kilobytes; refuse to read anything absurd
MAX_HEADER_BYTES = 1024 * 1024
_DTYPES = {"F32": torch.float32}


class CheckpointError(ValueError):
    """A file that is not a valid pcmodel checkpoint; the message says why in one sentence."""


@dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    params: dict[str, torch.Tensor]  # by name, in pcmodel.parameters' order
    provenance: dict[str, Any]
    sha256: str
    amortiser: Amortiser | None = None  # format 4: the amortised start, where the file has one


def content_hash(config: ModelConfig, params: Params) -> str:
    """sha256 over the canonical config JSON and every parameter's name, dtype, shape and bytes, in the
    declared order (one U per level gives the same bytes as before parameters had names: same hashes)."""
    digest = hashlib.sha256()
    digest.update(config.to_json().encode())
    for name, t in as_params(config, params).items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"\n{name}:F32:{list(t.shape)}\n".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def code_version() -> str:
    try:
        return importlib.metadata.version("predictive-coding")
    except Exception:  # running from a source tree that was never installed
        return "unknown"


def save(
    path: str | os.PathLike[str],
    config: ModelConfig,
    params: Params,
    provenance: dict[str, Any] | None = None,
    amortiser: Amortiser | None = None,
) -> str:
    """Write a checkpoint atomically and return its content hash (the amortiser, if any, is stored beside U
    and left out of the hash)."""
    info = {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "code_version": code_version()}
    info.update(provenance or {})
    named = as_params(config, params)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in named.items()}
    sha = content_hash(config, named)
    extra: dict[str, str] = {}
    if amortiser is not None:
        amortiser = Amortiser.from_params(config, amortiser.config, amortiser.params)  # checked against config
        tensors.update({name: t.detach().to("cpu", torch.float32).contiguous() for name, t in amortiser.params.items()})
        extra = {"amortiser": amortiser.config.to_json(), "amortiser_sha256": amortiser.sha256()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config.to_json(),
        "provenance": json.dumps(info, sort_keys=True),
        "sha256": sha,
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A crash or a full disk mid-write never leaves a half-written checkpoint, nor a temporary file: the old one stays.
    write_bytes(path, save_safetensors(tensors, metadata=metadata))
    return sha


def not_a_file(path: Path) -> str:
    """Why `path` cannot be read as a checkpoint file, in a few words (it is not a regular file)."""
    if not path.exists():
        return "no such checkpoint file"
    if path.is_dir():
        return "is a directory, not a checkpoint file (name the .safetensors file inside it)"
    if path.is_fifo():
        return "is a named pipe (FIFO), not a checkpoint file"
    if path.is_socket():
        return "is a socket, not a checkpoint file"
    return "is not a regular file (a device or other special file), not a checkpoint file"


def load(path: str | os.PathLike[str], max_bytes: int = MAX_CHECKPOINT_BYTES) -> Checkpoint:
    """Read and validate a checkpoint; raises CheckpointError with a one-sentence reason."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise CheckpointError(f"{name}: {not_a_file(path)}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{name} is empty (0 bytes), not a pcmodel checkpoint")
    if size > max_bytes:
        raise CheckpointError(f"{name} is {size} bytes, over the {max_bytes}-byte limit for a checkpoint")
    data = path.read_bytes()
    header, offset = _parse_header(data, name)
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{name} is a safetensors file but not a pcmodel checkpoint (no pcmodel metadata)")
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{name} has checkpoint format version {version!r}; this pcmodel reads versions "
            f"{', '.join(READABLE_VERSIONS)} "
            f"(upgrade pcmodel or re-save the model)"
        )
    try:
        config = ModelConfig.from_json(metadata.get("config", ""))
    except ConfigError as exc:
        raise CheckpointError(f"{name} has an invalid model config: {exc}") from None
    try:
        amortiser_config = AmortiserConfig.from_json(metadata["amortiser"]) if "amortiser" in metadata else None
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{name} has an invalid amortiser config: {exc}") from None
    _check_tensors(header, config, amortiser_config, len(data) - offset, name)
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # the header passed our checks, so this is deep corruption
        raise CheckpointError(f"{name} is corrupt: {exc}") from None
    params = {spec.name: tensors[spec.name] for spec in parameter_specs(config)}
    sha = content_hash(config, params)
    if metadata.get("sha256") != sha:
        raise CheckpointError(f"{name} fails its content hash: the weights or config were modified or corrupted")
    amortiser = None
    if amortiser_config is not None:
        amortiser = Amortiser(
            amortiser_config, {s.name: tensors[s.name] for s in _amortiser_specs(config, amortiser_config)}
        )
        if metadata.get("amortiser_sha256") != amortiser.sha256():
            raise CheckpointError(f"{name} fails its amortiser's hash: the amortiser was modified or corrupted")
        if not all(bool(torch.isfinite(t).all()) for t in amortiser.params.values()):
            raise CheckpointError(f"{name} has an amortiser with NaN or Inf parameters")
    try:
        provenance = json.loads(metadata.get("provenance", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{name} has unreadable provenance metadata (not JSON)") from None
    return Checkpoint(config=config, params=params, provenance=provenance, sha256=sha, amortiser=amortiser)


def _amortiser_specs(config: ModelConfig, amortiser: AmortiserConfig | None) -> list:
    return [] if amortiser is None else amortiser_specs(config, amortiser.hidden)


def _parse_header(data: bytes, name: str) -> tuple[dict[str, Any], int]:
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointError(f"{name} is a Python pickle; pcmodel never loads pickles (they can run code)")
    if data[:4] == b"PK\x03\x04":
        raise CheckpointError(
            f"{name} is a zip archive (a torch.save pickle?); pcmodel never loads pickles, only .safetensors files"
        )
    if len(data) < 8:
        raise CheckpointError(f"{name} is {len(data)} bytes: too short to be a safetensors file (truncated or foreign)")
    (length,) = struct.unpack("<Q", data[:8])
    starts_like_json = data[8:9] == b"{"
    if not starts_like_json or length > MAX_HEADER_BYTES:
        raise CheckpointError(f"{name} is not a safetensors file (foreign file format)")
    if 8 + length > len(data):
        raise CheckpointError(f"{name} is truncated: its header needs {8 + length} bytes, the file has {len(data)}")
    try:
        header = json.loads(data[8 : 8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{name} has a corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name} has a corrupt safetensors header (not a JSON object)")
    return header, 8 + length


def _check_tensors(
    header: dict[str, Any], config: ModelConfig, amortiser: AmortiserConfig | None, data_bytes: int, name: str
) -> None:
    specs = parameter_specs(config) + _amortiser_specs(config, amortiser)
    expected = {spec.name: spec.shape for spec in specs}
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else []
        )
        raise CheckpointError(f"{name} does not match its config: {'; '.join(parts)}")
    end = 0
    for key, shape in expected.items():
        info = header[key]
        if not isinstance(info, dict):
            raise CheckpointError(f"{name} has a corrupt entry for tensor {key}")
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{name}: tensor {key} has dtype {info.get('dtype')}, expected F32")
        if tuple(info.get("shape", ())) != shape:
            raise CheckpointError(
                f"{name}: tensor {key} has shape {tuple(info.get('shape', ()))}, the config needs {shape}"
            )
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{name} has corrupt data offsets for tensor {key}")
        end = max(end, offsets[1])
    if end > data_bytes:
        raise CheckpointError(f"{name} is truncated: its tensors need {end} bytes of data, the file has {data_bytes}")
