"""Mount external MCP servers (stdio or streamable HTTP) as keel tools.

Each configured server is connected with the official MCP SDK's :class:`mcp.Client`; every tool it lists
becomes a :class:`~keel.orchestration.tools.Tool` named ``<server>__<tool>`` whose body calls the server::

    servers = McpServerConfig.parse_many('{"calc": {"command": ["python", "calc.py"]}, "docs": {"url": "http://h/mcp"}}')
    async with McpMounts(servers) as mounts:
        catalog = ToolCatalog(mounts.tools)

How it behaves:

* **Effects.** A tool is ``read`` when the server annotates it ``readOnlyHint: true`` and ``write`` otherwise,
  unless the server's config sets ``effect``. Writes carry the effect ledger's idempotency key to the server
  in the request's ``_meta`` (``{"idempotency_key": ..., "keel_task_id": ...}``), so a server can apply them
  once. Every result counts as untrusted content (``untrusted_output=True``).
* **Results.** ``structuredContent`` when the server sends it (a dict; any other JSON value is wrapped as
  ``{"result": value}``), else ``{"content": [...], "text": "..."}`` with text blocks as strings and other
  blocks summarised. ``isError`` results and JSON-RPC error answers raise :class:`~keel.errors.ToolError`.
* **Failures.** A dead transport, a server that cannot be reached and a call that times out
  (``timeout_s``) raise :class:`~keel.errors.UpstreamError` (retryable). A session whose transport has
  ended (the stdio process exited, the HTTP transport failed) is reconnected by the next call, once per
  call; a call already in flight when the connection broke fails with ``UpstreamError`` (for a write the
  outcome is then unknown, which is what the idempotency key is for).
* **Cancellation.** Cancelling the task that awaits a call makes the SDK send ``notifications/cancelled``
  for that request id (stdio, and 2025-era HTTP sessions; on a 2026-07-28 HTTP session the SDK aborts the
  request's POST instead, which is that protocol's cancellation signal). Nothing here needs to add to it.
* **Concurrency.** Calls over one session run concurrently. Each session is owned by one background task
  that enters and exits the SDK's context managers (anyio task groups must be exited by the task that
  entered them), so callers in any task may use it and reconnects happen from whichever task needs them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.metadata
import json
import logging
import re
import shlex
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, cast

import anyio
import httpx2
import jsonschema.exceptions
import mcp_types as mcp_t
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT
from pydantic import ValidationError

from keel.errors import ConfigError, KeelError, ToolError, UpstreamError
from keel.orchestration.tools import Effect, Tool, ToolContext

__all__ = ["McpMounts", "McpServerConfig", "keel_tool_name"]

log = logging.getLogger("keel.mcp")

_MOUNT_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")
_NOT_NAME_CHAR = re.compile(r"[^A-Za-z0-9_-]")
_CONFIG_KEYS = frozenset(
    {"name", "command", "args", "env", "url", "headers", "effect", "approval", "timeout_s", "connect_timeout_s", "type"}
)
_LIST_PAGE_CAP = 100
"""A server whose tools/list cursors never end cannot hang start()."""
_CLOSE_GRACE_S = 10.0
"""How long a session's owner task gets to shut down (the SDK bounds a stdio shutdown at about 6 s)."""
_HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
"""The SDK's own defaults for MCP over HTTP (a response stream may stay open a long time)."""
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionError, BrokenPipeError, ...
    TimeoutError,  # a transport's own bounded write
    httpx2.HTTPError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)


