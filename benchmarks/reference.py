"""The notebook's way: eager PyTorch, the energy built and differentiated with autograd at every step.

This is case (a) of pc-bench, the baseline every fast path is measured against, written the way a
research notebook writes predictive-coding inference: build E(x, r) from the configuration with
ordinary layers, call backward, step r against the gradient, repeat. It is kept deliberately plain
and is NEVER optimised: its job is to be obviously the mathematics of docs/MODEL.md section 1,

    E = sum_l (1/sigma_l^2) ||t_l(r_{l-1}) - f(U_l r_l)||^2 + sum_l g_l(r_l) + sum_l lam_l ||U_l||^2,
    r_l <- r_l - (k1 k1_scale_l / 2) dE/dr_l   (all levels from the same state),

independently of pcmodel's hand-derived updates (it imports nothing from pcmodel.levels or model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pcmodel.config import ModelConfig, level_shapes


def _window(kernel: tuple[int, int], sigma: float, channels: int, dtype: torch.dtype) -> torch.Tensor:
    ys = torch.arange(kernel[0], dtype=torch.float64) - (kernel[0] - 1) / 2
    xs = torch.arange(kernel[1], dtype=torch.float64) - (kernel[1] - 1) / 2
    w = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))
    return w.flatten().repeat(channels).to(dtype).reshape(1, -1, 1)  # unfold order: channel-major


# Each prior's g(r) / alpha per entry, written here again on purpose: the oracle shares no code with pcmodel.
PRIOR_TERMS = {
    "gaussian": lambda r: r**2,
    "cauchy": lambda r: torch.log(1 + r**2),
    "smooth-laplace": lambda r: torch.sqrt(1 + r**2) - 1,
}


def reference_energy(
    config: ModelConfig, weights: Sequence[torch.Tensor], x: torch.Tensor, latents: Sequence[torch.Tensor]
) -> torch.Tensor:
    """E per image (B,), built the plain way: predictions, errors, priors and weight decay."""
    shapes = level_shapes(config, tuple(x.shape[-2:]))
    energy = torch.zeros(x.shape[0], dtype=x.dtype)
    lower = x
    for lc, geometry, U, r in zip(config.levels, shapes, weights, latents):
        if lc.kind == "convolutional":
            target = lower
            a = F.conv_transpose2d(r, U, stride=geometry.stride)
        else:  # modules and dense: each module predicts its own (windowed) patch with the shared U
            target = F.unfold(lower, geometry.kernel, stride=geometry.stride)
            if lc.window_sigma is not None:
                target = target * _window(geometry.kernel, lc.window_sigma, geometry.lower[0], x.dtype)
            a = U.reshape(U.shape[0], -1).T @ r.flatten(2)
        prediction = torch.tanh(a) if lc.f == "tanh" else a
        energy = energy + ((target - prediction) ** 2).flatten(1).sum(1) / lc.sigma2
        if lc.prior not in PRIOR_TERMS:
            raise ValueError(f"the reference has no prior {lc.prior!r}; it knows {', '.join(PRIOR_TERMS)}")
        energy = energy + lc.alpha * PRIOR_TERMS[lc.prior](r).flatten(1).sum(1)
        energy = energy + lc.lam * (U**2).sum()
        lower = r
    return energy


def reference_infer(
    config: ModelConfig,
    weights: Sequence[torch.Tensor],
    x: torch.Tensor,
    steps: int,
    init: Sequence[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`steps` autograd gradient steps from `init` (one tensor per level) or the config's initial latents;
    returns (latents, energy (steps+1, B))."""
    shapes = level_shapes(config, tuple(x.shape[-2:]))
    weights = [U.detach().to(x.dtype) for U in weights]
    latents = [] if init is None else [r.detach().to(x.dtype) for r in init]
    lower = x
    for lc, geometry, U in zip(config.levels, shapes, weights) if init is None else ():
        if config.initial_latents == "zeros":
            r = torch.zeros((x.shape[0], *geometry.latent), dtype=x.dtype)
        elif lc.kind == "convolutional":
            r = F.conv2d(lower, U, stride=geometry.stride)
        else:
            patches = F.unfold(lower, geometry.kernel, stride=geometry.stride)
            if lc.window_sigma is not None:
                patches = patches * _window(geometry.kernel, lc.window_sigma, geometry.lower[0], x.dtype)
            r = (U.reshape(U.shape[0], -1) @ patches).reshape(x.shape[0], *geometry.latent)
        latents.append(r)
        lower = r
    rates = [config.k1 * lc.k1_scale / 2 for lc in config.levels]  # each level's own step (MODEL.md section 2)
    trace = []
    for step in range(steps + 1):
        latents = [r.detach().requires_grad_(True) for r in latents]
        with torch.enable_grad():  # autograd even where the caller turned it off
            energy = reference_energy(config, weights, x, latents)
            if step < steps:
                energy.sum().backward()
        trace.append(energy.detach())
        if step == steps:
            break
        with torch.no_grad():
            latents = [r - rate * r.grad for r, rate in zip(latents, rates)]
    return [r.detach() for r in latents], torch.stack(trace)
