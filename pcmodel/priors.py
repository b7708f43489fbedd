"""Priors on the latents, each written once: its energy term, its gradient and its part of the step.

A prior is g(r) = alpha * sum psi(r) with psi(0) = 0, so dg/dr = 2 alpha phi(r), phi = psi' / 2. The
step r <- r - eta dE/dr then contains r - kappa phi(r) with kappa = 2 eta alpha (`LevelRates.kappa`).
`psi` and `phi` are written with arithmetic operators and a math namespace `m` (log1p, sqrt), so the
same lines run on torch tensors (the definition, the torch backend, CUDA graphs), numpy arrays and
ONNX graph values (pcmodel.engines.onnx_graph.OnnxOps.expr). A prior may override the program hooks
(`energy_terms`, `step`, `quadratic_*`) with a fused form; the tests hold every prior on every backend
against autograd and the plain loop. A new prior is one class here and one line in PRIORS.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch


class Prior:
    """g(r) = alpha * sum psi(r). Subclasses set `name` and `curvature` and write psi and phi."""

    name: ClassVar[str]
    quadratic: ClassVar[bool] = False  # psi = r^2: a quadratic energy (folds into the quadratic plan's H)
    # sup g'' / (2 alpha): the stability bound takes the Gaussian prior (curvature 1) as the worst case,
    # which holds for every prior with curvature <= 1 (tests/pcmodel/test_math.py checks each).
    curvature: ClassVar[float] = 1.0

    def psi(self, r: Any, m: Any) -> Any:
        raise NotImplementedError

    def phi(self, r: Any, m: Any) -> Any:
        raise NotImplementedError

    # ---- the definition (pcmodel.energy) --------------------------------------------------------

    def energy(self, r: torch.Tensor, alpha: float) -> torch.Tensor:
        """g(r) summed per image (B,)."""
        if alpha == 0:
            return r.new_zeros(r.shape[0])
        return alpha * self.psi(r, torch).flatten(1).sum(1)

    def gradient(self, r: torch.Tensor, alpha: float) -> torch.Tensor | None:
        """g'(r), or None when alpha = 0."""
        return None if alpha == 0 else (2 * alpha) * self.phi(r, torch)

    # ---- the levelwise program (pcmodel.engines.program), written against its ops ----------------

    def energy_terms(self, ops: Any, r: Any) -> tuple[Any, Any]:
        """(sum psi(r) per image, anything `step` reuses from it at the same state)."""
        return ops.sum_rows(ops.value(self.psi(ops.expr(r), ops.math))), None

    def step(self, ops: Any, u: Any, r: Any, kappa: float, aux: Any) -> Any:
        """u + r - kappa phi(r): this level's new latents from its data terms u."""
        return ops.sub(ops.add_(u, r), ops.value(self.phi(ops.expr(r), ops.math) * kappa))

    # ---- the quadratic plan: s = r / scale per entry -----------------------------------------------

    def quadratic_coefficients(self, kappa: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-entry tensors of `quadratic_step` (kappa = 0 on entries of other levels): the scale r = scale s
        and whatever else it reads. Default: no rescaling, `kappa` itself."""
        return {"scale": torch.ones_like(kappa), "kappa": kappa}

    def quadratic_step(self, ops: Any, z: Any, s: Any, coefficients: dict[str, Any]) -> Any:
        """s' = z - kappa phi(s) where z = s M + c holds the quadratic terms."""
        return ops.sub(z, ops.value(ops.expr(coefficients["kappa"]) * self.phi(ops.expr(s), ops.math)))


class Gaussian(Prior):
    """psi = r^2: the energy stays quadratic in r."""

    name = "gaussian"
    quadratic = True

    def psi(self, r: Any, m: Any) -> Any:
        return r * r

    def phi(self, r: Any, m: Any) -> Any:
        return r

    def energy_terms(self, ops: Any, r: Any) -> tuple[Any, Any]:
        return ops.sum_squares(r), None

    def step(self, ops: Any, u: Any, r: Any, kappa: float, aux: Any) -> Any:
        return ops.add_scaled_(u, r, 1 - kappa)  # a decay of r


class Cauchy(Prior):
    """psi = log(1 + r^2): sparse (heavy tails), the paper's choice. Fused: 1 + r^2 is made once a step."""

    name = "cauchy"

    def psi(self, r: Any, m: Any) -> Any:
        return m.log1p(r * r)

    def phi(self, r: Any, m: Any) -> Any:
        return r / (1 + r * r)

    def energy_terms(self, ops: Any, r: Any) -> tuple[Any, Any]:
        q = ops.addcmul(ops.one(), r, r)  # 1 + r^2, for the energy and the step
        return ops.sum_log(q), q

    def step(self, ops: Any, u: Any, r: Any, kappa: float, aux: Any) -> Any:
        return ops.addcdiv_(ops.add_(u, r), r, aux, value=-kappa)

    def quadratic_coefficients(self, kappa: torch.Tensor) -> dict[str, torch.Tensor]:
        # r = k s with k = sqrt(kappa): kappa r / (1 + r^2) becomes s / (1/kappa + s^2), two fused operations.
        cauchy = kappa > 0
        scale = torch.where(cauchy, kappa.sqrt(), torch.ones_like(kappa))
        qinv = torch.where(cauchy, 1 / kappa.clamp_min(1e-300), torch.full_like(kappa, math.inf))
        return {"scale": scale, "qinv": qinv}

    def quadratic_step(self, ops: Any, z: Any, s: Any, coefficients: dict[str, Any]) -> Any:
        q = ops.addcmul(coefficients["qinv"], s, s)  # 1/kappa + s^2 (+inf off the Cauchy entries: s / q = 0)
        return ops.addcdiv(z, s, q, value=-1.0)


class SmoothLaplace(Prior):
    """psi = sqrt(1 + r^2) - 1: the Laplace (L1) prior, smooth at 0 (pseudo-Huber): |r| - 1 for large r."""

    name = "smooth-laplace"
    curvature = 0.5  # g'' = alpha (1 + r^2)^(-3/2) <= alpha

    def psi(self, r: Any, m: Any) -> Any:
        return m.sqrt(1 + r * r) - 1

    def phi(self, r: Any, m: Any) -> Any:
        return r / (2 * m.sqrt(1 + r * r))


PRIORS: dict[str, Prior] = {p.name: p for p in (Gaussian(), Cauchy(), SmoothLaplace())}


def prior(name: str) -> Prior:
    """The prior called `name` (the config validates names against PRIORS)."""
    return PRIORS[name]
