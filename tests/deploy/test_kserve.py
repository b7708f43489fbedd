"""deploy/k8s/kserve: the KServe InferenceService and its ServingRuntime. No KServe CRD schema ships in a
package here (the kserve SDK would replace the service's own fastapi/uvicorn/protobuf), so: the runtime's
pod is validated by kubernetes-validate (strict) as a Pod, the KServe fields are held to the ones the
v1beta1/v1alpha1 APIs define, and the parts must agree: the model names the runtime and a format it
supports, protocol v2, ports and probes on the service's own settings and its v2 health routes."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml
from fastapi import FastAPI

from service.settings import Settings
from service.v2_rest import add_routes

from .conftest import K8S
from .test_k8s import KUBERNETES_VERSIONS

MANIFEST = K8S / "kserve" / "inferenceservice.yaml"
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
