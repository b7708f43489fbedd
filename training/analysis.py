"""pc-analyze: does a trained model reproduce Rao & Ballard (1999)? (docs/MODEL.md section 5 D, E, F.)

    pc-analyze rao-ballard-1999                  # a shipped model by name, or a checkpoint path
    pc-analyze runs/rao-ballard-1999/model.safetensors   # -> runs/rao-ballard-1999/analysis/
    pc-analyze runs/rao-ballard-1999/model.safetensors --out report/

Writes report.md (with PNG figures) and report.json:
- D: a 2-D Gabor fitted to every level-1 basis function, with R^2, orientation and frequency; the
  share with R^2 >= 0.7 and the orientation bins they cover; the same for random weights (control).
- E: relative reconstruction error on held-out photos (scikit-learn's china.jpg and flower.jpg)
  against the zero code (1.0).
- F: end-stopping: the centre module's level-1 error response to short and long bars, with the
  level-2 feedback and without it (the same U_1 with level 2 removed).
- Level-2 fields against random U_2, the photos' autocorrelation (the paper's Fig. 4) and the PCA
  control for D (training/fields.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.optimize import least_squares

import pcmodel
from pcmodel import ModelConfig, PCModel
from pcmodel.cliargs import ArgumentParser, fail, model_source, output_folder, positive_int
from pcmodel.images import filter_images

from . import data
from . import fields as field_measures
from .metrics import error_sums

log = logging.getLogger(__name__)

GOOD_FIT = 0.7  # R^2 at or above which a fit is good (docs/MODEL.md section 5 D)
MIN_STRIPES = 0.1  # n_x = f sigma_x at or above which a good fit has stripes inside its envelope (blobs: ~0.02)
ORIENTATION_BINS = 8
END_STOPPING_STEPS = 1000  # steady state for 5 F: level 2 (sigma2 = 10) relaxes with a time constant of ~130 steps


# ---- D: Gabor fits ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GaborFit:
    """A 2-D Gabor fitted to one field by least squares (pixel units, origin at the top-left pixel).

    g(x, y) = amplitude * exp(-(u^2 / 2 sigma_u^2 + v^2 / 2 sigma_v^2)) * cos(2 pi frequency u + phase) + offset,
    u along the carrier (the direction `carrier` from the x axis), v across it.
    """

    r2: float
    amplitude: float
    x0: float
    y0: float
    carrier: float  # radians, direction of the wave vector
    sigma_u: float
    sigma_v: float
    frequency: float  # cycles per pixel
    phase: float
    offset: float

    @property
    def n_x(self) -> float:
        """Stripes inside the envelope: carrier frequency (cycles/px) x envelope width across the stripes (px)."""
        return self.frequency * self.sigma_u

    @property
    def oriented(self) -> bool:
        """Gabor-like: a good fit (R^2 >= 0.7) AND stripes (n_x >= 0.1); a good fit without stripes is a blob."""
        return self.r2 >= GOOD_FIT and self.n_x >= MIN_STRIPES

    @property
    def orientation(self) -> float:
        """Orientation of the stripes (the preferred bar) in degrees in [0, 180), 0 = horizontal."""
        return float(np.degrees(self.carrier + np.pi / 2) % 180.0)

    @property
    def orientation_bin(self) -> int:
        """Bin of width 180/8 degrees, centred on 0, 22.5, 45, ... degrees."""
        width = 180.0 / ORIENTATION_BINS
        return int(((self.orientation + width / 2) % 180.0) // width)


def gabor(params: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    amplitude, x0, y0, carrier, sigma_u, sigma_v, frequency, phase, offset = params
    dx, dy = xx - x0, yy - y0
    u = dx * math.cos(carrier) + dy * math.sin(carrier)
    v = -dx * math.sin(carrier) + dy * math.cos(carrier)
    envelope = np.exp(-(u**2 / (2 * sigma_u**2) + v**2 / (2 * sigma_v**2)))
    return amplitude * envelope * np.cos(2 * np.pi * frequency * u + phase) + offset


def fit_gabor(field: np.ndarray) -> GaborFit:
    """Best of several least-squares fits, started at the field's energy peak and spectral peak."""
    field = np.asarray(field, dtype=np.float64)
    h, w = field.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    total = float(((field - field.mean()) ** 2).sum())
    if total <= 0:
        return GaborFit(0.0, 0.0, w / 2, h / 2, 0.0, 1.0, 1.0, 0.0, 0.0, float(field.mean()))
    energy = gaussian_filter(field**2, 1.5)
    y0, x0 = (float(v) for v in np.unravel_index(np.argmax(energy), energy.shape))
    pad = 64
    spectrum = np.abs(np.fft.fft2(field - field.mean(), s=(pad, pad)))
    spectrum[0, 0] = 0
    ky, kx = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    fy, fx = np.fft.fftfreq(pad)[ky], np.fft.fftfreq(pad)[kx]
    frequency = min(max(math.hypot(fx, fy), 0.02), 0.49)
    carrier = math.atan2(fy, fx)
    amplitude = float(np.abs(field).max())
    side = float(max(h, w))
    lower = [-np.inf, -2.0, -2.0, -np.inf, 0.5, 0.5, 0.0, -np.inf, -np.inf]
    upper = [np.inf, w + 1.0, h + 1.0, np.inf, side, side, 0.5, np.inf, np.inf]
    best_r2, best = -np.inf, None
    for phase in (0.0, np.pi / 2, np.pi, -np.pi / 2):
        for sigma in (2.0, 4.0):
            start = [amplitude, x0, y0, carrier, sigma, sigma, frequency, phase, 0.0]
            result = least_squares(
                lambda p: (gabor(p, yy, xx) - field).ravel(), start, bounds=(lower, upper), max_nfev=400
            )
            r2 = 1.0 - float((result.fun**2).sum()) / total
            if r2 > best_r2:
                best_r2, best = r2, result.x
    assert best is not None
    a, x0, y0, carrier, su, sv, f, phase, offset = (float(v) for v in best)
    return GaborFit(best_r2, a, x0, y0, carrier, su, sv, f, phase, offset)