@dataclass(kw_only=True, slots=True, frozen=True)
class McpServerConfig:
    """One MCP server to mount: a stdio ``command`` or a streamable-HTTP ``url`` (exactly one)."""

    name: str
    """Mount name (``[A-Za-z0-9_-]``, at most 40 characters); the server's tools become ``f"{name}__{tool}"``."""
    command: list[str] | None = None
    """stdio: the argv that starts the server (its environment is the SDK's safe default plus ``env``)."""
    env: dict[str, str] | None = None
    url: str | None = None
    """Streamable HTTP endpoint, e.g. ``http://127.0.0.1:8000/mcp``."""
    headers: dict[str, str] | None = None
    """Sent with every HTTP request (``Authorization``, ...)."""
    effect: Literal["read", "write"] | None = None
    """Overrides the tools' effect; by default a tool is ``read`` only if annotated ``readOnlyHint: true``."""
    approval: Literal["auto", "always", "never"] = "auto"
    timeout_s: float = 60.0
    """Per call: a call without an answer by then is cancelled on the server and fails (``UpstreamError``)."""
    connect_timeout_s: float = 30.0
    """For starting (or restarting) the server and the MCP handshake, and for each page of tools/list."""

    def __post_init__(self) -> None:
        where = f"MCP server {self.name!r}"
        if not isinstance(self.name, str) or not _MOUNT_NAME.fullmatch(self.name):
            raise ConfigError(f"{where}: the name must be 1-40 letters, digits, '_' or '-'")
        self._check_transport(where)
        if self.effect not in (None, "read", "write"):
            raise ConfigError(f"{where}: 'effect' must be 'read' or 'write'")
        if self.approval not in ("auto", "always", "never"):
            raise ConfigError(f"{where}: 'approval' must be 'auto', 'always' or 'never'")
        for field_name, seconds in (("timeout_s", self.timeout_s), ("connect_timeout_s", self.connect_timeout_s)):
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
                raise ConfigError(f"{where}: {field_name!r} must be a positive number")

    def _check_transport(self, where: str) -> None:
        if (self.command is None) == (self.url is None):
            raise ConfigError(f"{where}: give exactly one of 'command' (stdio) or 'url' (streamable HTTP)")
        if self.command is not None and (
            not isinstance(self.command, list)
            or not self.command
            or not all(isinstance(a, str) and a for a in self.command)
        ):
            raise ConfigError(f"{where}: 'command' must be a non-empty list of non-empty strings")
        if self.url is not None and (not isinstance(self.url, str) or not re.match(r"https?://[^/\s]+", self.url)):
            raise ConfigError(f"{where}: 'url' must be an http:// or https:// URL")
        for field_name, value in (("env", self.env), ("headers", self.headers)):
            if value is not None and not (
                isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
            ):
                raise ConfigError(f"{where}: {field_name!r} must map strings to strings")
        if self.env is not None and self.url is not None:
            raise ConfigError(f"{where}: 'env' applies to stdio servers only")
        if self.headers is not None and self.command is not None:
            raise ConfigError(f"{where}: 'headers' applies to HTTP servers only")

    @property
    def transport(self) -> Literal["stdio", "http"]:
        return "stdio" if self.command is not None else "http"

    @classmethod
    def parse_many(cls, raw: str | list[Any] | dict[str, Any]) -> list[McpServerConfig]:
        """Configs from a setting: JSON text, a mapping ``{name: spec}`` (optionally wrapped in
        ``{"mcpServers": ...}``, as other MCP clients write it) or a list of specs that carry a ``name``.

        A spec has ``command`` (a list, or a string split like a shell would, plus optional ``args``) or ``url``,
        and optionally ``env``, ``headers``, ``effect``, ``approval``, ``timeout_s``, ``connect_timeout_s`` and ``type``
        (``stdio`` or ``http``). Anything else raises :class:`ConfigError`.
        """
        if isinstance(raw, str):
            if not raw.strip():
                return []
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"MCP servers setting is not valid JSON: {exc}") from None
        if isinstance(raw, dict) and set(raw) == {"mcpServers"}:
            raw = raw["mcpServers"]
        specs: list[tuple[str, Any]]
        if isinstance(raw, dict):
            specs = list(raw.items())
        elif isinstance(raw, list):
            specs = []
            for i, item in enumerate(raw):
                if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                    raise ConfigError(f"MCP servers setting: entry {i} must be an object with a string 'name'")
                specs.append((item["name"], item))
        else:
            raise ConfigError("MCP servers setting must be a JSON object {name: {...}} or a list of objects")
        configs = [cls._from_spec(name, spec) for name, spec in specs]
        seen: set[str] = set()
        for cfg in configs:
            if cfg.name in seen:
                raise ConfigError(f"MCP server {cfg.name!r} is configured twice")
            seen.add(cfg.name)
        return configs

    @classmethod
    def _from_spec(cls, name: str, spec: Any) -> McpServerConfig:
        where = f"MCP server {name!r}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: its settings must be a JSON object")
        unknown = sorted(set(spec) - _CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}")
        if spec.get("name", name) != name:
            raise ConfigError(f"{where}: 'name' {spec['name']!r} differs from its key")
        command = spec.get("command")
        if isinstance(command, str):
            command = shlex.split(command)
        args = spec.get("args")
        if args is not None:
            if command is None or not isinstance(args, list):
                raise ConfigError(f"{where}: 'args' must be a list and needs a 'command'")
            command = [*command, *args] if isinstance(command, list) else command
        kind = spec.get("type")
        if kind is not None:
            want = {"stdio": "command", "http": "url", "streamable-http": "url", "streamable_http": "url"}.get(kind)
            if want is None:
                raise ConfigError(f"{where}: 'type' must be 'stdio' or 'http' (got {kind!r})")
            if spec.get(want) is None:
                raise ConfigError(f"{where}: type {kind!r} needs {want!r}")
        return cls(
            name=name,
            command=command,
            env=spec.get("env"),
            url=spec.get("url"),
            headers=spec.get("headers"),
            effect=spec.get("effect"),
            approval=spec.get("approval", "auto"),
            timeout_s=spec.get("timeout_s", 60.0),
            connect_timeout_s=spec.get("connect_timeout_s", 30.0),
        )


