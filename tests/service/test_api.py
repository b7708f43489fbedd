"""The API against a real server: shapes, exact arrays, energies, steps, tiles, batches, the model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import pcmodel
from pcmodel.images import decode, display_maps, prepare_image, preprocess, tile
from service.client import EncoderClient, ServiceError, decode_array
from service.host import pick_device
from service.metrics import REASONS

from .conftest import metric, png

# The service may run another backend or batch size than the local reference: pcmodel promises
# agreement within 1e-4 between its backends in float32.
TOL = 1e-4
MAPS = ("input", "reconstruction", "error_map")


@pytest.fixture(scope="module")
def client(server):
    with EncoderClient(server.url) as c:
        yield c


def test_encode_resize_returns_consistent_arrays(client, astronaut64):
    result = client.encode(astronaut64, size_mode="resize")
    model = pcmodel.load("default")
    assert result.model == {"name": "conv-rgb", "preset": "conv-rgb", "sha256": model.sha256}
    assert result.steps == model.config.steps
    assert result.size_mode == "resize"
    assert [r.shape for r in result.latents] == [(8, 7, 7), (10, 3, 3)]
    for name in ("input", "reconstruction", "error_map"):
        assert getattr(result, name).shape == (3, 32, 32) and getattr(result, name).dtype == np.float32
        assert result.images[name].size == (32, 32) and result.images[name].mode == "RGB"
    np.testing.assert_array_equal(result.input - result.reconstruction, result.error_map)  # exactly
    # The PNGs show the arrays as pcmodel displays them.
    pictures = display_maps(
        *(torch.from_numpy(getattr(result, n)) for n in MAPS), pcmodel.get_preset("conv-rgb").preprocess
    )
    for name, picture in zip(MAPS, pictures):
        np.testing.assert_array_equal(np.asarray(result.images[name]), np.asarray(picture))
    assert result.energy_final < result.energy_initial
    assert result.energy_trace is None  # not asked for
    assert set(result.timing) == {"queue", "model", "total"}  # Server-Timing, in ms
    assert 0 < result.timing["model"] <= result.timing["total"]

    # `input` is the image as the model saw it: pcmodel's own preprocessing of the same bytes.
    expected = preprocess([decode(astronaut64)], model.config, size=(32, 32))[0].numpy()
    np.testing.assert_array_equal(result.input, expected)
    # And the service's numbers are the model's numbers.
    local = model.infer(preprocess([decode(astronaut64)], model.config, size=(32, 32)))
    np.testing.assert_allclose(result.reconstruction, local.reconstruction[0].numpy(), atol=TOL)
    np.testing.assert_allclose(result.latents[1], local.latents[1][0].numpy(), atol=TOL)
    assert result.energy_final == pytest.approx(float(local.energy[-1, 0]), rel=TOL)


@pytest.mark.parametrize("steps", [1, 20, 250])
def test_steps_are_honoured(client, astronaut64, steps):
    result = client.encode(astronaut64, steps=steps, outputs=["trace"])
    assert result.steps == steps
    assert result.energy_trace.shape == (steps + 1,)
    assert result.energy_trace[0] == pytest.approx(result.energy_initial)
    assert result.energy_trace[-1] == pytest.approx(result.energy_final)
    # Each step lowers the energy (k1 is below the stability bound), up to float32 rounding near convergence.
    assert np.all(np.diff(result.energy_trace) <= 1e-6 * abs(result.energy_trace[0]))
    assert result.energy_final < result.energy_initial
    assert result.latents == [] and result.input is None  # only what `outputs` asked for


def test_tile_mode_covers_the_whole_image(client, china_jpeg):
    result = client.encode(china_jpeg, size_mode="tile", steps=30)
    assert result.size_mode == "tile"
    # 96x64 (w x h) in 32x32 tiles every 16 px from (-16, -16) until 16 px past the image: per axis
    # 1 + side / 16 tiles, row-major.
    assert result.tile_grid == {
        "rows": 5,
        "cols": 7,
        "tile": [32, 32],
        "stride": [16, 16],
        "origin": [-16, -16],
        "image": [64, 96],
    }
    assert [r.shape for r in result.latents] == [(35, 8, 7, 7), (35, 10, 3, 3)]
    for name in ("input", "reconstruction", "error_map"):
        assert getattr(result, name).shape == (3, 64, 96)
        assert result.images[name].size == (96, 64)
    np.testing.assert_array_equal(result.input - result.reconstruction, result.error_map)
    assert result.energy_final < result.energy_initial

    model = pcmodel.load("default")
    x = preprocess([decode(china_jpeg)], model.config)
    np.testing.assert_array_equal(result.input, x[0].numpy())
    tiles, grid = tile(x, (32, 32), (16, 16))
    local = model.infer(tiles, steps=30)
    np.testing.assert_allclose(result.latents[0], local.latents[0].numpy(), atol=TOL)
    np.testing.assert_allclose(result.reconstruction, grid.stitch(local.reconstruction)[0].numpy(), atol=TOL)
    assert result.energy_final == pytest.approx(float(local.energy[-1].sum()), rel=TOL)  # summed over tiles


def test_encode_batch_reports_bad_images_as_data(client, astronaut64, china_jpeg):
    results = client.encode_batch([astronaut64, b"not an image", china_jpeg], steps=10)
    assert len(results) == 3
    good, bad, other = results
    assert good.steps == 10 and other.steps == 10
    assert isinstance(bad, ServiceError) and bad.status == 400 and bad.reason == "bad_image"
    single = client.encode(astronaut64, steps=10)
    np.testing.assert_allclose(good.latents[0], single.latents[0], atol=TOL)
    np.testing.assert_array_equal(other.input - other.reconstruction, other.error_map)


def test_accepts_many_formats_and_modes(client, astronaut):
    small = Image.fromarray(astronaut).resize((48, 40))
    for fmt in ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF"):
        result = client.encode(png(small, fmt), steps=2, outputs=["input"])
        assert result.input.shape == (3, 40, 48), fmt  # full mode: the whole image, never enlarged


def test_exif_orientation_is_applied(client, astronaut):
    image = Image.fromarray(astronaut).resize((64, 32))  # wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the displayed image is tall
    result = client.encode(png(image, "JPEG", exif=exif), size_mode="tile", steps=1, outputs=["input"])
    assert result.tile_grid["image"] == [64, 32]


def test_model_card(server, client):
    card = client.model()
    model = pcmodel.load("default")
    assert card["name"] == "conv-rgb" and card["preset"] == "conv-rgb" and card["source"] == "default"
    assert card["sha256"] == model.sha256
    assert card["device"] == str(pick_device("auto")) and card["backend"]  # cuda where there is a GPU
    default = model.config.steps
    assert card["steps"] == {"default": default, "max": 1000, "warmed": sorted({20, default})}
    assert card["input"]["size_mode"] == {"default": "full", "choices": ["resize", "tile", "full"]}
    assert card["input"]["full"]["buckets"] == [[88, 88], [176, 176], [256, 256]]  # PC_FULL_MAX_SIDE 256
    assert card["arrays"] == {"default": "float32", "choices": ["float32", "float16", "none"]}
    assert pcmodel.ModelConfig.from_dict(card["config"]) == model.config
    assert isinstance(card["provenance"], dict)


def test_openapi_describes_every_route(server):
    spec = server.get("/docs.json").json()
    paths = spec["paths"]
    for route, method in [
        ("/encode", "post"),
        ("/encode_batch", "post"),
        ("/model", "get"),
        ("/model/basis", "get"),
        ("/", "get"),
        ("/docs", "get"),
        ("/readyz", "get"),
        ("/livez", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths.get(route, {}), f"{method.upper()} {route} missing from /docs.json"
    form = paths["/encode"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["image"]["format"] == "binary"
    assert form["properties"]["size_mode"]["enum"] == ["resize", "tile", "full"]
    assert form["properties"]["arrays"]["enum"] == ["float32", "float16", "none"]
    assert "level_errors" in form["properties"]["outputs"]["description"]
    assert {"400", "413", "415", "422"} <= set(paths["/encode"]["post"]["responses"])
    refs = str(spec)
    for name in ("PCEncodeResult", "PCModelCard", "PCError", "PCArray"):
        assert name in spec["components"]["schemas"] and f"#/components/schemas/{name}" in refs
    reasons = spec["components"]["schemas"]["PCError"]["properties"]["reason"]["enum"]
    assert set(REASONS) | {"not_found", "method_not_allowed", "load_failed"} == set(reasons)


_ROUTES = """
import json
from service.service import APP
routes = [r for r in APP.routes if getattr(r, "include_in_schema", False)]
print(json.dumps([[r.path, m.lower()] for r in routes for m in r.methods]))
"""


def test_real_answers_match_the_generated_schemas(server, astronaut64, china_jpeg, tmp_path):
    """The document is generated from the typed routes (service.service's APP, service.schemas): it describes
    every route the app serves, and real answers of every shape validate against its schemas."""
    import jsonschema

    from service import openapi, schemas

    spec = server.get("/docs.json").json()
    # The app's routes, listed in another process: service.service imports our protocol stubs, which cannot
    # share a process with tritonclient's (the v2 tests import those).
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true"}
    listing = subprocess.run([sys.executable, "-c", _ROUTES], capture_output=True, text=True, env=env, check=True)
    served = {tuple(route) for route in json.loads(listing.stdout.splitlines()[-1])}
    documented = {(p, m) for p, item in spec["paths"].items() for m in item if p not in openapi.BENTOML_ROUTES}
    assert served == documented
    for route, form in (("/encode", schemas.EncodeForm), ("/encode_batch", schemas.EncodeBatchForm)):
        body = spec["paths"][route]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert set(body["properties"]) == set(form.model_fields)

    def valid(instance: object, name: str, document: dict = spec) -> None:
        jsonschema.validate(instance, {"$ref": f"#/components/schemas/{name}", "components": document["components"]})

    every = "latents,reconstruction,error_map,input,trace,level_errors,snapshots"
    answers = [
        server.post("/encode", files={"image": ("a.png", astronaut64)}, data={"steps": "4", "outputs": every}),
        server.post("/encode", files={"image": ("c.jpg", china_jpeg)}, data={"steps": "2", "size_mode": "tile"}),
        server.post("/encode", files={"image": ("c.jpg", china_jpeg)}, data={"steps": "2", "size_mode": "full"}),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        valid(answer.json(), "PCEncodeResult")
    batch = server.post(
        "/encode_batch", files=[("images", ("a.png", astronaut64)), ("images", ("b.png", b"not an image"))]
    )
    assert batch.status_code == 200 and "error" in batch.json()["results"][1]
    valid(batch.json(), "PCBatchResult")
    card = server.get("/model").json()
    valid(card, "PCModelCard")
    undocumented = set(card) - set(spec["components"]["schemas"]["PCModelCard"]["properties"])
    assert not undocumented, undocumented  # the card allows extra keys: each one the service sends is described
    for error in (
        server.post("/encode", files={"image": ("a.png", astronaut64)}, data={"steps": "0"}),
        server.get("/nowhere"),
    ):
        assert error.status_code in (404, 422)
        valid(error.json(), "PCError")
    # The check can fail: a field the answers lack, made required, is caught.
    wrong = json.loads(json.dumps(spec))
    wrong["components"]["schemas"]["PCEncodeResult"]["required"].append("nonexistent")
    with pytest.raises(jsonschema.ValidationError):
        valid(answers[0].json(), "PCEncodeResult", wrong)


def test_health_probes(server):
    assert server.get("/livez").status_code == 200
    assert server.get("/readyz").status_code == 200


def test_arrays_none_makes_a_large_tiled_photo_compact(server, astronaut):
    photo = png(Image.fromarray(astronaut).resize((1024, 768), Image.Resampling.BICUBIC))
    sizes = {}
    for arrays in ("float32", "none"):
        data = {"size_mode": "tile", "steps": "1", "arrays": arrays}
        response = server.post("/encode", files={"image": ("photo.png", photo, "image/png")}, data=data)
        assert response.status_code == 200, response.text
        sizes[arrays] = len(response.content)
        body = response.json()
        assert ("array" in body["reconstruction"]) == (arrays == "float32") and "png" in body["reconstruction"]
        assert body["latents"][0]["dtype"] == ("float32" if arrays == "float32" else "float16")
    assert sizes["none"] <= 0.3 * sizes["float32"], sizes


def test_float16_arrays_round_the_float32_ones(client, astronaut64):
    full = client.encode(astronaut64, steps=5, outputs=["latents", "reconstruction"], size_mode="resize")
    half = client.encode(
        astronaut64, steps=5, outputs=["latents", "reconstruction"], arrays="float16", size_mode="resize"
    )
    assert half.raw["reconstruction"]["array"]["dtype"] == "float16" and half.reconstruction.dtype == np.float32
    np.testing.assert_array_equal(half.reconstruction, full.reconstruction.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(half.latents[1], full.latents[1].astype(np.float16).astype(np.float32))
    none = client.encode(astronaut64, steps=5, outputs=["reconstruction"], arrays="none", size_mode="resize")
    assert none.reconstruction is None and none.images["reconstruction"].size == (32, 32)


def test_level_errors_are_the_models(client, astronaut64):
    result = client.encode(astronaut64, steps=10, outputs=["level_errors", "error_map"], size_mode="resize")
    model = pcmodel.load("default")
    local = model.infer(preprocess([decode(astronaut64)], model.config, size=(32, 32)), steps=10)
    assert [e.shape for e in result.level_errors] == [(3, 32, 32), (8, 7, 7)]  # e_1 on the image, e_2 on r_1
    for got, want in zip(result.level_errors, local.errors):
        np.testing.assert_allclose(got, want[0].numpy(), atol=TOL)
    np.testing.assert_allclose(result.level_errors[0], result.error_map, atol=TOL)  # level 1's is the image's


def test_full_mode_returns_the_whole_photo_at_its_aspect_ratio(client, astronaut):
    photo = png(Image.fromarray(astronaut).resize((640, 480), Image.Resampling.BICUBIC))
    result = client.encode(photo, steps=20)  # full is conv-rgb's default size mode
    # The longer side scaled to PC_FULL_MAX_SIDE (256): 256x192, padded to the 256x256 bucket.
    assert result.size_mode == "full" and result.reconstruction.shape == (3, 192, 256)
    assert result.images["reconstruction"].size == (256, 192)
    assert result.padded == [32, 32, 0, 0] and result.raw["model_input"] == [256, 256]
    assert [r.shape for r in result.latents] == [(8, 63, 63), (10, 31, 31)]  # at the padded size
    np.testing.assert_array_equal(result.input - result.reconstruction, result.error_map)
    model = pcmodel.load("default")
    rows, shown, placement = prepare_image(decode(photo), model.config, "full")
    np.testing.assert_allclose(result.input, shown.numpy(), atol=1e-6)
    local = model.infer(rows, steps=20)
    np.testing.assert_allclose(result.reconstruction, placement.restore(local.reconstruction)[0].numpy(), atol=TOL)


def test_solver_and_init_fields(server, client, astronaut64):
    """The dynamics are a request's choice: each gives the model's own numbers, and says what ran."""
    model = pcmodel.load("default")
    x = preprocess([decode(astronaut64)], model.config, size=(32, 32))
    served = client.encode(astronaut64, size_mode="resize", steps=20)
    assert (served.solver, served.init) == (model.solver().label, "amortised")  # the model's own (its config)
    for solver in ("nesterov", "momentum", "gradient", "anderson"):
        result = client.encode(astronaut64, size_mode="resize", steps=20, solver=solver, init="zero")
        local = model.infer(x, steps=20, solver=solver, init="zero")
        assert result.solver == model.solver(solver).label and result.init == "zero"
        np.testing.assert_allclose(result.latents[0], local.latents[0][0].numpy(), atol=TOL)
        assert result.energy_final == pytest.approx(float(local.energy[-1, 0]), rel=TOL)
    paper = client.encode(astronaut64, size_mode="resize", steps=20, solver="gradient", init="zero")
    assert served.energy_final < paper.energy_final  # the served dynamics get further in the same steps
    card = client.model()
    assert card["solver"]["default"] in (model.config.solver, model.solver().label)
    assert card["solver"]["choices"] == ["gradient", "momentum", "nesterov", "anderson"]
    assert card["init"]["default"] == "amortised" and "zero" in card["init"]["choices"]
    before = server.metrics()
    for fields in ({"solver": "adam"}, {"init": "random"}, {"solver": ""}):
        response = server.post("/encode", files={"image": ("a.png", astronaut64)}, data=fields)
        assert response.status_code == 422 and response.json()["reason"] == "bad_parameter", fields
        assert next(iter(fields)) in response.json()["error"]
    after = server.metrics()
    counted = metric(after, "pc_request_errors_total", reason="bad_parameter") - metric(
        before, "pc_request_errors_total", reason="bad_parameter"
    )
    assert counted == 3
    # the shipped model has an amortised start: the fast guess, refined by the same steps
    assert model.has_amortiser and card["init"]["choices"] == ["zero", "amortised"]
    for solver in ("gradient", "nesterov"):
        result = client.encode(astronaut64, size_mode="resize", steps=10, init="amortised", solver=solver)
        local = model.infer(x, steps=10, init="amortised", solver=solver)
        assert result.init == "amortised"
        np.testing.assert_allclose(result.latents[0], local.latents[0][0].numpy(), atol=TOL)
        assert result.energy_initial == pytest.approx(float(local.energy[0, 0]), rel=TOL)
    zero = client.encode(astronaut64, size_mode="resize", steps=1, init="zero")
    assert result.energy_initial < zero.energy_initial  # the amortised guess starts far lower


def test_snapshots_show_the_states_inference_passes_through(client, astronaut64):
    """outputs=snapshots: each snapshot is the exact state after its step count, for the same start and solver."""
    result = client.encode(astronaut64, size_mode="resize", steps=30, solver="nesterov", outputs=["snapshots"])
    snapshots = result.raw["snapshots"]
    steps = [s["step"] for s in snapshots]
    assert steps[0] == 0 and steps[-1] == 30 and len(steps) == 21 and steps == sorted(steps)
    model = pcmodel.load("default")
    x = preprocess([decode(astronaut64)], model.config, size=(32, 32))
    trace = model.infer(x, steps=30, solver="nesterov").energy[:, 0]
    for snap in snapshots:
        assert snap["energy"] == pytest.approx(float(trace[snap["step"]]), rel=TOL)
        assert [a["dtype"] for a in snap["latents"]] == ["float16", "float16"]
        assert {"reconstruction", "error_map"} <= set(snap)
    local = model.infer(x, steps=snapshots[10]["step"], solver="nesterov").latents[0][0].numpy()
    np.testing.assert_allclose(decode_array(snapshots[10]["latents"][0]), local, atol=2e-3, rtol=2e-3)  # float16
    assert snapshots[0]["energy"] > snapshots[-1]["energy"]


def test_a_warm_start_from_a_previous_result(server, client, astronaut64, astronaut):
    """`start`: the previous frame's latents; the next frame starts where it ended (resize and tile mode)."""
    model = pcmodel.load("default")
    first = client.encode(astronaut64, size_mode="resize", steps=40, solver="nesterov")
    again = client.encode(astronaut64, size_mode="resize", steps=1, start=first)
    assert again.init == "given"
    assert again.energy_initial == pytest.approx(first.energy_final, rel=TOL)
    x = preprocess([decode(astronaut64)], model.config, size=(32, 32))
    local = model.infer(x, steps=1, init=[torch.from_numpy(r[None]) for r in first.latents])
    np.testing.assert_allclose(again.latents[0], local.latents[0][0].numpy(), atol=TOL)
    tiles = client.encode(png(astronaut[:64, :64]), size_mode="tile", steps=30)
    warm = client.encode(png(astronaut[:64, :64]), size_mode="tile", steps=1, start=tiles)
    assert warm.energy_initial == pytest.approx(tiles.energy_final, rel=TOL)
    stepped = client.encode(astronaut64, size_mode="resize", steps=2, start=first, outputs=["snapshots"])
    assert stepped.raw["snapshots"][0]["energy"] == pytest.approx(first.energy_final, rel=TOL)  # from the start given
    before = server.metrics()
    for start in ([r[:, :3] for r in first.latents], first.latents[:1]):  # wrong shapes, a missing level
        with pytest.raises(ServiceError) as refused:
            client.encode(astronaut64, size_mode="resize", start=start)
        assert refused.value.status == 422 and refused.value.reason == "bad_parameter"
    bad = server.post("/encode", files={"image": ("a.png", astronaut64), "start": ("s.npz", b"not a zip")})
    assert bad.status_code == 422 and "start" in bad.json()["error"]
    both = server.post(
        "/encode", files={"image": ("a.png", astronaut64), "start": ("s.npz", b"x")}, data={"init": "zero"}
    )
    assert both.status_code == 422
    after = server.metrics()
    assert (
        metric(after, "pc_request_errors_total", reason="bad_parameter")
        - metric(before, "pc_request_errors_total", reason="bad_parameter")
        == 4
    )
