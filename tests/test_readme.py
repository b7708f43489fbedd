"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def block_after(marker: str, language: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {marker}.*?-->\s*```{language}\n(.*?)```", text, re.S)
    assert match, f"README has no {language} block after <!-- {marker} -->"
    return match.group(1)


def test_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(block_after("python-example", "python"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "[(1, 8, 7, 7), (1, 10, 3, 3)]" in out
    assert (tmp_path / "my-model.safetensors").is_file()


def test_test_command_is_what_ci_runs():
    command = block_after("test-command", "bash")
    assert "python3 -m venv" in command and "pytest" in command
    assert "pip install torch==2.13.0" in command  # the CPU build, before anything can pull CUDA
    assert "PC_KSERVE_PYTHON=" in command  # KServe's clients run (tests/service/test_v2_kserve.py), not skipped
