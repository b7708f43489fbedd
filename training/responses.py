"""Responses of the paper's network to bars and flanks over time (docs/MODEL.md section 5 F).

The paper's geometry: three overlapping 16x16 modules in a row (x offsets 0, 5, 10 of a 16x26 patch)
and a level above them. A cell is one of the centre module's level-1 causes. Its response with
feedback is the level-1 error unit |r - r_td| (r_td: level 2's top-down prediction of that cause);
without feedback it is |r| of the same level 1 with level 2 removed (sigma_td^2 -> infinity).

    stimuli: bars drawn on a grey canvas, seen through the model's own filter (`stimuli`, `bar_stimuli`,
             `flank_bars`)
    models:  the served model, the same without feedback, the paper's dynamics with its single k1
             (`without_feedback`, `single_k1`)
    runs:    `centre_responses` (one inference), `end_stopping`, `time_course`, `surround`, and
             `settling` (how far from its steady state each level is after T steps)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pcmodel import ModelConfig, PCModel
from pcmodel.config import NEUTRAL_MODEL_FIELDS
from pcmodel.images import filter_images

from . import data

CENTRE = 1  # the centre module: offsets 0, 5, 10
CONTRASTS = (0.5, 1.0, 2.0)  # bar contrast relative to the natural one (`stimuli`)
STEADY_STEPS = 1000  # "steady state" for end-stopping: the 2,500-step check finds both levels settled by then
REFERENCE_STEPS = 5000  # r(infinity) for `settling`
STATES_PER_CALL = 250_000  # images x steps per call in `settling` (onnxruntime and torch keep every step's state)
DRIVEN = 0.25  # a cell is driven if a bar gives it >= this share of the most driven candidate's response
END_STOPPED = 0.7  # index below which a cell is end-stopped with feedback ...
NOT_END_STOPPED = 0.9  # ... while without feedback its index stays at or above this
PASS_SHARE = 0.5  # the model passes if at least this share of the cells is end-stopped at contrast x1
FLANK_OFFSET = 8.0  # px from the centre module's centre to a flank's: 3 px beyond a neighbour module's centre
FLANK_PX = 4.0  # a flank's length: its inner end 6 px from the centre, where the centre window is ~0.1


def applies(model: PCModel) -> bool:
    """The experiments need the paper's geometry: a row of three modules and a level above."""
    config = model.config
    return model.num_levels >= 2 and config.levels[0].kind == "modules" and model.latent_shapes()[0][1:] == (1, 3)


def contrast_key(contrast: float) -> str:
    """A contrast as a JSON key: 0.5 -> "0.5", 1.0 -> "1"."""
    return f"{contrast:g}"


# ---- the models -------------------------------------------------------------------------------


def _variant(model: PCModel, config: ModelConfig, weights: Sequence[torch.Tensor] | None = None) -> PCModel:
    """A private model (own engine state, so preparing it leaves the caller's model as it was), with the
    model's amortised start for its levels where the config starts there."""
    amortised = model.amortiser is not None and config.initial_latents == "amortised"
    amortiser = model.amortiser.lowest(len(config.levels)) if amortised else None
    weights = model.weights if weights is None else weights
    return PCModel(config, weights, allow_unstable=True, device=model.device, amortiser=amortiser)


def without_feedback(model: PCModel) -> PCModel:
    """The same level 1 with every level above removed (sigma_td^2 -> infinity: no top-down prediction).

    It starts from zero whatever the model starts from: the amortised guess of level 1 was fitted to the
    whole network's settled latents, feedback included, and under the sparse (non-convex) prior a start
    can choose the fixed point, so the control would inherit some of the feedback it removes
    (docs/TRAINING.md, "The served dynamics and the science"). Same solver and steps as the model's."""
    config = model.config.replace(levels=model.config.levels[:1], initial_latents="zeros")
    return _variant(model, config, model.weights[:1])


