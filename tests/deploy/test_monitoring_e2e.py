"""End to end: the real service (pc-serve) scraped by a real Prometheus server (Debian's package) on
loopback, with deploy/prometheus/prometheus.yml's job and relabelling and alerts.yml's rules, a 1 s
scrape interval, and good and bad requests spread over several scrapes. Then Prometheus's HTTP API:
every Grafana panel query returns data, every alert expression evaluates without error (the rule
manager reports every rule healthy), the relabelling drops unknown paths, and the numbers Prometheus
holds equal the service's own /metrics."""

from __future__ import annotations

import base64
import io
import math
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from . import dashboard as dash
from .conftest import JOB, K8S, PROMETHEUS, Served, dockerfile_env, free_port, require_tool, run, stop, wait_http

pytestmark = pytest.mark.slow

DASHBOARD_QUERIES = dash.panel_queries  # what this test evaluates (test_grafana checks it is every query)
RATE_INTERVAL = "1m"  # $__rate_interval: holds every scrape of the test at a 1 s interval
ROUNDS = 4  # traffic rounds, each longer than a scrape interval


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen

    def query(self, expr: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def api(self, path: str, **params) -> dict:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        assert body["status"] == "success", body
        return body["data"]


@pytest.fixture(scope="module")
def prometheus(pc_serve: Served, tmp_path_factory) -> Iterator[Prometheus]:
    """deploy/prometheus/prometheus.yml pointed at the test's service, scraping every second."""
    binary = require_tool("prometheus")
    home = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    job["static_configs"] = [{"targets": [pc_serve.url.removeprefix("http://")]}]
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    (home / "alerts.yml").write_text((PROMETHEUS / "alerts.yml").read_text())
    run([require_tool("promtool"), "check", "config", str(home / "prometheus.yml")])

    port = free_port()
    log = home / "prometheus.log"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={home / 'prometheus.yml'}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", 60, process, log)
        server = Prometheus(f"http://127.0.0.1:{port}", process)
        # Prometheus hands new targets to its scrape loops every 5 s: wait for the first scrape, so
        # that the traffic below really spans several.
        deadline = time.monotonic() + 30
        while not server.query(f'up{{job="{JOB}"}} == 1'):
            assert time.monotonic() < deadline, f"Prometheus never scraped {pc_serve.url}:\n{log.read_text()}"
            time.sleep(0.3)
        yield server
    finally:
        stop(process)


def photo(side: int) -> bytes:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def server_samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def traffic(pc_serve: Served, prometheus: Prometheus) -> dict:
    """Good and bad requests over ROUNDS scrape intervals; returns once Prometheus holds the final
    counts. Returns the service's own /metrics samples at the end."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    good, small = photo(64), photo(32)
    statuses: list[tuple[str, int]] = []
    v2_body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(small).decode()]}],
        "parameters": {"steps": 5},
    }
    grpc_image = grpcclient.InferInput("image", [1], "BYTES")
    grpc_image.set_data_from_numpy(np.array([small], dtype=object))
    grpc_codes: list[str] = []
    with (
        httpx.Client(base_url=pc_serve.url, timeout=120) as client,
        grpcclient.InferenceServerClient(pc_serve.grpc_target) as grpc,
    ):
        for _ in range(ROUNDS):
            started = time.monotonic()
            posts = [
                ("/encode", {"files": {"image": ("a.png", good, "image/png")}}),
                ("/encode", {"files": {"image": ("b.png", small, "image/png")}, "data": {"steps": "20"}}),
                (
                    "/encode_batch",
                    {
                        "files": [
                            ("images", ("a.png", good, "image/png")),
                            ("images", ("b.png", small, "image/png")),
                            ("images", ("c.png", b"not an image", "image/png")),
                        ]
                    },
                ),
                ("/encode", {"files": {"image": ("x.png", b"not an image", "image/png")}}),  # 400 bad_image
                ("/encode", {"files": {"image": ("a.png", good, "image/png")}, "data": {"steps": "0"}}),  # 422
                ("/encode", {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}),  # 400
            ]
            for path, kwargs in posts:
                statuses.append((path, client.post(path, **kwargs).status_code))
            statuses.append(("/model", client.get("/model").status_code))
            # The Open Inference Protocol: one image and one unknown model (404, NOT_FOUND) per round, REST and gRPC.
            for model in ("conv-rgb", "nope"):
                statuses.append(("/v2", client.post(f"/v2/models/{model}/infer", json=v2_body).status_code))
                try:
                    grpc.infer(model, [grpc_image], parameters={"steps": 5})
                    grpc_codes.append("OK")
                except InferenceServerException as refused:
                    grpc_codes.append(str(refused.status()))
            statuses.append(("/nope", client.get("/wp-login.php").status_code))  # a scanner's path
            time.sleep(max(0.0, 1.5 - (time.monotonic() - started)))  # every round spans a scrape
    assert {code for path, code in statuses if path in ("/encode_batch", "/model")} == {200}
    assert sorted({code for _, code in statuses}) == [200, 400, 404, 422], statuses
    assert [code for path, code in statuses if path == "/v2"] == [200, 404] * ROUNDS
    assert grpc_codes == ["OK", "StatusCode.NOT_FOUND"] * ROUNDS

    samples = server_samples(pc_serve.url)
    images = samples[("pc_images_total", ())]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = prometheus.query(f'pc_images_total{{job="{JOB}"}}')
        if result and float(result[0]["value"][1]) == images:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"Prometheus never saw pc_images_total = {images}")
    return samples


def finite_values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


def test_the_traffic_spans_several_scrapes(prometheus, traffic):
    (series,) = prometheus.query(f'changes(pc_images_total{{job="{JOB}"}}[1m])')
    assert float(series["value"][1]) >= 2, "the counters must have moved between at least two scrapes"
    (up,) = prometheus.query(f'up{{job="{JOB}"}}')
    assert up["value"][1] == "1"


def test_every_dashboard_query_returns_data(prometheus, traffic):
    board = dash.load()
    evaluated = set()
    for query in DASHBOARD_QUERIES(board):
        expr = dash.concrete(query.expr, board, RATE_INTERVAL)
        result = prometheus.query(expr)
        assert finite_values(result), (
            f"panel {query.panel!r} ({query.ref_id}) returned no finite value: {expr} -> {result}"
        )
        evaluated.add(query.expr)
    assert evaluated == {q.expr for q in dash.panel_queries(board)}


def test_dashboard_variables_find_the_service(prometheus, pc_serve, traffic):
    board = dash.load()
    variables = dash.variables(board)
    assert variables["job"]["definition"] == "label_values(pc_model_info, job)"
    assert JOB in prometheus.api("label/job/values", **{"match[]": "pc_model_info"})
    assert variables["instance"]["definition"] == 'label_values(pc_model_info{job=~"$job"}, instance)'
    instances = prometheus.api("label/instance/values", **{"match[]": f'pc_model_info{{job=~"{JOB}"}}'})
    assert instances == [pc_serve.url.removeprefix("http://")]


def test_the_service_metrics_reach_prometheus_unchanged(prometheus, traffic):
    for name, labels in [
        ("pc_images_total", ()),
        ("pc_inference_iterations_sum", ()),
        ("pc_batch_size_count", ()),
        ("pc_request_errors_total", (("reason", "bad_image"),)),
        ("pc_request_errors_total", (("reason", "bad_parameter"),)),
    ]:
        selector = ",".join([f'job="{JOB}"', *(f'{k}="{v}"' for k, v in labels)])
        (series,) = prometheus.query(f"{name}{{{selector}}}")
        assert float(series["value"][1]) == traffic[(name, labels)], name
    # Per round: 2 good /encode, 2 good images in /encode_batch, one over v2 REST and one over gRPC; one bad
    # image in the batch and one non-image request; one bad steps.
    assert traffic[("pc_images_total", ())] == 6 * ROUNDS
    assert traffic[("pc_request_errors_total", (("reason", "bad_image"),))] == 2 * ROUNDS
    assert traffic[("pc_request_errors_total", (("reason", "bad_parameter"),))] == ROUNDS


def test_relabelling_drops_paths_the_service_does_not_serve(prometheus, traffic):
    requests = [key for key in traffic if key[0] == "bentoml_service_request_total"]
    # pc-serve labels a path it does not serve "/(unknown)" (service.endpoints), never with the scanner's text
    assert not [key for key in requests if ("endpoint", "/wp-login.php") in key[1]]
    assert [key for key in requests if ("endpoint", "/(unknown)") in key[1]], "the scan was not counted"
    # and Prometheus keeps the API's and the probes' series only (the second guard, for a plain `bentoml serve`)
    assert prometheus.query('bentoml_service_request_total{endpoint=~"/wp-login.php|/[(]unknown[)]"}') == []
    assert prometheus.query('bentoml_service_request_total{endpoint="/encode", http_response_code="200"}')
    assert prometheus.query('{__tmp_known_endpoint!=""}') == []


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def test_every_alert_expression_evaluates(prometheus, traffic):
    for rule in alert_rules():
        prometheus.query(rule["expr"])  # fails on any PromQL error


def test_the_rule_manager_evaluates_every_alert_without_error(prometheus, traffic):
    names = {rule["alert"] for rule in alert_rules()}
    deadline = time.monotonic() + 20
    while True:
        (group,) = prometheus.api("rules")["groups"]
        rules = {rule["name"]: rule for rule in group["rules"]}
        if all(rule["evaluationTime"] > 0 for rule in rules.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(rules) == names
    for name, rule in rules.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), f"{name}: {rule.get('lastError')}"


def test_a_healthy_service_fires_no_alert(prometheus, traffic):
    firing = [a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []


def test_the_autoscaling_metric_query_returns_images_per_second(prometheus, pc_serve, traffic):
    """deploy/k8s/prometheus-adapter's metricsQuery with the adapter's template filled in."""
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    expr = (
        rule["metricsQuery"]
        .replace("<<.Series>>", "pc_images_total")
        .replace("<<.LabelMatchers>>", f'job="{JOB}"')
        .replace("<<.GroupBy>>", "instance")
    )
    result = prometheus.query(expr)
    assert [r["metric"]["instance"] for r in result] == [pc_serve.url.removeprefix("http://")]
    assert finite_values(result)[0] > 0


def test_the_service_writes_nothing_under_home(pc_serve, traffic):
    """The container's HOME is on the read-only root: with the image's environment, after every kind of request
    (onnxruntime, the CPU backend, wrote its telemetry device id and event queue to ~/.cache/Microsoft)."""
    assert sorted(str(p.relative_to(pc_serve.home)) for p in pc_serve.home.rglob("*")) == []
    image = dockerfile_env()
    cache = pc_serve.home.parent / "tmp" / PurePosixPath(image["XDG_CACHE_HOME"]).relative_to(image["TMPDIR"])
    assert not (cache / "Microsoft").exists(), "onnxruntime's telemetry is on"


def test_prometheus_log_is_clean(prometheus, traffic):
    log = Path(prometheus.process.args[1].split("=", 1)[1]).parent / "prometheus.log"
    errors = [line for line in log.read_text().splitlines() if "level=error" in line]
    assert not errors, errors
