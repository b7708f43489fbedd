"""pc-analyze: does a trained model reproduce Rao & Ballard (1999)? (docs/MODEL.md section 5 D, E, F.)

    pc-analyze rao-ballard-1999                  # a shipped model by name, or a checkpoint path
    pc-analyze runs/rao-ballard-1999/model.safetensors   # -> runs/rao-ballard-1999/analysis/
    pc-analyze runs/rao-ballard-1999/model.safetensors --out report/

Writes report.md (with PNG figures) and report.json:
- D: a 2-D Gabor fitted to every level-1 basis function, with R^2, orientation and frequency; the
  share with R^2 >= 0.7 and the orientation bins they cover; the same for random weights (control).
- E: relative reconstruction error on held-out photos (scikit-learn's china.jpg and flower.jpg)
  against the zero code (1.0).
- F: end-stopping: every oriented horizontal cell of the centre module that bars drive, its level-1
  error response to bars of every length with the level-2 feedback and without it (the same U_1 with
  level 2 removed), at three contrasts, at the model's steps and at steady state; the headline cell's
  mechanism, time course and surround responses (training.responses).
- Steady state: how far each level is, after the model's steps, from its state after many more.
- Level-2 fields against random U_2, the photos' autocorrelation (the paper's Fig. 4) and the PCA
  control for D (training/fields.py).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pcmodel
from pcmodel import PCModel
from pcmodel.cliargs import ArgumentParser, fail, model_source, output_folder, positive_int

from . import data, figures, responses
from . import fields as field_measures
from .gabor import GaborFit, fit_gabor, gabor_summary, level1_fields
from .metrics import error_sums
from .report import markdown

log = logging.getLogger(__name__)

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


# ---- the report -------------------------------------------------------------------------------


def analyze(
    model: PCModel,
    out: Path,
    steps: int | None = None,
    seed: int = 0,
    end_stopping_steps: int | None = None,
    random_draws: int = field_measures.RANDOM_DRAWS,
    reference_steps: int = responses.REFERENCE_STEPS,
) -> dict[str, Any]:
    """Run every check, write out/report.md, out/report.json and the figures; returns the numbers."""
    out.mkdir(parents=True, exist_ok=True)
    fields = level1_fields(model)
    fits = [fit_gabor(f) for f in fields]
    random_model = pcmodel.create(model.config, seed=seed + 1, allow_unstable=True)
    random_fits = [fit_gabor(f) for f in level1_fields(random_model)]
    report: dict[str, Any] = {
        "model": model.name,
        "sha256": model.sha256,
        "provenance_command": model.provenance.get("command", ""),
        "gabor": {
            **gabor_summary(fits),
            "random_weights": gabor_summary(random_fits),
            "span_control": field_measures.span_control(np.stack(fields), seed=seed),
            "fits": [
                {
                    "r2": f.r2,
                    "n_x": f.n_x,
                    "oriented": f.oriented,
                    "orientation_deg": f.orientation,
                    "frequency": f.frequency,
                    "bin": f.orientation_bin,
                }
                for f in fits
            ],
        },
        "held_out": held_out_reconstruction(model, steps=steps),
        "end_stopping": end_stopping(model, fits, steady_steps=end_stopping_steps),
        "steady_state": steady_state(model, seed=seed, reference_steps=reference_steps),
    }
    report.update(field_sections(model, out, seed=seed, draws=random_draws))
    figures.save(figures.gabor_figure(fields, fits, model.name), out / "gabor_fits.png")
    if report["end_stopping"] is not None:
        figures.save_end_stopping(report["end_stopping"], model.name, out)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    return report


def field_sections(
    model: PCModel, out: Path, seed: int = 0, draws: int = field_measures.RANDOM_DRAWS
) -> dict[str, Any]:
    """report["level2_fields"], ["autocorrelation"], ["pca_control"]; writes their figures into out."""
    acf = field_measures.autocorrelation(field_measures.training_images(model.config), seed=seed)
    figures.save(figures.autocorrelation_figure(acf, model.name), out / "autocorrelation.png")
    level2 = field_measures.level2_report(model, draws=draws, seed=seed)
    if level2 is not None:
        figures.save(figures.level2_measures_figure(level2, model.name), out / "level2_measures.png")
    return {
        "level2_fields": level2,
        "autocorrelation": acf,
        "pca_control": field_measures.pca_control(model.config, seed=seed),
    }


def default_out(checkpoint: str, name: str) -> Path:
    """Where the report goes without --out: beside the checkpoint, so each run keeps its own.

    A run's model.safetensors -> <its folder>/analysis/; another checkpoint file (a snapshot in
    checkpoints/) -> <its folder>/analysis-<its name>/; a model's name (a shipped checkpoint inside the
    package) -> analysis/<the model's name>/ in the current folder.
    """
    path = Path(checkpoint)
    if not path.is_file():
        return Path("analysis") / name
    return path.parent / ("analysis" if path.name == "model.safetensors" else f"analysis-{path.stem}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="pc-analyze", description=__doc__.split("\n")[0])
    parser.add_argument(
        "checkpoint", type=model_source, help="checkpoint path or model name (rao-ballard-1999, conv-rgb, default)"
    )
    parser.add_argument(
        "--out",
        type=output_folder,
        help="report folder (default: beside the checkpoint: <its folder>/analysis/ for a run's model.safetensors, "
        "<its folder>/analysis-<name>/ for another checkpoint file; analysis/<name>/ for a model name)",
    )
    parser.add_argument(
        "--steps", type=positive_int, help="inference steps for the reconstruction (default: the model's)"
    )
    parser.add_argument(
        "--end-stopping-steps",
        type=positive_int,
        help="inference steps for end-stopping's steady state; it is also measured at the model's steps "
        f"(default: max({END_STOPPING_STEPS}, the model's))",
    )
    parser.add_argument(
        "--reference-steps",
        type=positive_int,
        default=responses.REFERENCE_STEPS,
        help="inference steps taken as the steady state r(infinity) of every level (default: %(default)s)",
    )
    parser.add_argument(
        "--random-draws",
        type=positive_int,
        default=field_measures.RANDOM_DRAWS,
        help="random U2 the level-2 measures are compared with (default: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch intra-op CPU threads (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    try:
        model = pcmodel.load(args.checkpoint)
    except (pcmodel.CheckpointError, pcmodel.UnstableStepError) as exc:
        return fail("pc-analyze", str(exc))
    out = args.out or default_out(args.checkpoint, model.name)
    report = analyze(
        model,
        out,
        steps=args.steps,
        end_stopping_steps=args.end_stopping_steps,
        reference_steps=args.reference_steps,
        random_draws=args.random_draws,
    )
    g, e = report["gabor"], report["held_out"]
    summary = {
        "gabor_share": round(g["share_good"], 3),
        "orientation_bins": g["orientation_bins"],
        "held_out_relative_error": round(e["relative_error"], 4),
        "report": str(out / "report.md"),
    }
    if report["end_stopping"] is not None:
        summary["end_stopping"] = report["end_stopping"]["summary"]
        summary["end_stopping_steady"] = report["end_stopping"]["steady"]
    if report["steady_state"] is not None:
        distances = report["steady_state"]["median_relative_distance"]
        summary["steady_state_median_relative_distance"] = [round(v, 4) for v in distances]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