def keel_tool_name(server: str, tool: str, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """``f"{server}__{tool}"`` with characters outside ``[A-Za-z0-9_-]`` replaced by ``_``; a name longer than
    64 characters, or one already ``taken``, is cut and given a short hash of the original, so it stays unique."""
    full = f"{server}__{tool}"
    name = _NOT_NAME_CHAR.sub("_", full)
    if len(name) > 64 or name in taken:
        name = f"{name[:55]}_{hashlib.sha256(full.encode()).hexdigest()[:8]}"
    return name


class _WatchedReadStream:
    """The transport's read stream, reporting when it ends or its reader stops (the SDK's dispatcher reads
    it in ``async with``; once that exits, the session is closed for good and the next call reconnects):
    a stdio server exited, or the HTTP transport failed. The report comes before the dispatcher fails the
    calls in flight, so a caller that sees the connection closed also sees the mount as dead."""

    def __init__(self, inner: Any, on_end: Callable[[], None]) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> Any:
        # The dispatcher reads the sender's contextvars snapshot from here (HTTP transports set it).
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            return cast("SessionMessage | Exception", await self._inner.receive())
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise

    async def aclose(self) -> None:
        self._on_end()
        await self._inner.aclose()

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _WatchedReadStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (possibly nested) exception groups, for a readable message."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


@functools.cache
def _client_version() -> str:
    try:
        return importlib.metadata.version("keel")
    except importlib.metadata.PackageNotFoundError:
        return "0"


class _Connection:
    """One client session, owned by a background task that enters (and later exits) the SDK's contexts."""

    def __init__(self, cfg: McpServerConfig) -> None:
        self.cfg = cfg
        self.client: Client | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[Client] | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stop.is_set()

    def _transport(self) -> AbstractAsyncContextManager[tuple[Any, Any]]:
        cfg = self.cfg

        @asynccontextmanager
        async def transport() -> AsyncIterator[tuple[Any, Any]]:
            if cfg.command is not None:
                params = StdioServerParameters(command=cfg.command[0], args=cfg.command[1:], env=cfg.env)
                async with stdio_client(params) as (read, write):
                    yield _WatchedReadStream(read, self._stop.set), write
            else:
                assert cfg.url is not None
                async with (
                    httpx2.AsyncClient(headers=cfg.headers, timeout=_HTTP_TIMEOUT) as http,
                    streamable_http_client(cfg.url, http_client=http) as (read, write),
                ):
                    yield _WatchedReadStream(read, self._stop.set), write

        return transport()

    async def _own(self, ready: asyncio.Future[Client]) -> None:
        """The owner task: enter the client (transport, session, handshake), hand it over, and hold it open
        until asked to stop or until the transport ends; then exit it here, in the task that entered it."""
        try:
            client = Client(
                self._transport(),
                cache=None,
                client_info=mcp_t.Implementation(name="keel", version=_client_version()),
            )
            async with client:
                if not ready.done():
                    ready.set_result(client)
                await self._stop.wait()
        except Exception as exc:  # reported, never left unretrieved on the task
            if not ready.done():
                ready.set_exception(exc)
            else:
                log.warning("MCP server %r: the connection ended: %r", self.cfg.name, _leaf(exc))
        finally:
            self._stop.set()
            if not ready.done():
                ready.set_exception(RuntimeError("the connection was stopped before it was ready"))

    async def open(self) -> Client:
        """Connect and negotiate (server/discover, falling back to initialize). Raises UpstreamError."""
        ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
        self._ready = ready
        self._task = asyncio.create_task(self._own(ready), name=f"keel-mcp-{self.cfg.name}")
        try:
            async with asyncio.timeout(self.cfg.connect_timeout_s):
                self.client = await asyncio.shield(ready)
        except TimeoutError:
            await self.close(cancel=True)
            raise UpstreamError(
                f"MCP server {self.cfg.name!r}: no connection within {self.cfg.connect_timeout_s:g}s"
            ) from None
        except asyncio.CancelledError:
            await asyncio.shield(self.close(cancel=True))
            raise
        except Exception as exc:
            await self.close()
            raise UpstreamError(f"MCP server {self.cfg.name!r}: could not connect: {_leaf(exc)!r}") from exc
        return self.client

    async def close(self, *, cancel: bool = False) -> None:
        """Stop the session (a stdio server gets its stdin closed, then is terminated if it lingers).
        ``cancel``: do not wait for a handshake in progress."""
        self._stop.set()
        task = self._task
        if task is None:
            return
        if cancel:
            task.cancel()
        await asyncio.wait({task}, timeout=_CLOSE_GRACE_S)
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=_CLOSE_GRACE_S)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: _own reports its own errors
        if self._ready is not None and self._ready.done() and not self._ready.cancelled():
            self._ready.exception()  # likewise, when nobody was waiting for the connection any more


