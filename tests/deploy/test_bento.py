"""`bentoml build` from the repository's [tool.bentoml.build] (pyproject.toml): the bento holds the
service, pcmodel and the shipped weights, and BentoML's description of the service names its routes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

import pcmodel

from .conftest import ROOT

pytestmark = pytest.mark.slow


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bento(tmp_path_factory) -> tuple[Path, Path]:
    """Build from a copy of the project's sources (so the test can add weights where none are
    shipped yet); returns (the source copy, the bento's directory)."""
    tmp = tmp_path_factory.mktemp("bento")
    source = tmp / "project"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("pcmodel", "service"):
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    weights = source / "pcmodel" / "weights"
    weights.mkdir(exist_ok=True)
    if not list(weights.glob("*.safetensors")):
        # No shipped weights in this checkout yet: a real checkpoint stands in, to prove the include.
        pcmodel.create("conv-rgb", seed=0).save(weights / "conv-rgb.safetensors", {"note": "bento build test"})
    home = tmp / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag", str(source)],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"bentoml build failed:\n{result.stdout}\n{result.stderr}"
    (built,) = [p for p in (home / "bentos" / "predictive-coding").iterdir() if p.name != "latest"]
    return source, built


def test_bento_holds_the_sources_and_the_shipped_weights(bento):
    source, built = bento
    for package in ("service", "pcmodel", "pcmodel/engines"):
        expected = {p.name for p in (source / package).glob("*.py")}
        assert expected and expected <= {p.name for p in (built / "src" / package).glob("*.py")}
    shipped = {p.name: digest(p) for p in (source / "pcmodel" / "weights").glob("*.safetensors")}
    packed = {p.name: digest(p) for p in (built / "src" / "pcmodel" / "weights").glob("*.safetensors")}
    assert shipped and packed == shipped
    assert not (built / "src" / "tests").exists() and not (built / "src" / "deploy").exists()
    pages = {p.name: digest(p) for p in (source / "service" / "static").iterdir()}  # the explorer page
    packed_pages = {p.name: digest(p) for p in (built / "src" / "service" / "static").iterdir()}
    assert "index.html" in pages and packed_pages == pages


def test_bento_describes_the_service(bento):
    _, built = bento
    manifest = yaml.safe_load((built / "bento.yaml").read_text())
    assert manifest["service"] == "service.service:PCEncoder"
    assert {"name": "BENTOML_DO_NOT_TRACK", "value": "true", "stage": "all"} in manifest["envs"]
    # Every route of ours is a typed handler of the mounted FastAPI app (none a BentoML API method).
    assert {"/encode", "/encode_batch", "/model", "/docs.json", "/v2/models/{name}/infer"} <= set(
        manifest["schema"]["paths"]
    )


def test_bento_requirements_are_the_dependencies_and_the_serve_extra(bento):
    _, built = bento
    lines = (built / "env" / "python" / "requirements.txt").read_text().splitlines()
    requirements = {str(Requirement(line)) for line in lines if line.strip() and not line.startswith(("#", "-"))}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"] + project["optional-dependencies"]["serve"]
    assert {str(Requirement(d)) for d in dependencies} <= requirements
    assert (built / "env" / "docker" / "Dockerfile").exists()
