"""The inference dynamics: how the latents move from one step to the next, for the same energy.

Every solver takes the paper's plain gradient step d = -eta dE/dr (per-level eta from
pcmodel.energy.step_rates) at the state it holds, u = r + d, and only the way it moves the state differs:

    gradient (the paper, the definition):  r <- u
    momentum (Polyak's heavy ball):        v <- beta v + d;  r <- r + v
    nesterov (Nesterov's accelerated):     v <- beta v + d;  r <- u + beta v
    anderson (Anderson acceleration, window m):  r <- u - sum_j gamma_j (u_{j+1} - u_j) over the last m
        steps, gamma the least-squares fit of the latest residual f = u - r by the residuals' differences

with v = 0 at the start. A solver other than the paper's may also lengthen the plain step per level
(`level_steps`, m_l: d_l = -m_l eta_l dE/dr_l, a diagonal preconditioner with the same fixed points): the
slowest mode of a network can be one level's (conv-rgb's level 2: docs/PERFORMANCE.md), and a longer step
there costs nothing. The Nesterov form is the one whose held state is the look-ahead point (as in
torch.optim.SGD). All of them take one gradient per step and have the same fixed points (d = 0 there).
Anderson (type II, Walker & Ni 2011) couples the levels: gamma solves (A + lambda I) gamma = b per image,
A_ij = <df_i, df_j> and b_i = <df_i, f> over all levels (df_i = f_{i+1} - f_i), with a ridge lambda =
RIDGE tr(A): small enough not to slow it, large enough that float32 rounding of nearly parallel residuals
does not swing gamma (measured: docs/PERFORMANCE.md). Its inner product is r-space's: a backend that moves
scaled latents s = r / k passes k^2 as the `metric`. `Solver.advance` is
the one place this is written; the plain loop (pcmodel.energy.infer_loop) and the program every backend
runs (pcmodel.engines.program) take it from here with their ops (the small solve is an ops primitive:
ONNX has no solve), and the numba kernel restates it per row (its `kernel_mode`; tested against the loop).

Stability on a quadratic energy with curvature lambda along some direction (eta lambda = h): gradient
needs h < 2; heavy ball needs h < 2 (1 + beta); Nesterov needs h < 2 (1 + beta) / (1 + 2 beta) (the
roots of z^2 - (1 - h)(1 + beta) z + (1 - h) beta inside the unit circle). So a solver's largest stable
k1 is the gradient's times `Solver.bound_factor` (PCModel.stability_bound; docs/MODEL.md section 2), the
gradient's taken with each level's step multiplied by m_l (the curvature the step sees is m_l eta_l lambda).
Anderson has no such bound of its own; it mixes the plain step's images and is held to the plain step's
bound (factor 1): on a quadratic energy and with an unbounded window it is GMRES on the step's linear map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

SOLVERS = ("gradient", "momentum", "nesterov", "anderson")
DEFAULT_MOMENTUM = 0.7  # beta where a config does not say: measured best at 10-20 steps (docs/PERFORMANCE.md)
DEFAULT_WINDOW = 5  # Anderson's m where a config does not say: near the best of 3 to 8 at 10-20 steps (measured)
MAX_WINDOW = 8  # m + 1 residuals a step: the small solve is unrolled in the ONNX graph
RIDGE = 1e-3  # lambda / tr(A) (module docstring; measured: docs/PERFORMANCE.md)
TINY = 1e-30  # lambda's floor, so that an image whose residuals stop changing (A = 0) takes the plain step


def checked_level_steps(values: Any) -> tuple[float, ...]:
    """Per-level step multipliers as a tuple of positive finite floats, () where every one is 1."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"level_steps must be a sequence of positive numbers, got {values!r}")
    steps = []
    for m in values:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < math.inf:
            raise ValueError(f"level_steps must be positive finite numbers, got {m!r}")
        steps.append(float(m))
    return () if all(m == 1 for m in steps) else tuple(steps)


