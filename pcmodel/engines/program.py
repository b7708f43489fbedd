"""The inference step of each plan, written once against a tiny ops layer (pcmodel.engines.ops).

`run_program(ops, plan, x, steps)` is what every backend runs: the torch backend calls it with eager
torch ops, the CUDA-graph backend captures that call, and the onnxruntime backend (and pc-export) call
it with ops that append ONNX nodes, so the graph *is* this code unrolled. A new prior, level kind or
step rule is one change here (with its coefficients from pcmodel.energy.step_rates), and the tests
hold every backend against the plain loop (pcmodel.energy.infer_loop).

Ops methods ending in `_` may reuse their first argument's storage: the program only passes values
that are dead afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .ops import Ops
from .plans import LevelwisePlan, Plan, PlanLevel, QuadraticPlan


@dataclass
class ProgramOutput:
    """Final latents, the energy (steps + 1, B), and each level's final prediction and error.

    Predictions and errors are in the definition's target layout (module levels: (B, D, M) patches),
    level 1 on the input grid; `reconstruction` is f(U_1 r_1) on the input grid.
    """

    latents: list[Any]
    energy: Any
    predictions: list[Any]
    errors: list[Any]
    reconstruction: Any


def run_program(ops: Ops, plan: Plan, x: Any, steps: int) -> ProgramOutput:
    """T fixed steps of the plan from the config's initial latents."""
    if isinstance(plan, QuadraticPlan):
        return quadratic_program(ops, plan, x, steps)
    return levelwise_program(ops, plan, x, steps)


def quadratic_program(ops: Ops, plan: QuadraticPlan, x: Any, steps: int) -> ProgramOutput:
    """s <- s M_s + c_s - s / (1/kappa + s^2) for T steps, then the energy of every step from the history."""
    flat = ops.flatten(x)  # (B, n_x)
    step = ops.weight("step", plan.step)
    c = ops.matmul(flat, ops.weight("drive", plan.drive))  # (B, n)
    s = ops.zeros_like_rows(c) if plan.start is None else ops.matmul(flat, ops.weight("start", plan.start))
    qinv = ops.weight("qinv", plan.qinv) if plan.has_cauchy else None
    states, drives = [s], []
    for t in range(steps + 1):
        z = ops.affine(s, step, c)  # s M_s + c_s
        drives.append(z)
        if t == steps:
            break
        if qinv is not None:
            q = ops.addcmul(qinv, s, s)  # 1/kappa + s^2
            s = ops.addcdiv(z, s, q, value=-1.0)
        else:
            s = z
        states.append(s)
    history = ops.stack(states)  # (T+1, B, n)
    zs = ops.exact_affine(history, step, c) if not ops.exact else ops.stack(drives)
    scale = ops.weight("scale", plan.scale)
    gap = ops.sub(ops.sub(history, zs), c)  # s - z - c
    energy = ops.matvec(ops.mul(history, gap), ops.weight("energy_weight", plan.energy_weight))  # (T+1, B)
    base = ops.matvec(ops.mul(flat, flat), ops.weight("omega", plan.omega))  # (B,)
    energy = ops.add(ops.add(energy, base), ops.weight("const", plan.const))
    if plan.has_cauchy:
        r2 = ops.mul(ops.mul(history, history), ops.mul(scale, scale))
        energy = ops.add(energy, ops.matvec(ops.log1p(r2), ops.weight("cauchy_alpha", plan.cauchy_alpha)))
    final = ops.mul(s, scale)
    latents = ops.split_latents(final, plan.shapes)
    lowers = [flat, *(ops.flatten(r) for r in latents[:-1])]
    predictions, errors = [], []
    for i, (r, lower) in enumerate(zip(latents, lowers)):
        p = ops.matmul(ops.flatten(r), ops.weight(f"predict_map{i}", plan.predict_maps[i]))
        target = ops.matmul(lower, ops.weight(f"target_map{i}", plan.target_maps[i]))
        predictions.append(ops.reshape_rows(p, plan.target_shapes[i]))
        errors.append(ops.reshape_rows(ops.sub(target, p), plan.target_shapes[i]))
    reconstruction = ops.reshape_rows(ops.matmul(s, ops.weight("reconstruct", plan.reconstruct)), plan.input_shape)
    return ProgramOutput(latents, energy, predictions, errors, reconstruction)


