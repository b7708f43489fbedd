"""The mathematics, written once: errors, the energy, dE/dr, dE/dU, the step rates and the plain loop.

Energy of ONE image (docs/MODEL.md section 1), level 0 being the input x:

    E = sum_l (1/sigma_l^2) ||t_l(r_{l-1}) - f(U_l r_l)||^2  +  sum_l g_l(r_l)  +  sum_l lam_l ||U_l||^2

where t_l is the identity for convolutional levels and the (windowed) patches for module levels,
g_l is the level's prior (pcmodel.priors: alpha*sum r^2, alpha*sum log(1 + r^2), ...). Sums everywhere, never means,
so an image's result does not depend on its batch or on the map size.

Inference (fast timescale), all levels from the same state:   r_l <- r_l - eta_l dE/dr_l
Learning (slow timescale), batch mean:                        U_l <- U_l - (k2 k2_scale_l / 2) dE/dU_l
  then, on levels with a column_norm, each column of U_l rescaled to that norm (`constrain_weights`)

with eta_l = k1 k1_scale_l / 2 (`step_rates`: the one place the step size per level is decided; every backend takes
its coefficients from there). Both gradients are derived by hand and checked against autograd in the
tests. Everything here is a function of (config, levels, weights, state): no model object, no caches.
The engines in pcmodel.engines rearrange `infer_loop`'s arithmetic; `infer_loop` is their definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .levels import Level
from .priors import PRIORS
from .results import InferenceResult
from .solvers import GRADIENT, TENSOR_OPS, Solver


@dataclass
class LevelErrors:
    """One level's prediction of the level below, at one latent state."""

    prediction: torch.Tensor  # f(U_l r_l), in the level's target space
    error: torch.Tensor  # t_l(r_{l-1}) - prediction
    slope: torch.Tensor | None  # f'(U_l r_l); None where f is the identity

    @property
    def driven(self) -> torch.Tensor:
        """f' * e: the error as it drives both gradients (U^T of it for r, its outer product with r for U)."""
        return self.error if self.slope is None else self.slope * self.error


@dataclass(frozen=True)
class LevelRates:
    """The coefficients of one level's inference step r <- r - eta dE/dr, expanded once.

    r' = r + adjoint * U^T(f' e_below) - kappa phi(r) - above * t_above^T(e_above), where g'(r) =
    2 alpha phi(r) is the level's prior (pcmodel.priors; a Gaussian prior makes the middle term a decay).
    """

    eta: float  # the step size on this level's latents
    adjoint: float  # eta * 2 / sigma_l^2
    above: float  # eta * 2 / sigma_{l+1}^2 (0 at the top)
    kappa: float  # 2 eta alpha: the prior's coefficient in the step


def step_rates(config: ModelConfig) -> list[LevelRates]:
    """Every level's step coefficients. The step size per level is decided here and nowhere else."""
    out = []
    levels = config.levels
    for i, lc in enumerate(levels):
        eta = config.k1 * lc.k1_scale / 2  # k1_scale: the diagonal preconditioner (MODEL.md section 2)
        above = 2 * eta / levels[i + 1].sigma2 if i + 1 < len(levels) else 0.0
        out.append(LevelRates(eta=eta, adjoint=2 * eta / lc.sigma2, above=above, kappa=2 * eta * lc.alpha))
    return out


def prior_energy(r: torch.Tensor, prior: str, alpha: float) -> torch.Tensor:
    """g(r) summed per image (pcmodel.priors: alpha*sum r^2, alpha*sum log(1 + r^2), ...)."""
    return PRIORS[prior].energy(r, alpha)


def prior_gradient(r: torch.Tensor, prior: str, alpha: float) -> torch.Tensor | None:
    """g'(r) (2*alpha*r, 2*alpha*r / (1 + r^2), ...); None when alpha = 0."""
    return PRIORS[prior].gradient(r, alpha)


