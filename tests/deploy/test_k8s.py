"""deploy/k8s: both overlays rendered by `kubectl kustomize`, every resource validated by
kubernetes-validate against the Kubernetes schemas (strict: unknown fields are errors), the Prometheus
Operator resources against their CRD fields, and the properties the service needs checked on the
rendered output (probes, security context, GPU, settings, selectors that really select)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.settings import Settings, env_name

from .conftest import K8S, OVERLAYS, PROMETHEUS, SCHEMAS

# The oldest Kubernetes minor this deployment supports (autoscaling/v2 and policy/v1 are GA long
# before it) and the newest one kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
CRD_SCHEMAS = {
    "ServiceMonitor": "servicemonitor.monitoring.coreos.com-v1.json",
    "PrometheusRule": "prometheusrule.monitoring.coreos.com-v1.json",
}
EXPECTED_KINDS = {
    "ConfigMap",
    "Deployment",
    "Service",
    "Ingress",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "ServiceMonitor",
    "PrometheusRule",
}


def by_kind(resources: list[dict], kind: str) -> dict:
    (resource,) = [r for r in resources if r["kind"] == kind]
    return resource


def container(resources: list[dict]) -> dict:
    (c,) = by_kind(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def settings_env(resources: list[dict]) -> dict[str, str]:
    """The container's environment: its ConfigMap's data, then its own env entries."""
    c = container(resources)
    config_maps = {r["metadata"]["name"]: r for r in resources if r["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", [])})
    return env


def crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[kind]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_resource(rendered, overlay):
    assert {r["kind"] for r in rendered[overlay]} == EXPECTED_KINDS


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_accepts_every_builtin_resource(rendered, overlay, version):
    builtin = [r for r in rendered[overlay] if r["kind"] not in CRD_SCHEMAS]
    assert len(builtin) == len(EXPECTED_KINDS) - len(CRD_SCHEMAS)
    for resource in builtin:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {resource['kind']} is invalid for Kubernetes {version}: {exc.message}")


def test_kubernetes_validate_rejects_a_broken_deployment(rendered):
    """The validator is really strict: a misspelt field and a wrong type both fail."""
    deployment = copy.deepcopy(by_kind(rendered["cpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    deployment = copy.deepcopy(by_kind(rendered["cpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_operator_resources_match_their_crd_fields(rendered, overlay, kind):
    errors = [e.message for e in crd_validator(kind).iter_errors(by_kind(rendered[overlay], kind))]
    assert not errors, f"{overlay}: {kind}: {errors}"


def test_crd_schemas_reject_misspelt_fields(rendered):
    monitor = copy.deepcopy(by_kind(rendered["cpu"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["metricRelabellings"] = monitor["spec"]["endpoints"][0].pop("metricRelabelings")
    assert not crd_validator("ServiceMonitor").is_valid(monitor)
    monitor = copy.deepcopy(by_kind(rendered["cpu"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert not crd_validator("ServiceMonitor").is_valid(monitor)
    rule = copy.deepcopy(by_kind(rendered["cpu"], "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["annotation"] = {"summary": "x"}
    assert not crd_validator("PrometheusRule").is_valid(rule)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_select_the_pods(rendered, overlay):
    resources = rendered[overlay]
    deployment = by_kind(resources, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(match_labels: dict) -> bool:
        return bool(match_labels) and match_labels.items() <= pod_labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(by_kind(resources, "Service")["spec"]["selector"])
    assert selects(by_kind(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    hpa = by_kind(resources, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"], "with one replica a node drain stops the service"
    assert "replicas" not in deployment["spec"], "an applied replica count would reset the HPA's"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_the_service_metrics_port(rendered, overlay):
    resources = rendered[overlay]
    service = by_kind(resources, "Service")
    monitor = by_kind(resources, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    assert port["targetPort"] == container(resources)["ports"][0]["name"]

    def seconds(duration: str) -> int:
        return int(re.fullmatch(r"(\d+)s", duration).group(1))

    # The operator rejects a scrape timeout longer than the interval.
    assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])
    # The job label is the Service name, as in deploy/prometheus/prometheus.yml: the same alerts work.
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert "jobLabel" not in monitor
    assert service["metadata"]["name"] == config["scrape_configs"][0]["job_name"]


def test_servicemonitor_relabels_like_the_scrape_config(rendered):
    """The cardinality guard is the same rule set in both setups (camelCase on the operator's side)."""
    names = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    monitor = by_kind(rendered["cpu"], "ServiceMonitor")["spec"]["endpoints"][0]["metricRelabelings"]
    translated = [{names.get(k, k): v for k, v in rule.items()} for rule in monitor]
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert translated == config["scrape_configs"][0]["metric_relabel_configs"]


def test_prometheusrule_carries_the_alerts_file(rendered):
    alerts = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for overlay in OVERLAYS:
        assert by_kind(rendered[overlay], "PrometheusRule")["spec"]["groups"] == alerts["groups"], (
            "deploy/k8s/base/prometheusrule.yaml must carry deploy/prometheus/alerts.yml's groups unchanged"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_port(rendered, overlay):
    c = container(rendered[overlay])
    assert c["ports"] == [
        {"name": "http", "containerPort": 3000, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 8001, "protocol": "TCP"},  # the Open Inference Protocol over gRPC
    ]
    service = {p["name"]: p for p in by_kind(rendered[overlay], "Service")["spec"]["ports"]}
    assert service["grpc"]["targetPort"] == "grpc" and service["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert settings_env(rendered[overlay])["PC_GRPC_PORT"] == "8001"
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    startup = c["startupProbe"]
    # /readyz answers 503 while the model loads and warms up: give that minutes before liveness takes over.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert settings_env(rendered[overlay])["PC_PORT"] == "3000"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context_allows_a_read_only_root(rendered, overlay):
    pod = by_kind(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    c = container(rendered[overlay])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # What the service writes (BENTOML_HOME, TMPDIR; XDG_CACHE_HOME, any library's cache) lies on writable
    # volumes, and nothing under HOME: onnxruntime's telemetry, which writes a device id there, is off.
    env = settings_env(rendered[overlay])
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for variable in ("BENTOML_HOME", "TMPDIR"):
        assert env[variable] in mounts, f"{variable}={env[variable]} is not a mounted volume"
        assert "emptyDir" in volumes[mounts[env[variable]]]
    assert PurePosixPath(env["XDG_CACHE_HOME"]).is_relative_to(env["TMPDIR"])
    assert env["BENTOML_DO_NOT_TRACK"] == "true" and env["ORT_DISABLE_TELEMETRY"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_service_settings(rendered, overlay):
    """Every PC_* variable names a real setting of the service, with a value it accepts."""
    env = settings_env(rendered[overlay])
    pc = {k: v for k, v in env.items() if k.startswith("PC_")}
    known = {env_name(field) for field in Settings.__dataclass_fields__}
    assert pc.keys() <= known, f"unknown settings: {sorted(pc.keys() - known)}"
    Settings.from_env(pc)  # raises SettingsError on a value the service would refuse


def test_gpu_overlay_asks_for_one_gpu_and_one_worker(rendered):
    c = container(rendered["gpu"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = settings_env(rendered["gpu"])
    assert env["PC_WORKERS"] == "1" and env["PC_DEVICE"] == "cuda"
    assert c["image"].endswith("-gpu")
    tolerations = by_kind(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    (metric,) = by_kind(rendered["gpu"], "HorizontalPodAutoscaler")["spec"]["metrics"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    assert metric["pods"]["metric"]["name"] in [rule["name"]["as"] for rule in adapter["rules"]["custom"]]


def test_cpu_overlay_has_no_gpu_and_pins_threads_to_its_cpu_request(rendered):
    c = container(rendered["cpu"])
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    env = settings_env(rendered["cpu"])
    assert env["PC_DEVICE"] == "cpu"
    assert int(env["PC_TORCH_THREADS"]) == int(c["resources"]["requests"]["cpu"])
    assert c["image"].endswith("-cpu")
    (metric,) = by_kind(rendered["cpu"], "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_buffers_requests_for_the_service(rendered, overlay):
    """Slow clients meet nginx, not a worker: uvicorn has no header timeout (docs/DEPLOY.md)."""
    resources = rendered[overlay]
    ingress = by_kind(resources, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "on"
    timeout = Settings.from_env(settings_env(resources)).request_timeout_s
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > timeout
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    service = by_kind(resources, "Service")
    assert path["backend"]["service"] == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert service["spec"]["ports"][0]["name"] == "http"
    terminate = by_kind(resources, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert terminate > timeout, "requests in flight must finish within the grace period"
