"""The model inside the service: load, device, warm-up, batched inference, and the model card.

Inference only ever goes through `model.infer(x, steps=...)` with one step count per call and x on
the model's device, so whatever backend pcmodel picks (torch, onnxruntime, CUDA graphs) serves the
requests; the warm-up calls it at the default steps and at each PC_WARMUP_STEPS count, which is
where those backends export or capture, at the native size and (convolutional models) at full mode's
bucket sizes.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

import pcmodel
from pcmodel import SOLVERS, UnstableStepError
from pcmodel.config import has_whole_map_level
from pcmodel.engines import MAX_PREPARED_SHAPES
from pcmodel.images import FULL_BUCKETS, full_buckets, tile_stride

from . import metrics
from .batching import Batcher, Settled
from .errors import RequestError
from .options import ARRAYS, DEFAULT_OUTPUTS, INITS, OUTPUTS, SIZE_MODES
from .png import png_bytes
from .settings import Settings

logger = logging.getLogger(__name__)


def pick_device(setting: str) -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU. CUDA devices get their index."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if setting == "auto" else setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device needs an index
    return device


def default_threads(workers: int) -> int:
    """Intra-op threads per worker: its share of the cores, less one for its event loop (at least 1).

    The event loop decodes, encodes and answers while the model runs; on 2 cores, onnxruntime
    with 2 threads ran conv-rgb slower than with 1 (measured in docs/PERFORMANCE.md).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers - 1)


def model_source(setting: str) -> str:
    """What PC_MODEL names, without the server's directory layout (a name, or a file name)."""
    return setting if setting in pcmodel.shipped_models() else Path(setting).name


