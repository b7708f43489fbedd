"""The README's service example runs as written against a real server."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_service_example_runs(server, tmp_path, monkeypatch, capsys):
    match = re.search(r"<!-- service-example.*?-->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README has no python block after <!-- service-example -->"
    code = match.group(1)
    assert "http://localhost:3000" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://localhost:3000", server.url), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "50 True"
    assert out[1] == "[(8, 63, 63), (10, 31, 31)]"
    grid = "{'rows': 8, 'cols': 8, 'tile': [32, 32], 'stride': [16, 16], 'origin': [-16, -16], 'image': [100, 100]}"
    assert out[2] == grid + " (64, 8, 7, 7)"
    assert out[3] == "(200, 256) [0, 0, 28, 28] None"
    assert out[4] == "['Encoding', 'ServiceError']"
    assert out[5]  # the backend's name
    assert (tmp_path / "reconstruction.png").is_file()


def _prefix(text: str) -> str:
    return text.split("...")[0]


def test_example_response_is_what_the_shipped_model_gives(server):
    """The README's example response: the bundled photo through the shipped default model, as served."""
    import json
    from importlib import resources

    import httpx

    match = re.search(r"<!-- example-response.*?-->\s*```json\n(.*?)```", README.read_text(), re.S)
    assert match, "README has no json block after <!-- example-response -->"
    shown = json.loads(match.group(1))
    photo = (resources.files("pcmodel") / "data" / "astronaut.jpg").read_bytes()
    response = httpx.post(server.url + "/encode", files={"image": ("astronaut.jpg", photo)}, timeout=60)
    assert response.status_code == 200, response.text
    real = response.json()
    assert set(shown) == set(real)
    assert {k: v for k, v in shown["model"].items() if k != "sha256"} == {
        k: v for k, v in real["model"].items() if k != "sha256"
    }
    assert real["model"]["sha256"].startswith(_prefix(shown["model"]["sha256"])), real["model"]["sha256"][:8]
    assert (shown["steps"], shown["size_mode"]) == (real["steps"], real["size_mode"])
    energy = {k: round(v, 2) for k, v in real["energy"].items()}
    assert shown["energy"] == energy, energy
    for a, b in zip(shown["latents"], real["latents"], strict=True):
        assert (a["shape"], a["dtype"]) == (b["shape"], b["dtype"])
    assert real["latents"][0]["data"].startswith(_prefix(shown["latents"][0]["data"])), real["latents"][0]["data"][:8]
    assert shown["input"]["array"]["shape"] == real["input"]["array"]["shape"]
    assert real["input"]["png"].startswith(_prefix(shown["input"]["png"]))


def test_triton_example_runs(server, tmp_path, monkeypatch, capsys):
    """The "KServe v2 / Triton clients" example, with the real tritonclient, against a real server."""
    match = re.search(r"<!-- triton-example.*?-->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README has no python block after <!-- triton-example -->"
    code = match.group(1)
    assert "localhost:3000" in code and "localhost:8001" in code
    code = code.replace("http://localhost:3000", server.url).replace("localhost:3000", server.url[len("http://") :])
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("localhost:8001", server.grpc_target), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "True {'name': 'image', 'datatype': 'BYTES', 'shape': [-1]}",
        "(1, 8, 7, 7) (1, 3, 32, 32)",
        "True",
        "True",
    ]


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n### {title}\n")
    end = text.find("\n### ", start + 1)
    return text[start:end]


def test_every_setting_is_in_the_readme_table_with_its_default():
    from dataclasses import MISSING, fields

    from service.settings import Settings, env_name

    rows = {}
    for line in _section("Settings").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `PC_"):
            rows[cells[0].strip("`")] = cells[2]
    defaults = Settings().to_env()
    for f in fields(Settings):
        name = env_name(f.name)
        assert name in rows, f"{name} has no row in the README's settings table"
        if f.default is MISSING or name in ("PC_API_KEY", "PC_API_KEY_FILE", "PC_WARMUP_STEPS"):
            continue  # no default to show: (none)
        shown = re.match(r"`([^`]*)`", rows[name])
        assert shown, f"{name}: the README shows no default"
        value, documented = defaults[name], shown.group(1)
        if isinstance(f.default, float):
            assert float(documented) == float(value), f"{name}: README {documented}, code {value}"
        else:
            assert documented == value, f"{name}: README {documented}, code {value}"
    assert set(rows) <= {env_name(f.name) for f in fields(Settings)}, "the README documents a setting that is gone"


def test_every_error_reason_and_metric_is_in_the_readme():
    from prometheus_client import Counter, Gauge, Histogram

    from service import metrics

    errors = _section("Errors")
    for reason in metrics.REASONS:
        assert f"`{reason}`" in errors, f"reason {reason} is not in the README's errors section"
    table = _section("Metrics")
    for value in vars(metrics).values():
        if isinstance(value, Counter | Gauge | Histogram):
            name = value._name + ("_total" if isinstance(value, Counter) else "")
            assert f"`{name}" in table, f"metric {name} is not in the README's metrics table"
