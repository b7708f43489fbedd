"""BentoML's request metrics on a real server: their `endpoint` label takes a bounded set of values
(service.endpoints), however many distinct paths clients ask for, and every request still gets its answer."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx

from service.endpoints import UNKNOWN

STATIC = Path(__file__).parents[2] / "service" / "static"
BENTOML_FAMILIES = ("bentoml_service_request_total", "bentoml_service_request_duration_seconds_count")


def endpoints(samples: dict) -> set[str]:
    """The `endpoint` values of BentoML's request series (its count, duration and in-progress)."""
    return {
        dict(labels)["endpoint"]
        for name, labels in samples
        if name.startswith("bentoml_service_request_") and "endpoint" in dict(labels)
    }


def requests_to(samples: dict, endpoint: str, code: str | None = None) -> float:
    """bentoml_service_request_total for one endpoint (and status), summed over its other labels."""
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "bentoml_service_request_total"
        and dict(labels)["endpoint"] == endpoint
        and (code is None or dict(labels)["http_response_code"] == code)
    )


def known_paths(server) -> set[str]:
    """Every concrete path the service has, found from outside: the routes without parameters in its OpenAPI
    document, BentoML's probes and schema, the static files, Swagger UI's files and the served model's v2 routes."""
    document = server.get("/docs.json").json()
    paths = {path for path in document["paths"] if "{" not in path}
    paths |= {"/livez", "/healthz", "/readyz", "/metrics", "/schema.json", "/docs", "/"}
    paths |= {f"/static/{p.name}" for p in STATIC.iterdir() if p.is_file()}
    import bentoml._internal.server as bentoml_server  # the folder BentoML's /static_content/ mount serves

    paths |= {f"/static_content/{p.name}" for p in (Path(bentoml_server.__file__).parent / "static_content").iterdir()}
    model = server.get("/v2/models/conv-rgb").json()
    for base in (f"/v2/models/{model['name']}", f"/v2/models/{model['name']}/versions/{model['versions'][0]}"):
        paths |= {base, base + "/ready", base + "/infer"}
    return paths


def test_distinct_unknown_paths_share_one_label_and_get_their_own_404(server, astronaut64):
    known = known_paths(server)
    model = server.get("/v2/models/conv-rgb").json()
    version = model["versions"][0]
    before = server.metrics()
    answers = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for i in range(200):
            path = f"/scan/{i}/wp-login.php" if i % 2 else f"/x{i}%20y"  # %20: the label is the decoded path's
            answers.append((path.replace("%20", " "), client.get(path)))
        for i in range(20):
            name = f"no-such-model-{i}"
            answers.append((name, client.get(f"/v2/models/{name}")))
            answers.append((name, client.get(f"/v2/models/{name}/ready")))
            answers.append((name, client.post(f"/v2/models/{name}/infer", json={"inputs": []})))
            answers.append((name, client.get(f"/v2/models/conv-rgb/versions/{name}/ready")))  # an unknown version
            answers.append((f"page-{i}.js", client.get(f"/static/page-{i}.js")))
            answers.append((f"ui-{i}.js", client.get(f"/static_content/ui-{i}.js")))
        # The known routes keep their own labels and work.
        encoded = client.post("/encode", files={"image": ("a.png", astronaut64)}, data={"steps": "5"})
        infer = client.post(
            "/v2/models/conv-rgb/infer",
            json={
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(astronaut64)]}],
                "parameters": {"steps": 5},
                "outputs": [{"name": "energy"}],
            },
        )
        versioned = client.get(f"/v2/models/conv-rgb/versions/{version}/ready")
        ready = client.get("/readyz")
    after = server.metrics()

    for real, response in answers:
        assert response.status_code == 404, (real, response.text)
        body = response.json()
        assert body["reason"] == "not_found" and real in body["error"], (real, body)
    assert encoded.status_code == 200 and infer.status_code == 200 and infer.json()["model_name"] == "conv-rgb"
    assert versioned.status_code == 200 and ready.status_code == 200

    # One label for every unknown path, counted once per request; every other label is a path the service has.
    labels = endpoints(after)
    assert UNKNOWN in labels
    assert labels - known == {UNKNOWN}, sorted(labels - known)[:20]
    assert len(labels) <= len(known) + 1
    assert requests_to(after, UNKNOWN, "404") - requests_to(before, UNKNOWN, "404") == len(answers)
    assert requests_to(after, UNKNOWN) - requests_to(before, UNKNOWN) == len(answers)  # /metrics itself is not one
    for endpoint in ("/encode", "/v2/models/conv-rgb/infer"):
        assert requests_to(after, endpoint, "200") - requests_to(before, endpoint, "200") == 1, endpoint
    assert requests_to(after, f"/v2/models/conv-rgb/versions/{version}/ready", "200") >= 1
    assert requests_to(after, "/readyz", "200") > requests_to(before, "/readyz", "200")
    # /metrics answers, and BentoML leaves its own scrapes out of its request series, as before.
    assert "/metrics" not in labels


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_unknown_path_itself_is_answered_as_any_unknown_path(server):
    """A client that asks for the label's own text gets the 404 for that path, nothing more."""
    response = server.get(UNKNOWN)
    assert response.status_code == 404 and UNKNOWN in response.json()["error"]


def test_bentoml_sees_the_label_and_the_routes_the_real_path():
    """LabelPaths (around BentoML's app) and RestorePath (inside it) on their own: what each layer sees."""
    import asyncio

    from service.endpoints import PATH_KEY, KnownPaths, LabelPaths, RestorePath

    seen = []

    def layer(name, app=None):
        async def call(scope, receive, send):
            seen.append((name, scope["path"], scope.get("raw_path")))
            if app is not None:
                await app(scope, receive, send)

        return call

    known = KnownPaths(["/encode"])
    app = LabelPaths(layer("bentoml", RestorePath(layer("routes"))), known)
    for path, raw in [("/encode", b"/encode"), ("/a b", b"/a%20b"), ("/no-raw", None)]:
        scope = {"type": "http", "path": path}
        if raw is not None:
            scope["raw_path"] = raw
        asyncio.run(app(scope, None, None))
        labelled = path if path == "/encode" else UNKNOWN
        assert seen == [("bentoml", labelled, raw if labelled == path else UNKNOWN.encode()), ("routes", path, raw)]
        assert (PATH_KEY in scope) == (labelled == UNKNOWN)
        seen.clear()
    known.add(["/v2/models/m/infer"])  # what the model's load adds
    asyncio.run(app({"type": "http", "path": "/v2/models/m/infer", "raw_path": b"/v2/models/m/infer"}, None, None))
    assert seen[0] == ("bentoml", "/v2/models/m/infer", b"/v2/models/m/infer")
