"""The inference step of each plan, written once against a tiny ops layer (pcmodel.engines.ops).

`run_program(ops, plan, x, steps, r0)` is what every backend runs: the torch backend calls it with eager
torch ops, the CUDA-graph backend captures that call, and the onnxruntime backend (and pc-export) call
it with ops that append ONNX nodes, so the graph *is* this code unrolled. A prior's part of the step is
its own (pcmodel.priors); a new step rule is one change here (with its coefficients from
pcmodel.energy.step_rates). The starting state r0 is an input: given, or the config's start. The tests
hold every backend against the plain loop (pcmodel.energy.infer_loop).

Ops methods ending in `_` may reuse their first argument's storage: the program only passes values
that are dead afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..results import EngineRun
from ..solvers import GRADIENT, Solver
from .ops import Ops
from .plans import LevelwisePlan, Plan, QuadraticPlan


def run_program(
    ops: Ops, plan: Plan, x: Any, steps: int, r0: Sequence[Any] | None = None, solver: Solver = GRADIENT
) -> EngineRun:
    """T fixed steps of the plan from r0 (one value per level, shaped like the latents) or, when None,
    the config's initial latents, each plain step moved by `solver` (pcmodel.solvers)."""
    if isinstance(plan, QuadraticPlan):
        return quadratic_program(ops, plan, x, steps, r0, solver)
    return levelwise_program(ops, plan, x, steps, r0, solver)


def quadratic_program(
    ops: Ops, plan: QuadraticPlan, x: Any, steps: int, r0: Sequence[Any] | None = None, solver: Solver = GRADIENT
) -> EngineRun:
    """s <- s M_s + c_s - (the prior's step) for T steps, then the energy of every step from the history.

    The solver moves the scaled state s as it would r (s = r / scale per latent: the momentum updates are
    linear; Anderson's inner product is weighted by scale^2, r-space's).
    """
    flat = ops.flatten(x)  # (B, n_x)
    step = ops.weight("step", plan.step)
    c = ops.matmul(flat, ops.weight("drive", plan.drive))  # (B, n)
    if r0 is not None:
        s = ops.mul(ops.concat_rows([ops.flatten(r) for r in r0]), ops.weight("unscale", plan.unscale))
    elif plan.start is None:
        s = ops.zeros_like_rows(c)
    else:
        s = ops.matmul(flat, ops.weight("start", plan.start))
    prior = plan.prior
    coefficients = {k: ops.weight(f"prior_{k}", v) for k, v in plan.coefficients.items()}
    scale = ops.weight("scale", plan.scale)
    metric = ops.mul(scale, scale) if solver.name == "anderson" else None  # its inner product: r-space's
    lengths = None  # the levels side by side in s: their step multipliers per entry
    if solver.level_steps:
        per_entry = solver.entry_steps([math.prod(shape) for shape in plan.shapes]).to(plan.scale)
        lengths = [ops.weight("level_steps", per_entry)]
    states, drives, carried = [s], [], None
    for t in range(steps + 1):
        z = ops.affine(s, step, c)  # s M_s + c_s
        drives.append(z)
        if t == steps:
            break
        u = z if prior is None else prior.quadratic_step(ops, z, s, coefficients)
        (s,), carried = solver.advance(ops, [s], [u], carried, [tuple(plan.scale.shape)], metric, lengths)
        states.append(s)
    history = ops.stack(states)  # (T+1, B, n)
    zs = ops.exact_affine(history, step, c) if not ops.exact else ops.stack(drives)
    gap = ops.sub(ops.sub(history, zs), c)  # s - z - c
    energy = ops.matvec(ops.mul(history, gap), ops.weight("energy_weight", plan.energy_weight))  # (T+1, B)
    base = ops.matvec(ops.mul(flat, flat), ops.weight("omega", plan.omega))  # (B,)
    energy = ops.add(ops.add(energy, base), ops.weight("const", plan.const))
    if prior is not None:
        terms = ops.value(prior.psi(ops.expr(ops.mul(history, scale)), ops.math))  # psi(r), (T+1, B, n)
        energy = ops.add(energy, ops.matvec(terms, ops.weight("prior_alpha", plan.prior_alpha)))
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
    return EngineRun(latents, energy, predictions, errors, reconstruction)


