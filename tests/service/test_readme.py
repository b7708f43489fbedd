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
    assert out[1] == "[(8, 7, 7), (10, 3, 3)]"
    grid = "{'rows': 8, 'cols': 8, 'tile': [32, 32], 'stride': [16, 16], 'origin': [-16, -16], 'image': [100, 100]}"
    assert out[2] == grid + " (64, 8, 7, 7)"
    assert out[3] == "(200, 256) [0, 0, 28, 28] None"
    assert out[4] == "['Encoding', 'ServiceError']"
    assert out[5]  # the backend's name
    assert (tmp_path / "reconstruction.png").is_file()
