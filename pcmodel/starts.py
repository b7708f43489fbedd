"""A warm start's file, read one way for the service's `start` part and pc-encode's --init.

A start is an .npz (numpy's savez) holding latent_1 .. latent_L: pc-encode's encoding.npz, or a previous
/encode response's latents saved with np.savez. The file is untrusted: it is read without pickle, its
arrays may unpack to at most a given number of bytes (counted from the zip's and each array's own header
before anything is unpacked), its latents must be floats, finite and within +-MAX_GIVEN_VALUE, and a
`latent_N` past the model's levels is refused; other arrays (encoding.npz's energy, reconstruction, ...)
are ignored. Two optional arrays say where the latents came from: `size_mode` (a string) and `image_size`
([H, W], the image as the model saw it: after resizing, or full mode's scaling). pc-encode writes both;
where a start has them, `Start.fit` refuses it for an image encoded another way or of another size, whose
latents would sit at other places of the picture even where their shapes agree. Without them only the
shapes are compared.
"""

from __future__ import annotations

import io
import math
import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The largest |value| of latents or inputs a caller may give (a warm start, v2's `x`): settled latents and
# preprocessed images are of order 1-10; far beyond, the energy overflows float32 and the answer would be Inf.
MAX_GIVEN_VALUE = 1e4
# pc-encode's bound on a start file's unpacked latents: 5x those of the shipped model on the largest image
# it takes (25 MP in tile mode, ~190 MB in float32); a larger image's own latents raise it (`start_bytes`).
MAX_START_BYTES = 1 << 30
GEOMETRY = ("size_mode", "image_size")  # the optional arrays that say where a start's latents came from
_LATENT = re.compile(r"latent_(\d+)")
_SIZE_MODES = ("resize", "tile", "fit", "full")  # pcmodel.images.PLACEMENTS (not imported: no torch here)


class StartError(ValueError):
    """A start file that cannot be read, or does not fit the image: its message names the file and the fix."""


@dataclass(frozen=True)
class Start:
    """A start file's latents (float32, level 1 first, shaped as saved) and, where it says so, its geometry."""

    latents: tuple[np.ndarray, ...]
    size_mode: str | None = None
    image_size: tuple[int, int] | None = None  # (H, W) as the model saw the image

    def fit(
        self, size_mode: str, image_size: Sequence[int], shapes: Sequence[Sequence[int]], what: str
    ) -> list[np.ndarray]:
        """The latents for an image encoded in `size_mode` whose prepared size is `image_size` (H, W) and whose
        latents are shaped `shapes` ((rows, causes, H_l, W_l) per level): the geometry first, where the start
        has it, then the shapes. A latent may leave out the leading rows axis where there is one row (a
        response's latents have none outside tile mode, encoding.npz's always have it)."""
        if self.size_mode is not None and self.size_mode != size_mode:
            raise StartError(
                f"{what} is an encoding made in size mode {self.size_mode}; this image is encoded in {size_mode}: "
                "a warm start must be made the same way"
            )
        image = tuple(int(v) for v in image_size)
        if self.image_size is not None and self.image_size != image:
            raise StartError(
                f"{what} is the encoding of a {_size(self.image_size)} image; this one is {_size(image)} (width x "
                "height in pixels, as the model sees them): a warm start must come from an image of the same size, "
                "or its latents would sit at other places of the picture"
            )
        expected = [tuple(int(v) for v in s) for s in shapes]
        got = [a.shape for a in self.latents]
        one_row = all(s[0] == 1 for s in expected)
        if all(g == e or (one_row and g == e[1:]) for g, e in zip(got, expected)) and len(got) == len(expected):
            return [a if a.shape == e else a[None] for a, e in zip(self.latents, expected)]
        if one_row:  # shown as sent: with the rows axis only if the start has it
            shown = expected if any(len(g) == len(e) for g, e in zip(got, expected)) else [e[1:] for e in expected]
            raise StartError(
                f"{what} has latents shaped {got}; this image's are {shown} (the leading axis of 1 may be left out)"
            )
        raise StartError(f"{what} has latents shaped {got}; this image's are {expected}, one row per tile")


def _size(hw: tuple[int, ...]) -> str:
    return f"{hw[1]}x{hw[0]}"


def start_bytes(shapes: Sequence[Sequence[int]]) -> int:
    """pc-encode's bound on a start's unpacked bytes for an image whose latents are shaped `shapes`: room for
    them in float64 twice over, and never under MAX_START_BYTES."""
    return max(MAX_START_BYTES, 16 * sum(math.prod(s) for s in shapes))


def geometry(size_mode: str, image_size: Sequence[int]) -> dict[str, np.ndarray]:
    """The arrays a start file carries to say where its latents came from (pc-encode writes them)."""
    return {"size_mode": np.array(size_mode), "image_size": np.array([int(v) for v in image_size], dtype=np.int64)}


def read_start(source: bytes | Path, levels: int, max_bytes: int, what: str) -> Start:
    """A start file (its bytes, or a path) for a model of `levels` levels; StartError names it as `what`."""
    try:
        return _read(source, levels, max_bytes)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, NotImplementedError, zlib.error) as exc:
        if isinstance(exc, OSError) and isinstance(source, Path) and exc.strerror:  # unreadable, not malformed
            raise StartError(f"{what}: {exc.strerror}") from None
        wanted = f"an .npz of {_names(levels)} (numpy's savez, as pc-encode writes)"
        raise StartError(f"{what} must be {wanted}: {exc}") from None