def level1_fields(model: PCModel) -> np.ndarray:
    """Level-1 basis functions as 2-D images (N, h, w); colour fields are averaged over channels."""
    return model.receptive_fields(1).detach().cpu().double().mean(dim=1).numpy()


def gabor_summary(fits: list[GaborFit]) -> dict[str, Any]:
    """Gabor-like share (R^2 >= 0.7 and n_x >= 0.1), the blobs (good fits without stripes) and the bins covered."""
    r2 = np.array([f.r2 for f in fits])
    good = [f for f in fits if f.oriented]
    blobs = [f for f in fits if f.r2 >= GOOD_FIT and not f.oriented]
    bins = sorted({f.orientation_bin for f in good})
    return {
        "fields": len(fits),
        "good_fits": len(good),
        "share_good": len(good) / max(len(fits), 1),
        "blobs": len(blobs),
        "median_r2": float(np.median(r2)) if len(r2) else 0.0,
        "median_n_x": float(np.median([f.n_x for f in good])) if good else 0.0,
        "orientation_bins": len(bins),
        "bins": bins,
    }


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


# ---- F: end-stopping --------------------------------------------------------------------------


def _without_feedback(model: PCModel) -> PCModel:
    """The same level 1 with every level above removed (sigma_td^2 -> infinity: no top-down prediction)."""
    config = model.config.replace(levels=model.config.levels[:1])
    return PCModel(config, model.weights[:1], allow_unstable=True)


