"""Image tags: one scheme everywhere (docs/DEPLOY.md, "Image tags"). The service image is
pc-encoder:<version>-<cpu|gpu> (localhost/... where it is built locally), the Ray image pc-encoder-ray:<version>,
and <version> is pyproject.toml's: each manifest, the compose file, container.sh's default and the docs name it."""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest
import yaml

from .conftest import DEPLOY, K8S, ROOT

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# Every image reference of ours that carries a version, in any file (a tag is a version, then -cpu or -gpu).
TAGGED = re.compile(r"\bpc-encoder(?:-ray)?:(\d+\.\d+\.\d+)")
UNVERSIONED = re.compile(r"\bpc-encoder:(?:cpu|gpu)\b")  # the old local tags, before the scheme


def deployment_image(resources: list[dict]) -> str:
    (deployment,) = [r for r in resources if r["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container["image"]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_run_the_package_version(rendered, overlay):
    assert deployment_image(rendered[overlay]) == f"pc-encoder:{VERSION}-{overlay}"


def test_kserve_runtime_runs_the_package_version():
    documents = {d["kind"]: d for d in yaml.safe_load_all((K8S / "kserve" / "inferenceservice.yaml").read_text())}
    (container,) = documents["ServingRuntime"]["spec"]["containers"]
    assert container["image"] == f"pc-encoder:{VERSION}-cpu"


def test_rayjob_runs_the_package_version():
    job = yaml.safe_load((DEPLOY / "ray" / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    groups = [job["headGroupSpec"], *job["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {f"pc-encoder-ray:{VERSION}"}


def test_local_builds_use_the_same_tags():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["pc-encoder"]["image"] == f"localhost/pc-encoder:{VERSION}-cpu"
    for torch, variant in (("cpu", "cpu"), ("cuda", "gpu")):
        printed = subprocess.run(
            ["bash", str(DEPLOY / "container.sh"), "image"],
            env={"PATH": "/usr/bin:/bin", "TORCH": torch},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        assert printed == f"localhost/pc-encoder:{VERSION}-{variant}"


def test_every_tag_in_deploy_and_its_docs_is_the_package_version():
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and "wheelhouse" not in p.parts]
    texts = {p.relative_to(ROOT): p.read_text(errors="replace") for p in [*files, ROOT / "docs" / "DEPLOY.md"]}
    stale = {f"{path}: {m.group(0)}" for path, text in texts.items() for m in TAGGED.finditer(text) if m[1] != VERSION}
    assert not stale, f"tags that are not {VERSION}: {sorted(stale)}"
    unversioned = {f"{path}: {m.group(0)}" for path, text in texts.items() for m in UNVERSIONED.finditer(text)}
    assert not unversioned, f"tags without the version: {sorted(unversioned)}"
