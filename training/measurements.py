"""What pc-analyze measures on a model besides its fields: held-out reconstruction (docs/MODEL.md section 5 E),
end-stopping of the oriented horizontal cells (5 F; the experiments are training/responses.py's) and how far
inference is from steady state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pcmodel import PCModel

from . import data, responses
from .gabor import GaborFit
from .metrics import error_sums

END_STOPPING_STEPS = responses.STEADY_STEPS  # steady state for 5 F


# ---- E: held-out reconstruction ---------------------------------------------------------------


def held_out_reconstruction(model: PCModel, count: int = 1000, steps: int | None = None, seed: int = 0) -> dict:
    """Relative error of `count` held-out windows of the model's native size after `steps` inference steps.

    `relative_error` is the quantity level 1 minimises (module models: per module, in windowed patch
    space); `image_relative_error` uses the reconstruction on the image grid; the zero code scores 1.0.
    """
    windows = data.held_out_windows(model.config, count, seed=seed).to(model.device)
    err = norm = image_err = image_norm = abs_err = 0.0
    for start in range(0, count, 250):
        x = windows[start : start + 250]
        result = model.infer(x, steps=steps)
        e, n = error_sums(result)
        err, norm = err + e, norm + n
        image_err += float((x - result.reconstruction).double().square().sum())
        image_norm += float(x.double().square().sum())
        abs_err += float((x - result.reconstruction).double().abs().sum())
    return {
        "windows": count,
        "size": list(model.config.input_shape),
        "steps": steps or model.config.steps,
        "photos": list(data.HELD_OUT_PHOTOS),
        "relative_error": err / norm,
        "image_relative_error": image_err / image_norm,
        "mean_absolute_error": abs_err / windows.numel(),
        "zero_code_relative_error": 1.0,
    }


# ---- F: end-stopping (the measurements: training.responses) ---------------------------------


def horizontal_cells(fits: Sequence[GaborFit]) -> list[int]:
    """The level-1 causes that can be end-stopping cells: oriented (Gabor-like) with horizontal stripes (bin 0)."""
    return [i for i, f in enumerate(fits) if f.oriented and f.orientation_bin == 0]


def end_stopping(
    model: PCModel, fits: Sequence[GaborFit], steps: int | None = None, steady_steps: int | None = None
) -> dict[str, Any] | None:
    """docs/MODEL.md 5 F: every driven oriented horizontal cell of the centre module, at three contrasts.

    Measured at `steps` (default: the model's, what the service returns; the headline `summary`) and at
    `steady_steps` (default: max(END_STOPPING_STEPS, the model's): `steady`), plus the headline cell's
    mechanism (r, r_td, r - r_td against bar length), its time course and the surround experiment.
    None without the paper's geometry.
    """
    if not responses.applies(model):
        return None
    steps = model.config.steps if steps is None else steps
    steady_steps = max(END_STOPPING_STEPS, model.config.steps) if steady_steps is None else steady_steps
    measured = responses.end_stopping(model, horizontal_cells(fits), [steps, steady_steps], steady_steps)
    default, steady = measured.pop("measured")
    for cell, at_t, at_steady in zip(measured["cells"], default["cells"], steady["cells"]):
        fit = fits[cell["cause"]]
        cell.update(r2=fit.r2, n_x=fit.n_x, orientation_deg=fit.orientation)
        cell.update(default={k: at_t[k] for k in ("index_feedback", "index_without")})
        cell.update(steady={k: at_steady[k] for k in ("index_feedback", "index_without")})
    result = {
        **measured,
        "summary": default["summary"],
        "steady": steady["summary"],
        "mechanism": {"default": default["mechanism"], "steady": steady["mechanism"]},
        "time_course": None,
        "surround": None,
    }
    if measured["cells"]:
        head = measured["cells"][0]
        result["time_course"] = responses.time_course(model, head["cause"], head["bar_row"], steady_steps)
        result["surround"] = responses.surround(model, head["cause"], head["bar_row"], [steps, steady_steps])
    return result


def steady_state(model: PCModel, seed: int = 0, reference_steps: int = responses.REFERENCE_STEPS) -> dict | None:
    """Per-level distance from steady state at the model's steps, on 1,000 held-out windows (the paper's network).

    Other models: None (conv-rgb's 1,000 windows x 7,500 steps on the torch backend: ~0.3 ms per window
    and step, about 40 min on 2 CPU cores).
    """
    if not responses.applies(model):
        return None
    windows = data.held_out_windows(model.config, 1000, seed=seed)
    return responses.settling(model, windows, reference_steps=reference_steps)