@functools.lru_cache(maxsize=8)
def _reference_scale(config: ModelConfig) -> float:
    """Mean std of the training photos after the filter, before normalisation: gives bars a natural contrast."""
    pre = dataclasses.replace(config.preprocess, normalize="none", gain=1.0)
    images = data.prepare(data.default_photos(), config.replace(preprocess=pre))
    return float(np.mean([float(image.std()) for image in images]))


def bar_stimuli(model: PCModel, lengths: list[int], rows: list[float], width: float = 2.0) -> torch.Tensor:
    """Horizontal bright bars centred on the patch, as the model sees them: (len(rows)*len(lengths), 1, H, W).

    Each bar is drawn on a mid-grey canvas larger than the patch, passed through the model's own
    filter without per-image normalisation (which would change the contrast with the bar's
    length), scaled like a training photo, and cut to the native patch.
    """
    _, h, w = model.config.input_shape
    margin = 16
    lo, hi = model.config.preprocess.value_range
    yy, xx = np.mgrid[0 : h + 2 * margin, 0 : w + 2 * margin].astype(np.float64)
    centre_x = margin + (w - 1) / 2
    canvases = []
    for row in rows:
        for length in lengths:
            inside_x = np.clip(length / 2 + 0.5 - np.abs(xx - centre_x), 0, 1)  # antialiased ends
            inside_y = np.clip(width / 2 + 0.5 - np.abs(yy - (margin + row)), 0, 1)
            canvases.append(lo + (hi - lo) * (0.5 + 0.5 * inside_x * inside_y))
    raw = torch.tensor(np.stack(canvases), dtype=torch.float32).unsqueeze(1)
    pre = dataclasses.replace(model.config.preprocess, normalize="none")
    filtered = filter_images(raw, pre) / _reference_scale(model.config)
    return filtered[:, :, margin : margin + h, margin : margin + w]


def _horizontal(fit: GaborFit) -> bool:
    """A Gabor-like field whose preferred bar is horizontal (orientation bin 0): a cell for 5 F."""
    return fit.r2 >= GOOD_FIT and fit.orientation_bin == 0


