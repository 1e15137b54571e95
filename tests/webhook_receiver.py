"""A loopback webhook receiver (a fixture), and checking its deliveries' Standard Webhooks signatures."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pytest
from standardwebhooks.webhooks import Webhook

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass(frozen=True)
class Hit:
    at: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    status: int  # what the receiver answered


@dataclass
class Receiver:
    """Answers POSTs from a script of ``(status, headers)``, then with ``default``; records every request."""

    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    default: tuple[int, dict[str, str]] = (200, {})
    hits: list[Hit] = field(default_factory=list)
    gates: dict[str, threading.Event] = field(default_factory=dict)
    """A path whose requests are held, unanswered, until its event is set (a slow receiver, without a clock)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{self.base}/hook"

    def respond(self, *responses: tuple[int, dict[str, str]], default: tuple[int, dict[str, str]] = (200, {})) -> None:
        with self.lock:
            self.script = list(responses)
            self.default = default

    def snapshot(self) -> list[Hit]:
        with self.lock:
            return list(self.hits)

    def wait_hits(self, n: int, timeout: float = 10) -> list[Hit]:
        return wait_for(lambda: h if len(h := self.snapshot()) >= n else None, timeout, f"{n} webhook requests")

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        with self.lock:
            status, extra = self.script.pop(0) if self.script else self.default
            self.hits.append(Hit(time.monotonic(), time.time(), path, headers, body, status))
        return status, extra


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, extra = rec.handle(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            gate = rec.gates.get(self.path)
            if gate is not None:
                gate.wait(timeout=30)
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    rec.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=rec.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        for gate in rec.gates.values():
            gate.set()
        rec.server.shutdown()
        rec.server.server_close()
        thread.join(timeout=5)


def new_secret(n: int = 32) -> str:
    return "whsec_" + base64.b64encode(os.urandom(n)).decode()


def verify(secret: str, hit: Hit) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(hit.body, hit.headers)
    return payload