def single_k1_value(config: ModelConfig) -> float:
    """One inference step for every level, as in the paper: the served k1 times the smallest k1_scale below 1.
    Shrinking any level's step keeps the served (stable) step stable, so this single step is safe by
    construction; it is not the largest stable one (the shipped rao-ballard-1999's bound for one k1 is 5.8, this
    is 1). With every k1_scale >= 1 it is k1 itself."""
    return config.k1 * min(1.0, *(lv.k1_scale for lv in config.levels))


def single_k1(model: PCModel) -> PCModel:
    """The paper's dynamics with its single k1: plain gradient steps from r = 0 at `single_k1_value` for every
    level (every k1_scale 1), whatever solver and start the model is served with."""
    levels = tuple(dataclasses.replace(lv, k1_scale=1.0) for lv in model.config.levels)
    config = model.config.replace(
        levels=levels, k1=single_k1_value(model.config), initial_latents="zeros", **NEUTRAL_MODEL_FIELDS
    )
    return _variant(model, config)


def served(model: PCModel) -> PCModel:
    """The model as the service runs it (its own per-level steps), in a private copy."""
    return _variant(model, model.config)


def _fast(model: PCModel, steps: Sequence[int]) -> PCModel:
    """Let model.infer pick its fast backend for these step counts (a private model only).

    Only where that backend loops over the steps (numba, CUDA graphs): onnxruntime unrolls them, and
    thousands of unrolled steps cost more to build than to run on the torch backend.
    """
    hw = tuple(model.config.input_shape[1:])
    if model.engines.fast_backend(hw, model.device) != "onnxruntime":  # type: ignore[arg-type]
        model.prepare(steps=sorted(set(steps))[-8:], build=False)
    return model


# ---- stimuli ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """A bright bar on the patch (pixel units; pixel centres at 0 .. W-1), antialiased at its edges."""

    x: float  # centre
    y: float
    length: float
    width: float = 2.0
    vertical: bool = False  # False: the length runs along x (a horizontal bar)


@functools.lru_cache(maxsize=8)
def _reference_scale(config: ModelConfig) -> float:
    """Mean std of the training photos after the filter, before normalisation: gives bars a natural contrast."""
    pre = dataclasses.replace(config.preprocess, normalize="none", gain=1.0)
    images = data.prepare(data.default_photos(), config.replace(preprocess=pre))
    return float(np.mean([float(image.std()) for image in images]))


def stimuli(model: PCModel, scenes: Sequence[Sequence[Bar]], contrast: float = 1.0) -> torch.Tensor:
    """Scenes of bright bars as the model sees them: (len(scenes), 1, H, W) on the model's device.

    Each scene is drawn on a mid-grey canvas larger than the patch (the bar at `contrast` x half the
    value range above grey), passed through the model's own filter without per-image normalisation
    (which would change the contrast with the bars' length), scaled like a training photo, and cut to
    the native patch. Filter and scale are linear, so the stimulus is proportional to `contrast`.
    """
    _, h, w = model.config.input_shape
    margin = 16
    lo, hi = model.config.preprocess.value_range
    yy, xx = np.mgrid[0 : h + 2 * margin, 0 : w + 2 * margin].astype(np.float64)
    canvases = []
    for scene in scenes:
        inside = np.zeros_like(xx)
        for bar in scene:
            along, across = (yy, xx) if bar.vertical else (xx, yy)
            centre_along, centre_across = (bar.y, bar.x) if bar.vertical else (bar.x, bar.y)
            a = np.clip(bar.length / 2 + 0.5 - np.abs(along - (margin + centre_along)), 0, 1)
            b = np.clip(bar.width / 2 + 0.5 - np.abs(across - (margin + centre_across)), 0, 1)
            inside = np.maximum(inside, a * b)
        canvases.append(lo + (hi - lo) * 0.5 * (1.0 + contrast * inside))
    raw = torch.tensor(np.stack(canvases), dtype=torch.float32).unsqueeze(1)  # (N, 1, H + 2m, W + 2m)
    pre = dataclasses.replace(model.config.preprocess, normalize="none")
    filtered = filter_images(raw, pre) / _reference_scale(model.config)
    return filtered[:, :, margin : margin + h, margin : margin + w].to(model.device)


