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
from pcmodel.atomic import write_atomic
from pcmodel.images import display_maps, place

from . import data
from .gabor import GaborFit, gabor

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
    write_atomic(path, lambda f: image.save(f, format="PNG", optimize=True))  # a full disk leaves no half a PNG
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
        # Largest columns of U2 first: weight decay leaves many near zero, and the used ones lead the grid.
        order = model.weights[1].detach().cpu().flatten(1).norm(dim=1).argsort(descending=True, stable=True)
        fields = model.receptive_fields(2).cpu()[order]
        title = f"{name}: level-2 fields in image space (U1 U2), largest columns of U2 first"
        written.append(save(basis_grid(fields, title), folder / "level2.png"))
    written.append(save(reconstructions(model, held_out, steps), folder / "reconstructions.png"))
    metrics = read_metrics(metrics_path) if metrics_path is not None else []
    if metrics:
        written.append(save(curves(metrics, f"{name}: training"), folder / "training.png"))
    return written


def gabor_figure(fields: np.ndarray, fits: Sequence[GaborFit], name: str) -> plt.Figure:
    """Each level-1 field above its fitted Gabor, labelled with R^2 and the stripe orientation."""
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


def end_stopping_figure(es: dict, name: str) -> plt.Figure:
    """Left: the headline cell's error response against bar length; right: every cell's index, with vs without."""
    lengths = es["lengths"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.0))
    for key, style in (("default", "-"), ("steady", "--")):
        m = es["mechanism"][key]
        steps = es["summary" if key == "default" else "steady"]["steps"]
        error, without = np.abs(m["error"]), np.array(m["without"])
        left.plot(lengths, error, "o" + style, ms=3, color="C0", label=f"with feedback |r − r_td|, {steps} steps")
        left.plot(lengths, without, "s" + style, ms=3, color="C1", label=f"without feedback |r|, {steps} steps")
    left.axvline(es["module_px"], color="0.7", lw=0.8)
    left.set_xlabel("bar length (px)")
    left.set_ylabel("response")
    left.set_ylim(bottom=0)
    left.set_title(f"headline cell {es['summary']['headline_cell']} (contrast x1)", fontsize=8)
    left.legend(fontsize=6)
    for key, marker in (("default", "o"), ("steady", "s")):
        for k, colour in zip(es["contrasts"], ("C2", "C0", "C3")):
            x = [c[key]["index_without"][k] for c in es["cells"]]
            y = [c[key]["index_feedback"][k] for c in es["cells"]]
            label = f"x{k}, " + ("model's steps" if key == "default" else f"{es['steady']['steps']} steps")
            right.scatter(x, y, marker=marker, s=14, color=colour, alpha=0.8, label=label)
    high = max([1.2] + [v for c in es["cells"] for m in ("default", "steady") for v in c[m]["index_feedback"].values()])
    right.axhspan(0, 0.7, xmin=0, xmax=1, color="0.92", zorder=0)
    right.axvline(0.9, color="0.6", lw=0.8)
    right.plot([0, high], [0, high], color="0.8", lw=0.8)
    right.set_xlim(0, high)
    right.set_ylim(0, high)
    right.set_xlabel("index without feedback")
    right.set_ylabel("index with feedback")
    right.set_title("every cell (end-stopped: shaded, right of the line)", fontsize=8)
    right.legend(fontsize=6)
    fig.suptitle(f"{name}: end-stopping, {es['long_px']} px bar / peak up to {es['module_px']} px", fontsize=9)
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


def mechanism_figure(es: dict, name: str) -> plt.Figure:
    """The paper's mechanism: r, the top-down prediction r_td and r - r_td against bar length; |r| without feedback."""
    lengths = es["lengths"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8), sharey=True)
    for ax, key in zip(axes, ("default", "steady")):
        m = es["mechanism"][key]
        ax.plot(lengths, m["r"], "o-", ms=3, label="r (with feedback)")
        ax.plot(lengths, m["r_td"], "^-", ms=3, label="r_td (level 2's prediction)")
        ax.plot(lengths, m["error"], "s-", ms=3, label="r − r_td (error unit)")
        ax.plot(lengths, m["without"], "x--", ms=4, color="0.4", label="|r| without feedback")
        ax.axhline(0, color="0.8", lw=0.8)
        ax.axvline(es["module_px"], color="0.7", lw=0.8)
        ax.set_xlabel("bar length (px)")
        steps = es["summary" if key == "default" else "steady"]["steps"]
        ax.set_title(f"{steps} steps", fontsize=8)
    axes[0].set_ylabel(f"cell {es['mechanism']['default']['cause']} (preferred sign +)")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{name}: how feedback makes the error end-stopped (contrast x1)", fontsize=9)
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
    fig.suptitle(
        f"{name}: the {result['used']} used level-2 fields (red) against {result['draws']} random U2 (grey)",
        fontsize=8,
    )
    fig.tight_layout(pad=0.3)
    return fig