def levelwise_program(ops: Ops, plan: LevelwisePlan, x: Any, steps: int) -> ProgramOutput:
    """The definition's level loop: per level and step a = U r, p = f(a), e = t - p, then every level's
    r <- r + (eta 2/sigma^2) U^T(f' e) - eta g'(r) - (eta 2/sigma_above^2) t_above^T(e_above) from the same state.
    """
    levels = plan.levels
    count = len(levels)
    first = levels[0]
    predict = [ops.weight(f"predict{i}", lv.predict) for i, lv in enumerate(levels)]
    adjoint = [ops.weight(f"adjoint{i}", lv.adjoint) for i, lv in enumerate(levels)]
    first_target = ops.phase_split(x, first) if first.phase else ops.target(first, x)

    def target(i: int, lower: Any) -> Any:
        return first_target if i == 0 else ops.target(levels[i], lower)

    latents: list[Any] = []
    for i, lv in enumerate(levels):
        if lv.feedforward is None:
            r = ops.zeros_latents(x, lv.level.geometry.latent)
        else:
            r = ops.adjoint(lv, target(i, latents[-1] if latents else x), ops.weight(f"feedforward{i}", lv.feedforward))
        latents.append(r)

    squared: list[list[Any]] = [[] for _ in levels]  # |e_l|^2 per image, per step
    priors: list[list[Any]] = [[] for _ in levels]  # sum log(1 + r^2) or |r|^2 per image, per step
    for t in range(steps + 1):
        predictions, errors, squares = [], [], []
        for i, lv in enumerate(levels):
            p = ops.predict(lv, latents[i], predict[i])
            if lv.tanh:
                p = ops.tanh_(p)
            e = ops.sub(target(i, latents[i - 1] if i else None), p)
            squared[i].append(ops.sum_squares(e))
            q = None
            if lv.cauchy:
                q = ops.addcmul(ops.one(), latents[i], latents[i])  # 1 + r^2: the prior and its gradient
                priors[i].append(ops.sum_log(q))
            elif lv.alpha > 0:
                priors[i].append(ops.sum_squares(latents[i]))
            predictions.append(p)
            errors.append(e)
            squares.append(q)
        if t == steps:
            break
        updated = []
        for i, lv in enumerate(levels):
            e, r = errors[i], latents[i]
            d = ops.slope_error_(predictions[i], e) if lv.tanh else e  # e (1 - p^2); p is dead after
            u = ops.adjoint(lv, d, adjoint[i])  # (eta 2/sigma^2) U^T d
            if lv.cauchy:
                u = ops.addcdiv_(ops.add_(u, r), r, squares[i], value=-lv.rates.cauchy)
            else:
                u = ops.add_scaled_(u, r, lv.rates.decay)
            if i + 1 < count:
                u = ops.add_scaled_(u, ops.target_adjoint(levels[i + 1], errors[i + 1]), -lv.rates.above)
            updated.append(u)
        latents = updated

    energy = ops.weight("const", plan.const)
    for i, lv in enumerate(levels):
        energy = ops.add(energy, ops.scale(ops.stack(squared[i]), 1 / lv.sigma2))  # (T+1, B)
        if priors[i]:
            energy = ops.add(energy, ops.scale(ops.stack(priors[i]), lv.alpha))
    if first.phase:
        predictions[0] = ops.phase_merge(predictions[0], first)
        errors[0] = ops.phase_merge(errors[0], first)
    reconstruction = _reconstruction(ops, first, predictions[0])
    return ProgramOutput(latents, energy, predictions, errors, reconstruction)


def _reconstruction(ops: Ops, first: PlanLevel, prediction: Any) -> Any:
    """f(U_1 r_1) on the input grid; module levels: the least-squares average of overlapping predictions."""
    if not first.patchwise:
        return prediction
    return ops.patches_to_map(first, prediction)
