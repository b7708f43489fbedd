"""pc-encode over many images: finding the inputs, and the per-batch function every engine runs.

Inputs: a folder (recursive; hidden files and folders skipped; a file is an image when its first bytes
are an image's signature or its name ends in an image extension), a glob, a list file (.txt: a path a
line, blank lines and # comments skipped; .csv: a `path` column, else the first), or files. Each input
has the `path` its row is known by (relative to the folder it was found in, as written in a list
file, or as given) and the `file` it is read from.

`BatchEncoder` loads the model once and turns a batch of inputs into rows (pcmodel.encodings): each
file decoded within the service's limits (pcmodel.decoding), the rows of files of one input shape
run through `model.infer` together (the prepared fast backends), and a file that cannot be encoded
becomes a row with `error` and `reason` instead of latents. The local engine's worker processes and
Ray's actors both call it on the same batches, so both engines write the same rows.
"""

from __future__ import annotations

import csv
import errno
import glob
import hashlib
import io
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import has_whole_map_level
from .decoding import Limits, plan, prepare
from .images import DEFAULT_FULL_MAX_SIDE, ImageError, display_maps, full_buckets, header_size, open_image
from .results import join, rows

LIST_SUFFIXES = (".txt", ".csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".webp", ".tif", ".tiff", ".bmp", ".gif")
IMAGE_SUFFIXES += (".heic", ".heif", ".avif", ".jp2", ".j2k", ".ico", ".psd", ".ppm", ".pgm", ".pbm", ".qoi")
# First bytes of image files: the formats pcmodel reads, and others that then become unsupported_format rows.
SIGNATURES = (
    b"\x89PNG",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"\x00\x00\x01\x00",  # ICO
    b"8BPS",  # Photoshop
    b"\x00\x00\x00\x0cjP  ",  # JPEG 2000
    b"qoif",
)
MAX_FILE_BYTES = 100 * 1024 * 1024  # a file is read whole: larger files are too_large rows, never read
GLOB_CHARACTERS = frozenset("*?[")
# Files per batch and rows per model call. Measured on conv-rgb in full mode (one thread, 2-core EPYC):
# 8 rows per call ran at 21 images/s in 1.2 GB, 32 rows at 12 images/s in 3.3 GB (the unrolled graph's
# tensors grow with the batch and leave the cache), 1 row at 15 images/s in 0.5 GB.
DEFAULT_BATCH_SIZE = 8


class InputError(ValueError):
    """A PATH argument that names nothing to encode: the message says which and why."""


@dataclass(frozen=True)
class Input:
    path: str  # the row's `path`: relative to its folder, as written in a list file, or as given
    file: str  # where to read it


def looks_like_image(path: Path) -> bool:
    """An image by its first bytes, or by its name (so that a zero-byte or truncated photo.jpg gets its row)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True  # whatever it is: a FIFO or a device named .png gets an `unreadable` row, never a read
    try:
        with _open_regular(str(path)) as f:
            head = f.read(16)
    except OSError:
        return False
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"avif", b"mif1"):
        return True
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return True
    return head.startswith(SIGNATURES)


def _walk(root: Path) -> list[Path]:
    """Files under a folder, recursively and in a stable order; hidden files and folders are skipped."""
    found = []
    for folder, folders, files in os.walk(root, followlinks=False):
        folders[:] = sorted(d for d in folders if not d.startswith("."))
        found += [Path(folder) / name for name in sorted(files) if not name.startswith(".")]
    return found


def is_glob(text: str) -> bool:
    return not Path(text).exists() and bool(GLOB_CHARACTERS & set(text))


def is_list_file(text: str) -> bool:
    return Path(text).suffix.lower() in LIST_SUFFIXES and Path(text).is_file()


def is_collection(paths: Sequence[str]) -> bool:
    """Whether PATH... is a collection (a data set is written) rather than one image file (today's outputs)."""
    if len(paths) != 1:
        return True
    text = paths[0]
    return Path(text).is_dir() or is_glob(text) or is_list_file(text)


def _list_entries(list_file: Path) -> list[str]:
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{list_file}: a list of paths must be UTF-8 text (is it an image named .txt?)") from None
    if list_file.suffix.lower() == ".csv":
        table = list(csv.reader(io.StringIO(text)))  # a quoted field may hold a newline
        if not table:
            return []
        header = [h.strip().lower() for h in table[0]]
        column = header.index("path") if "path" in header else 0
        body = table[1:] if "path" in header else table
        return [row[column].strip() for row in body if len(row) > column and row[column].strip()]
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def find_inputs(paths: Sequence[str]) -> list[Input]:
    """The inputs that PATH... names, in a stable order; raises InputError for a path that names nothing."""
    inputs: list[Input] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            images = [p for p in _walk(path) if looks_like_image(p)]
            if not images:
                raise InputError(f"{text}: the folder holds no image files")
            inputs += [Input(p.relative_to(path).as_posix(), str(p)) for p in images]
        elif is_list_file(text):
            entries = _list_entries(path)
            if not entries:
                raise InputError(f"{text}: the list names no files")
            base = path.parent
            inputs += [Input(e, e if Path(e).is_absolute() else str(base / e)) for e in entries]
        elif path.is_file():
            inputs.append(Input(path.as_posix(), text))
        elif is_glob(text):
            matches = sorted(glob.glob(text, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file() and not Path(m).name.startswith(".")]
            if not files:
                raise InputError(f"{text}: the pattern matches no files")
            inputs += [Input(p.as_posix(), str(p)) for p in files]
        else:
            raise InputError(f"{text}: no such file or folder")
    seen: dict[str, str] = {}
    for item in inputs:
        if item.path in seen and seen[item.path] != item.file:
            raise InputError(
                f"two inputs have the same path {item.path!r} ({seen[item.path]} and {item.file}): a row is known by "
                "its path, so encode these folders into separate --out folders"
            )
        seen[item.path] = item.file
    return list({item.path: item for item in inputs}.values())


def file_sha256(file: str) -> str | None:
    """The sha256 of a regular file's bytes, or None where it cannot be read (or is no regular file)."""
    digest = hashlib.sha256()
    try:
        with _open_regular(file) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def read_file(file: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """A regular file's bytes; ImageError("too_large") past `limit` bytes (nothing more is read), OSError where
    it cannot be read or is no regular file."""
    with _open_regular(file) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ImageError(f"the file is {size} bytes, over the limit of {limit}", "too_large")
        data = f.read(limit + 1)  # a file that grew meanwhile is read no further
    if len(data) > limit:
        raise ImageError(f"the file is over the limit of {limit} bytes", "too_large")
    return data


def _open_regular(file: str) -> io.BufferedReader:
    """Open a file to read, refusing (OSError) what is not a regular file: a FIFO or a device is opened without
    blocking and never read (a FIFO would wait for a writer, /dev/zero never end)."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    except ValueError as exc:  # a path with a NUL byte (from a list file)
        raise OSError(errno.EINVAL, f"not a usable path ({exc})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device or a socket)")
    return f


@dataclass(frozen=True)
class EncodeSettings:
    """What a data set's rows depend on besides the inputs: the model and these (the manifest records them)."""

    model: str  # a name pcmodel.load knows or a checkpoint path
    steps: int
    size_mode: str
    max_side: int = DEFAULT_FULL_MAX_SIDE  # full mode only
    outputs: tuple[str, ...] = ("latents",)
    batch_size: int = DEFAULT_BATCH_SIZE  # files per batch and rows per model call (a tile-mode image: many rows)
    solver: str | None = None  # model.infer's solver (None: the model's)
    init: str | None = None  # model.infer's init: zero or amortised (None: the model's start)
    limits: Limits = field(default_factory=Limits)


def prepared_shapes(model, settings: EncodeSettings) -> list[tuple[int, int]]:
    """The input sizes the fast backends prepare for: the native size, and full mode's buckets."""
    native = tuple(model.config.input_shape[1:])
    if settings.size_mode != "full" or has_whole_map_level(model.config):
        return [native]
    return [native, *[b for b in full_buckets(model.config, settings.max_side) if b != native]]


class BatchEncoder:
    """Loads the model once (one thread by default); called with a batch of inputs, returns their rows."""

    def __init__(self, settings: EncodeSettings, threads: int | None = 1, expect_sha256: str | None = None) -> None:
        import pcmodel

        if threads is not None:
            torch.set_num_threads(threads)
        self.settings = settings
        self.model = pcmodel.load(settings.model)
        self.sha256 = self.model.sha256
        if expect_sha256 is not None and self.sha256 != expect_sha256:
            raise RuntimeError(f"{settings.model} changed while encoding (sha256 {self.sha256}, not {expect_sha256})")
        self.levels = self.model.num_levels
        solvers = None if settings.solver is None else [settings.solver]
        # Built on first use: a shape no image of this worker needs (full mode's largest bucket, for small
        # images) costs neither start-up nor memory.
        shapes = prepared_shapes(self.model, settings)
        self.model.prepare(steps=[settings.steps], shapes=shapes, solvers=solvers, build=False)

    def _row(self, item: Input) -> dict[str, Any]:
        s = self.settings
        return {"path": item.path, "model_sha256": self.sha256, "size_mode": s.size_mode, "steps": s.steps}

    def _decode(self, item: Input, row: dict[str, Any]):
        """Read, check and decode one file: (rows, shown, placement); ImageError or OSError when it cannot be."""
        s, config = self.settings, self.model.config
        data = read_file(item.file)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        try:
            image = open_image(data, max_pixels=s.limits.max_pixels, min_side=s.limits.min_side)
        except ImageError:
            # A too_small or too_large image has a size, one past Pillow's own decompression-bomb limit too.
            row["width"], row["height"] = header_size(data) or (None, None)
            raise
        row["width"], row["height"] = image.size  # before a JPEG's draft
        plan(image, config, s.size_mode, s.limits, s.max_side)
        return prepare(image, config, s.size_mode, s.max_side)

    def __call__(self, batch: Sequence[Input]) -> list[dict[str, Any]]:
        out = [self._row(item) for item in batch]
        groups: dict[tuple[int, ...], list[tuple[int, Any]]] = {}
        for index, item in enumerate(batch):
            try:
                prepared = self._decode(item, out[index])
            except ImageError as exc:
                out[index].update(error=str(exc), reason=exc.reason)
                continue
            except OSError as exc:
                reason = "not_found" if isinstance(exc, FileNotFoundError) else "unreadable"
                out[index].update(error=f"the file cannot be read: {exc.strerror or exc}", reason=reason)
                continue
            except Exception as exc:  # a file no limit caught: its row says so, the others go on
                out[index].update(error=f"decoding failed ({exc.__class__.__name__}: {exc})", reason="bad_image")
                continue
            groups.setdefault(tuple(prepared[0].shape[1:]), []).append((index, prepared))
        for members in groups.values():
            try:
                self._infer(members, out)
            except Exception as exc:  # the model failed on this shape: every row of it says so
                for index, _ in members:
                    out[index].update(error=f"inference failed ({exc.__class__.__name__}: {exc})", reason="internal")
        return out

    def _infer(self, members: list[tuple[int, Any]], out: list[dict[str, Any]]) -> None:
        """Rows of one input shape through the model, batch_size rows per call, and back to each file's row."""
        s = self.settings
        x = torch.cat([prepared[0] for _, prepared in members])  # (rows, C, h, w)
        size = s.batch_size
        parts = [
            self.model.infer(x[i : i + size], steps=s.steps, solver=s.solver, init=s.init)
            for i in range(0, x.shape[0], size)
        ]
        result = join(parts)
        start = 0
        for index, (rows_, shown, placement) in members:
            stop = start + rows_.shape[0]
            mine = rows(result, start, stop)
            start = stop
            energy = mine.energy.sum(dim=1, dtype=torch.float64)  # (steps + 1,): summed over tiles
            latents = [r.numpy() for r in mine.latents]  # (rows, causes, H_l, W_l)
            if not (torch.isfinite(energy).all() and all(np.isfinite(r).all() for r in latents)):
                out[index].update(
                    error="inference diverged (NaN or Inf) for this image: the model's step size k1 is unstable",
                    reason="not_finite",
                )
                continue
            row = out[index]
            row.update(energy_initial=float(energy[0]), energy_final=float(energy[-1]))
            if "latents" in s.outputs:
                row.update({f"latent_{i + 1}": r for i, r in enumerate(latents)})
            self._maps(row, mine, shown, placement)

    def _maps(self, row: dict[str, Any], mine, shown: torch.Tensor, placement) -> None:
        wanted = set(self.settings.outputs) - {"latents"}
        if not wanted:
            return
        reconstruction = placement.restore(mine.reconstruction)[0]  # (C, H, W) on the image's grid
        error = shown - reconstruction
        if "reconstruction" in wanted:
            row["reconstruction"] = reconstruction.numpy()
        if "error_map" in wanted:
            row["error_map"] = error.numpy()
        if wanted & {"reconstruction_png", "error_map_png"}:
            from .encodings import png_bytes

            _, picture, error_picture = display_maps(shown, reconstruction, error, self.model.config.preprocess)
            if "reconstruction_png" in wanted:
                row["reconstruction_png"] = png_bytes(picture)
            if "error_map_png" in wanted:
                row["error_map_png"] = png_bytes(error_picture)


def batches(inputs: Sequence[Input], size: int) -> list[list[Input]]:
    """Inputs in batches of `size` files, in order: the unit of work of both engines."""
    count = math.ceil(len(inputs) / size) if inputs else 0
    return [list(inputs[i * size : (i + 1) * size]) for i in range(count)]
