"""A loopback payment service counting every request by idempotency key: what the crash tests check writes against."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Sink:
    """A loopback payment service counting every request by idempotency key. ``delay_s``: each charge takes that
    long before it is applied (a slow downstream, so that crash tests kill workers mid-call)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.hits: Counter[str] = Counter()
        self.charges: dict[str, dict[str, Any]] = {}
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                key = self.headers["Idempotency-Key"]
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                except ValueError:  # the caller died mid-request: no charge was asked for
                    return
                if delay_s:
                    time.sleep(delay_s)
                sink.hits[key] += 1  # every request counts: a second one would be a second effect
                sink.charges.setdefault(key, {"id": f"ch_{len(sink.charges) + 1}", **body})
                self._send(200, sink.charges[key])

            def do_GET(self) -> None:  # noqa: N802
                key = self.path.rsplit("/", 1)[-1]
                self._send(200, sink.charges[key]) if key in sink.charges else self._send(404, {})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the caller may have died meanwhile (a crash test)
                    self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
