"""Receptive-field measures and their controls, for the paper's geometry (docs/TRAINING.md, Analysis).

- Level-2 fields: each level-2 cause the code uses (`used_causes`: the columns holding 90% of U_2's
  squared norm; the rest are decayed) projected to image space (U_1 U_2 over the 16x26 patch), scored
  for how far it spreads over the three modules, how elongated its energy is, how oriented its
  spectrum is and how well neighbouring modules' parts agree where they overlap; each against 100
  random U_2 whose every column keeps the model's norm (`level2_report`).
- Fig. 4 of the paper: the autocorrelation of the filtered training photos along and across the
  dominant local orientation (`autocorrelation`).
- The PCA control for the level-1 Gabor share: the top principal components of the windowed
  training patches, fitted like the model's fields (`pca_fields`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from pcmodel import ModelConfig, PCModel
from pcmodel.levels import gaussian_window

from . import data
from .gabor import fit_gabor, gabor_summary

RANDOM_DRAWS = 100  # random U_2 per comparison: p-values down to 1/101
USED_SHARE = 0.9  # the level-2 causes holding this share of U_2's squared norm are the "used" ones
MAX_LAG = 12  # px, the autocorrelation curves (the paper's Fig. 4 spans about a module)
MIN_COHERENCE = 0.3  # structure-tensor coherence a patch needs to have a dominant orientation


# ---- level 2 -------------------------------------------------------------------------------------


def module_parts(model: PCModel, u2: torch.Tensor | None = None) -> np.ndarray | None:
    """Each level-2 cause's prediction through each level-1 module, placed on the input grid.

    Returns (causes, modules, H, W) float64: part m of cause c is U_1 (U_2 e_c)_m, module m's windowed
    patch prediction at the module's place; their sum over m is model.receptive_fields(2). `u2`
    replaces the model's U_2 (same shape). None unless level 1 is modules in one row and level 2 is
    dense (the paper's geometry).
    """
    config = model.config
    if model.num_levels < 2 or config.levels[0].kind != "modules" or config.levels[1].kind != "dense":
        return None
    causes1, rows, modules = model.latent_shapes()[0]
    if rows != 1:
        return None
    u1 = model.weights[0].detach().cpu().double()  # (C1, Cin, kh, kw)
    u2 = (model.weights[1] if u2 is None else u2).detach().cpu().double()  # (C2, C1, 1, M)
    _, height, width = config.input_shape
    kh, kw = config.levels[0].kernel
    step = config.levels[0].stride[1]
    patches = torch.einsum("cdm,dp->cmp", u2[:, :, 0, :], u1.mean(dim=1).reshape(causes1, -1))  # (C2, M, kh*kw)
    parts = np.zeros((u2.shape[0], modules, height, width))
    for m in range(modules):
        parts[:, m, :kh, m * step : m * step + kw] = patches[:, m].reshape(-1, kh, kw).numpy()
    return parts


def module_spread(parts: np.ndarray) -> dict[str, np.ndarray]:
    """Per field, from its module energies E_m = ||part_m||^2 (parts: (N, M, H, W)).

    outside_share: 1 - max_m E_m / sum_m E_m (0: one module; (M-1)/M: all equal).
    participation: (sum E_m)^2 / sum E_m^2, the effective number of modules (1 to M).
    """
    energy = np.square(parts).sum(axis=(2, 3))  # (N, M)
    total = energy.sum(axis=1).clip(1e-300)
    return {
        "outside_share": 1.0 - energy.max(axis=1) / total,
        "participation": total**2 / np.square(energy).sum(axis=1).clip(1e-300),
    }


def elongation(fields: np.ndarray) -> np.ndarray:
    """1 - lambda_min / lambda_max of the second moments of each field's energy f^2 over the pixels.

    fields: (N, H, W). 0 for an isotropic blob, towards 1 for a line. Spreading along the row of
    modules raises it too; the random-U_2 comparison carries the same geometry.
    """
    n, h, w = fields.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    energy = np.square(fields).reshape(n, -1)
    mass = energy.sum(axis=1, keepdims=True).clip(1e-300)
    coords = np.stack([yy.ravel(), xx.ravel()])  # (2, P)
    mean = energy @ coords.T / mass  # (N, 2)
    second = np.einsum("np,ip,jp->nij", energy, coords, coords) / mass[:, :, None]
    cov = second - mean[:, :, None] * mean[:, None, :]
    eig = np.linalg.eigvalsh(cov)  # ascending
    return 1.0 - eig[:, 0] / eig[:, 1].clip(1e-300)


def orientation_index(fields: np.ndarray, pad: int = 64) -> np.ndarray:
    """1 - lambda_min / lambda_max of the second moments of each field's power spectrum over k.

    Stripes of one orientation put their power on one line through k = 0 (index near 1); a blob, or a
    sum of stripes of every orientation, spreads it over all directions (near 0).
    """
    f = fields - fields.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(f, s=(pad, pad))) ** 2  # (N, pad, pad)
    k = np.fft.fftfreq(pad)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    mass = power.sum(axis=(1, 2)).clip(1e-300)
    m_yy = (power * ky**2).sum(axis=(1, 2)) / mass
    m_xx = (power * kx**2).sum(axis=(1, 2)) / mass
    m_xy = (power * kx * ky).sum(axis=(1, 2)) / mass
    cov = np.stack([np.stack([m_yy, m_xy], -1), np.stack([m_xy, m_xx], -1)], -2)
    eig = np.linalg.eigvalsh(cov)
    return 1.0 - eig[:, 0] / eig[:, 1].clip(1e-300)


def overlap_agreement(parts: np.ndarray) -> np.ndarray:
    """Mean over neighbouring modules of the cosine between their parts on the pixels both cover.

    Neighbouring modules overlap (by 11 of 16 px in the paper), so a field that continues a structure
    from one module into the next (a long bar) has parts that agree there (cosine near 1); unrelated
    parts give about 0. A module covers the pixels where any field's part is non-zero.
    """
    covered = np.abs(parts).sum(axis=0) > 0  # (M, H, W)
    cosines = []
    for m in range(parts.shape[1] - 1):
        both = covered[m] & covered[m + 1]
        a, b = parts[:, m, both], parts[:, m + 1, both]  # (N, overlap pixels)
        cosines.append((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)).clip(1e-300))
    return np.mean(cosines, axis=0)


# Every measure level2_measures returns, with its name in the report.
MEASURE_NAMES = {
    "outside_share": "energy outside the strongest module",
    "participation": "participation ratio over modules",
    "elongation": "elongation (energy second moments)",
    "orientation": "orientation (power-spectrum second moments)",
    "overlap_agreement": "agreement of neighbouring modules' parts",
}


def level2_measures(parts: np.ndarray) -> dict[str, np.ndarray]:
    """Every level-2 measure per field, from the module parts (N, M, H, W)."""
    fields = parts.sum(axis=1)
    return {
        **module_spread(parts),
        "elongation": elongation(fields),
        "orientation": orientation_index(fields),
        "overlap_agreement": overlap_agreement(parts),
    }


def random_like(u2: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian entries of U_2's shape, each cause's column rescaled to its norm in U_2 (so the Frobenius
    norm and the weight each cause carries are U_2's: only the directions are random)."""
    r = torch.randn(u2.shape, generator=generator, dtype=torch.float64)
    norms = u2.detach().cpu().double().flatten(1).norm(dim=1)
    return r * (norms / r.flatten(1).norm(dim=1)).reshape(-1, *[1] * (r.dim() - 1))


def used_causes(u2: torch.Tensor, share: float = USED_SHARE) -> np.ndarray:
    """The level-2 causes whose columns hold `share` of U_2's squared norm, largest first.

    Weight decay leaves most of the 128 columns near zero: causes the code does not use, whose fields are
    leftovers of the random start. The measures are taken over the rest. Chosen by norm alone, not by
    the columns' directions, so a random U_2 with the same column norms selects the same causes and the
    comparison stays unbiased.
    """
    energy = u2.detach().cpu().double().flatten(1).square().sum(dim=1).numpy()
    order = np.argsort(-energy, kind="stable")
    cumulative = np.cumsum(energy[order]) / max(float(energy.sum()), 1e-300)
    return order[: int(np.searchsorted(cumulative, share)) + 1]


def level2_report(model: PCModel, draws: int = RANDOM_DRAWS, seed: int = 0) -> dict[str, Any] | None:
    """Each measure's median over the used level-2 fields, against `draws` random U_2 (same column norms).

    p = (1 + #random medians >= the model's) / (1 + draws): small when the model's fields score higher
    than chance; p_below the same for lower. None off the paper's geometry.
    """
    parts = module_parts(model)
    if parts is None:
        return None
    used = used_causes(model.weights[1])
    model_values = {k: float(np.median(v[used])) for k, v in level2_measures(parts).items()}
    generator = torch.Generator().manual_seed(seed)
    random_values: dict[str, list[float]] = {k: [] for k in model_values}
    for _ in range(draws):
        rand = level2_measures(module_parts(model, random_like(model.weights[1], generator))[used])
        for k, v in rand.items():
            random_values[k].append(float(np.median(v)))
    measures = {}
    for k, value in model_values.items():
        r = np.array(random_values[k])
        measures[k] = {
            "value": value,
            "random_mean": float(r.mean()),
            "random_std": float(r.std()),
            "p": (1 + int((r >= value).sum())) / (1 + draws),
            "p_below": (1 + int((r <= value).sum())) / (1 + draws),
            "random_medians": [float(v) for v in r],
        }
    return {
        "fields": int(parts.shape[0]),
        "used": int(used.size),
        "used_share": USED_SHARE,
        "modules": int(parts.shape[1]),
        "draws": draws,
        "measures": measures,
    }


# ---- Fig. 4: autocorrelation along and across the local orientation ----------------------------------


def dominant_orientation(patch: np.ndarray, sigma: float = 1.0) -> tuple[float, float]:
    """(angle of the stripes in radians from the x axis, coherence in [0, 1]) from the structure tensor.

    The tensor sum w (grad I)(grad I)^T, weighted by a Gaussian on the patch centre; its leading
    eigenvector is the gradient direction (across), the stripes run perpendicular to it.
    """
    gy, gx = np.gradient(gaussian_filter(patch, sigma))
    h, w = patch.shape
    weight = np.asarray(gaussian_window((h, w), max(h, w) / 4))
    jxx, jyy, jxy = (weight * gx * gx).sum(), (weight * gy * gy).sum(), (weight * gx * gy).sum()
    across = 0.5 * np.arctan2(2 * jxy, jxx - jyy)
    root = np.hypot(jxx - jyy, 2 * jxy)
    coherence = float(root / max(jxx + jyy, 1e-300))
    return float(across + np.pi / 2), coherence


def patch_autocorrelation(patch: np.ndarray) -> np.ndarray:
    """Linear (zero-padded) autocorrelation of a mean-removed patch, divided by the overlap count,
    with lag 0 at the centre of a (2h-1, 2w-1) array."""
    h, w = patch.shape
    p = patch - patch.mean()
    spectrum = np.abs(np.fft.fft2(p, s=(2 * h, 2 * w))) ** 2
    counts = np.abs(np.fft.fft2(np.ones((h, w)), s=(2 * h, 2 * w))) ** 2
    acf = np.fft.fftshift(np.real(np.fft.ifft2(spectrum)))
    overlap = np.fft.fftshift(np.real(np.fft.ifft2(counts)))
    return (acf / np.maximum(overlap, 1.0))[1:, 1:]  # drop the empty first row and column: lag 0 at (h-1, w-1)


def half_width(curve: Sequence[float]) -> float | None:
    """The lag (px, linear interpolation) where a curve starting at 1 first falls to 0.5; None if never."""
    for lag in range(1, len(curve)):
        if curve[lag] <= 0.5:
            a, b = curve[lag - 1], curve[lag]
            return float(lag - 1 + (a - 0.5) / (a - b))
    return None


def autocorrelation(
    images: Sequence[np.ndarray],
    patches: int = 2000,
    size: int = 32,
    max_lag: int = MAX_LAG,
    seed: int = 0,
    min_coherence: float = MIN_COHERENCE,
) -> dict[str, Any]:
    """The paper's Fig. 4: autocorrelation along vs across the dominant local orientation.

    `patches` random size x size windows of the images (2-D arrays); each with a dominant orientation
    (structure-tensor coherence >= min_coherence) contributes its autocorrelation, normalised to 1 at
    lag 0 and sampled (bilinear) along and across that orientation at lags 0..max_lag; the curves are
    averaged over those patches.
    """
    rng = np.random.default_rng(seed)
    usable = [np.asarray(im, dtype=np.float64) for im in images if min(np.shape(im)) >= size]
    assert usable, f"no image is at least {size}x{size}"
    lags = np.arange(max_lag + 1, dtype=np.float64)
    along, across, used = np.zeros(max_lag + 1), np.zeros(max_lag + 1), 0
    for _ in range(patches):
        image = usable[int(rng.integers(len(usable)))]
        top = int(rng.integers(image.shape[0] - size + 1))
        left = int(rng.integers(image.shape[1] - size + 1))
        patch = image[top : top + size, left : left + size]
        angle, coherence = dominant_orientation(patch)
        if coherence < min_coherence or patch.std() <= 0:
            continue
        acf = patch_autocorrelation(patch)
        acf = acf / acf[size - 1, size - 1]
        for curves, theta in ((along, angle), (across, angle + np.pi / 2)):
            rows = size - 1 + lags * np.sin(theta)
            cols = size - 1 + lags * np.cos(theta)
            curves += map_coordinates(acf, [rows, cols], order=1)
        used += 1
    along, across = along / max(used, 1), across / max(used, 1)
    return {
        "patches": patches,
        "patch_px": size,
        "used": used,
        "min_coherence": min_coherence,
        "lags": [int(v) for v in lags],
        "along": [float(v) for v in along],
        "across": [float(v) for v in across],
        "half_width_along": half_width(along),
        "half_width_across": half_width(across),
    }


def training_images(config: ModelConfig, photos: Sequence[data.Photo] | None = None) -> list[np.ndarray]:
    """The training photos as the model sees them (its filter and normalisation), channel mean, 2-D."""
    prepared = data.prepare(data.default_photos() if photos is None else photos, config)
    return [image.double().mean(dim=0).numpy() for image in prepared]


# ---- the PCA control for level 1 -----------------------------------------------------------------


SPAN_DRAWS = 5  # random rotations of the level-1 fields fitted for the span control


def pca_fields(config: ModelConfig, count: int | None = None, patches: int = 10000, seed: int = 0) -> np.ndarray:
    """The top `count` (default: level 1's causes) principal components of windowed training patches.

    Patches of level 1's kernel from the training photos under the model's preprocessing, times the
    level's window (what each module predicts), channel mean; returns (count, kh, kw).
    """
    level = config.levels[0]
    count = count or level.causes
    kernel = level.kernel if level.kind != "dense" else tuple(config.input_shape[1:])
    images = data.prepare(data.default_photos(), config)
    windows = data.PatchSampler(images, kernel, seed).batch(0, patches).double().mean(dim=1)  # (P, kh, kw)
    if level.window_sigma is not None:
        windows = windows * gaussian_window(kernel, level.window_sigma)
    x = windows.reshape(patches, -1).numpy()
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return vt[:count].reshape(count, *kernel)


def pca_control(config: ModelConfig, seed: int = 0) -> dict[str, Any]:
    """The Gabor summary of the PCA fields: what a linear, non-sparse code of the same patches gives."""
    pcs = pca_fields(config, seed=seed)
    return {
        "components": len(pcs),
        **gabor_summary([fit_gabor(f) for f in pcs]),
        "span_control": span_control(pcs, seed=seed),
    }


def span_control(fields: np.ndarray, draws: int = SPAN_DRAWS, seed: int = 0) -> dict[str, Any]:
    """Is the Gabor share a property of the basis or only of the space it spans?

    Random orthogonal rotations of the fields (the same span, the same total energy) are fitted like the
    fields. A code whose share comes from the window, or from collapsing onto a few smooth directions,
    keeps it under rotation; a learned basis does not. Also the span's effective dimension,
    (sum s^2)^2 / sum s^4 over the fields' singular values: the number of directions the fields use.
    """
    flat = np.asarray(fields, dtype=np.float64).reshape(len(fields), -1)
    s = np.linalg.svd(flat, compute_uv=False)
    rng = np.random.default_rng(seed)
    shares = []
    for _ in range(draws):
        q, r = np.linalg.qr(rng.standard_normal((len(flat), len(flat))))
        q = q * np.sign(np.diag(r))  # Haar-distributed
        rotated = (q @ flat).reshape(np.shape(fields))
        shares.append(gabor_summary([fit_gabor(f) for f in rotated])["share_good"])
    return {
        "draws": draws,
        "rotated_share_median": float(np.median(shares)),
        "rotated_shares": shares,
        "effective_dimension": float((s**2).sum() ** 2 / max((s**4).sum(), 1e-300)),
    }
