"""deploy/compose.yaml: validated by docker-compose (Debian's package; `config` needs no engine), and
its wiring checked: the scrape target is the service, every mounted file exists, the service runs as
on Kubernetes (read-only root, writable BENTOML_HOME and TMPDIR, no capabilities, /readyz health)."""

from __future__ import annotations

from pathlib import PurePosixPath

import yaml

from service.settings import Settings, env_name

from .conftest import DEPLOY, PROMETHEUS, dockerfile_env, require_tool, run

COMPOSE = DEPLOY / "compose.yaml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_docker_compose_validates_the_file():
    result = run([require_tool("docker-compose"), "--file", str(COMPOSE), "config", "--quiet"], cwd=DEPLOY)
    assert result.returncode == 0


def test_docker_compose_rejects_a_broken_file(tmp_path):
    """The validator is real: an unknown option fails."""
    import subprocess

    broken = compose()
    broken["services"]["pc-encoder"]["read_onlyy"] = True
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    result = subprocess.run(
        [require_tool("docker-compose"), "--file", str(tmp_path / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "read_onlyy" in result.stderr


def test_the_stack_is_wired_together():
    services = compose()["services"]
    assert set(services) == {"pc-encoder", "prometheus", "grafana"}
    # Prometheus scrapes the service under its compose name, on the port the service listens on.
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (target,) = config["scrape_configs"][0]["static_configs"][0]["targets"]
    service_port = services["pc-encoder"]["ports"][0].split(":")[-1]
    assert target == f"pc-encoder:{service_port}" == f"pc-encoder:{dockerfile_env()['PC_PORT']}"
    prometheus = services["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    mounts = dict(v.split(":")[:2] for v in prometheus["volumes"] if v.startswith("./"))
    assert config_flag == f"--config.file={mounts['./prometheus']}/prometheus.yml"
    for service in services.values():
        for volume in service.get("volumes", []):
            if volume.startswith("./"):
                assert (DEPLOY / volume.split(":")[0]).exists(), volume
    build = services["pc-encoder"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).exists()


def test_the_service_runs_as_on_kubernetes():
    service = compose()["services"]["pc-encoder"]
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"]
    env = dockerfile_env()
    tmpfs = {entry.split(":")[0] for entry in service["tmpfs"]}
    assert {env["BENTOML_HOME"], env["TMPDIR"]} <= tmpfs
    # Nothing under HOME: caches go to TMPDIR, onnxruntime's telemetry (a device id in ~/.cache) is off.
    assert PurePosixPath(env["XDG_CACHE_HOME"]).is_relative_to(env["TMPDIR"]) and env["ORT_DISABLE_TELEMETRY"] == "1"
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    known = {env_name(field) for field in Settings.__dataclass_fields__}
    assert {k for k in service["environment"] if k.startswith("PC_")} <= known