def bar_stimuli(
    model: PCModel, lengths: Sequence[float], rows: Sequence[float], width: float = 2.0, contrast: float = 1.0
) -> torch.Tensor:
    """Horizontal bars centred on the patch's x centre: (len(rows) * len(lengths), 1, H, W), rows outer."""
    x = (model.config.input_shape[2] - 1) / 2
    return stimuli(model, [[Bar(x, row, n, width)] for row in rows for n in lengths], contrast)


def module_centres(model: PCModel) -> list[float]:
    """x of each module's window centre (pixel units)."""
    lc = model.config.levels[0]
    return [i * lc.stride[1] + (lc.kernel[1] - 1) / 2 for i in range(model.latent_shapes()[0][2])]


def flank_bars(model: PCModel, row: float, kind: str) -> list[Bar]:
    """The two flanks of `surround`, in the neighbour modules' fields: "iso" (horizontal), "ortho", "none"."""
    if kind == "none":
        return []
    if kind not in ("iso", "ortho"):
        raise ValueError(f"unknown flank kind {kind!r}; choose iso, ortho or none")
    centre = module_centres(model)[CENTRE]
    return [Bar(centre + side * FLANK_OFFSET, row, FLANK_PX, vertical=kind == "ortho") for side in (-1, 1)]


# ---- responses --------------------------------------------------------------------------------


@dataclass
class CentreResponses:
    """The centre module's level-1 causes for a batch of stimuli: (B, causes) each."""

    r: torch.Tensor  # with feedback
    r_td: torch.Tensor  # level 2's prediction of r
    r_plain: torch.Tensor  # without feedback (level 2 removed)

    @property
    def error(self) -> torch.Tensor:
        """The level-1 error units r - r_td (with feedback)."""
        return self.r - self.r_td


def centre_responses(model: PCModel, plain: PCModel, x: torch.Tensor, steps: int) -> CentreResponses:
    """Infer x with the model and with its level-1-only twin `plain`; the centre module's causes."""
    full = model.infer(x, steps=steps)
    alone = plain.infer(x, steps=steps)
    return CentreResponses(
        r=full.latents[0][:, :, 0, CENTRE].double(),  # latents (B, causes, 1, 3)
        r_td=full.predictions[1][:, 0, :, 0, CENTRE].double(),  # level 2's prediction (B, 1, causes, 1, 3)
        r_plain=alone.latents[0][:, :, 0, CENTRE].double(),
    )


def end_stopping_index(curve: Sequence[float], lengths: Sequence[int], module_px: int) -> float:
    """Response to the longest bar / the peak response over bars no longer than a module (16 px)."""
    peak = max(v for v, n in zip(curve, lengths) if n <= module_px)
    return float(curve[-1] / max(peak, 1e-12))


