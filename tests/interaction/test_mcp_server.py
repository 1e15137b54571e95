"""keel's MCP endpoint (``keel.interaction.mcp``) over real HTTP: a uvicorn server on loopback, the official SDK
client, and raw httpx requests for the HTTP-level checks (auth, Origin). The backend is a fake."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx2
import mcp_types as mcp_t
import pytest
import uvicorn
from fastapi import FastAPI
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from pydantic import BaseModel

from keel.interaction.mcp import TASK_ID_META, McpEndpoint, Progress, ToolOutcome, build_mcp, origin_allowed
from keel.memory.types import ApiKey
from keel.orchestration.tools import Tool


class AddArgs(BaseModel):
    a: int
    b: int


class NoteArgs(BaseModel):
    text: str


async def _unused(args: Any) -> Any:  # the fake backend answers calls itself
    raise AssertionError("not called")


ADD = Tool(name="add", description="Add two integers.", fn=_unused, input_model=AddArgs, effect="read")
NOTE = Tool(name="note", description="Write a note.", fn=_unused, input_model=NoteArgs, effect="write")

KEYS = {
    "k-good": ApiKey(id="key1", tenant="t1", scopes=frozenset({"tasks:write", "tasks:read"})),
    "k-other": ApiKey(id="key2", tenant="t2", scopes=frozenset({"tasks:write"})),
    "k-read": ApiKey(id="key3", tenant="t1", scopes=frozenset({"tasks:read"})),
}


@dataclass
class FakeBackend:
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def tools_for(self, key: ApiKey) -> list[Tool]:
        return [ADD, NOTE] if key.tenant == "t1" else [ADD]

    async def call(
        self,
        key: ApiKey,
        name: str,
        args: dict[str, Any],
        *,
        progress: Progress | None = None,
        idempotency_key: str | None = None,
    ) -> ToolOutcome:
        tool = {"add": ADD, "note": NOTE}[name]
        parsed = tool.validate(args)  # raises ToolArgsInvalid
        self.calls.append((key.tenant, name, args))
        if progress is not None:
            await progress(0.5, "halfway")
        if name == "add":
            return ToolOutcome(result={"sum": parsed.a + parsed.b}, task_id=f"task-{key.tenant}")
        if parsed.text == "crash":
            raise RuntimeError("a bug")
        if parsed.text == "fail":
            return ToolOutcome(result=None, is_error=True, message="the note could not be written")
        return ToolOutcome(result=f"noted {parsed.text}")


async def verify_key(token: str) -> ApiKey | None:
    return KEYS.get(token)


@dataclass
class Served:
    base: str
    backend: FakeBackend

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"


def make_app(endpoint: McpEndpoint) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with endpoint.running():
            yield

    app = FastAPI(lifespan=lifespan)
    app.add_route("/mcp", endpoint.asgi, include_in_schema=False)
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serve(*, json_response: bool = False) -> AsyncIterator[Served]:
    """The endpoint over a fake backend, in a FastAPI app served by uvicorn on a free loopback port."""
    backend = FakeBackend()
    app = make_app(build_mcp(backend, verify_key, json_response=json_response))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started or task.done():
            break
        await asyncio.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield Served(f"http://127.0.0.1:{port}", backend)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serve() as s:
        yield s


@contextlib.asynccontextmanager
async def connect(url: str, key: str, mode: str = "auto") -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=10) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, cache=None) as client,
    ):
        yield client


def text_of(result: mcp_t.CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, mcp_t.TextContent)
    return block.text


# -- the SDK client ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "legacy"])  # 2026-07-28 per-request, and the handshake era
async def test_sdk_client_lists_tools_and_calls_them(served: Served, mode: str) -> None:
    async with connect(served.url, "k-good", mode) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert set(listed) == {"add", "note"}
        add, note = listed["add"], listed["note"]
        assert add.input_schema == ADD.input_schema and note.input_schema == NOTE.input_schema
        assert add.description == "Add two integers."
        assert add.annotations is not None and note.annotations is not None
        assert add.annotations.read_only_hint is True and add.annotations.destructive_hint is False
        assert note.annotations.read_only_hint is False and note.annotations.destructive_hint is True
        assert note.annotations.idempotent_hint is True

        result = await client.call_tool("add", {"a": 2, "b": 3})
        assert not result.is_error
        assert result.structured_content == {"sum": 5}
        assert text_of(result) == '{"sum": 5}'
        assert result.meta is not None and result.meta[TASK_ID_META] == "task-t1"

        noted = await client.call_tool("note", {"text": "hello"})
        assert not noted.is_error and text_of(noted) == "noted hello" and noted.structured_content is None

    assert served.backend.calls == [("t1", "add", {"a": 2, "b": 3}), ("t1", "note", {"text": "hello"})]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_tool_errors_are_error_results(served: Served, mode: str) -> None:
    async with connect(served.url, "k-good", mode) as client:
        invalid = await client.call_tool("add", {"a": "two", "b": 3})
        assert invalid.is_error and text_of(invalid).startswith("add: /a:")

        failed = await client.call_tool("note", {"text": "fail"})
        assert failed.is_error and text_of(failed) == "the note could not be written"

        crashed = await client.call_tool("note", {"text": "crash"})
        assert crashed.is_error and "a bug" not in text_of(crashed)

        unknown = await client.call_tool("nope", {})
        assert unknown.is_error and "'nope'" in text_of(unknown)
    assert served.backend.calls == [("t1", "note", {"text": "fail"}), ("t1", "note", {"text": "crash"})]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_progress_is_forwarded(served: Served, mode: str) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with connect(served.url, "k-good", mode) as client:
        result = await client.call_tool("add", {"a": 1, "b": 1}, progress_callback=on_progress)
    assert result.structured_content == {"sum": 2}
    assert seen == [(0.5, None, "halfway")]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_json_response_mode(mode: str) -> None:
    async with serve(json_response=True) as s, connect(s.url, "k-good", mode) as client:
        assert [t.name for t in (await client.list_tools()).tools] == ["add", "note"]
        assert (await client.call_tool("add", {"a": 20, "b": 22})).structured_content == {"sum": 42}


async def test_each_key_sees_and_calls_only_its_own_tools(served: Served) -> None:
    async with connect(served.url, "k-good") as one, connect(served.url, "k-other", "legacy") as two:
        assert [t.name for t in (await one.list_tools()).tools] == ["add", "note"]
        assert [t.name for t in (await two.list_tools()).tools] == ["add"]
        assert (await two.call_tool("add", {"a": 1, "b": 2})).structured_content == {"sum": 3}
        refused = await two.call_tool("note", {"text": "x"})
        assert refused.is_error and "'note'" in text_of(refused)
        meta = (await one.call_tool("add", {"a": 4, "b": 4})).meta
        assert meta is not None and meta[TASK_ID_META] == "task-t1"
    assert served.backend.calls == [("t2", "add", {"a": 1, "b": 2}), ("t1", "add", {"a": 4, "b": 4})]


# -- HTTP: auth and Origin ---------------------------------------------------------------------------------------

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
ACCEPT = {"Accept": "application/json, text/event-stream"}


async def post(served: Served, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10, follow_redirects=False) as http:
        return await http.post(served.url, json=INITIALIZE, headers={**ACCEPT, **headers})


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["type"] == f"urn:keel:problem:{slug}"
    assert body["title"] and body["detail"]
    return body


async def test_requests_without_a_valid_key_get_401(served: Served) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k-good"}):
        response = await post(served, headers)
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"


async def test_a_key_without_tasks_write_gets_403(served: Served) -> None:
    body = assert_problem(await post(served, {"Authorization": "Bearer k-read"}), 403, "forbidden")
    assert "tasks:write" in body["detail"]


async def test_origin(served: Served) -> None:
    auth = {"Authorization": "Bearer k-good"}
    evil = await post(served, {**auth, "Origin": "http://evil.example"})
    assert "evil.example" in assert_problem(evil, 403, "forbidden")["detail"]
    # checked before the key: a browser page learns nothing about keys
    assert_problem(await post(served, {"Origin": "http://evil.example"}), 403, "forbidden")

    plain = await post(served, auth)  # no Origin: a non-browser client
    assert plain.status_code == 200, plain.text
    assert "mcp-session-id" not in plain.headers  # stateless
    same = await post(served, {**auth, "Origin": served.base})  # same-origin loopback page
    assert same.status_code == 200, same.text


def test_origin_rules() -> None:
    host = "127.0.0.1:8000"
    assert origin_allowed("http://127.0.0.1:8000", host)
    assert origin_allowed("http://localhost:8000", "localhost:8000")
    assert origin_allowed("http://[::1]:8000", "[::1]:8000")
    assert origin_allowed("https://keel.example", "keel.example")  # TLS ended at a proxy
    assert not origin_allowed("http://127.0.0.1:9999", host)  # another local port is another origin
    assert not origin_allowed("http://localhost:8000", host)
    assert not origin_allowed("null", host)
    assert not origin_allowed("http://127.0.0.1:8000", None)
    assert origin_allowed("https://app.example", "keel.example", ["https://app.example"])
    assert origin_allowed("http://localhost:3000", host, ["http://localhost:*"])
    assert not origin_allowed("http://localhost.evil:3000", host, ["http://localhost:*"])
    assert origin_allowed("https://anything.example", host, ["*"])


async def test_not_running_answers_503() -> None:
    app = make_app(build_mcp(FakeBackend(), verify_key))  # httpx's ASGI transport does not run the lifespan
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
        response = await http.post("/mcp", json=INITIALIZE, headers={**ACCEPT, "Authorization": "Bearer k-good"})
    assert response.status_code == 503 and response.headers["content-type"] == "application/problem+json"
