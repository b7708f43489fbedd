"""Shared helpers for the deployment tests: paths, the real tools they call, and a real pc-serve.

Every check here runs the tool that consumes the file (kubectl kustomize, kubernetes-validate,
promtool, prometheus, docker-compose, bentoml, podman). Where a tool is missing the test is skipped
with the Debian package to install, except under CI (CI=true), where `.ci/run` installs them all
and a missing tool fails the test instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "pc-encoder.json"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
OVERLAYS = ("cpu", "gpu")
JOB = "pc-encoder"  # the scrape job name in prometheus.yml, and the Service name on Kubernetes

# tool -> the Debian package that provides it (what .ci/run installs)
TOOLS = {
    "kubectl": "kubernetes-client",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "docker-compose": "docker-compose",
    "podman": "podman",
    "runc": "runc",
    "mmdebstrap": "mmdebstrap",
}


def require_tool(name: str) -> str:
    """The tool's path; skips (or, under CI, fails) with the package to install when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        message = f"{name} not found: apt-get install {TOOLS[name]} (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(command: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run a tool; on failure the assertion shows its output."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


def dockerfile_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage."""
    text = DEPLOY.joinpath("Dockerfile").read_text().split("\nFROM ")[-1]
    (block,) = re.findall(r"\nENV ((?:.*\\\n)*.*)", text)
    return dict(re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")))


def load_yaml_documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Each overlay rendered by `kubectl kustomize`: {overlay: [resources]}."""
    kubectl = require_tool("kubectl")
    return {
        overlay: load_yaml_documents(run([kubectl, "kustomize", str(K8S / "overlays" / overlay)]).stdout)
        for overlay in OVERLAYS
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail early if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before {url} answered:\n{tail}")
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, with everything it started."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@dataclass
class Served:
    url: str
    process: subprocess.Popen
    log: Path
    grpc_target: str  # the Open Inference Protocol over gRPC
    home: Path  # its HOME, empty at the start: read-only in the container, so nothing may be written there


@pytest.fixture(scope="module")
def pc_serve(tmp_path_factory) -> Iterator[Served]:
    """The real service (`pc-serve`, default model) on a free loopback port with its own BENTOML_HOME, TMPDIR and
    HOME, and the image's other run-time variables (deploy/Dockerfile: telemetry off, XDG_CACHE_HOME in TMPDIR)."""
    home = tmp_path_factory.mktemp("pc-serve")
    for folder in ("tmp", "home"):
        (home / folder).mkdir()
    image = dockerfile_env()
    port, grpc_port = free_port(), free_port()  # not gRPC's default 8001, which another server may hold
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PC_", "XDG_"))},
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": image["BENTOML_DO_NOT_TRACK"],
        "ORT_DISABLE_TELEMETRY": image["ORT_DISABLE_TELEMETRY"],
        "TMPDIR": str(home / "tmp"),
        "XDG_CACHE_HOME": str(home / "tmp" / PurePosixPath(image["XDG_CACHE_HOME"]).relative_to(image["TMPDIR"])),
        "HOME": str(home / "home"),
        "PC_HOST": "127.0.0.1",
        "PC_PORT": str(port),
        "PC_GRPC_PORT": str(grpc_port),
    }
    log = home / "pc-serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli"],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", 180, process, log)
        yield Served(f"http://127.0.0.1:{port}", process, log, f"127.0.0.1:{grpc_port}", home / "home")
    finally:
        stop(process)
