"""A model's engine state: what it is prepared for, its plans, and the backends it has used.

Owned by one PCModel (`model.engines`); nothing is kept at module level. A backend is made (and its
libraries imported) the first time a call or `prepare` uses it. Plans and programs are keyed on the
parameters they were made from (`pcmodel.parameters.params_key`), so learning never runs on stale weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..config import ModelConfig
from ..levels import Level
from ..parameters import params_key
from ..results import EngineRun
from ..solvers import GRADIENT, Solver
from .base import Backend
from .plans import Plan, geometry, make_plan, nonquadratic_priors, plan_kind
from .registry import BACKENDS, SPECS, installed
from .select import Choice, select

MAX_PREPARED_STEPS = 8  # step counts with fast programs: memory stays bounded
MAX_PREPARED_SHAPES = 4  # input shapes per step count
MAX_PREPARED_SOLVERS = 3  # solvers per step count and shape


class EngineState:
    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.prepared: dict[int, list[tuple[int, ...]]] = {config.steps: [tuple(config.input_shape)]}
        self.solvers: tuple[Solver, ...] = (config.served_solver,)  # the dynamics the prepared programs run
        self.plans: dict[tuple, tuple[tuple, Plan, list[torch.Tensor]]] = {}
        self.backends: dict[str, Backend] = {}  # made on first use
        self.plan_kinds: dict[tuple[int, int], str] = {}  # by input size
        self.priors = frozenset(nonquadratic_priors(config))
        self.last_key: tuple | None = None  # the parameters key of the previous call

    def set_prepared(
        self, steps: Sequence[int], shapes: Sequence[tuple[int, ...]], solvers: Sequence[Solver] | None = None
    ) -> None:
        steps, shapes = sorted(set(steps)), list(dict.fromkeys(shapes))
        chosen = tuple(dict.fromkeys(solvers or (self.config.served_solver,)))
        if len(chosen) > MAX_PREPARED_SOLVERS:
            raise ValueError(f"prepare takes at most {MAX_PREPARED_SOLVERS} solvers (memory stays bounded)")
        if not steps or not shapes:
            raise ValueError("prepare needs at least one step count and one shape")
        if len(steps) > MAX_PREPARED_STEPS or len(shapes) > MAX_PREPARED_SHAPES:
            raise ValueError(
                f"prepare takes at most {MAX_PREPARED_STEPS} step counts and {MAX_PREPARED_SHAPES} shapes "
                f"(memory stays bounded); got {len(steps)} and {len(shapes)}"
            )
        if min(steps) < 1:
            raise ValueError(f"prepared step counts must be >= 1, got {min(steps)}")
        self.prepared = {t: list(shapes) for t in steps}
        self.solvers = chosen

    def is_prepared(self, steps: int, shape: tuple[int, ...], solver: Solver) -> bool:
        return shape in self.prepared.get(steps, []) and solver in self.solvers

    def backend(self, name: str) -> Backend:
        """The backend called `name` (registry), made on first use."""
        if name not in self.backends:
            self.backends[name] = SPECS[name].factory()
        return self.backends[name]

    def plan_kind(self, hw: tuple[int, int]) -> str:
        if hw not in self.plan_kinds:
            self.plan_kinds[hw] = plan_kind(self.config, hw)
        return self.plan_kinds[hw]

    def choose(
        self,
        requested: str | None,
        *,
        device: torch.device,
        float64: bool,
        steps: int,
        tol: float | None,
        shape: tuple[int, ...],
        key: tuple,
        solver: Solver = GRADIENT,
    ) -> Choice:
        """The automatic rule (pcmodel.engines.select) for one call, with what this state knows."""
        choice = self._select(
            requested,
            device=device,
            float64=float64,
            steps=steps,
            tol=tol,
            prepared=self.is_prepared(steps, shape, solver),
            weights_changing=self.last_key is not None and self.last_key != key,
            hw=(int(shape[-2]), int(shape[-1])),
        )
        self.last_key = key
        return choice

    def fast_backend(self, hw: tuple[int, int], device: torch.device) -> str | None:
        """The backend the automatic rule picks for prepared calls at this size on this device."""
        choice = self._select(
            None, device=device, float64=False, steps=1, tol=None, prepared=True, weights_changing=False, hw=hw
        )
        return choice.backend if SPECS[choice.backend].builds else None

    def _select(self, requested: str | None, *, device: torch.device, hw: tuple[int, int], **call: object) -> Choice:
        if requested is not None and not isinstance(requested, str):  # select is memoised: its arguments hash
            raise ValueError(f"unknown backend {requested!r}; choose auto or one of: {', '.join(BACKENDS)}")
        return select(
            requested, device=device.type, plan=self.plan_kind(hw), priors=self.priors, installed=installed(), **call
        )  # type: ignore[arg-type]

    def plan(
        self,
        params: Mapping[str, torch.Tensor],
        key: tuple,
        hw: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Plan:
        """The plan for the parameters whose key is `key` (rebuilt when they changed)."""
        index = (hw, dtype, str(device))
        cached = self.plans.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = make_plan(self.config, params, hw, dtype, device)
        # Holding the tensors keeps their ids and storages from being reused while the key lives.
        self.plans[index] = (key, plan, list(params.values()))
        return plan

    def run(
        self,
        choice: Choice,
        params: Mapping[str, torch.Tensor],
        key: tuple,
        x: torch.Tensor,
        steps: int,
        r0: Sequence[torch.Tensor] | None = None,
        solver: Solver = GRADIENT,
    ) -> EngineRun:
        """Run a chosen backend (not the loop) on x with parameters (in x's dtype) whose key is `key`."""
        plan = self.plan(params, key, (int(x.shape[-2]), int(x.shape[-1])), x.dtype, x.device)
        if choice.backend == "torch":
            torch_backend = self.backend("torch")
            return torch_backend.run(plan, x, steps, key, r0=r0, rowwise=choice.rowwise, solver=solver)  # type: ignore[call-arg]
        return self.backend(choice.backend).run(plan, x, steps, key, r0, solver)

    def build(
        self,
        params: Mapping[str, torch.Tensor],
        key: tuple,
        device: torch.device,
        amortiser: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Build the fast programs of the prepared set now (sessions; CUDA graphs capture on first use), for
        the config's served start (a learned start arrives as r0) and each prepared solver, and, given the
        `amortiser`'s parameters of a model served from its amortised start, that start's sessions."""
        init = self.config.initial_latents == "amortised"
        for steps, shapes in self.prepared.items():
            for shape in shapes:
                hw = (shape[1], shape[2])
                name = self.fast_backend(hw, device)
                if name is not None:
                    plan = self.plan(params, key, hw, torch.float32, device)
                    for solver in self.solvers:
                        self.backend(name).prepare(plan, steps, shape, key, init, solver)
                    if init and amortiser is not None:
                        levels = geometry(self.config, hw)
                        self.guess(Choice(name), levels, amortiser, torch.zeros((1, *shape), device=device))

    def guess(
        self, choice: Choice, levels: Sequence[Level], amortiser: Mapping[str, torch.Tensor], x: torch.Tensor
    ) -> list[torch.Tensor] | None:
        """The amortised start of a call the rule gave to a backend that builds programs, computed by
        onnxruntime (OrtGuess: the same bits alone and in a batch; faster than torch row by row) on a
        CPU in float32, for x at the size of `levels` (the caller has them); None elsewhere: the caller
        computes it in torch."""
        if choice.backend not in SPECS or not SPECS[choice.backend].builds:
            return None
        if x.device.type != "cpu" or x.dtype != torch.float32 or "onnxruntime" not in installed():
            return None
        return self.backend("onnxruntime").guess(levels, amortiser, params_key(amortiser), x)  # type: ignore[attr-defined]