def end_stopping(
    model: PCModel,
    candidates: Sequence[int],
    steps: Sequence[int],
    selection_steps: int,
    contrasts: Sequence[float] = CONTRASTS,
) -> dict[str, Any]:
    """End-stopping indices of the driven candidate cells at each step count in `steps`.

    Bars 2 px wide and 2, 4, ..., W px long are centred on the patch at 9 rows (the middle +-2 px).
    A candidate (the caller's: the oriented horizontal fields) is driven if, without feedback at
    contrast x1 after `selection_steps`, a bar gives it at least DRIVEN x the most driven candidate's
    response (max over lengths and rows); its bar row is the one with its largest response to bars up
    to a module's width. Cells are listed most driven first; the first is the headline cell.
    """
    _, h, w = model.config.input_shape
    module = model.config.levels[0].kernel[1]
    lengths = list(range(2, w + 1, 2))
    rows = [h / 2 - 0.5 + float(d) for d in np.arange(-2.0, 2.01, 0.5)]
    inside = [i for i, n in enumerate(lengths) if n <= module]
    counts = [*steps, selection_steps]
    net, plain = _fast(served(model), counts), _fast(without_feedback(model), counts)

    def run(contrast: float, t: int) -> CentreResponses:
        res = centre_responses(net, plain, bar_stimuli(model, lengths, rows, contrast=contrast), t)
        shape = (len(rows), len(lengths), -1)  # (rows, lengths, causes)
        return CentreResponses(res.r.reshape(shape), res.r_td.reshape(shape), res.r_plain.reshape(shape))

    if not candidates:  # nothing to select or measure
        causes = model.config.levels[0].causes
        drive_map = torch.zeros((len(rows), len(lengths), causes), dtype=torch.float64)
    else:
        drive_map = run(1.0, selection_steps).r_plain.abs()  # (rows, lengths, causes)
    drive = drive_map.amax(dim=(0, 1))
    strongest = max((float(drive[c]) for c in candidates), default=0.0)
    driven = [c for c in candidates if float(drive[c]) >= DRIVEN * strongest > 0]
    driven.sort(key=lambda c: -float(drive[c]))
    best_row = {c: int(drive_map[:, inside, c].amax(dim=1).argmax()) for c in driven}
    cells = [{"cause": c, "drive": float(drive[c]), "bar_row": rows[best_row[c]]} for c in driven]

    measured = []
    for t in steps:
        by_contrast = {contrast_key(k): run(k, t) for k in contrasts} if driven else {}
        table = []
        for c in driven:
            row = best_row[c]
            table.append(
                {
                    "cause": c,
                    "index_feedback": {
                        k: end_stopping_index(res.error[row, :, c].abs().tolist(), lengths, module)
                        for k, res in by_contrast.items()
                    },
                    "index_without": {
                        k: end_stopping_index(res.r_plain[row, :, c].abs().tolist(), lengths, module)
                        for k, res in by_contrast.items()
                    },
                }
            )
        mechanism = None
        if driven:
            c, row, res = driven[0], best_row[driven[0]], by_contrast[contrast_key(1.0)]
            sign = 1.0 if float(res.r_plain[row, inside, c].sum()) >= 0 else -1.0  # preferred response positive
            mechanism = {
                "cause": c,
                "sign": sign,
                "r": (sign * res.r[row, :, c]).tolist(),
                "r_td": (sign * res.r_td[row, :, c]).tolist(),
                "error": (sign * res.error[row, :, c]).tolist(),
                "without": res.r_plain[row, :, c].abs().tolist(),
            }
        measured.append({"summary": summarise(table, t, contrasts), "cells": table, "mechanism": mechanism})
    return {
        "lengths": lengths,
        "module_px": module,
        "long_px": lengths[-1],
        "rows": rows,
        "contrasts": [contrast_key(k) for k in contrasts],
        "selection_steps": selection_steps,
        "candidates": list(candidates),
        "cells": cells,
        "measured": measured,
    }


def summarise(table: Sequence[dict], steps: int, contrasts: Sequence[float] = CONTRASTS) -> dict[str, Any]:
    """The machine-readable summary: share of end-stopped cells, median indices, pass, per contrast."""
    keys = [contrast_key(k) for k in contrasts]

    def stopped(cell: dict, k: str) -> bool:
        return cell["index_feedback"][k] < END_STOPPED and cell["index_without"][k] >= NOT_END_STOPPED

    def median(name: str, k: str) -> float | None:
        return float(np.median([cell[name][k] for cell in table])) if table else None

    share = {k: (sum(stopped(cell, k) for cell in table) / len(table) if table else 0.0) for k in keys}
    return {
        "cells": len(table),
        "share_end_stopped": share,
        "median_feedback": {k: median("index_feedback", k) for k in keys},
        "median_without": {k: median("index_without", k) for k in keys},
        "headline_cell": table[0]["cause"] if table else None,
        "passes": bool(table) and share[contrast_key(1.0)] >= PASS_SHARE,
        "steps": steps,
    }


