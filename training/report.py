"""The text of pc-analyze's report.md, from the numbers of report.json (training/analysis.py gathers them).

One function per section: `markdown` puts them together; the figures they link are training/figures.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import responses
from .fields import MEASURE_NAMES
from .gabor import GOOD_FIT, MIN_STRIPES, ORIENTATION_BINS


def _span_lines(span: dict[str, Any] | None) -> list[str]:
    """The span control's paragraph under the Gabor table; nothing when the report has none."""
    if span is None:
        return []
    return [
        f"Span control: the fields use {span['effective_dimension']:.1f} directions (effective dimension of "
        f"their span); random rotations of them (the same span, {span['draws']} draws) are "
        f"{span['rotated_share_median']:.0%} Gabor-like (median). A share well above the rotations' is the "
        "basis's own, learned; one the rotations keep comes with the span (the window, or a code collapsed "
        "onto a few smooth directions).",
        "",
    ]


def _dynamics_lines(dynamics: dict[str, Any] | None) -> list[str]:
    if dynamics is None:
        return []
    return [
        f"Inference in every measurement but the time courses: {dynamics['steps']} steps of "
        f"{dynamics['solver']} from {dynamics['init']} (the time courses: the paper's dynamics, plain gradient "
        "steps from zero).",
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    """report.md: sections D, E, F, the steady state and the receptive-field measures."""
    g, e, es = report["gabor"], report["held_out"], report["end_stopping"]
    lines = [
        f"# Analysis of {report['model']}",
        "",
        f"Model sha256 `{report['sha256'][:16]}`; made by `{report['provenance_command'] or 'unknown'}`.",
        "",
        *_dynamics_lines(report.get("dynamics")),
        "## D. Level-1 basis functions: 2-D Gabor fits",
        "",
        "| | trained | random weights |",
        "|---|---|---|",
        f"| Gabor-like fields (R² ≥ {GOOD_FIT} and n_x ≥ {MIN_STRIPES}) | {g['good_fits']}/{g['fields']} "
        f"({g['share_good']:.0%}) | {g['random_weights']['good_fits']}/{g['random_weights']['fields']} "
        f"({g['random_weights']['share_good']:.0%}) |",
        f"| blobs (R² ≥ {GOOD_FIT}, n_x < {MIN_STRIPES}) | {g['blobs']} | {g['random_weights']['blobs']} |",
        f"| median R² | {g['median_r2']:.3f} | {g['random_weights']['median_r2']:.3f} |",
        f"| orientation bins covered (of {ORIENTATION_BINS}) | {g['orientation_bins']} | "
        f"{g['random_weights']['orientation_bins']} |",
        "",
        *_span_lines(g.get("span_control")),
        "![Gabor fits](gabor_fits.png)",
        "",
        "| field | R² | n_x | Gabor-like | orientation (°) | frequency (cycles/px) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {i} | {f['r2']:.3f} | {f['n_x']:.2f} | {'yes' if f['oriented'] else 'no'} | "
            f"{f['orientation_deg']:.0f} | {f['frequency']:.3f} |"
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
    lines += end_stopping_markdown(es) + steady_state_markdown(report["steady_state"])
    lines += start_markdown(report.get("amortised_start"))
    lines += ["", *fields_markdown(report)]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    """A median index, or n/a where no cell was driven."""
    return "n/a" if value is None else f"{value:.3f}"


def end_stopping_markdown(es: dict[str, Any] | None) -> list[str]:
    """Section F of report.md."""
    if es is None:
        return ["Not applicable: the experiment needs the paper's geometry (three modules in a row and a level above)."]
    keys = es["contrasts"]
    lines = [
        f"Horizontal bars 2 px wide, {es['lengths'][0]} to {es['long_px']} px long, centred on the centre module. "
        f"Index = response to the {es['long_px']} px bar / peak response over bars up to {es['module_px']} px; "
        "response = the error unit |r − r_td| with feedback, |r| with level 2 removed. Cells: the centre module's "
        f"oriented horizontal causes ({', '.join(map(str, es['candidates'])) or 'none'}) that a bar without "
        f"feedback drives to at least {responses.DRIVEN:g} of the most driven one's response "
        f"(at {es['selection_steps']} steps), each at its own best bar row. End-stopped: index < "
        f"{responses.END_STOPPED:g} with feedback and ≥ {responses.NOT_END_STOPPED:g} without; the model passes "
        f"if at least {responses.PASS_SHARE:.0%} of the cells are end-stopped at contrast x1. Long run: the same "
        f"dynamics for {es['steady']['steps']} steps (report.json's `steady`), not necessarily the fixed point "
        "(an accelerated solver can stall short of it on these stimuli).",
        "",
        "| steps | cells | end-stopped share (x" + " / x".join(keys) + ") | median index with feedback | "
        "median without | headline cell | passes |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, summary in (("model's T", es["summary"]), ("long run", es["steady"])):
        lines.append(
            f"| {summary['steps']} ({label}) | {summary['cells']} | "
            + " / ".join(f"{summary['share_end_stopped'][k]:.2f}" for k in keys)
            + " | "
            + " / ".join(_fmt(summary["median_feedback"][k]) for k in keys)
            + " | "
            + " / ".join(_fmt(summary["median_without"][k]) for k in keys)
            + f" | {summary['headline_cell']} | **{'yes' if summary['passes'] else 'no'}** |"
        )
    lines += [
        "",
        "Every cell, index with feedback / without, at contrasts x" + ", x".join(keys) + ":",
        "",
        "| cause | R² | n_x | orientation (°) | bar row | at the model's T | long run |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in es["cells"]:
        cols = [
            ", ".join(f"{m['index_feedback'][k]:.2f} / {m['index_without'][k]:.2f}" for k in keys)
            for m in (cell["default"], cell["steady"])
        ]
        lines.append(
            f"| {cell['cause']} | {cell['r2']:.2f} | {cell['n_x']:.2f} | {cell['orientation_deg']:.0f} | "
            f"{cell['bar_row']:.1f} | {cols[0]} | {cols[1]} |"
        )
    if not es["cells"]:
        return lines
    lines += [
        "",
        "![End-stopping](end_stopping.png)",
        "",
        "The headline cell's r, its top-down prediction r_td and the error r − r_td against bar length "
        "(signed so that its preferred response is positive), and |r| without feedback:",
        "",
        "![Mechanism](end_stopping_mechanism.png)",
        "",
        "Its error response to a short and a long bar against time k1 × steps, under plain gradient steps from "
        f"r = 0 whatever the model is served with: at its per-level steps (k1_scale {es['time_course']['k1_scale']}) "
        f"and at one k1 for every level ({es['time_course']['single_k1_value']:g}: the smallest served step, stable "
        "by construction, not the largest stable one):",
        "",
        "![Time course](end_stopping_time.png)",
        "",
    ]
    sur = es["surround"]
    lines += [
        f"Surround (the paper's Fig. 6): a {sur['centre_px']} px horizontal bar on the centre module at the "
        f"headline cell's row, alone or with two {sur['flank_px']:g} px flanks {sur['flank_offset_px']:g} px to "
        "either side (in the neighbour modules' fields), iso-oriented (horizontal) or ortho-oriented "
        "(vertical). The paper reports that with feedback an iso-oriented surround suppresses the response "
        "more than an ortho-oriented one. Measured, response / centre alone:",
        "",
        "| steps | with feedback: iso | ortho | without feedback: iso | ortho |",
        "|---|---|---|---|---|",
        *(
            f"| {b['steps']} | {b['feedback_ratio']['iso']:.3f} | {b['feedback_ratio']['ortho']:.3f} | "
            f"{b['without_ratio']['iso']:.3f} | {b['without_ratio']['ortho']:.3f} |"
            for b in sur["by_steps"]
        ),
        "",
        "![Surround](surround.png)",
    ]
    return lines


def steady_state_markdown(ss: dict[str, Any] | None) -> list[str]:
    """How settled inference is at the model's T (report.json: steady_state)."""
    if ss is None:
        return ["", "## Steady state of inference", "", "Measured for the paper's network only."]
    levels = len(ss["median_relative_distance"])
    single = ss["single_k1"]

    def row(name: str, values: Sequence[float], gap: float | str) -> str:
        gap_text = gap if isinstance(gap, str) else f"{gap:.2e}"
        return f"| {name} | " + " | ".join(f"{v:.3g}" for v in values) + f" | {gap_text} |"

    return [
        "",
        "## Steady state of inference",
        "",
        f"{ss['windows']} held-out windows: per level, the median over windows of ‖r_l(T) − r_l(∞)‖ / ‖r_l(∞)‖ "
        f"at T = {ss['steps']}, r(∞) = the served model after {ss['reference_steps']} steps; energy gap = "
        "median (E(T) − E(∞)) / |E(∞)|.",
        "",
        "| | " + " | ".join(f"level {i + 1}" for i in range(levels)) + " | energy gap |",
        "|---|" + "---|" * (levels + 1),
        row(f"served steps (k1_scale {ss['k1_scale']})", ss["median_relative_distance"], ss["energy_relative_gap"]),
        row(
            f"the paper's dynamics, one k1 = {single['k1']:g} (gradient from r = 0)"
            + (" (the same model)" if single["same_as_served"] else ""),
            single["median_relative_distance"],
            single["energy_relative_gap"],
        ),
        row(f"check: {ss['reference_check']['steps']} steps", ss["reference_check"]["median_relative_distance"], ""),
    ]


def fields_markdown(report: dict[str, Any]) -> list[str]:
    """The report's lines for the level-2 fields, the autocorrelation and the PCA control."""
    lines = ["## Level-2 fields against random U2", ""]
    l2 = report.get("level2_fields")
    if l2 is None:
        lines.append("Not applicable: the measures need the paper's geometry (modules in a row, a dense level above).")
    else:
        lines += [
            f"Median over the {l2['used']} of {l2['fields']} fields (U1 U2 over the patch) whose columns hold "
            f"{l2['used_share']:.0%} of U2's squared norm (the other columns have decayed), "
            f"against {l2['draws']} random U2 whose columns keep the model's norms; p = (1 + #random ≥ model) / "
            "(1 + draws), p_below the same for ≤. Random fields spread evenly over the modules (noise sets the "
            "maximum spread); learned fields that span modules do so coherently (agreement).",
            "",
            "| measure | model | random mean ± std | p | p_below |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {MEASURE_NAMES.get(k, k)} | {v['value']:.3f} | {v['random_mean']:.3f} ± {v['random_std']:.3f} "
                f"| {v['p']:.3f} | {v['p_below']:.3f} |"
                for k, v in l2["measures"].items()
            ),
            "",
            "![level-2 measures](level2_measures.png)",
        ]
    a = report["autocorrelation"]

    def width(v: float | None) -> str:
        return "> lag 12" if v is None else f"{v:.2f} px"

    lines += [
        "",
        "## Autocorrelation of the filtered training photos (the paper's Fig. 4)",
        "",
        f"{a['used']} of {a['patches']} random {a['patch_px']}x{a['patch_px']} windows with a dominant orientation "
        f"(structure-tensor coherence ≥ {a['min_coherence']}); half-width (where the curve falls to 0.5): "
        f"along the orientation {width(a['half_width_along'])}, across {width(a['half_width_across'])}.",
        "",
        "| lag (px) | " + " | ".join(str(v) for v in a["lags"]) + " |",
        "|---|" + "---:|" * len(a["lags"]),
        "| along | " + " | ".join(f"{v:.2f}" for v in a["along"]) + " |",
        "| across | " + " | ".join(f"{v:.2f}" for v in a["across"]) + " |",
        "",
        "![autocorrelation](autocorrelation.png)",
        "",
        "## PCA control for the level-1 Gabor share",
        "",
    ]
    p = report["pca_control"]
    lines.append(
        f"The top {p['components']} principal components of windowed training patches, fitted the same way: "
        f"{p['good_fits']}/{p['fields']} Gabor-like ({p['share_good']:.0%}), {p['blobs']} blobs, median R² "
        f"{p['median_r2']:.3f}, {p['orientation_bins']} orientation bins."
    )
    span = p.get("span_control")
    if span is not None:
        lines.append(
            f"Random rotations of them (a full-rank code of the same patches that no prior picks a basis for, "
            f"{span['effective_dimension']:.1f} directions) are {span['rotated_share_median']:.0%} Gabor-like."
        )
    return lines


def start_markdown(report: dict[str, Any] | None) -> list[str]:
    """report.md's section on the amortised start (report.json: amortised_start)."""
    if report is None:
        return ["", "## The amortised start", "", "This model has no amortiser (fit one: pc-train --amortise)."]
    curves = report["curves"]
    z, a = curves["zero"], curves["amortised"]
    levels = len(z["latent_distance"][0])
    lines = [
        "",
        "## The amortised start",
        "",
        f"{report['windows']} held-out windows; fixed point: {report['reference_steps']} plain gradient steps "
        "from zero. Energy gap = median (E(t) − E*) / |E*|; latent distance = median ‖r_l(t) − r_l*‖ / ‖r_l*‖.",
        "",
        "| steps | gap from zero | gap amortised | "
        + " | ".join(f"level {i + 1} zero / amortised" for i in range(levels))
        + " |",
        "|---|---|---|" + "---|" * levels,
    ]
    for steps in z["energy_gap"]:
        cells = " | ".join(
            f"{dz:.3f} / {da:.3f}" for dz, da in zip(z["latent_distance"][steps], a["latent_distance"][steps])
        )
        lines.append(f"| {steps} | {z['energy_gap'][steps]:.3%} | {a['energy_gap'][steps]:.3%} | {cells} |")
    lines += [
        "",
        f"Steps to come within {curves['reach_target_gap']:.3%} of the fixed point (the zero start's gap at 100 "
        f"steps), median: zero {z['steps_to_reach']:g}, amortised {a['steps_to_reach']:g}.",
        "",
        f"Early stop at tol = {report['tol']:.4g} (the zero start's median gradient norm after 100 steps), median "
        "steps used:",
        "",
        "| inputs | zero | amortised |",
        "|---|---|---|",
        *(f"| {what} | {u['zero']:g} | {u['amortised']:g} |" for what, u in report["steps_used_tol"].items()),
        "",
        "With each set's own tol (its zero start's median gradient norm after 100 steps), median steps used:",
        "",
        "| inputs | tol | zero | amortised |",
        "|---|---|---|---|",
        *(
            f"| {what} | {u['tol']:.4g} | {u['zero']:g} | {u['amortised']:g} |"
            for what, u in report["steps_used_own_tol"].items()
        ),
    ]
    if report["learning_curve"]:
        lines += [
            "",
            "As the amortiser learned (held-out, median steps used at the fit's tol; gap after 10 steps):",
            "",
        ]
        lines += ["| update | steps used | gap after 10 |", "|---|---|---|"]
        lines += [f"| {c['step']} | {c['steps_used_tol']:g} | {c['gap_10']:.3%} |" for c in report["learning_curve"]]
    return lines
