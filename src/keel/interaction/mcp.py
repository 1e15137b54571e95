"""keel's tools over MCP: a streamable-HTTP endpoint at ``/mcp``, behind keel's bearer API keys.

Built on the official ``mcp`` SDK (2.x) low-level :class:`~mcp.server.lowlevel.Server`; listing and calling
tools are delegated to a :class:`ToolBackend`, so this module knows nothing of tasks, ledgers or stores.

**Wiring** (in :func:`keel.app.create_app`). The route must exist when the app is built, the store and the
runtime only once the lifespan has run, so build the endpoint in ``create_app`` over callables that read
``app.state.keel`` when a request comes (none comes before the lifespan has started), and run it in the lifespan::

    endpoint = build_mcp(YourBackend(lambda: app.state.keel), lambda token: app.state.keel.verify_key(token),
                         allowed_origins=settings.mcp_allowed_origins)
    app.add_route("/mcp", endpoint.asgi, include_in_schema=False)  # exactly /mcp; not app.mount (see below)
    # in lifespan(), inside `async with running(...) as keel:` and after `app.state.keel = keel`:
    async with endpoint.running():
        yield

So MCP stops (its in-flight calls are cancelled) before ``running`` stops the runtime and closes the store.
Until ``running()`` is entered (and after it exits) ``/mcp`` answers 503 problem+json. ``running()`` may be
entered again after it exits (each run gets a fresh SDK session manager, which is single-use), not twice at once,
and must be exited in the task that entered it (it holds an anyio task group). Do not
``app.mount("/mcp", ...)``: a Starlette mount matches only paths below ``/mcp/``, so a client POSTing to ``/mcp``
would get a 307 to ``/mcp/``. ``add_route`` with the endpoint object (not a bound method or function, which
Starlette would treat as a GET-only request handler) routes every method of exactly ``/mcp`` to it.

**Every request** to the endpoint, before the SDK sees it:

1. ``Origin``: absent (a non-browser client) is fine; otherwise it must be the server's own origin (the Origin's
   ``host[:port]`` is the request's ``Host``: e.g. ``http://127.0.0.1:8000`` for ``Host: 127.0.0.1:8000``) or be
   in ``allowed_origins`` (exact, ``scheme://host:*`` for any port, or ``*``); anything else gets 403
   problem+json, before the key is looked at. (DNS rebinding, where a hostile name resolves to keel's address
   so that Origin and Host agree, gains a page nothing: every request needs a bearer key, which browsers never
   attach on their own.) The SDK's own Host/Origin check (``TransportSecuritySettings``) is not used: it is off
   by default when a session manager is built without ``security_settings``, and when on it answers a bad
   Origin with a plain-text 403 and a Host outside its list with 421, so this is the one check.
2. ``Authorization: Bearer <key>``, checked with ``verify_key``: missing or unknown, 401 problem+json with
   ``WWW-Authenticate: Bearer``; a key with neither ``tasks:write`` nor ``admin``, 403 problem+json.
3. The :class:`ApiKey` is put into the request's ASGI scope (``scope["keel.api_key"]``). The SDK hands every
   handler the Starlette ``Request`` of the HTTP request that carried the message (``ctx.request``), so the
   handlers read the key from ``ctx.request.scope``: per request, never from a context variable (the SDK runs
   handlers in tasks of its own task group) and never from connection state.

**Stateless.** The session manager runs with ``stateless=True``: no ``Mcp-Session-Id``, no in-memory session to
pin a client to one process, so any replica behind a load balancer can serve any request. Clients speaking the
2026-07-28 protocol (the SDK client's default ``mode="auto"``) are served per request by the SDK anyway; older,
handshake-era clients get a fresh transport per POST. Server-to-client requests (sampling, elicitation) are not
available then, which keel does not use; progress notifications are (on the POST's SSE response, so not with
``json_response=True``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from keel.errors import Forbidden, KeelError
from keel.interaction.auth import VerifyKey, authenticate
from keel.interaction.problems import of_error, problem
from keel.memory.types import ApiKey
from keel.orchestration.tools import Tool
from keel.service import Progress as Progress  # a ToolBackend's progress callback

log = logging.getLogger("keel.mcp")

SCOPE_KEY = "keel.api_key"
"""The ASGI-scope key under which the authenticated :class:`ApiKey` travels to the tool handlers."""
TASK_ID_META = "keel/task_id"
"""``_meta`` key of a ``tools/call`` result: the keel task that ran the call, when there is one."""
REQUIRED_SCOPE = "tasks:write"
"""What a key needs to reach the endpoint at all (or ``admin``); each tool's own scopes are checked per call."""


