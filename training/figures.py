"""Figures a user looks at first: the bases, reconstructions of held-out images, the training curves (PNG)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
import torch

from pcmodel import PCModel
from pcmodel.images import display_maps, place

from . import data

DPI = 80  # small committed PNGs


def field_image(field: torch.Tensor) -> np.ndarray:
    """One basis function (C, h, w) as an image in [0, 1], zero at mid-grey, scaled to its own peak."""
    f = field.detach().cpu().double()
    f = f / max(float(f.abs().max()), 1e-12)
    image = (0.5 + 0.5 * f).permute(1, 2, 0).numpy()
    return image[:, :, 0] if image.shape[2] == 1 else image


def basis_grid(fields: torch.Tensor, title: str, columns: int | None = None) -> plt.Figure:
    """A grid of basis functions (N, C, h, w), each on its own symmetric scale."""
    n = fields.shape[0]
    columns = columns or min(n, 16 if fields.shape[-1] < fields.shape[-2] * 1.3 else 8)
    rows = math.ceil(n / columns)
    h, w = fields.shape[-2:]
    size = 0.55 if max(h, w) <= 16 else 0.8
    fig, axes = plt.subplots(rows, columns, figsize=(columns * size * w / h, rows * size + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(field_image(fields[i]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.2)
    return fig


def encode_region(model: PCModel, x: torch.Tensor, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction and error of one preprocessed region x (1, C, H, W), on its own grid.

    Models that serve by tiling (or have a dense level) run on native-size tiles; convolutional ones on
    the whole region, fitted to a size the hierarchy tiles (pcmodel.images.place).
    """
    mode = "tile" if model.config.preprocess.size_mode == "tile" else "fit"
    rows, placement = place(x, model.config, mode)
    result = model.infer(rows.to(model.device), steps=steps)
    reconstruction = placement.restore(result.reconstruction.cpu())
    return reconstruction, x - reconstruction