def levelwise_program(
    ops: Ops, plan: LevelwisePlan, x: Any, steps: int, r0: Sequence[Any] | None = None, solver: Solver = GRADIENT
) -> EngineRun:
    """The definition's level loop: per level and step a = U r, p = f(a), e = t - p, then every level's
    r <- r + (eta 2/sigma^2) U^T(f' e) - eta g'(r) - (eta 2/sigma_above^2) t_above^T(e_above) from the same state.
    """
    levels = plan.levels
    count = len(levels)
    first = levels[0]
    predict = [ops.weight(f"predict{i}", lv.predict) for i, lv in enumerate(levels)]
    adjoint = [ops.weight(f"adjoint{i}", lv.adjoint) for i, lv in enumerate(levels)]
    first_target = first.kind.run_target(ops, first, x)  # the level kinds' maps: pcmodel.kinds

    def target(i: int, lower: Any) -> Any:
        return first_target if i == 0 else levels[i].kind.run_target(ops, levels[i], lower)

    latents: list[Any] = [] if r0 is None else list(r0)
    for i, lv in enumerate(levels if r0 is None else ()):
        if lv.feedforward is None:
            r = ops.zeros_latents(x, lv.level.geometry.latent)
        else:
            lower = target(i, latents[-1] if latents else x)
            r = lv.kind.run_adjoint(ops, lv, lower, ops.weight(f"feedforward{i}", lv.feedforward))
        latents.append(r)

    carried = None  # the solver's state (pcmodel.solvers)
    squared: list[list[Any]] = [[] for _ in levels]  # |e_l|^2 per image, per step
    priors: list[list[Any]] = [[] for _ in levels]  # sum psi(r) per image, per step (pcmodel.priors)
    for t in range(steps + 1):
        predictions, errors, reused = [], [], []
        for i, lv in enumerate(levels):
            p = lv.kind.run_predict(ops, lv, latents[i], predict[i])
            if lv.tanh:
                p = ops.tanh_(p)
            e = ops.sub(target(i, latents[i - 1] if i else None), p)
            squared[i].append(ops.sum_squares(e))
            aux = None
            if lv.alpha > 0:
                term, aux = lv.prior.energy_terms(ops, latents[i])
                priors[i].append(term)
            predictions.append(p)
            errors.append(e)
            reused.append(aux)
        if t == steps:
            break
        updated = []
        for i, lv in enumerate(levels):
            e, r = errors[i], latents[i]
            d = ops.slope_error_(predictions[i], e) if lv.tanh else e  # e (1 - p^2); p is dead after
            u = lv.kind.run_adjoint(ops, lv, d, adjoint[i])  # (eta 2/sigma^2) U^T d
            u = lv.prior.step(ops, u, r, lv.rates.kappa, reused[i]) if lv.alpha > 0 else ops.add_(u, r)
            if i + 1 < count:
                above = levels[i + 1]
                u = ops.add_scaled_(u, above.kind.run_target_adjoint(ops, above, errors[i + 1]), -lv.rates.above)
            updated.append(u)
        latents, carried = solver.advance(ops, latents, updated, carried, plan.shapes)

    energy = ops.weight("const", plan.const)
    for i, lv in enumerate(levels):
        energy = ops.add(energy, ops.scale(ops.stack(squared[i]), 1 / lv.sigma2))  # (T+1, B)
        if priors[i]:
            energy = ops.add(energy, ops.scale(ops.stack(priors[i]), lv.alpha))
    predictions[0] = first.kind.run_layout(ops, first, predictions[0])
    errors[0] = first.kind.run_error_layout(ops, first, x, predictions[0], errors[0])
    reconstruction = first.kind.run_reconstruction(ops, first, predictions[0])
    return EngineRun(latents, energy, predictions, errors, reconstruction)
