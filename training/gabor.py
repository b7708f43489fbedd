"""2-D Gabor fits to level-1 basis functions: are the learned fields Gabor-like? (docs/MODEL.md section 5 D.)

`fit_gabor` fits one field by least squares; `gabor_summary` turns a list of fits into the share of
Gabor-like fields, the blobs and the orientation bins they cover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.optimize import least_squares

from pcmodel import PCModel

GOOD_FIT = 0.7  # R^2 at or above which a fit is good (docs/MODEL.md section 5 D)
MIN_STRIPES = 0.1  # n_x = f sigma_x at or above which a good fit has stripes inside its envelope (blobs: ~0.02)
ORIENTATION_BINS = 8


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
    """The Gabor g of GaborFit at the pixel coordinates (yy, xx); params in GaborFit's order after r2."""
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