@dataclass(frozen=True)
class Solver:
    """One inference dynamics: its name; for momentum and nesterov beta in [0, 1); for anderson its window m;
    for any but the paper's gradient solver the plain step's multiplier per level (empty: 1 at every level)."""

    name: str = "gradient"
    momentum: float = 0.0
    window: int = 0
    level_steps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in SOLVERS:
            raise ValueError(f"unknown solver {self.name!r}; choose one of: {', '.join(SOLVERS)}")
        beta = self.momentum
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {beta!r}")
        if self.name in ("gradient", "anderson") and beta != 0:
            raise ValueError(f"the {self.name} solver has no momentum; use solver 'momentum' or 'nesterov'")
        m = self.window
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= MAX_WINDOW:
            raise ValueError(f"window must be an int in [1, {MAX_WINDOW}], got {m!r}")
        if (self.name == "anderson") != (m > 0):
            raise ValueError("only the anderson solver has a window, and it needs one of at least 1")
        object.__setattr__(self, "momentum", float(beta))
        object.__setattr__(self, "level_steps", checked_level_steps(self.level_steps))
        if self.name == "gradient" and self.level_steps:
            raise ValueError("the gradient solver takes no level_steps: its per-level steps are k1_scale")

    @property
    def plain(self) -> bool:
        """Whether a step is a plain gradient step, lengthened per level or not (nothing to carry between steps)."""
        return self.name == "gradient" or (self.name != "anderson" and self.momentum == 0)

    @property
    def bound_factor(self) -> float:
        """The largest stable step relative to the gradient solver's (module docstring)."""
        beta = self.momentum
        if self.name == "momentum":
            return 1 + beta
        if self.name == "nesterov":
            return (1 + beta) / (1 + 2 * beta)
        return 1.0

    def entry_steps(self, sizes: Sequence[int]) -> torch.Tensor:
        """The level steps per entry of a state holding levels of `sizes` entries side by side (float64)."""
        if len(sizes) != len(self.level_steps):
            raise ValueError(f"level_steps has {len(self.level_steps)} multipliers for {len(sizes)} levels")
        return torch.cat([torch.full((n,), m, dtype=torch.float64) for n, m in zip(sizes, self.level_steps)])

    @property
    def kernel_mode(self) -> int:
        """0 plain, 1 heavy ball, 2 Nesterov, 3 Anderson: the compiled kernel's switch
        (pcmodel.engines.numba_kernels)."""
        return 0 if self.plain else SOLVERS.index(self.name)

    @property
    def label(self) -> str:
        if self.name == "gradient":
            return self.name
        steps = f"; level steps {'/'.join(f'{m:g}' for m in self.level_steps)}" if self.level_steps else ""
        return f"{self.name}({self.window if self.name == 'anderson' else f'{self.momentum:g}'}{steps})"

    def advance(
        self,
        ops: Any,
        rs: Sequence[Any],
        us: Sequence[Any],
        state: Any,
        shapes: Sequence[Sequence[int]],
        metric: Any | None = None,
        lengths: Sequence[Any] | None = None,
    ) -> tuple[list[Any], Any]:
        """(the next state, the solver's carried state) from the state rs (one value per level, shaped
        (B, *shapes[l])), the plain step's results us = rs + d and the carried state (None at the start).

        `ops` is any pcmodel.engines.ops implementation (torch eager, ONNX nodes) or plain tensors through
        `TENSOR_OPS`; `metric` (Anderson only): per-latent weights of the inner product, over the levels'
        flattened latents side by side, where rs are scaled latents (None: rs are r). Neither rs nor us is
        written to (rs may be the caller's tensors, us values kept elsewhere). `lengths`: where rs holds
        several levels side by side (a flattened state), the level steps as one value of per-entry
        multipliers per rs entry (None: rs holds one value per level).
        """
        if self.level_steps:  # u_l = r_l + m_l (u_l - r_l): the plain step lengthened per level
            if lengths is None:
                if len(rs) != len(self.level_steps):
                    raise ValueError(f"level_steps has {len(self.level_steps)} multipliers for {len(rs)} levels")
                pairs = zip(rs, us, self.level_steps)
                us = [u if m == 1 else ops.add(ops.scale(ops.sub(u, r), m), r) for r, u, m in pairs]
            else:
                us = [ops.add(ops.mul(ops.sub(u, r), m), r) for r, u, m in zip(rs, us, lengths)]
        if self.plain:
            return list(us), None
        if self.name == "anderson":
            return self._anderson(ops, rs, us, state, shapes, metric)
        previous = [None] * len(rs) if state is None else state
        moved = [self._momentum(ops, r, u, p) for r, u, p in zip(rs, us, previous)]
        return [r for r, _ in moved], [p for _, p in moved]

    def _momentum(self, ops: Any, r: Any, u: Any, previous: Any | None) -> tuple[Any, Any]:
        """The velocity forms above as two-term recurrences on values at hand, three elementwise operations a
        level where the velocity takes five (a graph node or kernel each): with beta v = r' - u,
        nesterov r' = u + beta (u - u_prev), carrying the previous step's u (r_0 before the first step), and
        momentum r' = u + beta (r - r_prev), carrying the previous state (none before the first step: v = d)."""
        if self.name == "nesterov":
            before = r if previous is None else previous
            return ops.add(ops.scale(ops.sub(u, before), self.momentum), u), u
        if previous is None:
            return u, r
        return ops.add(ops.scale(ops.sub(r, previous), self.momentum), u), r

    def _anderson(
        self, ops: Any, rs: Sequence[Any], us: Sequence[Any], state: Any, shapes: Sequence[Sequence[int]], metric: Any
    ) -> tuple[list[Any], Any]:
        flat = len(shapes) == 1 and len(shapes[0]) == 1  # one level already (B, n): no copies
        r = rs[0] if flat else ops.concat_rows([ops.flatten(v) for v in rs])
        u = us[0] if flat else ops.concat_rows([ops.flatten(v) for v in us])
        f = ops.sub(u, r)
        if state is None:
            return list(us), (u, f, (), ())
        last_u, last_f, du, df = state
        du, df = (*du, ops.sub(u, last_u))[-self.window :], (*df, ops.sub(f, last_f))[-self.window :]
        gamma = ops.ridge_solve(ops.gram([*df, f], metric), RIDGE, TINY)  # (B, k): the least-squares fit
        mixed = ops.sub_combination(u, gamma, du)
        return ([mixed] if flat else ops.split_latents(mixed, shapes)), (u, f, du, df)


