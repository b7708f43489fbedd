"""Faults a real pc-serve must survive (docs/RELIABILITY.md, items 5-10), each against a real server.

One server serves most of them (a start costs seconds): two workers, a warm-up at 300 steps (so there
is a start-up to watch), a short request timeout (so a slow body runs into it soon), and a checkpoint
named by a path relative to the directory pc-serve was started in. The drain test stops it, so it
comes last.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

import pcmodel
from benchmarks.launch import free_port

from .conftest import Server, metric, png

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hardened(tmp_path_factory) -> Iterator[Server]:
    cwd = tmp_path_factory.mktemp("user")
    (cwd / "runs" / "x").mkdir(parents=True)
    pcmodel.load("conv-rgb").save(cwd / "runs" / "x" / "model.safetensors", {"note": "relative path"})
    server = Server(
        tmp_path_factory.mktemp("hardened"),
        cwd=cwd,
        model="runs/x/model.safetensors",
        workers=2,
        warmup_steps="300",
        max_batch_size=8,  # fewer batch sizes to warm up: a quicker start on 2 shared cores
        request_timeout_s=5,
        probe_encode=True,
    )
    with server as s:
        all_ready(s)
        yield s


def all_ready(server: Server, timeout_s: float = 120) -> None:
    """Until every worker is ready: each live worker has reported its model loaded (the `ready-PID` file it writes
    for pc-serve's supervisor, under the server's TMPDIR), then /readyz answers 200 twelve times in a row. /readyz
    alone is not enough: a restarted worker accepts no connection until its imports are done, so a streak can
    reach only the old worker and end before the new one answers 503 `loading`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reported = {f.name.removeprefix("ready-") for f in (server.home / "tmp").glob("pc-serve-state-*/ready-*")}
        live = {str(p.pid) for p in workers(server)}
        if live and live <= reported:
            break
        time.sleep(0.2)
    assert live and live <= reported, f"workers {sorted(live - reported)} never reported their model loaded"
    streak = 0
    while streak < 12 and time.monotonic() < deadline:
        streak = streak + 1 if server.get("/readyz").status_code == 200 else 0
        time.sleep(0.05 if streak else 0.3)
    assert streak >= 12, "a worker never became ready"


def workers(server: Server) -> list[psutil.Process]:
    assert server.process is not None
    return psutil.Process(server.process.pid).children()


def established(process: psutil.Process, port: int) -> int:
    return sum(1 for c in process.net_connections("tcp") if c.laddr.port == port and c.status == "ESTABLISHED")


def in_progress(server: Server) -> float:
    samples = server.metrics()
    return sum(v for (name, _), v in samples.items() if name == "bentoml_service_request_in_progress")


def test_probes_answer_while_the_model_loads(hardened):
    """Item 8: from the moment the port accepts connections, /readyz says 503 and /livez 200."""
    first_ready = hardened.probes.index(("/readyz", 200))
    loading = hardened.probes[:first_ready]
    assert ("/readyz", 503) in loading, hardened.probes
    assert ("/livez", 200) in loading and ("/livez", 503) not in loading
    # A request while the model loads is answered at once: 503 (retry), never a wait into a 504.
    encodes = {status for path, status in hardened.probes if path == "/encode"}
    assert 503 in encodes and encodes <= {503, 400}, hardened.probes


def test_a_relative_checkpoint_path_is_the_users(hardened):
    """Item 9: the path is resolved against the directory pc-serve started in, not the workers'."""
    card = hardened.get("/model").json()
    assert card["source"] == "model.safetensors" and card["name"] == "conv-rgb"
    assert hardened.get("/livez").status_code == 200


def test_keep_alive_clients_spread_over_the_workers(hardened):
    """Item 10: with one socket per worker (SO_REUSEPORT) the kernel spreads connections over both."""
    clients = [httpx.Client(base_url=hardened.url, timeout=30) for _ in range(16)]
    try:
        for client in clients:
            assert client.get("/readyz").status_code == 200  # the connection stays open (keep-alive)
        counts = [established(p, hardened.port) for p in workers(hardened)]
    finally:
        for client in clients:
            client.close()
    assert len(counts) == 2 and sum(counts) == 16
    assert min(counts) >= 1, f"every keep-alive connection went to one worker: {counts}"


@pytest.mark.parametrize("path", ["/encode", "/v2/models/conv-rgb/infer"])
def test_a_slow_body_gets_408_counted_as_timeout(hardened, path):
    """Item 7: a body dribbled at 1 byte/s is the client's fault: 408, reason timeout, never 504 (/encode and
    the Open Inference Protocol's infer alike)."""
    before = hardened.metrics()
    with socket.create_connection(("127.0.0.1", hardened.port)) as conn:
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n".encode()
            + b"Content-Length: 100000\r\n\r\n"
        )
        conn.settimeout(1.0)
        started = time.monotonic()
        answer = b""
        while time.monotonic() - started < 60:
            try:
                conn.sendall(b"x")
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in head.lower()
    assert b"did not arrive within" in body
    after = hardened.metrics()
    assert (
        metric(after, "pc_request_errors_total", reason="timeout")
        - metric(before, "pc_request_errors_total", reason="timeout")
        == 1
    )
    codes = {dict(labels).get("http_response_code") for (name, labels) in after if name.startswith("bentoml_service")}
    assert "408" in codes and "504" not in codes


