"""deploy/Dockerfile proven with a real build and run: podman (runc) builds the image on a minimal
Debian base made by mmdebstrap, then the container runs with a read-only root filesystem and no
capabilities, and is checked from outside (deploy/smoke.py: /readyz, an /encode of a real photo,
/metrics) and by its own HEALTHCHECK. Slow: about 3-6 minutes on 2 cores, most of it the build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import pcmodel

from .conftest import DEPLOY, free_port, require_tool, run, wait_http

IMAGE = "localhost/pc-encoder:cpu-test"
CONTAINERS_CONF = Path("/etc/containers/containers.conf")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image() -> str:
    """Build the CPU image once for this module (deploy/container.sh build)."""
    for tool in ("podman", "runc", "mmdebstrap"):
        require_tool(tool)
    if "default_ulimits = []" not in (CONTAINERS_CONF.read_text() if CONTAINERS_CONF.exists() else ""):
        message = f"podman needs `default_ulimits = []` under [containers] in {CONTAINERS_CONF} (.ci/run sets it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    started = time.monotonic()
    env = {**os.environ, "IMAGE": IMAGE, "PYTHON": sys.executable}
    result = run(["bash", str(DEPLOY / "container.sh"), "build"], timeout=1500, env=env)
    steps = [line for line in result.stderr.splitlines() if line.startswith("container.sh:")]
    print("\n" + "\n".join(steps) + f"\ncontainer build: {time.monotonic() - started:.0f} s")
    return IMAGE


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True, timeout=timeout)


def shell_in(image: str, script: str) -> str:
    result = podman("run", "--rm", "--network=none", "--entrypoint", "sh", image, "-c", script)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_image_config(image):
    result = podman("image", "inspect", image)
    assert result.returncode == 0, result.stderr
    (info,) = json.loads(result.stdout)
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert "3000/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"] == ["pc-serve"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["BENTOML_HOME"] == "/var/lib/bentoml" and env["BENTOML_DO_NOT_TRACK"] == "true"
    assert env["PC_PORT"] == "3000" and env["PC_HOST"] == "0.0.0.0"
    assert env["NUMBA_CACHE_DIR"].startswith("/tmp/")  # the root filesystem may be read-only
    # Kept only in the Docker image format (--format docker), which container.sh builds.
    healthcheck = info.get("Healthcheck") or config.get("Healthcheck")
    assert healthcheck and "/readyz" in " ".join(healthcheck["Test"])
    print(f"image size: {info['Size'] / 1e9:.2f} GB")


def test_image_holds_no_compilers_caches_or_build_tools(image):
    found = shell_in(
        image,
        "for tool in gcc cc c++ g++ make pip pip3; do command -v $tool || true; done; "
        "ls -d /root/.cache /home/pc/.cache /wheels /opt/venv/bin/pip "
        "/opt/venv/lib/python3.11/site-packages/torch/include 2>/dev/null || true",
    )
    assert found.strip() == "", f"left in the final image: {found.split()}"


def test_image_has_the_cpu_build_of_torch(image):
    version = shell_in(image, "python -c 'import torch; print(torch.__version__, torch.version.cuda)'").split()
    assert version[0].endswith("+cpu") and version[1] == "None", version


def test_a_missing_checkpoint_stops_the_container_with_one_line(image):
    result = podman("run", "--rm", "--network=none", "-e", "PC_MODEL=/models/missing.safetensors", image)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("pc-serve:")]
    assert len(lines) == 1 and "missing.safetensors" in lines[0], result.stderr


def test_a_mounted_checkpoint_is_served(image, tmp_path):
    """PC_MODEL names a checkpoint mounted into /models; /model reports its hash."""
    checkpoint = tmp_path / "mine.safetensors"
    pcmodel.create("rao-ballard-1999", seed=3).save(checkpoint, {"note": "container test"})
    checkpoint.chmod(0o644)
    port = free_port()
    name = f"pc-encoder-mounted-{port}"
    started = podman(
        "run", "--detach", "--rm", "--name", name, "--network=host", "--read-only",
        "--mount", "type=tmpfs,destination=/var/lib/bentoml,chown=true", "--health-interval=disable",
        "-v", f"{checkpoint}:/models/mine.safetensors:ro",
        "-e", "PC_MODEL=/models/mine.safetensors", "-e", f"PC_PORT={port}", image,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", 300)
        card = httpx.get(f"http://127.0.0.1:{port}/model", timeout=30).json()
        assert card["sha256"] == pcmodel.load(checkpoint).sha256
        # The paper's network runs on numba (a core dependency) in the read-only image: its kernels compile
        # into NUMBA_CACHE_DIR on the tmpfs.
        assert card["backend"] == "numba", card["backends"]
    finally:
        podman("rm", "--force", "--time", "10", name)


def test_container_runs_read_only_and_answers_from_outside(image):
    """deploy/container.sh verify: read-only root, no capabilities; smoke.py checks it over HTTP."""
    env = {**os.environ, "IMAGE": image, "PYTHON": sys.executable, "PORT": str(free_port())}
    output = run(["bash", str(DEPLOY / "container.sh"), "verify"], timeout=600, env=env)
    text = output.stdout + output.stderr
    assert "smoke: /encode 200" in text and "smoke: /metrics counted both" in text
    assert f"ok: {image} serves /readyz, /encode and /metrics, and its HEALTHCHECK passes" in text
    left = podman("ps", "--all", "--filter", f"ancestor={image}", "--format", "{{.Names}}").stdout.split()
    assert not left, f"container.sh left containers behind: {left}"
