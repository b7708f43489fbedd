"""pc-bench case (e): the paper's two-level networks written in pcx 0.6.3's idioms.

pcx pins an old JAX (jax<0.5, equinox<0.12), so it lives in its own virtual environment (the `pcx`
extra, docs/PERFORMANCE.md); where it is not importable the case is skipped with a log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

import pcmodel

log = logging.getLogger(__name__)


def pcx_inference(
    model: pcmodel.PCModel, x: torch.Tensor, steps: int
) -> tuple[Callable[[], list[torch.Tensor]], float, str] | None:
    """Case (e), as (call() -> latents, first-call seconds, note), or None where pcx cannot run it.

    The same network in pcx 0.6.3's idioms (Vodes, energy functions, optax SGD on h, scan, jit).

    Written as pcx's own decoder example writes a generative network: per-sample model code vmapped over
    the batch, zero-initialised Vodes through the STATUS.INIT rule, the observation Vode frozen at x, and
    `optax.sgd(k1/2)` on the Vodes' values so that h <- h - (k1/2) dE/dh, the same step as every backend.
    """
    try:
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax
        import pcx as px
        import pcx.functional as pxf
        import pcx.nn as pxnn
        import pcx.predictive_coding as pxc
        import pcx.utils as pxu
    except ImportError as exc:
        log.info("pcx: not importable (%s); install the optional extra: pip install -e '.[pcx]'", exc)
        return None
    config = model.config
    levels = model.levels(x.shape[-2:])
    kinds = [lc.kind for lc in config.levels]
    if any(lc.k1_scale != 1 for lc in config.levels):
        # pcx's idiom is one optax optimiser over every Vode: one step size for all levels.
        log.info(
            "pcx: the model steps each level at its own rate (k1_scale), which pcx's one optimiser cannot; skipped"
        )
        return None
    if len(kinds) != 2 or kinds not in (["convolutional", "convolutional"], ["modules", "dense"]):
        log.info("pcx: case (e) is written for the two presets' shapes, not %s", kinds)
        return None
    l1, l2 = config.levels
    (lat1, lat2) = [lv.geometry.latent for lv in levels]

    def energy_fn(inv_sigma2: float | None, prior: str | None, alpha: float) -> Callable:
        def fn(vode: Any, rkg: Any = None) -> Any:  # per element; pcx sums it per sample
            h = vode.get("h")
            out = 0.0
            if inv_sigma2 is not None:
                e = h - vode.get("u")
                out = inv_sigma2 * e * e
            if alpha:
                out = out + alpha * (h * h if prior == "gaussian" else jnp.log1p(h * h))
            return out

        return fn

    def zero_init(shape: tuple[int, ...]) -> dict[str, Any]:
        return {
            "ruleset": {pxc.STATUS.INIT: ("h, u <- u:to_zero",)},
            "tforms": {"to_zero": lambda n, k, v, rkg: jnp.zeros(shape)},
        }

    U1, U2 = (w.detach().cpu().numpy() for w in model.weights)

    class Network(pxc.EnergyModule):
        def __init__(self) -> None:
            super().__init__()
            key = jax.random.PRNGKey(0)
            if kinds[0] == "convolutional":
                # pcx 0.6.3's pxnn.ConvTranspose passes rkg= on to equinox (TypeError); pxnn.Layer wraps
                # equinox's layer the same way. Equinox takes the kernel (out, in, kh, kw), flipped.
                self.up2 = pxnn.Layer(
                    eqx.nn.ConvTranspose, 2, l2.causes, l1.causes, l2.kernel, l2.stride, use_bias=False, key=key
                )
                self.up1 = pxnn.Layer(
                    eqx.nn.ConvTranspose, 2, l1.causes, x.shape[1], l1.kernel, l1.stride,
                    use_bias=False, key=key,
                )  # fmt: skip
                self.up2.nn.weight.set(jnp.asarray(np.ascontiguousarray(U2.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])))
                self.up1.nn.weight.set(jnp.asarray(np.ascontiguousarray(U1.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])))
                mid_shape: tuple[int, ...] = lat1
                top_shape: tuple[int, ...] = lat2
            else:  # modules sharing U_1 (one Linear applied per module), a dense level 2 over all causes
                modules = lat1[1] * lat1[2]
                self.up2 = pxnn.Linear(l2.causes, l1.causes * modules, bias=False, rkg=px.RandomKeyGenerator(0))
                self.up1 = pxnn.Linear(l1.causes, U1[0].size, bias=False, rkg=px.RandomKeyGenerator(0))
                self.up2.nn.weight.set(jnp.asarray(U2.reshape(l2.causes, -1).T))
                self.up1.nn.weight.set(jnp.asarray(U1.reshape(l1.causes, -1).T))
                mid_shape, top_shape = (l1.causes * modules,), (l2.causes,)
            f1 = jnp.tanh if l1.f == "tanh" else (lambda a: a)
            f2 = jnp.tanh if l2.f == "tanh" else (lambda a: a)
            self.f = px.static((f1, f2))
            self.top = pxc.Vode(energy_fn=energy_fn(None, l2.prior, l2.alpha), **zero_init(top_shape))
            self.mid = pxc.Vode(energy_fn=energy_fn(1 / l2.sigma2, l1.prior, l1.alpha), **zero_init(mid_shape))
            self.obs = pxc.Vode(energy_fn=energy_fn(1 / l1.sigma2, None, 0.0))
            self.obs.h.frozen = True
            self.shapes = px.static((top_shape, lat1))

        def __call__(self, observation: Any) -> Any:
            (top_shape, lat1_shape), (f1, f2) = self.shapes.get(), self.f.get()
            r2 = self.top(jnp.zeros(top_shape))  # u's shape tells pcx the call is per sample
            r1 = self.mid(f2(self.up2(r2)))
            if kinds[0] == "convolutional":
                self.obs(f1(self.up1(r1)))
            else:  # each module predicts its own windowed patch
                self.obs(f1(jax.vmap(self.up1)(r1.reshape(lat1_shape[0], -1).T)))
            if observation is not None:
                self.obs.set("h", observation)
            return self.obs.get("u")

    per_sample = pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0))

    @pxf.vmap(per_sample, in_axes=0, out_axes=0)
    def forward(observation: Any, *, model: Network) -> Any:
        return model(observation)

    @pxf.vmap(per_sample, out_axes=(None, 0), axis_name="batch")
    def energy(*, model: Network) -> Any:
        y = model(None)
        return jax.lax.psum(model.energy(), "batch"), y

    @pxf.jit(static_argnums=0)
    def infer(T: int, observation: Any, *, model: Network, optim_h: Any) -> Any:
        grad = pxf.value_and_grad(pxu.M_hasnot(pxc.VodeParam, frozen=True).to([False, True]), has_aux=True)(energy)
        with pxu.step(model, (pxc.STATUS.INIT, pxc.STATUS.NONE), clear_params=pxc.VodeParam.Cache):
            forward(observation, model=model)
        optim_h.init(pxu.M_hasnot(pxc.VodeParam, frozen=True)(model))

        def body(_: Any, *, model: Network, optim_h: Any) -> Any:
            with pxu.step(model, clear_params=pxc.VodeParam.Cache):
                _, g = grad(model=model)
            optim_h.step(model, g["model"])
            return (), None

        pxf.scan(body, length=T)(model=model, optim_h=optim_h)
        optim_h.clear()
        return model.mid.h.get(), model.top.h.get()

    if kinds[0] == "convolutional":
        observation = jnp.asarray(x.numpy())
    else:  # the windowed patches are the observation, as a pcx user would prepare the data
        observation = jnp.asarray(levels[0].target(x).transpose(1, 2).contiguous().numpy())
    network = Network()
    optim_h = pxu.Optim(lambda: optax.sgd(config.k1 / 2))

    def call() -> list[torch.Tensor]:
        r1, r2 = infer(steps, observation, model=network, optim_h=optim_h)
        r1.block_until_ready()
        batch = x.shape[0]
        return [
            torch.from_numpy(np.array(r1)).reshape(batch, *lat1),
            torch.from_numpy(np.array(r2)).reshape(batch, *lat2),
        ]

    start = time.perf_counter()
    call()
    return call, time.perf_counter() - start, "jax " + jax.__version__
