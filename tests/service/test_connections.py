"""Connections a client can abuse: request heads are bounded (431; gRPC metadata: RESOURCE_EXHAUSTED), and a
client that disconnects mid-body ends its request at once, so an idle server stops within 5 s of SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from service.middleware import MAX_HEADER_FIELDS

from .conftest import Server, metric


def test_request_heads_are_bounded(server):
    before = metric(server.metrics(), "pc_request_errors_total", reason="header_too_large")
    long_line = httpx.get(server.url + "/livez", headers={"X-Padding": "a" * 200_000}, timeout=30)
    many = httpx.get(server.url + "/livez", headers=[(f"X-Field-{i}", "1") for i in range(5000)], timeout=30)
    for response in (long_line, many):
        assert response.status_code == 431 and response.json()["reason"] == "header_too_large"
        assert "PC_MAX_HEADER_BYTES" in response.json()["error"]
    assert "16384 bytes" in long_line.json()["error"]
    # Just under both limits is fine (httpx adds a few fields of its own).
    fields = [(f"X-Field-{i}", "1") for i in range(MAX_HEADER_FIELDS - 10)]
    assert httpx.get(server.url + "/livez", headers=fields, timeout=30).status_code == 200
    assert metric(server.metrics(), "pc_request_errors_total", reason="header_too_large") == before + 2

    client = grpcclient.InferenceServerClient(server.grpc_target)
    with pytest.raises(InferenceServerException) as caught:
        client.get_server_metadata(headers={"x-padding": "a" * 20_000})
    assert str(caught.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
    assert client.is_server_live()  # the channel still works for a sane call
    client.close()


def test_an_endless_head_is_refused_while_it_arrives(server):
    """A header line that never ends gets 431 once the limit's bytes are in, not when the client stops: the
    worker holds at most one read beyond PC_MAX_HEADER_BYTES (service.headguard)."""
    before = metric(server.metrics(), "pc_request_errors_total", reason="header_too_large")
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            while sent < 64 << 20:  # 64 MiB: far more than the worker would ever keep
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    assert sent < 16 << 20, f"the server read {sent} bytes of one head"
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["reason"] == "header_too_large" and "still arriving" in body["error"]
    assert metric(server.metrics(), "pc_request_errors_total", reason="header_too_large") == before + 1
    assert server.get("/livez").status_code == 200


def _exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh connection and read the answer until the server closes it."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


UNPARSEABLE = [  # what httptools refuses, and its words for it (in the answer's message)
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", "Invalid method"),  # TLS to plain HTTP
    (b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", "Content-Length"),
    (b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "Duplicate"),
    (
        b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding",
    ),
    (b"GET /livez HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", "header"),
    # The head is fine, so the request has started; its chunked body's framing is not.
    (b"POST /encode HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
]


def test_unparseable_http_gets_the_json_400_counted_as_bad_http(server):
    """Before: uvicorn's plain-text 400 "Invalid HTTP request received.", counted nowhere. Now the service's JSON
    error body with reason bad_http, the parser's words in the message, the connection closed, each counted once
    (the request whose body broke is not counted again as `disconnected`)."""
    samples = server.metrics()
    before = metric(samples, "pc_request_errors_total", reason="bad_http")
    disconnected = metric(samples, "pc_request_errors_total", reason="disconnected")
    for data, words in UNPARSEABLE:
        answer = _exchange(server.port, data)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
        assert b"content-type: application/json" in head.lower() and b"connection: close" in head.lower()
        error = json.loads(body)
        assert error["reason"] == "bad_http" and "not valid HTTP/1.1" in error["error"], error
        assert words in error["error"], error
    deadline = time.monotonic() + 5  # the broken body's request ends asynchronously
    while metric(server.metrics(), "pc_request_errors_total", reason="bad_http") < before + len(UNPARSEABLE):
        assert time.monotonic() < deadline, "not every unparseable request was counted"
        time.sleep(0.1)
    time.sleep(0.3)
    samples = server.metrics()
    assert metric(samples, "pc_request_errors_total", reason="bad_http") == before + len(UNPARSEABLE)
    assert metric(samples, "pc_request_errors_total", reason="disconnected") == disconnected
    assert server.get("/livez").status_code == 200


def _start_body_and_vanish(port: int, path: str) -> None:
    """A chunked multipart body that stops after its first chunk, then the connection closes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        sock.sendall(head.encode() + b"10\r\n--b\r\nContent-Dis\r\n")
        time.sleep(0.3)


