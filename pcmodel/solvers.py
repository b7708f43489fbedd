"""The inference dynamics: how the latents move from one step to the next, for the same energy.

Every solver takes the paper's plain gradient step d = -eta dE/dr (per-level eta from
pcmodel.energy.step_rates) at the state it holds, and only the way d moves the state differs:

    gradient (the paper, the definition):  r <- r + d
    momentum (Polyak's heavy ball):        v <- beta v + d;  r <- r + v
    nesterov (Nesterov's accelerated):     v <- beta v + d;  r <- r + d + beta v

with v = 0 at the start. The Nesterov form is the one whose held state is the look-ahead point (as in
torch.optim.SGD): one gradient per step, at the state whose energy the trace records. All three have the
same fixed points (v = 0 and d = 0 there). `Solver.update` is the one place this is written; the plain loop
(pcmodel.energy.infer_loop), the program every backend runs (pcmodel.engines.program) and the numba kernel
(which takes `Solver.kernel_mode`) all take it from here.

Stability on a quadratic energy with curvature lambda along some direction (eta lambda = h): gradient
needs h < 2; heavy ball needs h < 2 (1 + beta); Nesterov needs h < 2 (1 + beta) / (1 + 2 beta) (the
roots of z^2 - (1 - h)(1 + beta) z + (1 - h) beta inside the unit circle). So a solver's largest stable
k1 is the gradient's times `Solver.bound_factor` (PCModel.stability_bound; docs/MODEL.md section 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SOLVERS = ("gradient", "momentum", "nesterov")
DEFAULT_MOMENTUM = 0.7  # beta where a config does not say: measured best at 10-20 steps (docs/PERFORMANCE.md)


@dataclass(frozen=True)
class Solver:
    """One inference dynamics: its name and, for momentum and nesterov, beta in [0, 1)."""

    name: str = "gradient"
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SOLVERS:
            raise ValueError(f"unknown solver {self.name!r}; choose one of: {', '.join(SOLVERS)}")
        beta = self.momentum
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {beta!r}")
        if self.name == "gradient" and beta != 0:
            raise ValueError("the gradient solver has no momentum; use solver 'momentum' or 'nesterov'")
        object.__setattr__(self, "momentum", float(beta))

    @property
    def plain(self) -> bool:
        """Whether a step is the paper's plain gradient step (no velocity to carry)."""
        return self.name == "gradient" or self.momentum == 0

    @property
    def bound_factor(self) -> float:
        """The largest stable step relative to the gradient solver's (module docstring)."""
        beta = self.momentum
        if self.name == "momentum":
            return 1 + beta
        if self.name == "nesterov":
            return (1 + beta) / (1 + 2 * beta)
        return 1.0

    @property
    def kernel_mode(self) -> int:
        """0 plain, 1 heavy ball, 2 Nesterov: the compiled kernel's switch (pcmodel.engines.numba_kernels)."""
        return 0 if self.plain else SOLVERS.index(self.name)

    @property
    def label(self) -> str:
        return self.name if self.name == "gradient" else f"{self.name}({self.momentum:g})"

    def update(self, ops: Any, r: Any, u: Any, v: Any | None) -> tuple[Any, Any | None]:
        """(r', v') from the state r, the plain step's result u = r + d and the velocity v (None at the start).

        `ops` is any pcmodel.engines.ops implementation (torch eager, ONNX nodes) or plain tensors through
        `TENSOR_OPS`. Neither r nor u is written to (r may be the caller's tensor, u a value kept elsewhere).
        """
        if self.plain:
            return u, None
        d = ops.sub(u, r)
        v = d if v is None else ops.add_scaled_(d, v, self.momentum)  # beta v + d, in d's storage
        if self.name == "momentum":
            return ops.add(r, v), v
        return ops.add(u, ops.scale(v, self.momentum)), v  # r + d + beta v


GRADIENT = Solver()


def solver_for(name: str | Solver | None, default: Solver, momentum: float) -> Solver:
    """The solver a call asks for: None the model's own (`default`), a name with the model's momentum
    (DEFAULT_MOMENTUM where the model's own solver is the gradient), or a Solver as given."""
    if name is None:
        return default
    if isinstance(name, Solver):
        return name
    if not isinstance(name, str) or name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of: {', '.join(SOLVERS)}")
    return Solver(name, 0.0 if name == "gradient" else momentum)


class TensorOps:
    """The few ops `Solver.update` uses, on plain torch tensors (for the plain loop)."""

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


TENSOR_OPS = TensorOps()