def _summarise(block: Any) -> Any:
    """One content block as plain JSON: text as a string, anything else described rather than inlined."""
    if isinstance(block, mcp_t.TextContent):
        return block.text
    if isinstance(block, mcp_t.ImageContent | mcp_t.AudioContent):
        return {"type": block.type, "mimeType": block.mime_type}
    if isinstance(block, mcp_t.ResourceLink):
        return {"type": "resource_link", "uri": str(block.uri), "name": block.name, "mimeType": block.mime_type}
    if isinstance(block, mcp_t.EmbeddedResource):
        res = block.resource
        item: dict[str, Any] = {"type": "resource", "uri": str(res.uri), "mimeType": res.mime_type}
        if isinstance(res, mcp_t.TextResourceContents):
            item["text"] = res.text
        return item
    return {"type": str(getattr(block, "type", "unknown"))}


def _result_value(result: mcp_t.CallToolResult, keel_name: str) -> Any:
    texts = [b.text for b in result.content if isinstance(b, mcp_t.TextContent)]
    if result.is_error:
        raise ToolError("\n".join(texts) or f"{keel_name} failed (the MCP server gave no message)", tool=keel_name)
    if result.structured_content is not None:
        sc = result.structured_content
        return sc if isinstance(sc, dict) else {"result": sc}
    return {"content": [_summarise(b) for b in result.content], "text": "\n".join(texts)}


