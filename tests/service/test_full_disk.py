"""A full BENTOML_HOME (where the workers' Prometheus files live), on a real tmpfs under a real pc-serve.

prometheus_client's files are sparse mmaps: a full filesystem answered the first write to an unbacked page
with SIGBUS, which killed the worker (-7) and every replacement (docs/RELIABILITY.md, item 12). Needs root
(mount); skipped otherwise.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from benchmarks.launch import LocalServer, free_port
from service.supervisor import MIN_FREE_BYTES


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """mount(path, size): a tmpfs of `size` at `path`, unmounted at the end whatever happens."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"mount -t tmpfs failed: {done.stderr.decode(errors='replace').strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> None:
    """Write zeros into `path` until its filesystem is full."""
    subprocess.run(["dd", "if=/dev/zero", f"of={path / 'filler'}", "bs=4k"], capture_output=True)
    st = os.statvfs(path)
    assert st.f_bavail == 0, "the tmpfs did not fill"


def test_pc_serve_refuses_to_start_on_a_full_bentoml_home_in_one_line(tmp_path, tmpfs):
    home = tmpfs(tmp_path / "bentoml", "3m")
    fill(home)
    (tmp_path / "tmp").mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PC_")},
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        "TMPDIR": str(tmp_path / "tmp"),
        "PC_HOST": "127.0.0.1",
        "PC_PORT": str(free_port()),
        "PC_GRPC_PORT": "0",
        "PC_WORKERS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "service.cli"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    # Before: exit 1 after three worker deaths, "a worker failed to start 3 times in a row: exited with status -7".
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"pc-serve: BENTOML_HOME={home} has 0 bytes free"), lines[0]
    assert f"{MIN_FREE_BYTES} (16 MiB)" in lines[0]


def _pid_files(directory: Path, pid: int) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in directory.glob(f"*_{pid}.db")}


def test_a_bentoml_home_filling_up_leaves_the_workers_serving(tmp_path, tmpfs):
    home = tmpfs(tmp_path / "bentoml", f"{(MIN_FREE_BYTES >> 20) + 4}m")
    server = LocalServer(tmp_path, grpc_port=0, workers=1)
    try:
        server.start()
        worker = psutil.Process(server.process.pid).children()[0]
        metrics_dir = home / "prometheus_multiproc_dir"
        files = _pid_files(metrics_dir, worker.pid)
        assert {"counter", "histogram"} <= {name.rsplit("_", 1)[0] for name in files}
        for name, st in files.items():  # before: sparse (the histogram file had 36 KiB of its 64)
            assert st.st_blocks * 512 >= st.st_size, f"{name}: {st.st_blocks * 512} of {st.st_size} bytes allocated"

        fill(home)
        client = httpx.Client(base_url=server.url, timeout=10)
        paths = ["/healthz", "/readyz", "/livez", "/metrics", "/schema.json", "/docs.json", "/", "/encode", "/nope"]
        paths += ["/v2", "/v2/health/ready", "/v2/models/conv-rgb", "/v2/models/conv-rgb/ready"]
        answers = []
        for path in paths:  # new (endpoint, method, status) series: more than the 64 KiB histogram file holds
            for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
                answers.append(client.request(method, path).status_code)  # before: the first /healthz: no answer
        assert set(answers) <= {200, 400, 404, 405, 415, 422}, sorted(set(answers))
        assert worker.is_running() and server.process.poll() is None
        log = server.log.read_text(errors="replace")
        assert "exited" not in log and "failed to start" not in log, server.log_tail()
        assert "no space for a new Prometheus series" in log, server.log_tail()
        for name, st in _pid_files(metrics_dir, worker.pid).items():
            assert st.st_blocks * 512 >= st.st_size, name
        assert client.get("/metrics").status_code == 200

        # Space again: a series left out appears at its next update.
        (home / "filler").unlink()
        assert client.put("/healthz").status_code == 405
        text = client.get("/metrics").text
        assert re.search(r'bentoml_service_request_total\{[^}]*endpoint="/healthz"[^}]*http_response_code="405"', text)

        # Full again, and the worker dies (here: killed): its replacement cannot make its files, and pc-serve
        # stops naming the full disk (before: three deaths by SIGBUS, "exited with status -7" and nothing else).
        fill(home)
        worker.kill()
        assert server.process.wait(60) == 1
        last = server.log.read_text(errors="replace").strip().splitlines()[-1]
        assert last.startswith("pc-serve: a worker failed to start 3 times in a row"), last
        assert f"BENTOML_HOME={home} is full" in last and "No space left on device" in last, last
    finally:
        server.stop()


def test_the_files_grow_with_blocks_and_a_full_disk_leaves_a_series_out(tmp_path, tmpfs):
    """BackedMmapedDict on its own: blocks under every byte as the file doubles; ENOSPC is no signal."""
    from service import metricfiles

    directory = tmpfs(tmp_path / "m", "1m")
    name = str(directory / "histogram_1.db")
    values = metricfiles.BackedMmapedDict(name)
    for i in range(300):  # 64 KiB -> 128 KiB
        values.write_value(f"key-{i:04d}-" + "x" * 200, float(i), 0.0)
    st = os.stat(name)
    assert st.st_size == 128 << 10 and st.st_blocks * 512 >= st.st_size
    fill(directory)
    for i in range(300, 600):  # past 128 KiB: left out, no SIGBUS
        values.write_value(f"key-{i:04d}-" + "x" * 200, float(i), 0.0)
    assert os.stat(name).st_size == 128 << 10
    assert values.read_value("key-0299-" + "x" * 200) == (299.0, 0.0)
    (directory / "filler").unlink()
    values.write_value("late", 7.0, 0.0)
    assert values.read_value("late") == (7.0, 0.0)
    used = struct.unpack("i", Path(name).read_bytes()[:4])[0]
    assert used <= os.stat(name).st_size <= os.stat(name).st_blocks * 512
    values.close()