def end_stopping(
    model: PCModel, steps: int | None = None, candidates: Sequence[int] | None = None
) -> dict[str, Any] | None:
    """docs/MODEL.md 5 F on the paper's geometry: three modules in a row, a level above them.

    The chosen cell is the centre module's level-1 cause, among `candidates` (the horizontal Gabor-like
    fields, so the bar is at the cell's preferred orientation; None: every cause), that responds most to
    a short horizontal bar (half a module: 8 px in the paper) without feedback, at the bar row that
    drives it most. Its error response is |r - r_td| with feedback and |r| without (r_td = 0). The
    population response is the norm over the centre module's 32 error units. Ratio = response to the
    long bar (26 px: all three modules) / short bar, and / the peak over bars no longer than a module.
    Responses are steady-state ones: by default max(END_STOPPING_STEPS, the model's steps) steps, since
    level 2 (sigma2 = 10) settles far more slowly than level 1 and is not settled at the model's T.
    """
    config = model.config
    if model.num_levels < 2 or config.levels[0].kind != "modules" or model.latent_shapes()[0][1:] != (1, 3):
        return None
    steps = max(END_STOPPING_STEPS, config.steps) if steps is None else steps
    _, h, w = config.input_shape
    module = config.levels[0].kernel[1]  # a module's width: 16 px in the paper
    lengths = list(range(2, w + 1, 2))
    short = module // 2 if (module // 2) % 2 == 0 else module // 2 + 1
    rows = [h / 2 - 0.5 + d for d in (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)]
    stimuli = bar_stimuli(model, lengths, rows).to(model.device)
    centre = 1  # module index: offsets 0, 5, 10

    plain = _without_feedback(model).infer(stimuli, steps=steps)
    r_plain = plain.latents[0][:, :, 0, centre].reshape(len(rows), len(lengths), -1)  # (rows, lengths, causes)
    full = model.infer(stimuli, steps=steps)
    r_full = full.latents[0][:, :, 0, centre].reshape(len(rows), len(lengths), -1)
    e_full = full.errors[1][:, 0, :, 0, centre].reshape(len(rows), len(lengths), -1)  # r1 - r_td, centre module

    s = lengths.index(short)
    drive = r_plain[:, s, :].abs()  # (rows, causes)
    if candidates:  # only cells whose preferred orientation is the bar's
        allowed = torch.zeros(drive.shape[1], dtype=torch.bool, device=drive.device)
        allowed[list(candidates)] = True
        drive = drive.masked_fill(~allowed, -1.0)
    row, cell = (int(v) for v in np.unravel_index(int(drive.argmax()), tuple(drive.shape)))

    def curve(t: torch.Tensor) -> list[float]:
        return [float(v) for v in t]

    cell_with = e_full[row, :, cell].abs()
    cell_without = r_plain[row, :, cell].abs()
    pop_with = e_full[row].norm(dim=-1)
    pop_without = r_plain[row].norm(dim=-1)
    long_index = len(lengths) - 1

    def ratios(values: torch.Tensor) -> dict[str, float]:
        inside = values[: sum(1 for n in lengths if n <= module)]
        return {
            "long_over_short": float(values[long_index] / values[s].clamp_min(1e-12)),
            "long_over_peak": float(values[long_index] / inside.max().clamp_min(1e-12)),
        }

    return {
        "short_px": short,
        "long_px": w,
        "module_px": module,
        "steps": steps,
        "bar_row": rows[row],
        "cell": cell,
        "cell_is_horizontal_gabor": bool(candidates),
        "lengths": lengths,
        "cell_error_with_feedback": curve(cell_with),
        "cell_error_without_feedback": curve(cell_without),
        "cell_response_with_feedback": curve(r_full[row, :, cell].abs()),
        "population_error_with_feedback": curve(pop_with),
        "population_error_without_feedback": curve(pop_without),
        "ratios": {
            "cell_with_feedback": ratios(cell_with),
            "cell_without_feedback": ratios(cell_without),
            "population_with_feedback": ratios(pop_with),
            "population_without_feedback": ratios(pop_without),
        },
        "reproduced": bool(
            ratios(cell_with)["long_over_short"] < 0.8 and ratios(cell_without)["long_over_short"] >= 0.8
        ),
    }


# ---- the report -------------------------------------------------------------------------------