class _Mount:
    """A configured server: its current connection, reconnected on demand."""

    def __init__(self, cfg: McpServerConfig) -> None:
        self.cfg = cfg
        self.conn: _Connection | None = None
        self.lock = asyncio.Lock()
        self.closed = False

    async def client(self) -> Client:
        """The live session's client, connecting (once per call) when there is none or it died."""
        conn = self.conn
        if conn is not None and conn.alive and conn.client is not None:
            return conn.client
        async with self.lock:
            conn = self.conn
            if conn is not None and conn.alive and conn.client is not None:
                return conn.client
            if self.closed:
                raise UpstreamError(f"MCP server {self.cfg.name!r}: the mounts are closed")
            if conn is not None:
                log.warning("MCP server %r: the session ended; reconnecting", self.cfg.name)
                self.conn = None
                await conn.close()
            fresh = _Connection(self.cfg)
            client = await fresh.open()
            self.conn = fresh
            if conn is not None:
                # Refresh the session's view of the tools (output schemas, x-mcp-header maps) after a reconnect.
                try:
                    await _list_all(client, self.cfg)
                except _TRANSPORT_ERRORS + (MCPError,) as exc:
                    log.warning("MCP server %r: listing tools after the reconnect failed: %r", self.cfg.name, exc)
            return client

    async def call(self, tool: str, args: dict[str, Any], meta: dict[str, Any], keel_name: str) -> Any:
        name = self.cfg.name
        client = await self.client()
        try:
            result = await client.call_tool(
                tool, args, read_timeout_seconds=self.cfg.timeout_s, meta=cast(Any, meta) or None
            )
        except MCPError as exc:
            if exc.code == REQUEST_TIMEOUT:
                raise UpstreamError(
                    f"MCP server {name!r}: tool {tool!r} gave no answer within {self.cfg.timeout_s:g}s (cancelled)"
                ) from None
            if exc.code == CONNECTION_CLOSED:
                raise UpstreamError(
                    f"MCP server {name!r}: the connection closed during a call to {tool!r}: {exc.error.message}"
                ) from None
            raise ToolError(
                f"{keel_name}: the MCP server answered with error {exc.code}: {exc}", tool=keel_name
            ) from None
        except _TRANSPORT_ERRORS as exc:
            raise UpstreamError(f"MCP server {name!r}: transport failure calling {tool!r}: {exc!r}") from None
        except (RuntimeError, ValidationError) as exc:
            if self.conn is None or not self.conn.alive:
                # The session ended between handing out its client and this call (the SDK's "not connected").
                raise UpstreamError(f"MCP server {name!r}: the connection closed before calling {tool!r}") from None
            # The SDK refused the answer: output that breaks the tool's outputSchema, an input request keel
            # cannot serve, a result shape it does not know.
            raise ToolError(f"{keel_name}: unusable answer from MCP server {name!r}: {exc}", tool=keel_name) from None
        return _result_value(result, keel_name)

    async def aclose(self) -> None:
        async with self.lock:
            self.closed = True
            conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()


async def _list_all(client: Client, cfg: McpServerConfig) -> list[mcp_t.Tool]:
    tools: list[mcp_t.Tool] = []
    cursor: str | None = None
    for _ in range(_LIST_PAGE_CAP):
        with anyio.fail_after(cfg.connect_timeout_s):
            page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools
    log.warning("MCP server %r: stopped listing tools after %d pages", cfg.name, _LIST_PAGE_CAP)
    return tools


