"""Issue 21, defect 2: strict JSON in at every edge, and JSON out that a bad stored row cannot break.

The battery's reproduction: ``"metadata": {"x": "\\udc00"}`` was accepted with 202, and from then on the task's
GET, its cancel and every page of ``GET /v1/tasks`` holding it answered 500; ``/v1/agent`` had the same fault;
``NaN``, ``Infinity`` and ``1e999`` came back as ``null``; ``max_tokens: true`` and ``wait_s: false`` were coerced.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from conftest import LiveServer, wait_terminal
from keel.backends import open_store
from keel.interaction.wire_json import check, scrub
from keel.memory.types import NewTask

LONE = b'"\\udc00"'  # the escape as it travels: six bytes of JSON text
# Every edge that takes a JSON body, with a body that would be valid but for ``{bad}``.
EDGES: list[tuple[str, bytes]] = [
    ("/v1/tasks", b'{"workflow": "diagnostic", "input": {"steps": 1}, "metadata": {"x": {bad}}}'),
    ("/v1/agent", b'{"goal": "hi", "metadata": {"x": {bad}}}'),
    ("/v1/chat", b'{"message": {bad}}'),
    ("/v1/reason", b'{"prompt": {bad}, "output_schema": {"type": "object"}}'),
    ("/v1/function-call", b'{"prompt": {bad}}'),
    ("/v1/stream", b'{"prompt": {bad}}'),
    ("/v1/responses", b'{"model": "test", "input": {bad}}'),
    ("/v1/chat/completions", b'{"model": "test", "messages": [{"role": "user", "content": {bad}}]}'),
    ("/v1/memory/search", b'{"query": {bad}}'),
    ("/mcp", b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": {bad}}}'),
]
BAD_VALUES = [LONE, b'"a\\ud800b"', b'{"\\udfff": 1}', b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1E+400"]


def task_count(live: LiveServer) -> int:
    with live.client() as c:
        return len(c.get("/v1/tasks", params={"limit": 200}).json()["items"])


@pytest.mark.parametrize("path,template", EDGES, ids=[p for p, _ in EDGES])
def test_non_strict_json_is_a_422_at_every_edge(live: LiveServer, path: str, template: bytes) -> None:
    before = task_count(live)
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    with live.client() as c:
        for bad in BAD_VALUES:
            r = c.post(path, content=template.replace(b"{bad}", bad), headers=headers)
            assert r.status_code == 422, (path, bad, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            problem = r.json()
            assert problem["type"] == "urn:keel:problem:malformed_json" and problem["errors"], problem
    assert task_count(live) == before, "a refused body stored a task"


@pytest.mark.parametrize(
    "method,path",
    [("POST", "/v1/keys"), ("PUT", "/v1/tenants/acme/limits"), ("POST", "/v1/memory/search"),
     ("POST", "/v1/chat/completions"), ("POST", "/v1/tasks/tsk_x/approvals/call_x"), ("POST", "/v1/tasks")],
)  # fmt: skip
def test_a_body_that_is_not_utf8_is_a_422_not_a_bare_400(live: LiveServer, method: str, path: str) -> None:
    """Found by the reliability battery (Schemathesis ST103): FastAPI answers bytes that are not UTF-8 with an
    undocumented 400 ``about:blank``; keel refuses them as it refuses any malformed JSON."""
    with live.client() as c:
        r = c.request(method, path, content=b'{"a": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["type"] == "urn:keel:problem:malformed_json"


def test_the_problem_points_at_the_number_out_of_range(live: LiveServer) -> None:
    body = b'{"workflow": "diagnostic", "metadata": {"ok": 1.5e300, "list": [1, 1e999]}}'
    with live.client() as c:
        r = c.post("/v1/tasks", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["errors"][0]["pointer"] == "/metadata/list/1"


def test_strict_json_that_is_valid_still_passes(live: LiveServer) -> None:
    """A surrogate *pair* is a real character; big but finite numbers and huge integers are fine."""
    body = (
        b'{"workflow": "diagnostic", "input": {"steps": 1, "step_seconds": 0}, '
        b'"metadata": {"emoji": "\\ud83d\\ude00", "big": 1.7e308, "int": 123456789012345678901234567890}}'
    )
    with live.client() as c:
        r = c.post("/v1/tasks", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 202, r.text
        task = c.get(f"/v1/tasks/{r.json()['id']}").json()
    assert task["metadata"] == {"emoji": "😀", "big": 1.7e308, "int": 123456789012345678901234567890}


@pytest.mark.parametrize(
    "path,body,pointer",
    [
        ("/v1/chat", {"message": "hi", "max_tokens": True}, "/max_tokens"),
        ("/v1/chat", {"message": "hi", "max_tokens": "5"}, "/max_tokens"),
        ("/v1/reason", {"prompt": "hi", "output_schema": {"type": "object"}, "wait_s": False}, "/wait_s"),
        ("/v1/stream", {"prompt": "hi", "max_tokens": 1.0}, "/max_tokens"),
        ("/v1/tasks", {"workflow": "diagnostic", "budget": {"max_steps": True}}, "/budget/max_steps"),
        ("/v1/tasks", {"workflow": "diagnostic", "cache": {"max_age_s": "60"}}, "/cache/max_age_s"),
        ("/v1/tasks", {"workflow": "diagnostic", "input": {"steps": True}}, "/input/steps"),
        ("/v1/tasks", {"workflow": "diagnostic", "input": {"steps": "3"}}, "/input/steps"),
        ("/v1/chat/completions", {"model": "test", "messages": [], "max_tokens": True}, "/max_tokens"),
    ],
)
def test_strict_types_at_the_edge(live: LiveServer, path: str, body: dict[str, object], pointer: str) -> None:
    with live.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["type"] == "urn:keel:problem:validation_error"
    assert pointer in [e["pointer"] for e in r.json()["errors"]], r.json()


def test_an_enum_still_takes_its_value(live: LiveServer) -> None:
    """Strict mode must not refuse ``{"decision": "approve"}`` (FastAPI validates Python data, not JSON)."""
    with live.client() as c:
        r = c.post("/v1/tasks/tsk_nope/approvals/call_nope", json={"decision": "approve"})
    assert r.status_code in (403, 404), r.text  # past validation: refused for the key or the missing task


def test_a_bad_stored_row_never_breaks_a_listing_or_a_get(live: LiveServer) -> None:
    """A task stored with a lone surrogate (before this check, or by another writer) is served, the surrogate
    replaced by U+FFFD, and the rest of its tenant's page with it."""

    async def plant() -> str:
        store = open_store(f"sqlite:///{live.data_dir / 'keel.db'}")
        try:
            task = NewTask(tenant="acme", workflow="diagnostic", input={"steps": 1}, metadata={"x": "a\udc00b"})
            created = await store.create_task(task, None, time.time())
            assert created.task is not None
            return created.task.id
        finally:
            await store.aclose()

    with live.client() as c:
        good = c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 1, "step_seconds": 0}})
        assert good.status_code == 202
        bad = asyncio.run(plant())
        page = c.get("/v1/tasks")
        assert page.status_code == 200, page.text
        items = {t["id"]: t for t in page.json()["items"]}
        assert items[bad]["metadata"] == {"x": "a\ufffdb"} and good.json()["id"] in items
        got = c.get(f"/v1/tasks/{bad}")
        assert got.status_code == 200 and got.json()["metadata"] == {"x": "a\ufffdb"}
        wait_terminal(c, bad)
        cancelled = c.post(f"/v1/tasks/{bad}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["metadata"] == {"x": "a\ufffdb"}


def test_check_is_a_pure_function() -> None:
    assert check(b'{"a": [1, 2.5, "x"]}') is None
    assert check(b"{not json") is None  # left to the route's own malformed-JSON answer
    assert check(b'{"a": "\xff\xfe"}') == ("", "the body is not UTF-8 (RFC 8259 JSON is)")
    assert check(b'{"a": ' + b"9" * 5000 + b"}") is not None  # more digits than Python converts: not a 500
    assert check(b'{"a": "\\udc00"}') is not None
    assert check(b'{"a": NaN}') is not None
    assert check(b'{"a": {"b": 1e400}}') == ("/a/b", "number out of range: larger than a double can hold")
    assert check(b'{"a/b": [-1e999]}') == ("/a~1b/0", "number out of range: larger than a double can hold")
    assert check('{"a": "\udc00"}'.encode("utf-8", "surrogatepass")) is not None  # raw, not escaped
    assert scrub({"k\udc00": ["v\ud800", 1, None]}) == {"k\ufffd": ["v\ufffd", 1, None]}


def test_a_body_refused_before_the_route_still_carries_the_request_id(live: LiveServer) -> None:
    r = httpx.post(
        live.url + "/v1/tasks",
        content=b'{"workflow": NaN}',
        headers={"content-type": "application/json", "Authorization": f"Bearer {live.key}"},
    )
    assert r.status_code == 422 and r.headers.get("x-request-id")