def analyze(
    model: PCModel,
    out: Path,
    steps: int | None = None,
    seed: int = 0,
    end_stopping_steps: int | None = None,
    random_draws: int = field_measures.RANDOM_DRAWS,
) -> dict[str, Any]:
    """Run every check, write out/report.md, out/report.json and the figures; returns the numbers."""
    from . import figures

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
            "fits": [
                {"r2": f.r2, "orientation_deg": f.orientation, "frequency": f.frequency, "bin": f.orientation_bin}
                for f in fits
            ],
        },
        "held_out": held_out_reconstruction(model, steps=steps),
        "end_stopping": end_stopping(
            model, end_stopping_steps, candidates=[i for i, f in enumerate(fits) if _horizontal(f)]
        ),
    }
    report.update(field_measures.report_sections(model, out, seed=seed, draws=random_draws))
    figures.save(figures.gabor_figure(fields, fits, model.name), out / "gabor_fits.png")
    if report["end_stopping"] is not None:
        figures.save(figures.end_stopping_figure(report["end_stopping"], model.name), out / "end_stopping.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    g, e, es = report["gabor"], report["held_out"], report["end_stopping"]
    lines = [
        f"# Analysis of {report['model']}",
        "",
        f"Model sha256 `{report['sha256'][:16]}`; made by `{report['provenance_command'] or 'unknown'}`.",
        "",
        "## D. Level-1 basis functions: 2-D Gabor fits",
        "",
        "| | trained | random weights |",
        "|---|---|---|",
        f"| fields with R² ≥ {GOOD_FIT} | {g['good_fits']}/{g['fields']} ({g['share_good']:.0%}) | "
        f"{g['random_weights']['good_fits']}/{g['random_weights']['fields']} "
        f"({g['random_weights']['share_good']:.0%}) |",
        f"| median R² | {g['median_r2']:.3f} | {g['random_weights']['median_r2']:.3f} |",
        f"| orientation bins covered (of {ORIENTATION_BINS}) | {g['orientation_bins']} | "
        f"{g['random_weights']['orientation_bins']} |",
        "",
        "![Gabor fits](gabor_fits.png)",
        "",
        "| field | R² | orientation (°) | frequency (cycles/px) |",
        "|---|---|---|---|",
        *(
            f"| {i} | {f['r2']:.3f} | {f['orientation_deg']:.0f} | {f['frequency']:.3f} |"
            for i, f in enumerate(g["fits"])
        ),
        "",
        "## E. Reconstruction of held-out photos",
        "",
        f"{e['windows']} windows of {'x'.join(map(str, e['size']))} from {', '.join(e['photos'])} "
        "(scikit-learn's sample photos, CC BY 2.0, never trained on), prepared by the model's own "
        f"preprocessing, {e['steps']} inference steps.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| relative error at level 1 (what the model minimises) | {e['relative_error']:.4f} |",
        f"| relative error on the image grid, ‖x − reconstruction‖²/‖x‖² | {e['image_relative_error']:.4f} |",
        f"| mean absolute error per value | {e['mean_absolute_error']:.4f} |",
        "| zero code | 1.0 |",
        "",
        "## F. End-stopping",
        "",
    ]
    if es is None:
        lines.append(
            "Not applicable: the experiment needs the paper's geometry (three modules in a row and a level above)."
        )
    else:
        r = es["ratios"]
        lines += [
            f"Horizontal bars centred on the centre module, row {es['bar_row']:.1f}; cell {es['cell']} "
            f"(the centre module's {'horizontal Gabor-like ' if es['cell_is_horizontal_gabor'] else ''}cause most "
            f"driven by the {es['short_px']} px bar without feedback), steady state after {es['steps']} steps. "
            f"Ratio = error response to the {es['long_px']} px bar / to the {es['short_px']} px bar "
            f"(and / the peak over lengths up to a module's {es['module_px']} px).",
            "",
            "| response | long/short | long/peak |",
            "|---|---|---|",
            *(
                f"| {name.replace('_', ' ')} | {v['long_over_short']:.3f} | {v['long_over_peak']:.3f} |"
                for name, v in r.items()
            ),
            "",
            f"Reproduced (cell ratio < 0.8 with feedback, ≥ 0.8 without): **{'yes' if es['reproduced'] else 'no'}**.",
            "",
            "![End-stopping](end_stopping.png)",
        ]
    lines += ["", *field_measures.markdown(report)]
    return "\n".join(lines) + "\n"


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
        help=f"inference steps for end-stopping, a steady state (default: max({END_STOPPING_STEPS}, the model's))",
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
        model, out, steps=args.steps, end_stopping_steps=args.end_stopping_steps, random_draws=args.random_draws
    )
    g, e = report["gabor"], report["held_out"]
    summary = {
        "gabor_share": round(g["share_good"], 3),
        "orientation_bins": g["orientation_bins"],
        "held_out_relative_error": round(e["relative_error"], 4),
        "report": str(out / "report.md"),
    }
    if report["end_stopping"] is not None:
        summary["end_stopping_cell_ratio_with_feedback"] = round(
            report["end_stopping"]["ratios"]["cell_with_feedback"]["long_over_short"], 3
        )
        summary["end_stopping_cell_ratio_without_feedback"] = round(
            report["end_stopping"]["ratios"]["cell_without_feedback"]["long_over_short"], 3
        )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
