"""deploy/ray/rayjob.yaml: the KubeRay RayJob that runs pc-encode --engine ray on Kubernetes.

No KubeRay operator runs here, so the checks are the ones the tools at hand allow: every field is one of
the RayJob CRD's (ray.io/v1, KubeRay's config/crd/bases/ray.io_rayjobs.yaml, the fields listed below),
each pod template validated strictly by kubernetes-validate as a v1 PodTemplate, the entrypoint parsed by
pc-encode's own parser, the actor pool below the cluster's CPUs, and the paths it reads and writes on a
volume that the head and every worker mount.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import PurePosixPath

import kubernetes_validate
import pytest
import yaml

from pcmodel.cli import build_parser

from .conftest import DEPLOY

RAYJOB = DEPLOY / "ray" / "rayjob.yaml"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# The RayJob CRD's fields (ray.io/v1) at the levels this manifest uses.
SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "entrypoint", "entrypointNumCpus",
    "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata", "rayClusterSpec",
    "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig", "submitterPodTemplate",
    "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
CLUSTER_FIELDS = {
    "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs",
}  # fmt: skip
HEAD_FIELDS = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_FIELDS = {
    "groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts", "rayStartParams",
    "replicas", "scaleStrategy", "suspend", "template",
}  # fmt: skip


@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def groups(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def test_every_field_is_the_crds(job):
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(job["spec"]) <= SPEC_FIELDS
    cluster = job["spec"]["rayClusterSpec"]
    assert set(cluster) <= CLUSTER_FIELDS
    assert set(cluster["headGroupSpec"]) <= HEAD_FIELDS
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_FIELDS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for group in groups(job):  # Ray's start parameters are strings
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_each_pod_template_is_a_valid_pod_template(job, version):
    for i, group in enumerate(groups(job)):
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"group-{i}"}}
        template["template"] = group["template"]
        kubernetes_validate.validate(template, version, strict=True)
        spec = group["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["ORT_DISABLE_TELEMETRY"] == "1"


def test_the_validator_is_strict_here_too(job):
    group = copy.deepcopy(groups(job)[0])
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": group["template"]}
    template["template"]["spec"]["containers"][0]["volumeMount"] = []  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(template, KUBERNETES_VERSIONS[0], strict=True)


def test_the_entrypoint_is_a_pc_encode_command_for_this_cluster(job):
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "pc-encode"
    args = build_parser().parse_args(words[1:])  # pc-encode's own parser: every flag exists and parses
    assert args.engine == "ray" and args.address == "auto"
    head, *workers = groups(job)
    assert head["rayStartParams"]["num-cpus"] == "0"  # the driver and the writer only
    cpus = sum(int(w["rayStartParams"]["num-cpus"]) * w["replicas"] for w in workers)
    assert args.workers < cpus  # an actor per CPU but one: Ray Data's own tasks need a CPU
    for group in workers:  # the pods are sized for what Ray is told it has
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["cpu"] == group["rayStartParams"]["num-cpus"]

    # The images are read by the actors and the shards written by the head: one shared volume in every pod.
    paths = [PurePosixPath(p) for p in args.paths] + [PurePosixPath(str(args.out))]
    claims = set()
    for group in groups(job):
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        for path in paths:
            assert any(path.is_relative_to(m) for m in mounts), f"{path} is not on a mounted volume"
        volumes = {v["name"]: v for v in spec["volumes"]}
        claims |= {volumes[name]["persistentVolumeClaim"]["claimName"] for name in mounts.values()}
    assert len(claims) == 1  # the same claim everywhere (ReadWriteMany)