def _step_grid(last: int, points: int = 40) -> list[int]:
    return sorted({0, *(round(float(v)) for v in np.geomspace(1, last, points))})


def short_bar(model: PCModel) -> int:
    """Half a module's width, rounded up to an even length: 8 px in the paper."""
    half = model.config.levels[0].kernel[1] // 2
    return half + half % 2


def time_course(
    model: PCModel, cause: int, row: float, last: int, lengths: Sequence[int] | None = None
) -> dict[str, Any]:
    """The cell's |r - r_td| (with feedback) to a short and a long bar (default: 8 and 26 px) after t steps.

    At the model's per-level rates (k1_scale) and at one k1 for every level (`single_k1_value`); time is
    k1 x steps for both (the single k1 takes k1 / single k1 times the steps), so the curves share an axis.
    Always plain gradient steps from zero, whatever the model is served with (`model_dynamics` says how it is):
    the time course is the paper's claim about its dynamics.
    """
    lengths = [short_bar(model), model.config.input_shape[2]] if lengths is None else list(lengths)
    x = bar_stimuli(model, lengths, [row])
    steps = _step_grid(last)
    single = single_k1_value(model.config)
    dynamics = f"{model.config.served_solver.label} from {model.config.initial_latents}"  # how it is served
    out: dict[str, Any] = {"k1": model.config.k1, "single_k1_value": single, "steps": steps,
                           "model_steps": model.config.steps, "lengths": list(lengths),
                           "model_dynamics": dynamics}  # fmt: skip
    runs = (("served", served(model), 1.0), ("single_k1", single_k1(model), model.config.k1 / single))
    for name, net, stretch in runs:
        curves = np.zeros((len(lengths), len(steps)))
        for j, t in enumerate(steps):
            full = net.infer(x, steps=round(t * stretch), init="zero", solver="gradient")
            error = full.latents[0][:, cause, 0, CENTRE] - full.predictions[1][:, 0, cause, 0, CENTRE]
            curves[:, j] = error.abs().double().cpu().numpy()
        out[name] = {str(n): curves[i].tolist() for i, n in enumerate(lengths)}
    out["k1_scale"] = [lv.k1_scale for lv in model.config.levels]
    return out


def surround(
    model: PCModel, cause: int, row: float, steps: Sequence[int], centre_px: int | None = None
) -> dict[str, Any]:
    """The cell's response to a centre bar alone, with iso- and with ortho-oriented flanks (the paper's Fig. 6).

    The centre bar (horizontal: the cell's preferred orientation; `centre_px` long, default 8 px) sits on the centre
    module at the cell's bar row; the flanks (`flank_bars`) lie in the neighbour modules' fields.
    Response: |r - r_td| with feedback, |r| without; ratios are to the centre bar alone.
    """
    centre_px = short_bar(model) if centre_px is None else centre_px
    x0 = module_centres(model)[CENTRE]
    kinds = ("none", "iso", "ortho")
    scenes = [[Bar(x0, row, centre_px), *flank_bars(model, row, kind)] for kind in kinds]
    x = stimuli(model, scenes)
    net, plain = _fast(served(model), steps), _fast(without_feedback(model), steps)
    out: dict[str, Any] = {"cause": cause, "bar_row": row, "centre_px": centre_px, "flank_px": FLANK_PX,
                           "flank_offset_px": FLANK_OFFSET, "by_steps": []}  # fmt: skip
    for t in steps:
        res = centre_responses(net, plain, x, t)
        feedback = res.error[:, cause].abs().tolist()
        without = res.r_plain[:, cause].abs().tolist()
        out["by_steps"].append(
            {
                "steps": t,
                "feedback": dict(zip(kinds, feedback)),
                "without": dict(zip(kinds, without)),
                "feedback_ratio": {k: v / max(feedback[0], 1e-12) for k, v in zip(kinds, feedback)},
                "without_ratio": {k: v / max(without[0], 1e-12) for k, v in zip(kinds, without)},
            }
        )
    out["stimuli"] = x[:, 0].cpu().tolist()
    return out


