"""Issue 21, defect 6: slow clients are timed out by `keel serve` (real sockets against a real server).

The battery held connections with half-sent headers open for 150 s (10 of them) and 45 s (80 of them). Now the
headers must arrive within KEEL_HTTP_HEADER_TIMEOUT_S, a body within KEEL_HTTP_BODY_TIMEOUT_S, headers within
KEEL_HTTP_MAX_HEADER_BYTES, and connections past KEEL_HTTP_MAX_CONNECTIONS get 503
(:mod:`keel.interaction.server`).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from conftest import free_port, make_key
from keel_processes import KeelProcess, Servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

ENV = {
    "KEEL_HTTP_HEADER_TIMEOUT_S": "1",
    "KEEL_HTTP_BODY_TIMEOUT_S": "1",
    "KEEL_HTTP_MAX_HEADER_BYTES": "4096",
    "KEEL_HTTP_MAX_CONNECTIONS": "4",
}


def connect(server: KeelProcess) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def answer(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start, chunks = time.monotonic(), []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - start


@pytest.fixture
def server(servers: Servers, tmp_path: Path) -> KeelProcess:
    return servers.start(free_port(), tmp_path / "keel", env=ENV)


def test_half_sent_headers_are_timed_out(server: KeelProcess) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: keel\r\nX-Slow: ")
        data, took = answer(sock)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert b"urn:keel:problem:request_timeout" in data
    assert took < 8  # the header deadline (1 s here), not for ever


def test_a_connection_that_sends_nothing_is_timed_out(server: KeelProcess) -> None:
    with connect(server) as sock:
        data, _ = answer(sock)
    assert data.startswith(b"HTTP/1.1 408 "), data


def test_headers_dribbled_byte_by_byte_still_meet_the_deadline(server: KeelProcess) -> None:
    """Slowloris proper: each byte comes in time, the headers never end. The deadline is for all of them."""
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n")
        start = time.monotonic()
        with pytest.raises(OSError):  # the server closes on us mid-dribble (reset or broken pipe)
            while time.monotonic() - start < 8:
                sock.sendall(b"X-A: b\r\n")
                time.sleep(0.2)
                sock.setblocking(False)
                try:
                    if sock.recv(65536).startswith(b"HTTP/1.1 408"):
                        raise ConnectionResetError("answered 408")
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
        assert time.monotonic() - start < 8


def test_a_slow_body_is_timed_out(server: KeelProcess, tmp_path: Path) -> None:
    key = make_key(tmp_path / "keel", "acme", frozenset({"tasks:read", "tasks:write"}))
    with connect(server) as sock:
        sock.sendall(
            b"POST /v1/tasks HTTP/1.1\r\nHost: keel\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + key.encode() + b'\r\nContent-Length: 100\r\n\r\n{"workflow": '
        )
        data, took = answer(sock)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert took < 8
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as c:
        assert c.get("/v1/tasks").json()["items"] == []  # nothing half-read was stored


def test_oversized_headers_are_refused(server: KeelProcess) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n" + b"X-Big: " + b"a" * 8000)
        data, _ = answer(sock)
    assert data.startswith(b"HTTP/1.1 431 "), data


def test_connections_past_the_limit_get_503_until_the_slow_ones_are_gone(server: KeelProcess) -> None:
    held = [connect(server) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n")
        time.sleep(0.2)
        refused = httpx.get(server.url + "/healthz")  # 3 held + this one: the limit of 4
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["type"] == "urn:keel:problem:over_capacity"
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/healthz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_normal_requests_and_long_streams_are_untouched(server: KeelProcess, tmp_path: Path) -> None:
    """The deadlines are for reading a request: a kept-alive connection, a request slower than them to answer
    and an SSE stream far longer than them all work."""
    key = make_key(tmp_path / "keel", "acme", frozenset({"tasks:read", "tasks:write"}))
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        time.sleep(0.5)  # idle, under the keep-alive timeout: the same connection serves the next request
        body = {"workflow": "diagnostic", "input": {"steps": 6, "step_seconds": 0.5}}
        task = c.post("/v1/tasks", json=body)
        assert task.status_code == 202, task.text
        with connect_sse(c, "GET", f"/v1/tasks/{task.json()['id']}/events") as source:
            start = time.monotonic()
            types = [e.event for e in source.iter_sse() if e.data]
        assert types[-1] == "end" and time.monotonic() - start > 2  # streamed past both deadlines
