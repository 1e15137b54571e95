"""The HTTP side of the seam: an ASGI middleware that makes the app's observer current for every request (so
what a request does, a submission or an SSE stream, is observed by its own app) and, when tracing, wraps the
request in a server span named after its route."""

from __future__ import annotations

import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.observability import Observer, use


class ObserveRequests:
    def __init__(self, app: ASGIApp, *, observer: Observer) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            with use(self.observer):
                await self.app(scope, receive, send)
            return
        tracing = self.observer.tracing
        with use(self.observer), contextlib.ExitStack() as stack:
            if tracing is None:
                await self.app(scope, receive, send)
                return
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
            span = stack.enter_context(tracing.request_span(scope["method"], scope["path"], headers))

            async def send_observed(message: Message) -> None:
                if message["type"] == "http.response.start":
                    tracing.responded(span, int(message["status"]))
                await send(message)

            try:
                await self.app(scope, receive, send_observed)
            finally:
                template = getattr(scope.get("route"), "path", None)
                if isinstance(template, str):
                    tracing.routed(span, scope["method"], template)
