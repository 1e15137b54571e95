"""The HTTP server's own guards against slow clients, for ``keel serve``.

uvicorn times out an idle keep-alive connection and can cap connections (``limit_concurrency``: past it, 503), but
it never times out a request being *read*: a client that sends half its headers, or a body one byte a minute
(slowloris), holds its connection, and a slot under that cap, for ever. :func:`guarded` wraps uvicorn's HTTP
protocol (httptools, or h11 without it) with two deadlines and a size cap, at the protocol level where the bytes
arrive, before any ASGI app sees the request:

- the request line and headers must arrive within ``header_timeout_s`` of the connection opening (or of the
  request's first byte on a kept-alive connection), and within ``max_header_bytes``: else ``408`` / ``431`` and the
  connection is closed;
- the body must arrive within ``body_timeout_s`` of the headers: else ``408`` (when no answer has started) and the
  connection is closed, so the app reading it sees a disconnect.

A response being *written* (an SSE stream, for hours) is no request being read: neither deadline applies to it.

Past uvicorn's connection cap (``limit_concurrency``) a request gets keel's ``503`` problem+json with
``Retry-After``, not uvicorn's plain-text one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.h11_impl import H11Protocol

from keel.interaction.problems import problem

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
    Base = H11Protocol  # type: ignore[assignment,misc]


def _answer(status: int, reason: str) -> bytes:
    body = f'{{"type":"urn:keel:problem:{reason}","title":"{reason.replace("_", " ").capitalize()}","status":{status}}}'
    return (
        f"HTTP/1.1 {status} {reason.replace('_', ' ').title()}\r\ncontent-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n{body}"
    ).encode()


OVER_CAPACITY_RETRY_S = 1
"""``Retry-After`` of the 503 past the connection cap: connections free up as requests end."""


async def over_capacity(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """The ASGI app uvicorn runs for a request past its connection cap, answering as keel answers errors."""
    answer = problem(
        503,
        "Over capacity",
        "this server holds as many connections as it is configured for (KEEL_HTTP_MAX_CONNECTIONS); retry shortly",
        type="urn:keel:problem:over_capacity",
        headers={"Retry-After": str(OVER_CAPACITY_RETRY_S), "Connection": "close"},
    )
    await answer(scope, receive, send)  # type: ignore[arg-type]  # uvicorn's and Starlette's ASGI types, one protocol


class GuardedProtocol(Base):
    """uvicorn's HTTP protocol with the deadlines of the module docstring (set on a subclass by :func:`guarded`)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_header_bytes: int = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._reading: str | None = None  # "headers" or "body" while a request is being read
        self._header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._read(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading is None:
            self._read("headers")  # the first bytes of the next request on a kept-alive connection
        before = self.cycle
        super().data_received(data)
        if self.transport.is_closing():
            self._read(None)
            return
        if self._reading == "headers":
            if self.cycle is before:  # the headers are not complete yet
                self._header_bytes += len(data)
                if self._header_bytes > self.max_header_bytes:
                    self._refuse(431, "request_header_fields_too_large")
                return
            self._header_bytes = 0
            self._read("body")
        if self._reading == "body" and not self.cycle.more_body:
            self._read(None)

    def _read(self, what: str | None) -> None:
        """Start reading ``what`` under its deadline (None: nothing is being read, no deadline)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._reading = what
        if what is not None:
            timeout = self.header_timeout_s if what == "headers" else self.body_timeout_s
            self._deadline = self.loop.call_later(timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._deadline = None
        if self._reading == "headers":
            self._refuse(408, "request_timeout")
        elif self._reading == "body":
            cycle = self.cycle
            cycle.disconnected = True  # the app's reads end, and its answer is not written after ours
            cycle.message_event.set()
            self._refuse(408 if not cycle.response_started else 0, "request_timeout")

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # uvicorn picked its plain-text 503 for a request past the connection cap; keel's answer goes instead.
        # (httptools only: uvicorn's h11 protocol has no such hook and keeps its own 503.)
        super()._start_asgi_task(cycle, over_capacity if app is service_unavailable else app)

    def _refuse(self, status: int, reason: str) -> None:
        self._read(None)
        if status and not self.transport.is_closing():
            self.transport.write(_answer(status, reason))
        self.transport.close()


def guarded(*, header_timeout_s: float, body_timeout_s: float, max_header_bytes: int) -> type[GuardedProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, with these limits."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s, "max_header_bytes": max_header_bytes},
    )