def _v2_infer(server: Server, image: bytes, steps: int, images: int = 1) -> httpx.Response:
    """An Open Inference Protocol request for `images` copies of one image (JSON tensors), energies only."""
    data = [base64.b64encode(image).decode()] * images
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [images], "data": data}],
        "parameters": {"steps": steps, "size_mode": "resize"},
        "outputs": [{"name": "energy"}],
    }
    return httpx.post(server.url + "/v2/models/conv-rgb/infer", json=body, timeout=60)


def test_a_killed_worker_leaves_no_requests_in_progress(hardened, astronaut):
    """Item 5: kill -9 a worker with requests in flight (/encode and the Open Inference Protocol's infer); the
    service recovers and an idle server reports 0."""
    image = png(astronaut[:96, :96])
    results: list[int | str] = []

    def encode(v2: bool) -> None:
        try:
            if v2:
                r = _v2_infer(hardened, image, 1000)
            else:
                r = httpx.post(
                    hardened.url + "/encode", files={"image": ("a.png", image)}, data={"steps": "1000"}, timeout=60
                )
            results.append(r.status_code)
        except httpx.HTTPError as exc:
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=encode, args=(i % 2 == 1,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    victim = None
    while victim is None and time.monotonic() < deadline:
        busy = [(established(p, hardened.port), p) for p in workers(hardened)]
        count, process = max(busy, key=lambda item: item[0])
        if count >= 1 and in_progress(hardened) >= 1:
            victim = process
    assert victim is not None, "no request was in flight"
    old = {p.pid for p in workers(hardened)}
    os.kill(victim.pid, signal.SIGKILL)
    time.sleep(0.5)  # the supervisor sees the exit within its poll (0.2 s)
    # The dead worker's socket is closed, not left listening for its replacement: a new connection goes to the
    # other worker at once (it had waited 4-7 s in the dead one's backlog). And the server is not ready until
    # every worker is: the survivor's /readyz says 503 while the replacement loads.
    for _ in range(10):
        assert httpx.get(hardened.url + "/livez", timeout=3).status_code == 200
    assert httpx.get(hardened.url + "/readyz", timeout=3).status_code == 503
    for t in threads:
        t.join(90)
    assert any(isinstance(r, str) for r in results) or len(results) == 8
    # A new worker takes the dead one's place, and the lost requests are not "in progress" forever.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        current = {p.pid for p in workers(hardened)}
        if len(current) == 2 and current != old and in_progress(hardened) == 0:
            break
        time.sleep(0.5)
    assert len(current) == 2 and victim.pid not in current
    assert in_progress(hardened) == 0
    all_ready(hardened)  # the new worker loads its model (requests sent to it meanwhile get 503 `loading`)
    assert hardened.post("/encode", files={"image": ("a.png", image)}).status_code == 200
    assert _v2_infer(hardened, image, 5).status_code == 200
    assert in_progress(hardened) == 0
    # The new worker serves gRPC too (each worker binds the gRPC port): fresh channels reach both workers.
    import tritonclient.grpc as grpcclient

    for _ in range(4):
        client = grpcclient.InferenceServerClient(hardened.grpc_target)
        assert client.is_server_ready()
        client.close()


def test_sigterm_drains_and_refuses_new_connections_at_once(hardened, astronaut):
    """Item 6 (stops the server): requests in flight (/encode_batch and a v2 infer) finish; a new connection is
    refused at once."""
    assert hardened.process is not None
    all_ready(hardened)  # a worker still loading would answer 503 `loading` instead of taking a request
    image = png(astronaut[:96, :96])
    results: list[int] = []
    batch = threading.Thread(
        target=lambda: results.append(
            httpx.post(
                hardened.url + "/encode_batch",
                files=[("images", (f"{i}.png", image)) for i in range(8)],
                data={"steps": "1000", "size_mode": "resize"},  # 8 native-size images, 1000 steps each
                timeout=60,
            ).status_code
        )
    )
    v2 = threading.Thread(target=lambda: results.append(_v2_infer(hardened, image, 1000, images=4).status_code))
    senders = [batch, v2]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 30
    while in_progress(hardened) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(hardened.process.pid, signal.SIGTERM)  # pc-serve alone, as a container runtime does
    time.sleep(0.5)
    started = time.monotonic()
    try:
        status = httpx.get(hardened.url + "/readyz", timeout=30).status_code
    except httpx.ConnectError:
        status = None  # refused: nothing listens any more
    assert time.monotonic() - started < 5, "a new connection waited during the drain"
    assert status in (None, 503)
    for sender in senders:
        sender.join(60)
    assert results == [200, 200], "a request in flight did not finish"
    assert hardened.process.wait(60) == 0


def test_pc_serve_gives_up_after_failed_worker_starts(tmp_path):
    """Item 9: a worker that cannot start (here: a device that does not exist) stops pc-serve after
    three tries with exit status 1 and the worker's one-line error, instead of restarting forever."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PC_")}
    env.update(BENTOML_HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path), PC_DEVICE="cuda:99", PC_HOST="127.0.0.1")
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 1, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("pc-serve: a worker failed to start 3 times in a row: "), last
    assert "Traceback" not in last and len(last) < 300
    assert run.stderr.count("failed to start (") == 3