def level_errors(
    levels: Sequence[Level],
    weights: Sequence[torch.Tensor],
    x: torch.Tensor,
    latents: Sequence[torch.Tensor],
    linear: bool = False,
) -> list[LevelErrors]:
    """Each level's prediction, error and f' at this state. linear=True treats f as the identity."""
    out = []
    lower = x
    for level, U, r in zip(levels, weights, latents):
        a = level.predict(r, U)
        if level.config.f == "tanh" and not linear:
            prediction = torch.tanh(a)
            slope = 1 - prediction.square()
        else:
            prediction, slope = a, None
        out.append(LevelErrors(prediction, level.target(lower) - prediction, slope))
        lower = r
    return out


def energy(
    config: ModelConfig,
    weights: Sequence[torch.Tensor],
    latents: Sequence[torch.Tensor],
    errors: Sequence[LevelErrors],
) -> torch.Tensor:
    """The energy per image (B,) from a state's errors: the formula in the module docstring."""
    total = 0
    for lc, U, r, le in zip(config.levels, weights, latents, errors):
        total = total + le.error.square().flatten(1).sum(1) / lc.sigma2
        total = total + prior_energy(r, lc.prior, lc.alpha)
        total = total + lc.lam * U.square().sum()
    return total


def latent_gradients(
    levels: Sequence[Level],
    weights: Sequence[torch.Tensor],
    latents: Sequence[torch.Tensor],
    errors: Sequence[LevelErrors],
    gaussian_prior: bool = False,
) -> list[torch.Tensor]:
    """dE/dr_l for every level, by hand:

    dE/dr_l = -(2/sigma_l^2) U_l^T (f' * e_{l-1}) + g_l'(r_l) + (2/sigma_{l+1}^2) t_{l+1}^T(e_l)
    (the last term is absent at the top level; f' multiplies the error before U^T).
    gaussian_prior=True replaces every prior by the Gaussian one (the stability bound's worst case).
    """
    grads = []
    for i, (level, U, r, le) in enumerate(zip(levels, weights, latents, errors)):
        lc = level.config
        grad = level.adjoint(le.driven, U) * (-2 / lc.sigma2)
        prior = prior_gradient(r, "gaussian" if gaussian_prior else lc.prior, lc.alpha)
        if prior is not None:
            grad = grad + prior
        if i + 1 < len(levels):
            above = levels[i + 1]
            grad = grad + above.target_adjoint(errors[i + 1].error) * (2 / above.config.sigma2)
        grads.append(grad)
    return grads


def weight_gradients(
    levels: Sequence[Level],
    weights: Sequence[torch.Tensor],
    latents: Sequence[torch.Tensor],
    errors: Sequence[LevelErrors],
) -> list[torch.Tensor]:
    """dE/dU_l as a batch mean (hand-derived), shaped like the weights:

    dE/dU_l = -(2/sigma_l^2) mean_b (f' * e_{l-1}) r_l^T + 2 lam_l U_l
    """
    grads = []
    batch = latents[0].shape[0]
    for level, U, r, le in zip(levels, weights, latents, errors):
        lc = level.config
        data = level.weight_gradient(le.driven, r) * (-2 / (lc.sigma2 * batch))
        grads.append(data + (2 * lc.lam) * U)
    return grads


def constrain_weights(config: ModelConfig, weights: Sequence[torch.Tensor]) -> None:
    """In place, after every learning step: each cause's field (column i of U_l, stored as U_l[i])
    rescaled to the level's column_norm, where it has one (Olshausen & Field's constraint)."""
    for U, lc in zip(weights, config.levels):
        if lc.column_norm is not None:
            norms = U.flatten(1).norm(dim=1).clamp_min(torch.finfo(U.dtype).tiny)
            U.mul_((lc.column_norm / norms).reshape(-1, *[1] * (U.dim() - 1)))


