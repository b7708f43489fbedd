"""deploy/k8s/kserve: the KServe InferenceService and its ServingRuntime. No KServe CRD schema ships in a
package here (the kserve SDK would replace the service's own fastapi/uvicorn/protobuf), so: the runtime's
pod is validated by kubernetes-validate (strict) as a Pod, the KServe fields are held to the ones the
v1beta1/v1alpha1 APIs define, and the parts must agree: the model names the runtime and a format it
supports, protocol v2, ports and probes on the service's own settings and its v2 health routes. Its
PodMonitor is validated against the Prometheus Operator's CRD fields, as the base's ServiceMonitor is, and held
to the runtime's pods and port, the scrape job and relabelling of deploy/prometheus/prometheus.yml."""

from __future__ import annotations

import copy
import json
from pathlib import PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi import FastAPI

from service.settings import Settings
from service.v2_rest import add_routes

from .conftest import K8S, PROMETHEUS, SCHEMAS
from .test_k8s import KUBERNETES_VERSIONS

MANIFEST = K8S / "kserve" / "inferenceservice.yaml"
POD_MONITOR = K8S / "kserve" / "podmonitor.yaml"
# The fields of KServe's API types this manifest may use (a misspelt one is an error).
ISVC_SPEC = {"predictor", "transformer", "explainer"}
PREDICTOR = {"model", "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "terminationGracePeriodSeconds"}
MODEL = {"modelFormat", "runtime", "protocolVersion", "storageUri", "env", "resources", "args"}
RUNTIME_SPEC = {"supportedModelFormats", "protocolVersions", "containers", "volumes", "multiModel", "disabled"}


@pytest.fixture(scope="module")
def documents() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_kinds_and_api_versions(documents):
    assert documents["InferenceService"]["apiVersion"] == "serving.kserve.io/v1beta1"
    assert documents["ServingRuntime"]["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert set(documents) == {"InferenceService", "ServingRuntime"}


def test_fields_are_kserves(documents):
    isvc = documents["InferenceService"]["spec"]
    assert set(isvc) <= ISVC_SPEC
    assert set(isvc["predictor"]) <= PREDICTOR and set(isvc["predictor"]["model"]) <= MODEL
    assert set(documents["ServingRuntime"]["spec"]) <= RUNTIME_SPEC
    assert documents["InferenceService"]["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in (
        "RawDeployment",
        "Serverless",
    )


def test_the_model_runs_on_the_runtime_with_protocol_v2(documents):
    model = documents["InferenceService"]["spec"]["predictor"]["model"]
    runtime = documents["ServingRuntime"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [
        {k: v for k, v in f.items() if k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]
    ]
    assert model["protocolVersion"] == "v2" and {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    predictor = documents["InferenceService"]["spec"]["predictor"]
    assert 2 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["terminationGracePeriodSeconds"] > Settings().request_timeout_s


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_runtime_pod_is_a_valid_pod(documents, version):
    spec = documents["ServingRuntime"]["spec"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "pc-encoder"},
        "spec": {"containers": spec["containers"], "volumes": spec["volumes"]},
    }
    kubernetes_validate.validate(pod, version, strict=True)


def test_ports_and_probes_match_the_service(documents):
    (container,) = documents["ServingRuntime"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings = Settings.from_env(env)  # every PC_* value is one the service takes
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http1": settings.port, "h2c": settings.grpc_port}
    assert container["ports"][0]["name"] == "http1"  # KServe sends REST to the first port
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    add_routes(app, lambda: None)
    served = {route.path for route in app.routes}
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready")):
        assert container[probe]["httpGet"] == {"path": path, "port": settings.port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": settings.port}
    assert {"/v2/health/ready", "/v2/health/live"} <= served
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # the model loads and warms up
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {env["BENTOML_HOME"], env["TMPDIR"]} <= mounts and container["securityContext"]["readOnlyRootFilesystem"]
    # Nothing is written under HOME (docs/DEPLOY.md): caches go to the tmp volume, onnxruntime's telemetry is off.
    assert PurePosixPath(env["XDG_CACHE_HOME"]).is_relative_to(env["TMPDIR"]) and env["ORT_DISABLE_TELEMETRY"] == "1"


@pytest.fixture(scope="module")
def pod_monitor() -> dict:
    (monitor,) = [d for d in yaml.safe_load_all(POD_MONITOR.read_text()) if d]
    return monitor


def pod_monitor_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / "podmonitor.monitoring.coreos.com-v1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_pod_monitor_matches_its_crd_fields(pod_monitor):
    assert pod_monitor["apiVersion"] == "monitoring.coreos.com/v1" and pod_monitor["kind"] == "PodMonitor"
    errors = [e.message for e in pod_monitor_validator().iter_errors(pod_monitor)]
    assert not errors, errors
    broken = copy.deepcopy(pod_monitor)
    broken["spec"]["podMetricsEndpoints"][0]["metricRelabellings"] = broken["spec"]["podMetricsEndpoints"][0].pop(
        "metricRelabelings"
    )
    assert not pod_monitor_validator().is_valid(broken)
    broken = copy.deepcopy(pod_monitor)
    broken["spec"]["endpoints"] = broken["spec"].pop("podMetricsEndpoints")  # a ServiceMonitor's field
    assert not pod_monitor_validator().is_valid(broken)


def test_pod_monitor_scrapes_the_runtime_pods_as_job_pc_encoder(documents, pod_monitor):
    """KServe labels a predictor's pods serving.kserve.io/inferenceservice=<name> and component=predictor; the
    job label is that name, the scrape job of deploy/prometheus/prometheus.yml, so the same alerts work."""
    spec = pod_monitor["spec"]
    isvc = documents["InferenceService"]["metadata"]["name"]
    assert spec["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": isvc, "component": "predictor"}
    assert spec["jobLabel"] == "serving.kserve.io/inferenceservice"
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert isvc == config["scrape_configs"][0]["job_name"]
    (endpoint,) = spec["podMetricsEndpoints"]
    (container,) = documents["ServingRuntime"]["spec"]["containers"]
    assert endpoint["port"] == container["ports"][0]["name"] and endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True  # the operator's `endpoint` target label would replace BentoML's
    base = yaml.safe_load((K8S / "base" / "servicemonitor.yaml").read_text())  # the plain Deployment's
    (base_endpoint,) = base["spec"]["endpoints"]
    for timing in ("interval", "scrapeTimeout"):
        assert endpoint[timing] == base_endpoint[timing]
    assert pod_monitor["metadata"]["labels"]["release"] == base["metadata"]["labels"]["release"]


def test_pod_monitor_relabels_like_the_scrape_config(pod_monitor):
    names = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    rules = pod_monitor["spec"]["podMetricsEndpoints"][0]["metricRelabelings"]
    translated = [{names.get(k, k): v for k, v in rule.items()} for rule in rules]
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert translated == config["scrape_configs"][0]["metric_relabel_configs"]