def _make_tool(mount: _Mount, spec: mcp_t.Tool, keel_name: str) -> Tool:
    cfg = mount.cfg
    effect: Effect
    if cfg.effect is not None:
        effect = cfg.effect
    else:
        effect = "read" if spec.annotations is not None and spec.annotations.read_only_hint is True else "write"
    schema = dict(spec.input_schema) or {"type": "object"}
    mcp_name = spec.name

    async def call_mcp_tool(args: dict[str, Any], tc: ToolContext) -> Any:
        meta: dict[str, Any] = {}
        if tc.task_id is not None:
            meta["keel_task_id"] = tc.task_id
        if effect == "write" and tc.idempotency_key is not None:
            meta["idempotency_key"] = tc.idempotency_key
        return await mount.call(mcp_name, dict(args), meta, keel_name)

    call_mcp_tool.__name__ = f"mcp_{keel_name.replace('-', '_')}"
    description = spec.description or (spec.annotations.title if spec.annotations else None) or spec.title
    return Tool(
        name=keel_name,
        description=f"[mcp:{cfg.name}] {description or spec.name}",
        fn=call_mcp_tool,
        input_model=None,
        input_schema=schema,
        effect=effect,
        approval=cfg.approval,
        untrusted_output=True,
        source=f"mcp:{cfg.name}",
    )


class McpMounts:
    """Owns the client sessions of the configured MCP servers; an async context manager.

    ``start()`` connects to every server, lists its tools (following pagination cursors) and returns them
    as keel tools; ``aclose()`` shuts every session down (a stdio server's process is stopped).
    """

    def __init__(self, servers: Sequence[McpServerConfig]) -> None:
        names = [s.name for s in servers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"MCP server(s) configured twice: {', '.join(dupes)}")
        self._mounts = {s.name: _Mount(s) for s in servers}
        self._tools: list[Tool] | None = None
        self._start_lock = asyncio.Lock()

    @property
    def tools(self) -> list[Tool]:
        """The mounted tools (empty before :meth:`start`)."""
        return list(self._tools or [])

    def alive(self, server: str) -> bool:
        """Whether ``server``'s session is up right now (a dead one is reconnected by its next call)."""
        conn = self._mounts[server].conn
        return conn is not None and conn.alive

    async def start(self) -> list[Tool]:
        """Connect to every server and build its tools. Raises UpstreamError naming a server that fails
        (the ones already connected are closed again)."""
        async with self._start_lock:
            if self._tools is not None:
                return list(self._tools)
            try:
                outcomes = await asyncio.gather(
                    *(self._connect_and_list(m) for m in self._mounts.values()), return_exceptions=True
                )
            except BaseException:
                await asyncio.shield(self.aclose())
                raise
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            if errors:
                await self.aclose()
                for extra in errors[1:]:
                    log.warning("%s", extra)
                raise errors[0]
            listed = cast("list[list[mcp_t.Tool]]", outcomes)
            tools: list[Tool] = []
            taken: set[str] = set()
            for mount, specs in zip(self._mounts.values(), listed, strict=True):
                for spec in specs:
                    keel_name = keel_tool_name(mount.cfg.name, spec.name, taken)
                    try:
                        tool = _make_tool(mount, spec, keel_name)
                    except (KeelError, jsonschema.exceptions.SchemaError) as exc:
                        log.warning("MCP server %r: skipping tool %r: %s", mount.cfg.name, spec.name, exc)
                        continue
                    taken.add(keel_name)
                    tools.append(tool)
            self._tools = tools
            return list(tools)

    async def _connect_and_list(self, mount: _Mount) -> list[mcp_t.Tool]:
        client = await mount.client()
        try:
            return await _list_all(client, mount.cfg)
        except TimeoutError:
            raise UpstreamError(f"MCP server {mount.cfg.name!r}: tools/list timed out") from None
        except _TRANSPORT_ERRORS + (MCPError,) as exc:
            raise UpstreamError(f"MCP server {mount.cfg.name!r}: tools/list failed: {exc!r}") from None

    async def aclose(self) -> None:
        await asyncio.gather(*(m.aclose() for m in self._mounts.values()))

    async def __aenter__(self) -> McpMounts:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