class ModelHost:
    """One loaded model and its batcher. Build it once per worker process."""

    def __init__(self, settings: Settings) -> None:
        started = time.perf_counter()
        self.settings = settings
        torch.set_num_threads(settings.torch_threads or default_threads(settings.workers))
        self.device = pick_device(settings.device)
        if self.device.type == "cuda":
            # Plain float32 on a GPU too: with TF32 (cuDNN's default for convolutions) the torch backend's
            # results drift ~3e-4 from the CPU's, beyond the 1e-4 that pcmodel's backends agree within.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.model = pcmodel.load(settings.model, allow_unstable=settings.allow_unstable).to(self.device)
        self.config = self.model.config
        self.sha256 = self.model.sha256
        self.preset = self.config.name if self.config.name in pcmodel.PRESETS else "custom"
        self.ref = {"name": self.config.name, "preset": self.preset, "sha256": self.sha256}
        self._basis_png: bytes | None = None
        # Full mode's padded sizes: with the native size, the shapes the fast backends prepare.
        assert FULL_BUCKETS + 1 <= MAX_PREPARED_SHAPES
        full = settings.full_max_side > 0 and not has_whole_map_level(self.config)
        self.buckets = full_buckets(self.config, settings.full_max_side) if full else []
        self.size_modes = [m for m in SIZE_MODES if m != "full" or full]
        self.full_bound: float | None = None  # the stability bound at the largest bucket, once checked
        self.inits = [i for i in INITS if i != "amortised" or self.model.has_amortiser]
        self.backends = self._warm_up()
        self.backend = self.backends[self.config.steps]
        self.batcher = Batcher(
            self._infer,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            wait_s=settings.batch_wait_ms / 1000,
            unit_pixels=self.config.input_shape[1] * self.config.input_shape[2],
            on_batch=_observe_batch,
            # The model runs on the batcher's own thread: give it the device's CUDA context up front.
            thread_init=(lambda: torch.cuda.set_device(self.device)) if self.device.type == "cuda" else None,
        )
        metrics.MODEL_INFO.labels(
            name=self.config.name,
            preset=self.preset,
            sha256=self.sha256,
            device=str(self.device),
            backend=self.backend,
        ).set(1)
        logger.info(
            "model %s (%s, sha256 %s) ready on %s with backend %s in %.1f s",
            self.config.name,
            self.preset,
            self.sha256[:12],
            self.device,
            self.backend,
            time.perf_counter() - started,
        )
        self._stability: threading.Thread | None = None
        if self.buckets:
            # Seconds of float64 work at 256x256 (docs/PERFORMANCE.md): checked beside the service, not before it.
            self._stability = threading.Thread(target=self._check_full_stability, name="pc-stability", daemon=True)
            self._stability.start()

    def _check_full_stability(self) -> None:
        """Warn when k1 is at or above the stability bound at full mode's largest bucket.

        The checkpoint's own check is at the native size; a convolutional model's bound falls a little
        with the input size (more positions couple), so a k1 close to it may diverge on large images.
        """
        shape = self.buckets[-1]
        try:
            bound = self.model.stability_bound(shape, method="lanczos")
        except Exception:  # a check, not a service: log it and go on
            logger.exception("the stability check at %dx%d failed", *shape)
            return
        self.full_bound = bound
        if self.config.k1 >= bound:
            logger.warning(
                "k1 = %g is at or above the stability bound %.4g at full mode's largest size %dx%d: full-mode "
                "requests may diverge (500 not_finite); lower PC_FULL_MAX_SIDE or serve a smaller k1",
                self.config.k1,
                bound,
                *shape,
            )
        else:
            logger.info("stability bound at %dx%d: %.4g (k1 = %g)", *shape, bound, self.config.k1)

    def _warm_up(self) -> dict[int, str]:
        """Run every warmed step count at every batch-size bucket; returns the backend each count ran on.

        This is where pcmodel's fast backends export (onnxruntime) or capture (CUDA graphs) their
        programs. Only these step counts get one: other counts run on the torch backend, so a client
        asking for an unusual step count never triggers an export or a capture mid-service.
        """
        warmed = sorted({self.config.steps, *self.settings.warmup_steps})
        c, h, w = self.config.input_shape
        # The model's own dynamics and the paper's (solver=gradient), each with its fast programs.
        solvers = list(dict.fromkeys([self.model.solver(), self.model.solver("gradient")]))
        shapes = [(h, w), *[b for b in self.buckets if b != (h, w)]]
        self.model.prepare(steps=warmed, shapes=shapes, solvers=solvers)
        sizes = sorted({min(2**k, self.settings.max_batch_size) for k in range(11)})  # 1, 2, 4, ... max
        generator = torch.Generator().manual_seed(0)
        lo, hi = self.config.preprocess.value_range
        x = (torch.rand((sizes[-1], c, h, w), generator=generator) * (hi - lo) + lo).to(self.device)
        backends = {}
        for steps, solver in itertools.product(warmed, solvers):
            for size in sizes:
                result = self.model.infer(x[:size], steps=steps, solver=solver)
            if not torch.isfinite(result.energy).all():
                logger.warning(
                    "warm-up at %d steps produced NaN/Inf: this model diverges (PC_ALLOW_UNSTABLE=%s); "
                    "requests will get an error instead of results",
                    steps,
                    self.settings.allow_unstable,
                )
            backends.setdefault(steps, result.backend)
            for bh, bw in self.buckets:  # one image per bucket: full-mode rows are large, batches small
                self.model.infer(x[:1, :, :1, :1].expand(1, c, bh, bw).contiguous(), steps=steps, solver=solver)
        return backends

    def _infer(
        self,
        x: torch.Tensor,
        steps: int,
        how: tuple[str | None, str | None] | None = None,
        start: list[torch.Tensor] | None = None,
    ) -> Settled:
        """Runs on the batcher's thread: one model call, results moved to the CPU. `how`: (solver, init);
        `start`: given starting latents (init "given")."""
        solver, init = how or (None, None)
        result = self.model.infer(x, steps=steps, solver=solver, init=start if start is not None else init)
        return Settled(
            latents=[r.to("cpu") for r in result.latents],
            errors=[e.to("cpu") for e in result.errors],
            reconstruction=result.reconstruction.to("cpu"),
            energy=result.energy.to("cpu"),
            steps=result.steps.to("cpu"),
            backend=result.backend,
        )

    async def infer(
        self,
        rows: torch.Tensor,
        steps: int,
        solver: str | None = None,
        init: str | None = None,
        start: list[torch.Tensor] | None = None,
    ) -> Settled:
        """Settle the latents of rows (n, C, H, W) for `steps` steps, batched with other requests that ask
        for the same steps, solver and start (None: the model's own); `start`: the rows' own starting
        latents (a warm start, one tensor per level shaped like the rows' latents)."""
        self.check_dynamics(solver, init)
        if start is not None:
            expected = [(rows.shape[0], *s) for s in self.model.latent_shapes(tuple(rows.shape[-2:]))]
            got = [tuple(t.shape) for t in start]
            if got != expected:
                raise RequestError(
                    422, "bad_parameter", f"`start` has latents shaped {got}; this image's are {expected}"
                )
            start = [t.to(self.device) for t in start]
            return await self.batcher.submit(rows.to(self.device), steps, (solver, "given"), start)
        return await self.batcher.submit(rows.to(self.device), steps, (solver, init))

    def check_dynamics(self, solver: str | None, init: str | None) -> None:
        """A 422 for a solver this model's step size makes unstable, or a start it does not have."""
        try:
            self.model.solver(solver)
        except (ValueError, UnstableStepError) as exc:
            raise RequestError(422, "bad_parameter", f"solver={solver}: {exc}") from None
        if init == "amortised" and not self.model.has_amortiser:
            raise RequestError(
                422, "bad_parameter", f"init=amortised: {self.config.name} has no amortised start (use init=zero)"
            )

    def dynamics(self, solver: str | None, init: str | None) -> dict:
        """Which solver and start a request ran with (its options resolved against the model's own)."""
        start = init or {"zeros": "zero"}.get(self.config.initial_latents, self.config.initial_latents)
        start = "given" if init == "given" else start
        return {"solver": self.model.solver(solver).label, "init": start}

    def card(self) -> dict:
        """GET /model: what this service runs and accepts."""
        s = self.settings
        return {
            "name": self.config.name,
            "preset": self.preset,
            "source": model_source(s.model),
            "sha256": self.sha256,
            "device": str(self.device),
            "backend": self.backend,
            "backends": {str(k): v for k, v in sorted(self.backends.items())},
            "steps": {"default": self.config.steps, "max": s.max_steps, "warmed": sorted(self.backends)},
            "input": {
                "native_shape": list(self.config.input_shape),
                "size_mode": {"default": self.config.preprocess.size_mode, "choices": self.size_modes},
                "definition": (
                    "input is the image as the model saw it after preprocessing (resized to the native size, "
                    "covered with overlapping native-size tiles blended back, or scaled to at most full.max_side), "
                    "so input - reconstruction = error_map"
                ),
                "tile_stride": list(tile_stride(self.config)),
                "full": {
                    "max_side": s.full_max_side if self.buckets else 0,
                    "buckets": [list(b) for b in self.buckets],
                    "stability_bound": self.full_bound,
                },
            },
            "solver": {"default": self.model.solver().label, "choices": list(SOLVERS)},
            "init": {"default": self.dynamics(None, None)["init"], "choices": self.inits},
            "outputs": {"default": list(DEFAULT_OUTPUTS), "choices": list(OUTPUTS)},
            "arrays": {"default": "float32", "choices": list(ARRAYS)},
            "limits": {
                "max_body_bytes": s.max_body_bytes,
                "max_pixels": s.max_pixels,
                "min_side": s.min_side,
                "max_tiles": s.tile_limit,
                "max_batch_images": s.max_batch_images,
                "max_image_bytes": s.max_image_bytes,
                "max_inflight_bytes": s.inflight_bytes,
                "max_decoding_bytes": s.decoding_bytes,
            },
            "batching": {"max_batch_size": s.max_batch_size, "wait_ms": s.batch_wait_ms, "max_queue": s.max_queue},
            "config": self.config.to_dict(),
            "provenance": self.model.provenance,
        }

    def basis_png(self) -> bytes:
        """GET /model/basis: the level-1 receptive fields as one PNG grid (see basis_grid), made once."""
        if self._basis_png is None:
            self._basis_png = png_bytes(basis_grid(self.model.receptive_fields(1).to("cpu", torch.float32)))
        return self._basis_png

    def close(self) -> None:
        self.batcher.close()
        # The stability check runs in torch's C++ threads: a process that exits under it aborts ("terminate
        # called without an active exception", exit 134), so a closing host waits for it (about a second).
        if self._stability is not None:
            self._stability.join(timeout=60)


def basis_grid(fields: torch.Tensor, gap: int = 1) -> np.ndarray:
    """Fields (N, C, h, w) as one uint8 picture, (H, W) gray or (H, W, 3) RGB: each field on its own
    symmetric scale (zero at mid-grey, its largest magnitude at black or white, as in
    training/figures.py), in a near-square grid with `gap` white pixels between fields. At the
    fields' own size: the page enlarges it without smoothing."""
    n, c, h, w = fields.shape
    peak = fields.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    pixels = ((fields / peak + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    columns = math.ceil(math.sqrt(n * h / w))  # about as wide as tall
    rows = math.ceil(n / columns)
    sheet = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, c), 255, dtype=np.uint8)
    for i in range(n):
        top, left = (i // columns) * (h + gap), (i % columns) * (w + gap)
        sheet[top : top + h, left : left + w] = pixels[i]
    return sheet[:, :, 0] if c == 1 else sheet


def _observe_batch(rows: int, seconds: float) -> None:
    metrics.BATCH_SIZE.observe(rows)
    metrics.INFERENCE_DURATION.observe(seconds)