def _read(source: bytes | Path, levels: int, max_bytes: int) -> Start:
    head = source[:2] if isinstance(source, bytes) else _head(source)
    if head != b"PK":  # an .npz is a zip file; np.load would read a bare .npy, or a pickle
        raise ValueError("it is not an .npz (zip) file")
    with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
        members = {name.removesuffix(".npy"): name for name in archive.namelist() if name.endswith(".npy")}
        names = [f"latent_{i}" for i in range(1, levels + 1)]
        extra = sorted(n for n in members if _LATENT.fullmatch(n) and n not in names)
        extra += sorted(n for n in members if n.startswith("latent_") and not _LATENT.fullmatch(n))
        if extra:
            raise ValueError(f"it has {', '.join(extra)}; this model's {levels} levels are {_names(levels)}")
        missing = [n for n in names if n not in members]
        if missing:
            raise ValueError(f"it has no {', '.join(missing)}")
        left, arrays = max_bytes, {}
        for name in [*names, *(g for g in GEOMETRY if g in members)]:
            info = archive.getinfo(members[name])
            if info.file_size > left:  # zipfile unpacks no more than this, whatever the stream holds
                raise ValueError(f"its arrays unpack to more than {max_bytes} bytes")
            left -= info.file_size
            kinds = {"size_mode": "U", "image_size": "iu"}.get(name, "f")
            arrays[name] = _npy(archive.read(info), name, kinds)
    latents = tuple(finite_floats(arrays[n], f"its {n}") for n in names)
    return Start(latents, _size_mode(arrays.get("size_mode")), _image_size(arrays.get("image_size")))


def _names(levels: int) -> str:
    return f"latent_1..latent_{levels}" if levels > 1 else "latent_1"


def _head(path: Path) -> bytes:
    with open(path, "rb") as file:
        return file.read(2)


def _size_mode(array: np.ndarray | None) -> str | None:
    if array is None:
        return None
    if array.size != 1 or str(array.reshape(())) not in _SIZE_MODES:
        raise ValueError(f"its size_mode must be one of {', '.join(_SIZE_MODES)}")
    return str(array.reshape(()))


def _image_size(array: np.ndarray | None) -> tuple[int, int] | None:
    if array is None:
        return None
    if array.shape != (2,) or not all(0 < int(v) < 2**31 for v in array):
        raise ValueError("its image_size must be two positive integers, [H, W]")
    return int(array[0]), int(array[1])


def _npy(raw: bytes, name: str, kinds: str) -> np.ndarray:
    """One .npy's array, its header checked first: a dtype of `kinds` (never objects), and no more values
    than the bytes hold (numpy allocates what the header claims before it reads)."""
    stream = io.BytesIO(raw)
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{name} is a .npy of version {version[0]}.{version[1]}; save it with numpy's savez")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(stream)
    if dtype.kind not in kinds:
        wanted = {"f": "floats", "iu": "integers", "U": "a string"}[kinds]
        raise ValueError(f"{name} holds {dtype}, not {wanted}")
    if math.prod(shape) * dtype.itemsize > len(raw) - stream.tell():
        raise ValueError(f"{name}'s header claims more values than it holds")
    stream.seek(0)
    return np.lib.format.read_array(stream, allow_pickle=False)


def finite_floats(values: np.ndarray, what: str) -> np.ndarray:
    """Given float values as float32 (a copy the caller owns); ValueError unless every value is finite and
    within +-MAX_GIVEN_VALUE once in float32."""
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes Inf: refused below
        out = np.array(values, dtype=np.float32)
    if not (np.abs(out) <= MAX_GIVEN_VALUE).all():  # NaN compares False too
        raise ValueError(
            f"{what} must be finite numbers within +-{MAX_GIVEN_VALUE:g} in float32 (latents and preprocessed "
            "inputs are of order 1)"
        )
    return out