def initial_latents(
    config: ModelConfig, levels: Sequence[Level], weights: Sequence[torch.Tensor], x: torch.Tensor
) -> list[torch.Tensor]:
    """The deterministic start: zeros, or feed-forward r_l = U_l^T t_l(r_{l-1}) bottom up.

    The amortised start needs the model's amortiser (pcmodel.amortiser): `PCModel` computes it and passes it
    as `init`, so here it is an error rather than a silent zero."""
    if config.initial_latents == "amortised":
        raise ValueError("the amortised start needs the model's amortiser: pass model.amortised_latents(x) as init")
    out = []
    lower = x
    for level, U in zip(levels, weights):
        if config.initial_latents == "feedforward":
            r = level.adjoint(level.target(lower), U)
        else:
            r = x.new_zeros((x.shape[0], *level.geometry.latent))
        out.append(r)
        lower = r
    return out


def infer_loop(
    config: ModelConfig,
    levels: Sequence[Level],
    weights: Sequence[torch.Tensor],
    x: torch.Tensor,
    steps: int,
    tol: float | None = None,
    init: Sequence[torch.Tensor] | None = None,
    solver: Solver = GRADIENT,
) -> InferenceResult:
    """The plain loop: the mathematical definition every backend is checked against.

    Starts from `init` (r0 per level, shaped like the latents) or, when None, the config's start
    (`initial_latents`). Each step is the plain gradient step d = -eta dE/dr, moved by `solver`
    (pcmodel.solvers: the paper's gradient dynamics by default). With `tol`, an image stops once the norm
    of its gradient (all levels) falls below tol and keeps its latents; `steps` in the result counts the
    steps each image took.
    """
    latents = initial_latents(config, levels, weights, x) if init is None else list(init)
    shapes = [tuple(r.shape[1:]) for r in latents]
    carried = None  # the solver's state (pcmodel.solvers)
    rates = [lr.eta for lr in step_rates(config)]
    batch = x.shape[0]
    used = torch.zeros(batch, dtype=torch.int64, device=x.device)
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    trace = []
    for step in range(steps + 1):
        errors = level_errors(levels, weights, x, latents)
        trace.append(energy(config, weights, latents, errors))
        if step == steps:
            break
        grads = latent_gradients(levels, weights, latents, errors)
        if tol is not None:
            norm = torch.sqrt(sum(g.square().flatten(1).sum(1) for g in grads))
            active = active & (norm >= tol)
            if not active.any():
                break
        steps_plain = [r - eta * g for r, g, eta in zip(latents, grads, rates)]
        moved, carried = solver.advance(TENSOR_OPS, latents, steps_plain, carried, shapes)
        if tol is None:
            latents = moved
            continue
        keep = active.view(-1, 1, 1, 1)
        latents = [torch.where(keep, new, r) for new, r in zip(moved, latents)]
        used += active
    if tol is None:
        used.fill_(steps)
    return make_result(levels, x, latents, [le.prediction for le in errors], torch.stack(trace), used)


def make_result(
    levels: Sequence[Level],
    x: torch.Tensor,
    latents: list[torch.Tensor],
    predictions: Sequence[torch.Tensor],
    trace: torch.Tensor,
    used: torch.Tensor,
    errors: Sequence[torch.Tensor] | None = None,
    reconstruction: torch.Tensor | None = None,
    backend: str = "loop",
    reason: str = "",
) -> InferenceResult:
    """The result from a final state: each level's prediction (target space) and, unless given, its error
    and the reconstruction (level 1's prediction on the input grid)."""
    if errors is None:
        lowers = [x, *latents[:-1]]
        errors = [lv.target(lower) - p for lv, lower, p in zip(levels, lowers, predictions)]

    def layout(level: Level, t: torch.Tensor) -> torch.Tensor:
        return level.as_patches(t) if level.patchwise else t

    if reconstruction is None:
        reconstruction = levels[0].to_lower_map(predictions[0])
    # A convolutional level 1 predicts the input grid itself: its error is x - reconstruction already.
    whole = not levels[0].patchwise and errors[0].shape == x.shape
    return InferenceResult(
        latents=latents,
        predictions=[layout(lv, p) for lv, p in zip(levels, predictions)],
        errors=[layout(lv, e) for lv, e in zip(levels, errors)],
        reconstruction=reconstruction,
        error=errors[0] if whole else x - reconstruction,
        energy=trace,
        steps=used,
        backend=backend,
        reason=reason,
    )
