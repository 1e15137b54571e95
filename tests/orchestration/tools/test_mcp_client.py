"""MCP servers mounted as keel tools: real servers (``tests/mcp_servers/calc_server.py``) over stdio and
streamable HTTP, driven through ``Tool.validate`` and ``Tool.invoke`` as the engine does."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mcp_types as mcp_t
import pytest
import pytest_asyncio

from keel.errors import ConfigError, ToolArgsInvalid, ToolError, UpstreamError
from keel.orchestration.tools import Tool, ToolContext
from keel.orchestration.tools.mcp_client import McpMounts, McpServerConfig, _list_all, _result_value, keel_tool_name

CALC = str(Path(__file__).parents[2] / "mcp_servers" / "calc_server.py")
module_loop = pytest.mark.asyncio(loop_scope="module")


def ctx(tool: Tool, key: str | None = "k1") -> ToolContext:
    return ToolContext(tool=tool.name, call_id="c1", task_id="t1", tenant="t", idempotency_key=key)


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def wait_for_line(path: Path, pattern: str, *, after: int = 0, timeout: float = 3.0) -> re.Match[str]:
    """The first line from line ``after`` on that matches ``pattern``, waiting up to ``timeout`` for it."""
    deadline = time.monotonic() + timeout
    while True:
        for line in log_lines(path)[after:]:
            if m := re.fullmatch(pattern, line):
                return m
        if time.monotonic() > deadline:
            raise AssertionError(f"no line matching {pattern!r} in {log_lines(path)}")
        await asyncio.sleep(0.05)


@dataclass
class Mounted:
    mounts: McpMounts
    log: Path

    def __getitem__(self, name: str) -> Tool:
        return next(t for t in self.mounts.tools if t.name == name)


def stdio_config(log: Path, **kw: Any) -> McpServerConfig:
    return McpServerConfig(name="calc", command=[sys.executable, CALC], env={"CALC_LOG": str(log)}, **kw)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def calc(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mounted]:
    """One stdio server shared by the tests that do not break it."""
    log = tmp_path_factory.mktemp("calc") / "calc.log"
    async with McpMounts([stdio_config(log)]) as mounts:
        yield Mounted(mounts, log)


# -- configuration ----------------------------------------------------------------------------------------


def test_parse_many_accepts_the_usual_shapes() -> None:
    cfgs = McpServerConfig.parse_many(
        '{"calc": {"command": ["python", "srv.py"], "env": {"A": "1"}, "effect": "read"},'
        ' "docs": {"url": "http://127.0.0.1:9/mcp", "headers": {"Authorization": "Bearer x"}, "approval": "always",'
        ' "timeout_s": 5}}'
    )
    assert [(c.name, c.transport) for c in cfgs] == [("calc", "stdio"), ("docs", "http")]
    assert cfgs[0].command == ["python", "srv.py"] and cfgs[0].env == {"A": "1"} and cfgs[0].effect == "read"
    assert cfgs[1].headers == {"Authorization": "Bearer x"} and cfgs[1].approval == "always"
    assert cfgs[1].timeout_s == 5

    # The mcpServers wrapper and command + args, as other MCP clients write them; a list of named specs.
    wrapped = McpServerConfig.parse_many({"mcpServers": {"fs": {"command": "npx -y srv", "args": ["/tmp"]}}})
    assert wrapped[0].command == ["npx", "-y", "srv", "/tmp"]
    listed = McpServerConfig.parse_many([{"name": "a", "url": "https://h/mcp", "type": "http"}])
    assert listed[0].url == "https://h/mcp"
    assert McpServerConfig.parse_many("") == [] and McpServerConfig.parse_many("{}") == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"x": {"command": ["a"], "url": "http://h"}}', "exactly one of"),
        ('{"x": {}}', "exactly one of"),
        ('{"bad name": {"url": "http://h"}}', "name must be"),
        ("{not json", "not valid JSON"),
        ('{"x": {"url": "http://h", "colour": "red"}}', "unknown setting"),
        ('{"x": {"url": "http://h", "effect": "delete"}}', "'effect'"),
        ('{"x": {"url": "http://h", "approval": "sometimes"}}', "'approval'"),
        ('{"x": {"url": "ftp://h"}}', "'url'"),
        ('{"x": {"command": []}}', "'command'"),
        ('{"x": {"url": "http://h", "timeout_s": 0}}', "'timeout_s'"),
        ('{"x": {"url": "http://h", "env": {"A": "1"}}}', "'env' applies to stdio"),
        ('[{"name": "x", "url": "http://h"}, {"name": "x", "url": "http://h"}]', "configured twice"),
        ("[1]", "entry 0"),
        ("3", "must be a JSON object"),
    ],
)
def test_parse_many_rejects_bad_input_clearly(raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        McpServerConfig.parse_many(raw)


def test_tool_names_are_sanitised_and_bounded() -> None:
    assert keel_tool_name("calc", "add") == "calc__add"
    assert keel_tool_name("docs", "search.v2/pages") == "docs__search_v2_pages"
    long = keel_tool_name("srv", "x" * 100)
    assert len(long) == 64 and re.fullmatch(r"[A-Za-z0-9_-]+", long)
    assert keel_tool_name("srv", "x" * 100) == long != keel_tool_name("srv", "x" * 101)
    assert keel_tool_name("docs", "a.b", taken={"docs__a_b"}) != "docs__a_b"


# -- result mapping and pagination (no server needed) ------------------------------------------------------


def test_results_map_to_plain_json() -> None:
    structured = mcp_t.CallToolResult(content=[], structured_content={"result": 5})
    assert _result_value(structured, "s__t") == {"result": 5}
    assert _result_value(mcp_t.CallToolResult(content=[], structured_content=[1, 2]), "s__t") == {"result": [1, 2]}
    mixed = mcp_t.CallToolResult(
        content=[
            mcp_t.TextContent(text="hello"),
            mcp_t.ImageContent(data="aGk=", mime_type="image/png"),
            mcp_t.TextContent(text="world"),
        ]
    )
    assert _result_value(mixed, "s__t") == {
        "content": ["hello", {"type": "image", "mimeType": "image/png"}, "world"],
        "text": "hello\nworld",
    }
    with pytest.raises(ToolError, match="it broke") as err:
        _result_value(mcp_t.CallToolResult(content=[mcp_t.TextContent(text="it broke")], is_error=True), "s__t")
    assert err.value.tool == "s__t"


async def test_tools_list_follows_cursors() -> None:
    pages = {None: ("a", "p2"), "p2": ("b", "p3"), "p3": ("c", None)}
    seen: list[str | None] = []

    class Paged:
        async def list_tools(self, *, cursor: str | None = None) -> mcp_t.ListToolsResult:
            seen.append(cursor)
            name, nxt = pages[cursor]
            return mcp_t.ListToolsResult(
                tools=[mcp_t.Tool(name=name, input_schema={"type": "object"})], next_cursor=nxt
            )

    tools = await _list_all(Paged(), McpServerConfig(name="p", url="http://h/mcp"))  # type: ignore[arg-type]
    assert [t.name for t in tools] == ["a", "b", "c"] and seen == [None, "p2", "p3"]


# -- a stdio server ---------------------------------------------------------------------------------------


@module_loop
async def test_lists_tools_with_schemas_and_effects(calc: Mounted) -> None:
    assert {t.name for t in calc.mounts.tools} == {"calc__add", "calc__record", "calc__slow", "calc__fail"}
    add = calc["calc__add"]
    assert add.input_model is None
    assert set(add.input_schema["properties"]) == {"a", "b"} and add.input_schema["required"] == ["a", "b"]
    assert add.description == "[mcp:calc] Add two integers."
    assert add.effect == "read"  # readOnlyHint: true
    assert calc["calc__record"].effect == "write"  # readOnlyHint: false
    assert calc["calc__fail"].effect == "write"  # no annotations
    for t in calc.mounts.tools:
        assert t.untrusted_output and t.source == "mcp:calc" and t.approval == "auto" and t.takes_context


@module_loop
async def test_arguments_are_validated_against_the_servers_schema(calc: Mounted) -> None:
    add = calc["calc__add"]
    with pytest.raises(ToolArgsInvalid) as err:
        add.validate({"a": "x"})
    assert err.value.tool == "calc__add" and "/a" in str(err.value)
    assert add.validate({"a": 2, "b": 3}) == {"a": 2, "b": 3}


@module_loop
async def test_call_returns_the_structured_result(calc: Mounted) -> None:
    add = calc["calc__add"]
    assert await add.invoke(add.validate({"a": 2, "b": 3}), ctx(add)) == {"result": 5}


@module_loop
async def test_writes_carry_the_idempotency_key_in_request_meta(calc: Mounted) -> None:
    record = calc["calc__record"]
    assert await record.invoke({"note": "hello"}, ctx(record, key="key-123")) == {"result": "recorded hello"}
    assert "record hello key=key-123 task=t1" in log_lines(calc.log)


@module_loop
async def test_an_error_result_raises_tool_error(calc: Mounted) -> None:
    fail = calc["calc__fail"]
    with pytest.raises(ToolError, match="the calculator is on fire") as err:
        await fail.invoke({}, ctx(fail))
    assert err.value.tool == "calc__fail" and not isinstance(err.value, ToolArgsInvalid)


@module_loop
async def test_calls_over_one_session_run_concurrently(calc: Mounted) -> None:
    slow, add = calc["calc__slow"], calc["calc__add"]
    started = time.monotonic()
    results = await asyncio.gather(
        *(slow.invoke({"seconds": 0.6}, ctx(slow)) for _ in range(4)),
        *(add.invoke({"a": i, "b": 1}, ctx(add)) for i in range(10)),
    )
    assert time.monotonic() - started < 1.5  # four 0.6 s calls side by side, not one after another
    assert results[:4] == [{"result": "slept 0.6"}] * 4
    assert [r["result"] for r in results[4:]] == list(range(1, 11))


@module_loop
async def test_cancelling_a_call_sends_notifications_cancelled(calc: Mounted) -> None:
    slow, add = calc["calc__slow"], calc["calc__add"]
    before = len(log_lines(calc.log))
    task = asyncio.create_task(slow.invoke({"seconds": 30}, ctx(slow)))
    await asyncio.sleep(0.3)
    started = await wait_for_line(calc.log, r"started (\S+)", after=before)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 2.0
    # The server received notifications/cancelled naming that very request (its middleware saw it on the
    # wire) and cancelled the matching handler; the session itself stays up.
    request_id = re.escape(started.group(1))
    await wait_for_line(calc.log, rf"notification cancelled {request_id}", after=before)
    await wait_for_line(calc.log, rf"cancelled {request_id}", after=before)
    assert calc.mounts.alive("calc")
    assert await add.invoke({"a": 1, "b": 1}, ctx(add)) == {"result": 2}


# -- failures: a bad command, a timeout, a server that dies ----------------------------------------------


async def test_a_server_that_cannot_start_raises_upstream_error() -> None:
    mounts = McpMounts([McpServerConfig(name="ghost", command=["/nonexistent/mcp-server"])])
    with pytest.raises(UpstreamError, match="MCP server 'ghost': could not connect") as err:
        await mounts.start()
    assert err.value.retryable and err.value.status_code is None
    await mounts.aclose()


async def test_a_server_that_never_answers_times_out_connecting() -> None:
    mute = [sys.executable, "-c", "import sys; sys.stdin.read()"]  # reads, never answers, exits on EOF
    mounts = McpMounts([McpServerConfig(name="mute", command=mute, connect_timeout_s=0.5)])
    started = time.monotonic()
    with pytest.raises(UpstreamError, match="MCP server 'mute': no connection within 0.5s"):
        await mounts.start()
    assert time.monotonic() - started < 5
    await mounts.aclose()


async def test_timeouts_and_a_killed_server(tmp_path: Path) -> None:
    log = tmp_path / "calc.log"
    async with McpMounts([stdio_config(log, timeout_s=1.0)]) as mounts:
        tools = {t.name: t for t in mounts.tools}
        slow, add = tools["calc__slow"], tools["calc__add"]

        # A call past timeout_s fails as a retryable UpstreamError, and the server is told to stop.
        with pytest.raises(UpstreamError, match="no answer within 1s") as err:
            await slow.invoke({"seconds": 30}, ctx(slow))
        assert err.value.retryable
        started = await wait_for_line(log, r"started (\S+)")
        await wait_for_line(log, rf"notification cancelled {re.escape(started.group(1))}")
        await wait_for_line(log, rf"cancelled {re.escape(started.group(1))}")

        # Killed mid-call: that call fails with a clear UpstreamError; the next one restarts the server.
        first_pid = int((await wait_for_line(log, r"pid (\d+)")).group(1))
        task = asyncio.create_task(slow.invoke({"seconds": 0.9}, ctx(slow)))
        await asyncio.sleep(0.3)
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(UpstreamError, match="MCP server 'calc': the connection closed"):
            await task
        assert await add.invoke({"a": 2, "b": 3}, ctx(add)) == {"result": 5}
        pids = [int(line.split()[1]) for line in log_lines(log) if line.startswith("pid ")]
        assert len(pids) == 2 and pids[0] == first_pid

        # Killed between calls: the mount notices, and the next call reconnects before it is sent.
        os.kill(pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 3
        while mounts.alive("calc") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not mounts.alive("calc")
        assert await add.invoke({"a": 4, "b": 5}, ctx(add)) == {"result": 9}
        assert mounts.alive("calc")
        pids = [int(line.split()[1]) for line in log_lines(log) if line.startswith("pid ")]
        assert len(pids) == 3
    with pytest.raises(ProcessLookupError):  # closing the mounts stopped (and reaped) the server
        os.kill(pids[2], 0)


# -- streamable HTTP ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    log = tmp_path / "calc.log"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, CALC, "http", "127.0.0.1", str(port)],
        env={**os.environ, "CALC_LOG": str(log)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the HTTP MCP server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp", log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_an_http_mount(http_server: tuple[str, Path]) -> None:
    url, log = http_server
    cfg = McpServerConfig(name="web", url=url, headers={"X-Keel": "test"})
    async with McpMounts([cfg]) as mounts:
        tools = {t.name: t for t in mounts.tools}
        assert set(tools) == {"web__add", "web__record", "web__slow", "web__fail"}
        add, record, slow = tools["web__add"], tools["web__record"], tools["web__slow"]
        assert add.effect == "read" and add.source == "mcp:web"
        assert await add.invoke({"a": 2, "b": 3}, ctx(add)) == {"result": 5}
        assert await record.invoke({"note": "via-http"}, ctx(record, key="k-http")) == {"result": "recorded via-http"}
        assert "record via-http key=k-http task=t1" in log_lines(log)

        # Cancelling over HTTP stops the server's handler too. (On this 2026-07-28 session the SDK signals it
        # by aborting the request's POST, that protocol's cancellation; no notification is posted.)
        task = asyncio.create_task(slow.invoke({"seconds": 30}, ctx(slow)))
        started = await wait_for_line(log, r"started (\S+)")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for_line(log, rf"cancelled {re.escape(started.group(1))}")