def test_a_client_that_vanishes_mid_body_does_not_hold_the_drain(tmp_path, astronaut64):
    """Before: the request lived until the request timeout (SIGTERM took 57.5 s). Now it ends at once, is
    counted, and no 5xx is logged as ours. A gRPC call in flight at SIGTERM still finishes (the drain
    waits for it, and only for it), and the server exits within 5 s of it."""
    with Server(tmp_path) as s:
        before = metric(s.metrics(), "pc_request_errors_total", reason="disconnected")
        for path in ("/encode", "/v2/models/conv-rgb/infer"):
            _start_body_and_vanish(s.port, path)
        deadline = time.monotonic() + 10
        while metric(s.metrics(), "pc_request_errors_total", reason="disconnected") < before + 2:
            assert time.monotonic() < deadline, "the disconnects were not noticed"
            time.sleep(0.1)
        client = grpcclient.InferenceServerClient(s.grpc_target)
        image = grpcclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([astronaut64], dtype=object))
        done: queue.Queue = queue.Queue()
        parameters = {"steps": 1000, "size_mode": "tile"}  # seconds of model time on a CPU
        client.async_infer("conv-rgb", [image], lambda result, error: done.put((result, error)), parameters=parameters)
        time.sleep(0.3)
        assert done.empty(), "the call finished before SIGTERM: nothing was in flight"
        os.killpg(s.process.pid, signal.SIGTERM)
        result, error = done.get(timeout=60)
        finished = time.monotonic()
        assert error is None and result.as_numpy("energy").shape == (1, 2)
        s.process.wait(timeout=60)
        assert time.monotonic() - finished < 5
        assert s.process.returncode == 0
        client.close()
        log = s.log.read_text()
        assert "status=5" not in log and "Traceback" not in log


def test_starting_a_running_server_again_starts_no_second_one(server):
    """`with LocalServer(...).start() as s` calls start twice: the second call keeps the running process (a
    second would be left running when the first is stopped: such leftovers skewed a benchmark session)."""
    process = server.process
    assert server.start() is server and server.process is process and process.poll() is None
    assert server.get("/readyz").status_code == 200


def _access_lines(s: Server) -> list[str]:
    return [line for line in s.log.read_text(errors="replace").splitlines() if "path=/encode" in line]


def test_the_access_log_has_a_line_per_request_unless_turned_off(server, astronaut64, tmp_path):
    """BentoML's access log (client, method, path, status, bytes, time) is on by default; PC_ACCESS_LOG=false
    turns it off (a line per request costs the event loop ~0.1 ms: docs/PERFORMANCE.md). The request is found
    by its own multipart boundary, which the line records."""
    boundary = f"pc-access-log-{os.getpid()}-{time.monotonic_ns()}"
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    files = {"image": ("a.png", astronaut64)}
    assert server.post("/encode", files=files, data={"steps": "2"}, headers=headers).status_code == 200
    deadline = time.monotonic() + 10
    while not (mine := [line for line in _access_lines(server) if boundary in line]) and time.monotonic() < deadline:
        time.sleep(0.05)  # the line is written after the response
    assert len(mine) == 1 and "method=POST" in mine[0] and "status=200" in mine[0]
    with Server(tmp_path, model="rao-ballard-1999", access_log=False, grpc_port=0) as quiet:
        for _ in range(3):
            answer = quiet.post("/encode", files=files, data={"steps": "2"})
            assert answer.status_code == 200
        time.sleep(0.5)
        assert _access_lines(quiet) == [] and "Service PCEncoder initialized" in quiet.log.read_text()