def time_course_figure(tc: dict, name: str) -> plt.Figure:
    """The headline cell's error response against time k1 x steps: gradient steps from zero, per-level vs one k1."""
    fig, ax = plt.subplots(figsize=(5, 2.8))
    time = tc["k1"] * np.array(tc["steps"])
    curves = (
        ("served", f"gradient from r = 0, k1_scale {tc['k1_scale']}"),
        ("single_k1", f"gradient from r = 0, one k1 = {tc['single_k1_value']:g}"),
    )
    for (key, label), style in zip(curves, ("-", "--")):
        for n, colour in zip(tc["lengths"], ("C0", "C3")):
            ax.plot(time, tc[key][str(n)], style, color=colour, lw=1.2, label=f"{n} px bar, {label}")
    served_as = f"T = {tc['model_steps']}, served ({tc.get('model_dynamics', 'gradient from zeros')})"
    ax.axvline(tc["k1"] * tc["model_steps"], color="0.7", lw=0.8, label=served_as)
    ax.set_xscale("symlog", linthresh=max(tc["k1"], 1e-6))  # linear up to one step, then logarithmic
    ax.set_xlim(0, time[-1])
    ax.set_xlabel("time: k1 × steps")
    ax.set_ylabel("|r − r_td|")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=6)
    ax.set_title(f"{name}: cell's error response over inference", fontsize=8)
    fig.tight_layout(pad=0.4)
    return fig


def surround_figure(sur: dict, name: str) -> plt.Figure:
    """The three stimuli, and the cell's response to each relative to the centre bar alone."""
    fig = plt.figure(figsize=(7, 2.6))
    kinds = ("none", "iso", "ortho")
    stimuli = np.array(sur["stimuli"])
    scale = max(float(np.abs(stimuli).max()), 1e-12)
    for i, kind in enumerate(kinds):
        ax = fig.add_axes((0.02, 0.68 - i * 0.31, 0.28, 0.27))
        ax.imshow(stimuli[i] / scale, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title("centre alone" if kind == "none" else f"{kind}-oriented flanks", fontsize=6, pad=1)
        ax.axis("off")
    ax = fig.add_axes((0.42, 0.18, 0.55, 0.7))
    width = 0.8 / (2 * len(sur["by_steps"]))
    bar = 0
    for b in sur["by_steps"]:
        for key, label in (("feedback_ratio", "with feedback"), ("without_ratio", "without")):
            positions = np.arange(len(kinds)) + (bar - (2 * len(sur["by_steps"]) - 1) / 2) * width
            ax.bar(positions, [b[key][k] for k in kinds], width, label=f"{label}, {b['steps']} steps")
            bar += 1
    ax.set_xticks(range(len(kinds)), ["centre alone", "iso flanks", "ortho flanks"], fontsize=7)
    ax.axhline(1, color="0.6", lw=0.8)
    top = max(b[key][k] for b in sur["by_steps"] for key in ("feedback_ratio", "without_ratio") for k in kinds)
    ax.set_ylim(0, 1.35 * max(top, 1.0))  # room for the legend above the bars
    ax.set_ylabel("response / centre alone", fontsize=7)
    ax.legend(fontsize=6, loc="upper center", ncol=2)
    ax.set_title(f"{name}: surround, cell {sur['cause']}", fontsize=8)
    return fig


def save_end_stopping(es: dict, name: str, folder: Path) -> list[Path]:
    """Write the end-stopping figures (section F) that `es` has data for; returns the paths."""
    if not es["cells"]:
        return []
    return [
        save(end_stopping_figure(es, name), folder / "end_stopping.png"),
        save(mechanism_figure(es, name), folder / "end_stopping_mechanism.png"),
        save(time_course_figure(es["time_course"], name), folder / "end_stopping_time.png"),
        save(surround_figure(es["surround"], name), folder / "surround.png"),
    ]
