"""The JSON response for one encoded image: energies, latents, maps as base64 arrays and PNGs.

Arrays in responses are {"shape": [...], "dtype": "float32" or "float16", "data": base64 of the
little-endian bytes}. `arrays` chooses them: float32 (the default), float16 (half the bytes) or none
(maps as PNGs only; latents and level errors, which have no PNG, as float16). `input` is the image as
the model saw it after its preprocessing (resized, scaled in full mode, scaled to the config's value
range, filtered), so input - reconstruction = error_map exactly in float32. Nothing that is not finite
goes out: `check_finite` raises NotFinite (500 not_finite) instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pcmodel import ModelConfig
from pcmodel.images import display_pixels, display_scale

from .batching import Settled
from .errors import NotFinite
from .inputs import Prepared
from .jsonbody import Base64
from .options import EncodeOptions
from .png import png_bytes


def check_finite(settled: Settled) -> None:
    """Raise NotFinite unless every number a response would carry is finite."""
    tensors = [*settled.latents, settled.reconstruction, settled.energy]
    # A float64 sum of float32 values cannot overflow, and any NaN or Inf makes it NaN or Inf: the same test as
    # isfinite(t).all(), in one pass with no mask (0.45 -> 0.08 ms for a 256 px photo), tested as a Python float.
    if not all(math.isfinite(t.sum(dtype=torch.float64)) for t in tensors):
        raise NotFinite(
            "inference diverged (NaN or Inf) for this image: the model's step size k1 is unstable. The operator "
            "serves it with PC_ALLOW_UNSTABLE; serve a stable checkpoint instead"
        )


def array_payload(t: torch.Tensor, dtype: str = "float32") -> dict:
    """{"shape", "dtype": float32 or float16, "data": base64 of the little-endian bytes in C order}."""
    a = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy(), dtype="<f4" if dtype == "float32" else "<f2")
    return {"shape": list(a.shape), "dtype": dtype, "data": Base64.of(a.data)}


MAPS = ("input", "reconstruction", "error_map")


def png_payload(pixels: np.ndarray, compress: bool = True) -> Base64:
    """A picture ((H, W, 3) or (H, W) uint8) as base64 PNG; uncompressed (`compress=False`) where the response
    carries its array too, so that the PNG is a small part of it (service/png.py)."""
    return Base64.of(png_bytes(pixels, compress))


def image_arrays(prepared: Prepared, settled: Settled, outputs: tuple[str, ...]) -> dict:
    """The numbers of one encoded image, as every protocol sends them (only those `outputs` asks for):
    "energy" (steps + 1,) float64, summed over tiles; "latents" and "level_errors", one tensor per level,
    (causes, h, w), or (tiles, causes, h, w) in tile mode; the maps "input", "reconstruction" and
    "error_map" (C, H, W), with tiles stitched and full mode's padding cropped off."""
    out: dict = {"energy": settled.energy.sum(dim=1, dtype=torch.float64)}
    grid, fit = prepared.grid, prepared.fit
    if "latents" in outputs:
        out["latents"] = [r if grid is not None else r[0] for r in settled.latents]
    if "level_errors" in outputs:
        out["level_errors"] = [e if grid is not None else e[0] for e in settled.errors]
    if any(m in outputs for m in MAPS):
        shown = prepared.shown.to("cpu", torch.float32)
        if grid is not None:
            reconstruction = grid.stitch(settled.reconstruction)[0]
        elif fit is not None:
            reconstruction = fit.undo(settled.reconstruction)[0]
        else:
            reconstruction = settled.reconstruction[0]
        error = shown - reconstruction  # (C, H, W): exactly input - reconstruction in float32
        maps = {"input": shown, "reconstruction": reconstruction, "error_map": error}
        out.update((name, maps[name]) for name in MAPS if name in outputs)
    return out


def encode_result(
    prepared: Prepared, settled: Settled, options: EncodeOptions, model_ref: dict, config: ModelConfig
) -> dict:
    """The JSON object for one encoded image (see the module docstring and README); `settled` has passed
    `check_finite` (Pipeline.settle checks every protocol's results once)."""
    arrays = image_arrays(prepared, settled, options.outputs)
    energy = arrays["energy"]
    out: dict = {
        "model": model_ref,
        "steps": int(settled.steps.max()),
        "size_mode": options.size_mode,
        "energy": {"initial": float(energy[0]), "final": float(energy[-1])},
    }
    if "trace" in options.outputs:
        out["energy"]["trace"] = energy.tolist()
    grid, fit = prepared.grid, prepared.fit
    # Latents and level errors have no PNG: `arrays=none` still sends them, as float16.
    per_row = "float32" if options.arrays == "float32" else "float16"
    for name in ("latents", "level_errors"):
        if name in arrays:
            out[name] = [array_payload(t, per_row) for t in arrays[name]]
    if grid is not None:
        out["tile_grid"] = {
            "rows": grid.rows,
            "cols": grid.cols,
            "tile": list(grid.tile),
            "stride": list(grid.stride),
            "origin": [-grid.margin[0], -grid.margin[1]],
            "image": list(grid.original),
        }
    if fit is not None:
        out["padded"] = [fit.top, fit.bottom, fit.left, fit.right]
        out["model_input"] = list(fit.fitted)
    maps = [m for m in MAPS if m in arrays]
    for name, picture in map_pictures(arrays, prepared, config, maps).items():
        out[name] = {"png": png_payload(picture, compress=options.arrays == "none")}
        if options.arrays != "none":
            out[name]["array"] = array_payload(arrays[name], options.arrays)
    return out


def map_pictures(arrays: dict, prepared: Prepared, config: ModelConfig, names: list[str]) -> dict[str, np.ndarray]:
    """The pictures of an image's maps (`arrays` from image_arrays), all on the input's scale, so that every map
    of an image is comparable; the error map centred."""
    if not names:
        return {}
    pre = config.preprocess
    scale = display_scale(prepared.shown.to("cpu", torch.float32), pre)
    centred = not (pre.filter == "none" and pre.normalize == "none")
    return {n: display_pixels(arrays[n], pre, scale, centred=centred or n == "error_map") for n in names}


def image_maps(
    prepared: Prepared, settled: Settled, config: ModelConfig, names: list[str]
) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """The maps on the image's grid, each as its tensor (C, H, W) and its picture: input (as the model saw
    it), reconstruction, and error_map = input - reconstruction (exactly, in float32)."""
    if not names:
        return {}
    arrays = image_arrays(prepared, settled, tuple(names))
    return {n: (arrays[n], picture) for n, picture in map_pictures(arrays, prepared, config, names).items()}


def snapshot_payload(prepared: Prepared, settled: Settled, config: ModelConfig) -> dict:
    """One snapshot of inference (outputs=snapshots): its step, energy, the reconstruction and error PNGs and
    the latents as float16 arrays (a snapshot is for seeing, and a slider holds up to MAX_SNAPSHOTS)."""
    check_finite(settled)
    grid = prepared.grid
    maps = image_maps(prepared, settled, config, ["reconstruction", "error_map"])
    return {
        "step": int(settled.steps.max()),
        "energy": float(settled.energy[-1].sum(dtype=torch.float64)),
        **{name: png_payload(picture) for name, (_, picture) in maps.items()},
        "latents": [array_payload(r if grid is not None else r[0], "float16") for r in settled.latents],
    }


def snapshot_steps(steps: int, count: int) -> list[int]:
    """The steps a slider shows: 0 (the start) and about `count` more, evenly up to `steps`."""
    return sorted({0, *(round(k * steps / count) for k in range(1, count + 1))})