# ---- settling ---------------------------------------------------------------------------------


def _relative_distances(latents: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> list[float]:
    """Per level, the median over images of ||r_l - r_l(ref)|| / ||r_l(ref)||."""
    out = []
    for r, ref in zip(latents, reference):
        diff = (r - ref).double().flatten(1).norm(dim=1)
        out.append(float((diff / ref.double().flatten(1).norm(dim=1).clamp_min(1e-30)).median()))
    return out


def _energy_gap(energy: torch.Tensor, reference: torch.Tensor) -> float:
    """Median over images of (E(T) - E(ref)) / |E(ref)|."""
    return float(((energy.double() - reference.double()) / reference.double().abs().clamp_min(1e-30)).median())


def _settle(net: PCModel, windows: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Latents per level and final energy (B,) after `steps`, inferred in chunks.

    Chunks, because the onnxruntime and torch backends keep every step's state for the energy trace:
    memory grows with steps x batch there (the numba backend keeps one chunk of steps at a time).
    """
    chunk = max(1, STATES_PER_CALL // max(steps, 1))
    parts = [net.infer(windows[i : i + chunk], steps=steps) for i in range(0, windows.shape[0], chunk)]
    latents = [torch.cat([p.latents[level] for p in parts]) for level in range(len(parts[0].latents))]
    return latents, torch.cat([p.energy[-1] for p in parts])


def settling(
    model: PCModel, windows: torch.Tensor, steps: int | None = None, reference_steps: int = REFERENCE_STEPS
) -> dict[str, Any]:
    """How far each level is from its steady state after `steps` (default: the model's) inference steps.

    r(infinity) is the served model's state after `reference_steps`; `reference_check` is the same
    distance for half as many steps (near 0: the reference has settled). The paper's dynamics with its single
    k1 (`single_k1`: plain gradient steps from r = 0, every k1_scale 1) are measured at the same T against the
    same reference.
    """
    steps = model.config.steps if steps is None else steps
    half = max(reference_steps // 2, 1)
    net = _fast(served(model), [steps, half, reference_steps])
    windows = windows.to(model.device)
    reference = _settle(net, windows, reference_steps)
    at_t = _settle(net, windows, steps)
    at_half = _settle(net, windows, half)
    report: dict[str, Any] = {
        "steps": steps,
        "reference_steps": reference_steps,
        "windows": int(windows.shape[0]),
        "median_relative_distance": _relative_distances(at_t[0], reference[0]),
        "energy_relative_gap": _energy_gap(at_t[1], reference[1]),
        "reference_check": {
            "steps": half,
            "median_relative_distance": _relative_distances(at_half[0], reference[0]),
        },
        "k1_scale": [lv.k1_scale for lv in model.config.levels],
    }
    if single_k1(model).config == model.config:
        single = at_t  # the served model already runs the paper's dynamics with its single k1
    else:
        single = _settle(_fast(single_k1(model), [steps]), windows, steps)
    report["single_k1"] = {
        "k1": single_k1_value(model.config),
        "same_as_served": single is at_t,
        "median_relative_distance": _relative_distances(single[0], reference[0]),
        "energy_relative_gap": _energy_gap(single[1], reference[1]),
    }
    finite = all(math.isfinite(v) for v in report["single_k1"]["median_relative_distance"])
    report["single_k1"]["finite"] = finite  # the single k1 may exceed the stability bound of a retrained model
    return report
