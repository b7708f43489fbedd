"""pc-encode's data set: Parquet shards of one row per input, a manifest, and `read` to get the rows back.

A data set is a folder:

    DIR/manifest.json        the model, the settings, counts of done and failed rows, the time, the version
    DIR/data/part-*.parquet  the shards; a shard is written under a hidden name, fsynced, then renamed,
                             so a shard that is visible is complete

The shards have a folder of their own because pyarrow (and pandas through it) reads every file of a
folder it is given as Parquet: `pyarrow.parquet.read_table("DIR/data")`, `pandas.read_parquet("DIR/data")`
and DuckDB's `read_parquet('DIR/data/*.parquet')` read them as they are. The columns are in
docs/ENCODINGS.md: path, sha256, width, height, model_sha256, size_mode, steps, energy_initial,
energy_final, latent_1 .. latent_L with latent_1_shape .. latent_L_shape (a tensor is its values in C
order and its shape), the maps asked for, error and reason.

pyarrow is imported when a function here first needs it (`pip install predictive-coding[encode]`), so
`import pcmodel` does not pay for it.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import fsync_folder as _fsync_folder
from .atomic import write_atomic

DATA = "data"  # the shards' folder inside a data set
MANIFEST = "manifest.json"
FORMAT = "pc-encode dataset 1"  # the manifest's `format`: the layout and columns of this module
# The maps pc-encode can add to the latents: as float32 tensors (C, H, W) on the image's grid, or as the
# PNG files pc-encode writes for one image (reconstruction.png, error.png).
OUTPUTS = ("latents", "reconstruction", "error_map", "reconstruction_png", "error_map_png")
TENSOR_OUTPUTS = ("reconstruction", "error_map")
PNG_OUTPUTS = ("reconstruction_png", "error_map_png")
META_COLUMNS = ("path", "sha256", "width", "height", "model_sha256", "size_mode", "steps")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("pc-encode's data sets need pyarrow: pip install 'predictive-coding[encode]'") from None
    return pa, pq


def tensor_columns(levels: int, outputs: Sequence[str]) -> list[str]:
    """The tensor-valued columns, each with a `<name>_shape` column beside it."""
    names = [f"latent_{i + 1}" for i in range(levels)] if "latents" in outputs else []
    return names + [o for o in TENSOR_OUTPUTS if o in outputs]


def schema(levels: int, outputs: Sequence[str]):
    """The Arrow schema of a data set of a model with `levels` levels and these outputs."""
    pa, _ = _pyarrow()
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("size_mode", pa.string(), nullable=False),
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("energy_initial", pa.float64()),
        pa.field("energy_final", pa.float64()),
    ]
    for name in tensor_columns(levels, outputs):
        fields += [pa.field(name, pa.list_(pa.float32())), pa.field(f"{name}_shape", pa.list_(pa.int32()))]
    fields += [pa.field(o, pa.binary()) for o in PNG_OUTPUTS if o in outputs]
    fields += [pa.field("error", pa.string()), pa.field("reason", pa.string())]
    return pa.schema(fields, metadata={"pc-encode": FORMAT})


def _tensor_arrays(values: list[np.ndarray | None]):
    """A list<float32> column of the values in C order and a list<int32> column of the shapes (null for None)."""
    pa, _ = _pyarrow()
    mask = np.array([v is None for v in values])
    sizes = np.array([0 if v is None else v.size for v in values], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    flat = [np.ascontiguousarray(v, dtype=np.float32).ravel() for v in values if v is not None]
    data = pa.array(np.concatenate(flat) if flat else np.empty(0, np.float32), type=pa.float32())
    ranks = np.array([0 if v is None else v.ndim for v in values], dtype=np.int64)
    shape_offsets = pa.array(np.concatenate([[0], np.cumsum(ranks)]).astype(np.int32))
    dims = [np.asarray(v.shape, dtype=np.int32) for v in values if v is not None]
    shape_data = pa.array(np.concatenate(dims) if dims else np.empty(0, np.int32), type=pa.int32())
    mask_array = pa.array(mask)
    return (
        pa.ListArray.from_arrays(offsets, data, mask=mask_array),
        pa.ListArray.from_arrays(shape_offsets, shape_data, mask=mask_array),
    )


def table(rows: Sequence[dict[str, Any]], levels: int, outputs: Sequence[str]):
    """Rows (dicts of the columns; tensors as numpy arrays, None where a row has none) as an Arrow table."""
    pa, _ = _pyarrow()
    target = schema(levels, outputs)
    columns: dict[str, Any] = {}
    for name in tensor_columns(levels, outputs):
        columns[name], columns[f"{name}_shape"] = _tensor_arrays([row.get(name) for row in rows])
    arrays = [
        columns[f.name] if f.name in columns else pa.array([row.get(f.name) for row in rows], type=f.type)
        for f in target
    ]
    return pa.Table.from_arrays(arrays, schema=target)


def write_shard(folder: str | os.PathLike[str], data) -> Path:
    """Write an Arrow table as a new shard of the data set in `folder`; returns its path."""
    _, pq = _pyarrow()
    shards = Path(folder) / DATA
    shards.mkdir(parents=True, exist_ok=True)
    path = shards / f"part-{uuid.uuid4().hex[:16]}.parquet"
    write_atomic(path, lambda f: pq.write_table(data, f, compression="zstd"))
    return path


def shards(folder: str | os.PathLike[str]) -> list[Path]:
    """The complete shards of a data set (hidden temporary files are not shards)."""
    return sorted((Path(folder) / DATA).glob("part-*.parquet"))


def remove_partial(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files an interrupted writer left behind; returns how many."""
    leftovers = list((Path(folder) / DATA).glob(".part-*.tmp")) + list(Path(folder).glob(f".{MANIFEST}.*.tmp"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def done(folder: str | os.PathLike[str]) -> dict[str, tuple[str | None, Path]]:
    """Every row's path -> (its sha256, its shard), read from the shards' path and sha256 columns only."""
    _, pq = _pyarrow()
    seen: dict[str, tuple[str | None, Path]] = {}
    for shard in shards(folder):
        columns = pq.read_table(shard, columns=["path", "sha256"]).to_pydict()
        for path, sha in zip(columns["path"], columns["sha256"]):
            seen[path] = (sha, shard)
    return seen


def drop_rows(shard: Path, paths: set[str]) -> None:
    """Rewrite a shard without the rows of these paths (atomically); a shard left empty is deleted."""
    pa, pq = _pyarrow()
    import pyarrow.compute as pc

    data = pq.read_table(shard)
    kept = data.filter(pc.invert(pc.is_in(data["path"], value_set=pa.array(sorted(paths), pa.string()))))
    if kept.num_rows == 0:
        shard.unlink()
        _fsync_folder(shard.parent)
    else:
        write_atomic(shard, lambda f: pq.write_table(kept, f, compression="zstd"))


def counts(folder: str | os.PathLike[str]) -> dict[str, int]:
    """Rows, and of them encoded (no error) and failed, over the complete shards."""
    _, pq = _pyarrow()
    rows = failed = 0
    for shard in shards(folder):
        error = pq.read_table(shard, columns=["error"]).column("error")
        rows += len(error)
        failed += len(error) - error.null_count
    return {"rows": rows, "done": rows - failed, "failed": failed}


def read_manifest(folder: str | os.PathLike[str]) -> dict | None:
    """The data set's manifest, or None where the folder has none; ValueError where it is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is not a data set's manifest ({exc.__class__.__name__}: {exc})"[:300]) from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a data set's manifest (a JSON {type(manifest).__name__}, not an object)")
    return manifest


def damaged_shards(folder: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """The shards whose Parquet footer cannot be read (cut short or overwritten outside pc-encode), with why."""
    _, pq = _pyarrow()
    damaged = []
    for shard in shards(folder):
        try:
            pq.read_metadata(shard)
        except Exception as exc:  # pyarrow's ArrowInvalid, or an OSError
            damaged.append((shard, f"{exc.__class__.__name__}: {exc}"[:200]))
    return damaged


def write_manifest(folder: str | os.PathLike[str], manifest: dict) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomic(Path(folder) / MANIFEST, lambda f: f.write(text.encode()))


@dataclass(frozen=True)
class Encoding:
    """One row of a data set: an input and what the model made of it, or why it could not."""

    path: str  # as in the path column: relative to the folder it was found in, or as given
    sha256: str | None  # of the file's bytes (None where it could not be read)
    width: int | None
    height: int | None
    latents: list[np.ndarray]  # level 1 first, each (rows, causes, H_l, W_l) as encoding.npz has them; [] on error
    energy: float | None  # the final energy (summed over an image's tiles), None on error
    energy_initial: float | None
    error: str | None  # why the input could not be encoded, None on success
    reason: str | None  # bad_image, too_small, too_large, unsupported_format, unreadable, not_finite, ...
    maps: dict[str, Any] = field(default_factory=dict)  # reconstruction, error_map (arrays), *_png (bytes)


def read(folder: str | os.PathLike[str]) -> Iterator[Encoding]:
    """The rows of a pc-encode data set, shard by shard (a shard at a time in memory)."""
    _, pq = _pyarrow()
    if not (Path(folder) / DATA).is_dir():
        raise FileNotFoundError(f"{folder} is not a pc-encode data set: it has no {DATA}/ folder of shards")
    for shard in shards(folder):
        yield from _records(pq.read_table(shard))


def _records(data) -> Iterator[Encoding]:
    names = data.column_names
    levels = sorted(int(n.split("_")[1]) for n in names if n.startswith("latent_") and not n.endswith("_shape"))
    maps = [n for n in (*TENSOR_OUTPUTS, *PNG_OUTPUTS) if n in names]
    columns = {n: data.column(n) for n in names}

    def cell(name: str, i: int) -> Any:
        return columns[name][i].as_py()

    def tensor(name: str, i: int) -> np.ndarray | None:
        scalar = columns[name][i]
        if not scalar.is_valid:
            return None
        values = scalar.values.to_numpy(zero_copy_only=False)  # no Python list in between
        return values.astype(np.float32, copy=False).reshape(cell(f"{name}_shape", i))

    for i in range(data.num_rows):
        latents = [tensor(f"latent_{level}", i) for level in levels]
        yield Encoding(
            path=cell("path", i),
            sha256=cell("sha256", i),
            width=cell("width", i),
            height=cell("height", i),
            latents=[r for r in latents if r is not None],
            energy=cell("energy_final", i),
            energy_initial=cell("energy_initial", i),
            error=cell("error", i),
            reason=cell("reason", i),
            maps={n: tensor(n, i) if n in TENSOR_OUTPUTS else cell(n, i) for n in maps},
        )


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes (fast zlib: these are for viewing)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
