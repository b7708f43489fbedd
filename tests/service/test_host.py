"""The host and its batcher in-process, on real models: grouping by (steps, shape), splitting, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import pcmodel
from service.batching import Batcher, Overloaded
from service.errors import RequestError
from service.forms import Part
from service.host import ModelHost
from service.inputs import plan, prepare
from service.options import parse_options
from service.responses import encode_result
from service.settings import Settings

# The service may run another backend or batch size than the local reference: pcmodel promises
# agreement within 1e-4 between its backends in float32.
TOL = 1e-4


@pytest.fixture(scope="module")
def host() -> Iterator[ModelHost]:
    host = ModelHost(Settings(max_batch_size=3, warmup_steps=(5,)))
    yield host
    host.close()  # waits for its stability check: a process exiting under it aborts


def rows(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_batches_group_by_steps_solver_and_shape_and_split_large_jobs(host):
    calls: list[tuple[int, int, object, tuple[int, ...]]] = []

    def recording_infer(x, steps, how, start):
        calls.append((x.shape[0], steps, how, tuple(x.shape[2:])))
        return host._infer(x, steps, how, start)

    plain, fast = (None, None), ("nesterov", None)
    jobs = [(rows(1, seed=1), 5, plain), (rows(1, seed=2), 10, plain), (rows(3, seed=3), 5, plain)]
    jobs += [(rows(1, seed=5), 5, fast), (rows(1, 40, seed=4), 5, plain), (rows(1, seed=6), 5, fast)]
    jobs = [(x.to(host.device), steps, how) for x, steps, how in jobs]

    async def run():
        batcher = Batcher(recording_infer, max_batch_size=3, max_queue=100)
        try:
            return await asyncio.gather(*(batcher.submit(x, steps, how) for x, steps, how in jobs))
        finally:
            batcher.close()

    results = asyncio.run(run())
    # Oldest job first; rows of the same key (steps, solver and start, shape) join it up to 3; the 3-row job
    # is split over two calls.
    assert calls == [
        (3, 5, plain, (32, 32)),
        (1, 10, plain, (32, 32)),
        (1, 5, plain, (32, 32)),
        (2, 5, fast, (32, 32)),
        (1, 5, plain, (40, 40)),
    ]
    for (x, steps, (solver, init)), got in zip(jobs, results):
        want = host.model.infer(x, steps=steps, solver=solver, init=init)
        assert got.steps.tolist() == [steps] * x.shape[0]
        assert got.energy.shape == (steps + 1, x.shape[0])
        for a, b in zip(got.latents, want.latents):
            torch.testing.assert_close(a, b.cpu(), atol=TOL, rtol=TOL)
        torch.testing.assert_close(got.reconstruction, want.reconstruction.cpu(), atol=TOL, rtol=TOL)


def test_a_lone_job_gets_the_bits_it_gets_in_a_shared_batch(host):
    """A job alone in its model call goes in and comes back whole (no copy, no slices); the same rows sharing a
    call with another job, with and without given starts, give the same bits."""
    x, other = rows(2, seed=7).to(host.device), rows(1, seed=8).to(host.device)
    start = [r.to(host.device) for r in host.model.infer(x, steps=3).latents]
    other_start = [r[:1].clone() for r in start]
    given = ("nesterov", "given")
    sizes: list[int] = []

    def recording_infer(x, steps, how, start):
        sizes.append(x.shape[0])
        return host._infer(x, steps, how, start)

    async def run():
        batcher = Batcher(recording_infer, max_batch_size=3, max_queue=100)
        try:
            alone = [await batcher.submit(x, 5), await batcher.submit(x, 5, given, start)]
            # Queued together: each of x's calls also carries the other job's row.
            shared = await asyncio.gather(
                batcher.submit(other, 5),
                batcher.submit(x, 5),
                batcher.submit(other, 5, given, other_start),
                batcher.submit(x, 5, given, start),
            )
            return alone, [shared[1], shared[3]]
        finally:
            batcher.close()

    alone, shared = asyncio.run(run())
    assert sizes == [2, 2, 3, 3]
    for a, b in zip(alone, shared):
        assert all(torch.equal(u, v) for u, v in zip(a.latents, b.latents))
        assert all(torch.equal(u, v) for u, v in zip(a.errors, b.errors))
        assert torch.equal(a.reconstruction, b.reconstruction) and torch.equal(a.energy, b.energy)


def test_a_failing_batch_fails_only_its_own_jobs(host):
    async def run():
        batcher = Batcher(host._infer, max_batch_size=8, max_queue=100)
        try:
            bad = torch.zeros((1, 1, 32, 32))  # one channel: the model refuses it
            return await asyncio.gather(batcher.submit(bad, 5), batcher.submit(rows(1), 5), return_exceptions=True)
        finally:
            batcher.close()

    failed, good = asyncio.run(run())
    assert isinstance(failed, ValueError) and "channel" in str(failed)
    assert good.latents[0].shape == (1, 8, 7, 7)


def test_a_full_queue_is_refused(host):
    async def run():
        batcher = Batcher(host._infer, max_batch_size=2, max_queue=4)
        try:
            first = asyncio.ensure_future(batcher.submit(rows(2), 50))
            await asyncio.sleep(0.001)
            while batcher.queued:  # until the first batch is running
                await asyncio.sleep(0.001)
            queued = [asyncio.ensure_future(batcher.submit(rows(2), 50)) for _ in range(2)]
            while batcher.queued < 4:
                await asyncio.sleep(0)
            with pytest.raises(Overloaded, match="queue is full"):
                await batcher.submit(rows(1), 50)
            await asyncio.gather(first, *queued)
        finally:
            batcher.close()

    asyncio.run(run())


def test_the_queue_counts_pixels_in_native_sizes(host):
    async def run():
        batcher = Batcher(host._infer, max_batch_size=2, max_queue=8, unit_pixels=32 * 32)
        try:
            first = asyncio.ensure_future(batcher.submit(rows(1), 50))
            await asyncio.sleep(0.001)
            while batcher.queued:  # until the first batch is running
                await asyncio.sleep(0.001)
            # A 64x64 row costs four 32x32 rows: two of them fill a queue of 8.
            queued = [asyncio.ensure_future(batcher.submit(rows(1, 64), 50)) for _ in range(2)]
            while batcher.queued_units < 8:
                await asyncio.sleep(0)
            assert batcher.queued == 2
            with pytest.raises(Overloaded, match="8 of 8 native-size units"):
                await batcher.submit(rows(1), 50)
            await asyncio.gather(first, *queued)
        finally:
            batcher.close()

    asyncio.run(run())


def test_full_mode_and_arrays_options_are_checked(host):
    dense = pcmodel.get_preset("rao-ballard-1999")
    with pytest.raises(RequestError, match="dense level") as refused:
        parse_options({"size_mode": "full"}, dense, host.settings)
    assert refused.value.status == 422
    with pytest.raises(RequestError, match="arrays must be one of float32, float16, none"):
        parse_options({"arrays": "float64"}, host.config, host.settings)
    options = parse_options({"size_mode": "full", "arrays": "none"}, host.config, host.settings)
    assert (options.size_mode, options.arrays, options.full_max_side) == ("full", "none", 256)
    # The host prepared the native size and full mode's three buckets: the model's four shapes.
    assert host.buckets == [(88, 88), (176, 176), (256, 256)]


def test_only_warmed_step_counts_get_fast_programs(host):
    served = host.config.steps
    assert host.card()["steps"]["warmed"] == sorted({5, served})

    async def run(counts):
        return [(await host.infer(rows(2), steps)).backend for steps in counts]

    backends = asyncio.run(run([served, 5, 7, 8, 9, 11]))
    assert backends[:2] == [host.backends[served], host.backends[5]]
    # A client's unusual step counts never prepare a program of their own: they run on the torch backend.
    assert backends[2:] == ["torch"] * 4
    assert {key[0] for key in host.model.engines.backend("onnxruntime").programs} == {5, served}


@pytest.mark.slow
def test_rao_ballard_tiles_by_default():
    host = ModelHost(Settings(model="rao-ballard-1999", max_batch_size=4))
    config = host.config
    assert config.preprocess.size_mode == "tile"
    options = parse_options({"steps": "20"}, config, host.settings)
    image = (np.random.default_rng(0).random((40, 60)) * 255).astype(np.uint8)
    part = Part("image", "x.png", _png(image))
    prepared = prepare(plan(part, options, config, host.settings), options, config)
    # 16x26 tiles every 8x13 px from (-8, -13) until 8x13 px past the image: (1 + ceil(40/8)) x (1 + ceil(60/13))
    assert prepared.rows.shape == (6 * 6, 1, 16, 26)

    async def run():
        try:
            return await host.infer(prepared.rows, options.steps)
        finally:
            host.close()

    settled = asyncio.run(run())
    out = encode_result(prepared, settled, options, host.ref, config)
    assert out["tile_grid"] == {
        "rows": 6,
        "cols": 6,
        "tile": [16, 26],
        "stride": [8, 13],
        "origin": [-8, -13],
        "image": [40, 60],
    }
    from service.client import decode_array

    # Level 1 is three windowed modules per tile, level 2 one dense module: a leading tile axis.
    assert [a["shape"] for a in out["latents"]] == [[36, 32, 1, 3], [36, 128, 1, 1]]
    shown, recon, error = (decode_array(out[k]["array"]) for k in ("input", "reconstruction", "error_map"))
    assert shown.shape == recon.shape == error.shape == (1, 40, 60)
    np.testing.assert_array_equal(shown - recon, error)
    assert out["energy"]["final"] < out["energy"]["initial"]
    assert out["model"] == {"name": "rao-ballard-1999", "preset": "rao-ballard-1999", "sha256": host.sha256}
    assert pcmodel.load("rao-ballard-1999").sha256 == host.sha256


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_model_without_an_amortised_start_refuses_init_amortised(host):
    from service.errors import RequestError

    saved = host.model
    host.model = saved.with_dynamics(init="zero")  # a model that starts from zero, then without an amortiser
    host.model.amortiser = None
    try:
        with pytest.raises(RequestError) as refused:
            host.check_dynamics(None, "amortised")
        assert refused.value.status == 422 and refused.value.reason == "bad_parameter"
        assert "amortised" in refused.value.message
    finally:
        host.model = saved
    host.check_dynamics(None, "amortised")  # with it back, accepted


def test_one_requests_bad_start_fails_only_that_request_in_a_shared_batch(host):
    """A start the model refuses (Inf) shares a batch with good ones: the batch is run again per request, and
    the good requests get what they get alone."""
    shapes = host.model.latent_shapes((32, 32))
    good_starts = [
        [torch.randn(1, *s, generator=torch.Generator().manual_seed(i)) * 0.1 for s in shapes] for i in (1, 2)
    ]
    bad_start = [torch.full((1, *s), float("inf")) for s in shapes]
    how = (None, "given")

    async def run():
        batcher = Batcher(host._infer, max_batch_size=8, max_queue=100)
        try:
            alone = [await batcher.submit(rows(1, seed=i), 5, how, good_starts[i]) for i in (0, 1)]
            together = await asyncio.gather(
                batcher.submit(rows(1, seed=0), 5, how, good_starts[0]),
                batcher.submit(rows(1, seed=9), 5, how, bad_start),
                batcher.submit(rows(1, seed=1), 5, how, good_starts[1]),
                return_exceptions=True,
            )
            return alone, together
        finally:
            batcher.close()

    alone, (first, failed, second) = asyncio.run(run())
    assert isinstance(failed, ValueError) and "NaN or Inf" in str(failed)
    for got, want in zip((first, second), alone):
        assert not isinstance(got, BaseException), got
        assert torch.equal(got.latents[0], want.latents[0]) and torch.equal(got.energy, want.energy)