@dataclass(kw_only=True, slots=True)
class ToolOutcome:
    """What a tool call came to, as the backend reports it."""

    result: Any
    """JSON-able; a dict becomes the MCP ``structuredContent`` as well as the text content."""
    is_error: bool = False
    message: str | None = None
    """For errors: the text the caller (a model) reads."""
    task_id: str | None = None
    """The keel task that ran the call, if any (returned in the result's ``_meta`` as ``keel/task_id``)."""


class ToolBackend(Protocol):
    """What the MCP endpoint delegates to."""

    def tools_for(self, key: ApiKey) -> list[Tool]:
        """The tools this key may use (the listing, and the only names ``call`` is asked about)."""
        ...

    async def call(
        self,
        key: ApiKey,
        name: str,
        args: dict[str, Any],
        *,
        progress: Progress | None = None,
        idempotency_key: str | None = None,
    ) -> ToolOutcome:
        """Run one call. May raise :class:`KeelError` (e.g. ``ToolArgsInvalid``): the caller gets an ``isError``
        result with its message. ``progress`` is given only when the client asked for progress.
        ``idempotency_key`` (the client's ``_meta.idempotency_key``) makes a retried call return the first
        call's outcome instead of running again."""
        ...


def _version() -> str:
    try:
        return importlib.metadata.version("keel")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _problem(exc: KeelError) -> Response:
    """The RFC 9457 body (and headers: ``WWW-Authenticate``, ``Retry-After``) the REST API gives the same error."""
    return of_error(exc)


def origin_allowed(origin: str, host: str | None, allowed: Sequence[str] = ()) -> bool:
    """Whether a request with this ``Origin`` (a browser page's) may reach the endpoint.

    Allowed: an origin listed in ``allowed`` (exactly, ``scheme://host:*`` for any port, or ``*`` for all), or
    the server's own origin, i.e. the Origin's ``host[:port]`` is the request's ``Host`` (scheme not compared:
    TLS may end at a proxy). A request without an Origin is not a browser's and never comes here.
    """
    origin = origin.strip().rstrip("/").lower()
    for pattern in allowed:
        pattern = pattern.strip().rstrip("/").lower()
        if pattern == "*" or pattern == origin:
            return True
        if pattern.endswith(":*") and origin.startswith(pattern[:-1]) and origin[len(pattern) - 1 :].isdigit():
            return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or host is None:
        return False
    return parts.netloc == host.strip().lower()


def tool_to_mcp(tool: Tool) -> types.Tool:
    """A keel tool as MCP lists it: its JSON Schema as ``inputSchema``, its effect as annotations."""
    write = tool.effect == "write"
    return types.Tool(
        name=tool.name,
        description=tool.description,
        input_schema=tool.input_schema,
        annotations=types.ToolAnnotations(
            read_only_hint=not write,
            destructive_hint=write,
            # keel's effect ledger applies each write once, so repeating a call has no further effect.
            idempotent_hint=True if write else None,
        ),
    )


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _error_result(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


def outcome_to_mcp(outcome: ToolOutcome) -> types.CallToolResult:
    meta = {TASK_ID_META: outcome.task_id} if outcome.task_id else None
    if outcome.is_error:
        message = outcome.message or (_text(outcome.result) if outcome.result is not None else "the tool failed")
        return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True, meta=meta)
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=_text(outcome.result))],
        structured_content=outcome.result if isinstance(outcome.result, dict) else None,
        meta=meta,
    )


def _key_of(ctx: ServerRequestContext[Any, Any]) -> ApiKey:
    """The key the endpoint authenticated for the HTTP request that carried this message."""
    scope = getattr(ctx.request, "scope", None)
    key = scope.get(SCOPE_KEY) if isinstance(scope, Mapping) else None
    if not isinstance(key, ApiKey):  # unreachable through McpEndpoint: every request is authenticated first
        raise MCPError(code=types.INVALID_REQUEST, message="not authenticated")
    return key