def reconstructions(
    model: PCModel, photos: Sequence[data.Photo], steps: int | None = None, region: int = 128
) -> plt.Figure:
    """Input, reconstruction and error for a central region of each held-out photo (model's preprocessing)."""
    images = data.prepare(photos, model.config)
    fig, axes = plt.subplots(len(images), 3, figsize=(6, 2.1 * len(images)), squeeze=False)
    for row, (photo, image) in enumerate(zip(photos, images)):
        h, w = image.shape[-2:]
        top, left = max((h - region) // 2, 0), max((w - region) // 2, 0)
        x = image[:, top : top + region, left : left + region].unsqueeze(0)
        reconstruction, error = encode_region(model, x, steps)
        relative = float(error.square().sum() / x.square().sum().clamp_min(1e-30))
        shown = display_maps(x[0], reconstruction[0], error[0], model.config.preprocess)
        titles = (f"{photo.name} (held out)", "reconstruction", f"error ({relative:.3f} of ||x||²)")
        for ax, picture, title in zip(axes[row], shown, titles):
            ax.imshow(np.asarray(picture), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout(pad=0.3)
    return fig


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(metrics: Sequence[dict], title: str) -> plt.Figure:
    """Energy per input, and relative reconstruction error on training batches and held-out windows."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 2.8))
    steps = [m["step"] for m in metrics]
    left.plot(steps, [m["energy"] for m in metrics], lw=1)
    left.set_yscale("log")
    left.set_xlabel("update")
    left.set_ylabel("energy per input (after T steps)")
    right.plot(steps, [m["rel_error"] for m in metrics], lw=1, label="training batch")
    held = [m for m in metrics if "held_out_rel_error" in m]
    right.plot([m["step"] for m in held], [m["held_out_rel_error"] for m in held], "o-", ms=3, label="held out")
    right.set_xlabel("update")
    right.set_ylabel("relative error")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    k2 = right.twinx()
    k2.plot(steps, [m["k2"] for m in metrics], color="0.6", lw=0.8, ls="--")
    k2.set_ylabel("k2 (dashed)", color="0.4")
    k2.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.4)
    return fig


def save(fig: plt.Figure, path: Path) -> Path:
    """Write a figure as a small PNG: 256 colours are plenty for grey images and line plots."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI)
    plt.close(fig)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB").quantize(256)
    image.save(path, optimize=True)
    return path


def write_figures(
    model: PCModel, folder: Path, metrics_path: Path | None, held_out: Sequence[data.Photo], steps: int | None = None
) -> list[Path]:
    """Write every training figure into `folder`; returns the paths."""
    name = model.name
    written = [
        save(basis_grid(model.receptive_fields(1).cpu(), f"{name}: level-1 basis (rows of U1)"), folder / "level1.png")
    ]
    if model.num_levels > 1:
        fields = model.receptive_fields(2).cpu()
        written.append(
            save(basis_grid(fields, f"{name}: level-2 fields in image space (U1 U2)"), folder / "level2.png")
        )
    written.append(save(reconstructions(model, held_out, steps), folder / "reconstructions.png"))
    metrics = read_metrics(metrics_path) if metrics_path is not None else []
    if metrics:
        written.append(save(curves(metrics, f"{name}: training"), folder / "training.png"))
    return written


def gabor_figure(fields: np.ndarray, fits: Sequence, name: str) -> plt.Figure:
    """Each level-1 field above its fitted Gabor, labelled with R^2 and the stripe orientation."""
    from .analysis import gabor

    n = len(fields)
    columns = min(n, 8)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(2 * rows, columns, figsize=(columns * 0.9, rows * 2.0 + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (field, gf) in enumerate(zip(fields, fits)):
        r, c = divmod(i, columns)
        h, w = field.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        model_image = gabor(
            np.array([gf.amplitude, gf.x0, gf.y0, gf.carrier, gf.sigma_u, gf.sigma_v, gf.frequency,
                      gf.phase, gf.offset]), yy, xx)  # fmt: skip
        scale = max(float(np.abs(field).max()), 1e-12)
        axes[2 * r, c].imshow(field / scale, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        axes[2 * r, c].set_title(f"R² {gf.r2:.2f}", fontsize=6, color="black" if gf.r2 >= 0.7 else "red")
        axes[2 * r + 1, c].imshow(model_image / scale, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        axes[2 * r + 1, c].set_title(f"{gf.orientation:.0f}°", fontsize=6)
    fig.suptitle(f"{name}: level-1 fields (upper) and fitted Gabors (lower)", fontsize=8)
    fig.tight_layout(pad=0.2)
    return fig


def end_stopping_figure(result: dict, name: str) -> plt.Figure:
    """Error response of the centre module against bar length, with and without feedback."""
    lengths = result["lengths"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 2.8))
    for ax, key, title in (
        (left, "cell", f"cell {result['cell']} of the centre module"),
        (right, "population", "all 32 error units of the centre module"),
    ):
        with_fb = np.array(result[f"{key}_error_with_feedback"])
        without = np.array(result[f"{key}_error_without_feedback"])
        ax.plot(lengths, with_fb / max(with_fb.max(), 1e-12), "o-", ms=3, label="with feedback: |r - r_td|")
        ax.plot(lengths, without / max(without.max(), 1e-12), "s--", ms=3, label="without feedback: |r|")
        ax.axvline(result["module_px"], color="0.7", lw=0.8)
        ax.set_xlabel("bar length (px)")
        ax.set_ylabel("error response (/ its maximum)")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"{name}: end-stopping", fontsize=9)
    fig.tight_layout(pad=0.4)
    return fig


def autocorrelation_figure(result: dict, name: str) -> plt.Figure:
    """The paper's Fig. 4: autocorrelation of the filtered photos along and across the local orientation."""
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    ax.plot(result["lags"], result["along"], "o-", ms=3, label="along the dominant orientation")
    ax.plot(result["lags"], result["across"], "s--", ms=3, label="across it")
    ax.axhline(0.5, color="0.7", lw=0.8)
    ax.axhline(0.0, color="0.85", lw=0.8)
    ax.set_xlabel("lag (px)")
    ax.set_ylabel("autocorrelation (/ lag 0)")
    ax.set_title(f"{name}: filtered training photos, {result['used']} windows", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout(pad=0.4)
    return fig


def level2_measures_figure(result: dict, name: str) -> plt.Figure:
    """Each level-2 measure: the random U2's medians (histogram) and the model's (a line)."""
    measures = result["measures"]
    fig, axes = plt.subplots(1, len(measures), figsize=(2.1 * len(measures), 2.2), squeeze=False)
    for ax, (key, m) in zip(axes[0], measures.items()):
        ax.hist(m["random_medians"], bins=15, color="0.7")
        ax.axvline(m["value"], color="C3", lw=1.5)
        ax.set_title(f"{key.replace('_', ' ')}, p = {m['p']:.2f}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    fig.suptitle(f"{name}: level-2 fields (red) against {result['draws']} random U2 (grey)", fontsize=8)
    fig.tight_layout(pad=0.3)
    return fig
