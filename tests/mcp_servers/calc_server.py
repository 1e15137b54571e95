"""A tiny MCP server for keel's MCP-client tests, built with the SDK's high-level ``MCPServer``.

Run over stdio (the default) or streamable HTTP::

    python calc_server.py                     # stdio
    python calc_server.py http 127.0.0.1 8765 # streamable HTTP at http://127.0.0.1:8765/mcp

Tools: ``add`` (read-only), ``record`` (a write that logs its note and the idempotency key it got in the
request's ``_meta``), ``slow`` (sleeps; logs ``cancelled <request id>`` when the client cancels it) and
``fail`` (an ``isError`` result). A middleware logs every ``notifications/cancelled`` the server receives
(``notification cancelled <request id>``). Log lines go to the file named by ``CALC_LOG``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations


def _log(line: str) -> None:
    path = os.environ.get("CALC_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


async def see_cancellations(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Record each ``notifications/cancelled`` as it arrives on the wire (the dispatcher has already
    cancelled the request it names)."""
    if ctx.method == "notifications/cancelled":
        _log(f"notification cancelled {(ctx.params or {}).get('requestId')}")
    return await call_next(ctx)


server = MCPServer("calc", log_level="WARNING", middleware=[see_cancellations])


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool(annotations=ToolAnnotations(read_only_hint=False, idempotent_hint=True))
def record(note: str, ctx: Context) -> str:
    """Append a note to the log."""
    meta = ctx.request_context.meta or {}
    _log(f"record {note} key={meta.get('idempotency_key')} task={meta.get('keel_task_id')}")
    return f"recorded {note}"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
async def slow(seconds: float, ctx: Context) -> str:
    """Sleep for a while."""
    _log(f"started {ctx.request_id}")
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        _log(f"cancelled {ctx.request_id}")
        raise
    return f"slept {seconds}"


@server.tool()
def fail() -> str:
    """Always fails."""
    raise ToolError("the calculator is on fire")


if __name__ == "__main__":
    _log(f"pid {os.getpid()}")
    if len(sys.argv) > 1 and sys.argv[1] == "http":
        server.run("streamable-http", host=sys.argv[2], port=int(sys.argv[3]))
    else:
        server.run()