def _idempotency_key(params: Mapping[str, Any] | None) -> str | None:
    meta = (params or {}).get("_meta")
    key = meta.get("idempotency_key") if isinstance(meta, Mapping) else None
    return key if isinstance(key, str) and 0 < len(key) <= 255 else None


def _progress_token(params: Mapping[str, Any] | None) -> str | int | None:
    meta = (params or {}).get("_meta")
    token = meta.get("progressToken") if isinstance(meta, Mapping) else None
    return token if isinstance(token, str | int) and not isinstance(token, bool) else None


def build_server(backend: ToolBackend) -> Server[Any]:
    """The low-level MCP server: ``tools/list`` and ``tools/call``, for the key of each request."""

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        key = _key_of(ctx)
        return types.ListToolsResult(tools=[tool_to_mcp(t) for t in backend.tools_for(key)])

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        key = _key_of(ctx)
        name = params.name
        if name not in {t.name for t in backend.tools_for(key)}:
            return _error_result(f"unknown tool {name!r}, or this API key may not use it")

        async def report(done: float, message: str | None = None) -> None:
            await ctx.session.report_progress(done, None, message)

        progress = report if _progress_token(ctx.params) is not None else None
        try:
            outcome = await backend.call(
                key,
                name,
                dict(params.arguments or {}),
                progress=progress,
                idempotency_key=_idempotency_key(ctx.params),
            )
        except KeelError as exc:
            return _error_result(exc.message)
        except Exception:
            log.exception("MCP tools/call %r (tenant %s) failed", name, key.tenant)
            return _error_result(f"{name}: the call failed unexpectedly; it has been logged")
        return outcome_to_mcp(outcome)

    return Server(
        "keel",
        version=_version(),
        instructions="keel's tools. A write tool's effect is applied once per call (keel's effect ledger); send "
        "_meta.idempotency_key so that a retried call returns the first call's result instead of running again.",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


class McpEndpoint:
    """The ``/mcp`` endpoint: :attr:`asgi` to route, :meth:`running` to enter in the app's lifespan."""

    def __init__(
        self,
        server: Server[Any],
        verify_key: VerifyKey,
        *,
        allowed_origins: Sequence[str] = (),
        json_response: bool = False,
    ) -> None:
        self.server = server
        self.verify_key = verify_key
        self.allowed_origins = tuple(allowed_origins)
        self.json_response = json_response
        self._manager: StreamableHTTPSessionManager | None = None

    @property
    def asgi(self) -> ASGIApp:
        """The ASGI app; route it at exactly ``/mcp`` (``app.add_route("/mcp", endpoint.asgi)``).

        The endpoint object itself: Starlette routes a bound method or a function as a request/response
        handler (GET only), an object with ``__call__`` as a raw ASGI app (every method)."""
        return self

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[McpEndpoint]:
        """Run the SDK's session manager (its task group serves the requests) for as long as this is entered."""
        if self._manager is not None:
            raise RuntimeError("the MCP endpoint is already running")
        manager = StreamableHTTPSessionManager(
            app=self.server,
            json_response=self.json_response,
            stateless=True,
            security_settings=None,  # Origin is checked here, before auth (see the module docstring)
        )
        async with manager.run():
            self._manager = manager
            try:
                yield self
            finally:
                self._manager = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin, headers.get("host"), self.allowed_origins):
            log.warning("MCP request refused: Origin %r is not allowed", origin[:200])
            await _problem(Forbidden(f"the Origin {origin[:200]!r} is not allowed"))(scope, receive, send)
            return
        try:
            key = await authenticate(headers.get("authorization", ""), self.verify_key, REQUIRED_SCOPE)
        except KeelError as exc:
            await _problem(exc)(scope, receive, send)
            return
        manager = self._manager
        if manager is None:
            unavailable = problem(503, "Service Unavailable", "the MCP endpoint is not running", headers=None)
            await unavailable(scope, receive, send)
            return
        await manager.handle_request({**scope, SCOPE_KEY: key}, receive, send)


def build_mcp(
    backend: ToolBackend,
    verify_key: VerifyKey,
    *,
    allowed_origins: Sequence[str] = (),
    json_response: bool = False,
) -> McpEndpoint:
    """keel's MCP endpoint over ``backend``; see the module docstring for how to wire it into the app."""
    return McpEndpoint(build_server(backend), verify_key, allowed_origins=allowed_origins, json_response=json_response)