GRADIENT = Solver()


def float32_tolerance(solver: Solver, scale: float) -> float:
    """How closely two float32 backends' latents agree under `solver` (largest absolute difference): 1e-4,
    and for Anderson 1e-3 of the latents' largest magnitude `scale` (at least 1): its least squares amplify
    rounding on hard images, where the float32 loop itself is that far from the float64 one (measured on
    held-out windows: docs/PERFORMANCE.md)."""
    return 1e-3 * max(1.0, scale) if solver.name == "anderson" else 1e-4


def solver_for(
    name: str | Solver | None,
    default: Solver,
    momentum: float,
    window: int = DEFAULT_WINDOW,
    level_steps: Sequence[float] = (),
) -> Solver:
    """The solver a call asks for: None the model's own (`default`), a name with the model's momentum
    (DEFAULT_MOMENTUM where the model's own solver is not a momentum one), window and level steps (never for
    the paper's gradient solver), or a Solver as given."""
    if name is None:
        return default
    if isinstance(name, Solver):
        return name
    if not isinstance(name, str) or name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of: {', '.join(SOLVERS)}")
    if name == "gradient":
        return GRADIENT
    if name == "anderson":
        return Solver(name, window=window, level_steps=tuple(level_steps))
    return Solver(name, momentum, level_steps=tuple(level_steps))


def gram(rows: Sequence[torch.Tensor], metric: torch.Tensor | None) -> torch.Tensor:
    """(B, k, k): <rows_i, rows_j> per image, weighted by `metric` per column where given."""
    stacked = torch.stack(list(rows), 1)  # (B, k, n)
    weighted = stacked if metric is None else stacked * metric
    return weighted @ stacked.transpose(1, 2)


def ridge_solve(g: torch.Tensor, ridge: float, tiny: float) -> torch.Tensor:
    """(B, k - 1): gamma with (A + lambda I) gamma = b, A the leading (k - 1) x (k - 1) block of g (B, k, k)
    and b its last column above the diagonal, lambda = ridge tr(A) + tiny."""
    k = g.shape[-1] - 1
    a, b = g[:, :k, :k], g[:, :k, k]
    lam = a.diagonal(dim1=1, dim2=2).sum(1) * ridge + tiny
    system = a + lam[:, None, None] * torch.eye(k, dtype=g.dtype, device=g.device)
    return torch.linalg.solve_ex(system, b)[0]  # _ex: no sync, so that a CUDA graph captures it


def sub_combination(base: torch.Tensor, coefficients: torch.Tensor, rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, n): base - sum_j coefficients_j rows_j per image."""
    return base - (coefficients[:, None, :] @ torch.stack(list(rows), 1))[:, 0]


class TensorOps:
    """The ops `Solver.advance` uses, on plain torch tensors (for the plain loop)."""

    @staticmethod
    def sub(a: Any, b: Any) -> Any:
        return a - b

    @staticmethod
    def add(a: Any, b: Any) -> Any:
        return a + b

    @staticmethod
    def scale(a: Any, factor: float) -> Any:
        return a * factor

    @staticmethod
    def add_scaled_(a: Any, b: Any, alpha: float) -> Any:
        return a.add_(b, alpha=alpha)

    @staticmethod
    def flatten(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)

    @staticmethod
    def concat_rows(values: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(values), dim=1)

    @staticmethod
    def split_latents(flat: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        return [p.reshape(flat.shape[0], *s).contiguous() for p, s in zip(torch.split(flat, sizes, 1), shapes)]

    gram = staticmethod(gram)
    ridge_solve = staticmethod(ridge_solve)
    sub_combination = staticmethod(sub_combination)


TENSOR_OPS = TensorOps()
