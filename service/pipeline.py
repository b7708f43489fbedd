"""One image through the worker: checked, decoded within the memory budget, settled by the shared batcher.

Every protocol the service speaks (/encode and /encode_batch, the Open Inference Protocol's REST and
gRPC routes) calls the same Pipeline, so their results are the same numbers for the same image and
options, their requests share the batcher's model calls, and each image counts once in the metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from . import metrics
from .batching import Settled
from .budget import Budget
from .errors import RequestError
from .forms import Part
from .health import ModelLoader, NotLoaded, every_worker_ready
from .host import ModelHost
from .inputs import Prepared, plan, prepare
from .options import EncodeOptions
from .responses import check_finite
from .settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class Decoded:
    """An image ready for the model, and whether it is small enough to handle on the event loop."""

    prepared: Prepared
    small: bool


class Pipeline:
    """The worker's model (loading on a thread), its settings and its decoding budget."""

    def __init__(self, settings: Settings, loader: ModelLoader[ModelHost], decoding: Budget) -> None:
        self.settings = settings
        self.loader = loader
        self.decoding = decoding

    @property
    def host(self) -> ModelHost:
        """The loaded model; raises NotLoaded (the load failed) or RequestError 503 `loading`."""
        if self.loader.error is not None:
            raise NotLoaded(f"the model failed to load: {self.loader.error}")
        if self.loader.value is None:
            # A worker starting or restarting behind a shared port: the client retries after Retry-After,
            # often on another worker, instead of waiting out the load.
            raise RequestError(503, "loading", "the model is still loading; retry in a few seconds")
        return self.loader.value

    @property
    def ready(self) -> bool:
        """/readyz: the model is loaded and warmed up, the batcher runs, and (under pc-serve) every other worker
        has loaded its model too."""
        return self.loader.value is not None and self.loader.value.batcher.alive and every_worker_ready()

    @property
    def alive(self) -> bool:
        """/livez: the load has not failed, and the batcher (once there is one) still runs."""
        return self.loader.error is None and (self.loader.value is None or self.loader.value.batcher.alive)

    async def decode(self, part: Part, options: EncodeOptions) -> Decoded:
        """Check the image from its header, then decode and preprocess it within the decoding budget."""
        config = self.host.config
        # The header is read right here (no pixel is decoded: a bomb costs nothing). A small image is then decoded
        # here too (well under a millisecond); a large one on a thread, so that it never stalls the other requests
        # on the event loop.
        planned = plan(part, options, config, self.settings)
        async with self.decoding.hold(planned.cost, "decoding this image"):  # bounds decode memory across requests
            prepared = await run(planned.small, prepare, planned, options, config)
        return Decoded(prepared, planned.small)

    async def settle(
        self, rows: torch.Tensor, options: EncodeOptions, start: list[torch.Tensor] | None = None
    ) -> Settled:
        """Rows (n, C, H, W) through the shared batcher with the options' steps, solver and start (or the
        given starting latents, one per level), as one encoded image (counted); NotFinite if it diverged."""
        settled = await self.host.infer(rows, options.steps, options.solver, options.init, start)
        check_finite(settled)
        metrics.IMAGES.inc()
        metrics.INFERENCE_ITERATIONS.observe(int(settled.steps.max()))
        metrics.FINAL_ENERGY.observe(float(settled.energy[-1].sum(dtype=torch.float64)))
        return settled


async def run(inline: bool, fn: Callable[..., T], *args: object) -> T:
    """fn(*args) here (inline) or on a thread."""
    return fn(*args) if inline else await asyncio.to_thread(fn, *args)
