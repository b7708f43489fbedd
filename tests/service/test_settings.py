"""Settings from PC_* variables and pc-serve's checks before it starts a server."""

from __future__ import annotations

import os

import pytest

from service import cli
from service.settings import Settings, SettingsError


def test_defaults_are_the_documented_ones():
    s = Settings.from_env({})
    assert (s.model, s.host, s.port, s.workers) == ("default", "0.0.0.0", 3000, 1)
    assert s.max_body_bytes == 20 * 1024 * 1024 and s.max_steps == 1000 and s.max_batch_images == 32


def test_environment_then_overrides():
    env = {"PC_MODEL": "rao-ballard-1999", "PC_PORT": "3100", "PC_ALLOW_UNSTABLE": "yes", "PC_WARMUP_STEPS": "10, 50"}
    s = Settings.from_env(env, port=3200, workers=None)
    assert s.model == "rao-ballard-1999" and s.port == 3200 and s.workers == 1
    assert s.allow_unstable is True and s.warmup_steps == (10, 50)
    assert Settings.from_env(s.to_env()) == s  # what pc-serve hands to the workers reads back the same


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PC_PORT": "http"}, "PC_PORT='http' is not valid: expected an integer"),
        ({"PC_PORT": "70000"}, "PC_PORT must be a TCP port"),
        ({"PC_WORKERS": "0"}, "PC_WORKERS must be at least 1"),
        ({"PC_ALLOW_UNSTABLE": "maybe"}, "expected true or false"),
        ({"PC_WARMUP_STEPS": "0"}, "PC_WARMUP_STEPS must be step counts in 1..1000"),
        ({"PC_WARMUP_STEPS": "1,2,3,4,5,6,7,8"}, "PC_WARMUP_STEPS takes at most 7 step counts"),
        ({"PC_MAX_BATCH_SIZE": "64", "PC_MAX_QUEUE": "8"}, "PC_MAX_QUEUE must be at least PC_MAX_BATCH_SIZE"),
        ({"PC_GRPC_PORT": "3000"}, "PC_GRPC_PORT must be a TCP port other than PC_PORT"),
        ({"PC_MAX_HEADER_BYTES": "100"}, "PC_MAX_HEADER_BYTES must be at least 1024"),
        ({"PC_API_KEY": "a", "PC_API_KEY_FILE": "/k"}, "set PC_API_KEY or PC_API_KEY_FILE, not both"),
    ],
)
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env)


def run_cli(capsys, monkeypatch, tmp_path, *argv: str, **env: str) -> tuple[int, str, str]:
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = cli.main(["--check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_pc_serve_checks_a_good_model(capsys, monkeypatch, tmp_path):
    code, out, err = run_cli(capsys, monkeypatch, tmp_path)
    assert code == 0 and "conv-rgb" in out and err == ""


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.safetensors", "no such checkpoint file"),
        (lambda p: _write(p / "junk.safetensors", b"not a checkpoint at all"), "not a safetensors file"),
        (lambda p: _write(p / "empty.safetensors", b""), "is empty"),
        (lambda p: p, "is a directory"),
        (lambda p: _fifo(p / "pipe.safetensors"), "is a named pipe"),
    ],
    ids=["missing", "junk", "empty", "directory", "fifo"],
)
def test_pc_serve_rejects_a_bad_checkpoint_in_one_line(capsys, monkeypatch, tmp_path, make, message):
    code, out, err = run_cli(capsys, monkeypatch, tmp_path, "--model", str(make(tmp_path)))
    assert code == 2 and out == ""
    assert err.startswith("pc-serve: ") and err.count("\n") == 1 and message in err


def test_pc_serve_needs_a_writable_bentoml_home(capsys, monkeypatch, tmp_path):
    blocked = _write(tmp_path / "file", b"")  # a file where a directory should be
    code, _, err = run_cli(capsys, monkeypatch, tmp_path, BENTOML_HOME=str(blocked / "home"))
    assert code == 2 and "BENTOML_HOME" in err and "not a writable directory" in err


def test_pc_serve_flags_win_over_the_environment(capsys, monkeypatch, tmp_path):
    code, _, err = run_cli(capsys, monkeypatch, tmp_path, "--port", "99999", PC_PORT="3000")
    assert code == 2 and "PC_PORT must be a TCP port" in err


def _fifo(path):
    os.mkfifo(path)  # opening it to read would block: the check must not
    return path


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_api_key_from_the_variable_or_a_file_and_never_in_repr(tmp_path):
    assert Settings.from_env({}).secret() is None
    s = Settings.from_env({"PC_API_KEY": "abc-123"})
    assert s.secret() == b"abc-123" and "abc-123" not in repr(s)
    (tmp_path / "key").write_text("from-a-secret\n")
    assert Settings.from_env({"PC_API_KEY_FILE": str(tmp_path / "key")}).secret() == b"from-a-secret"
    with pytest.raises(SettingsError, match="cannot be read"):
        Settings.from_env({"PC_API_KEY_FILE": str(tmp_path / "missing")}).secret()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SettingsError, match="is empty"):
        Settings.from_env({"PC_API_KEY_FILE": str(tmp_path / "empty")}).secret()


_TRACING = """
import json
import service.service as s
s.PCEncoder.inject_config()  # what a worker does when it builds the app
from bentoml._internal.configuration.containers import BentoMLContainer
excluded = BentoMLContainer.tracing_excluded_urls.get()
print(json.dumps(bool(excluded and excluded.url_disabled("http://127.0.0.1:3000/encode"))))
"""


@pytest.mark.parametrize(("otel_sdk_disabled", "skipped"), [(None, True), ("TRUE", True), ("false", False)])
def test_tracing_middleware_is_skipped_only_while_the_sdk_is_off(otel_sdk_disabled, skipped, tmp_path):
    """With the OpenTelemetry SDK off (the default) BentoML's tracing middleware excludes every URL (it would
    parse each request for spans that go nowhere); with OTEL_SDK_DISABLED=false it traces /encode. Read from
    BentoML's own configuration container, in a fresh process as a worker would build it."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OTEL_SDK_DISABLED"}
    env.update(BENTOML_HOME=str(tmp_path), BENTOML_DO_NOT_TRACK="true")
    if otel_sdk_disabled is not None:
        env["OTEL_SDK_DISABLED"] = otel_sdk_disabled
    run = subprocess.run([sys.executable, "-c", _TRACING], capture_output=True, text=True, env=env, check=True)
    assert json.loads(run.stdout.splitlines()[-1]) is skipped
