"""The endpoint families over a live keel server, with a scripted OpenAI-compatible model on loopback: chat with
session memory (sync, 202 fallback, streamed), agent, reason against a caller's schema, function-call (checked,
executed, parked for approval), token streaming with resumption, and the shared HTTP contract."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

import endpoint_tools
from conftest import LiveServer, wait_terminal
from keel.settings import Settings
from keel.testing.fake_llm import FakeOpenAIServer, Hang, Reply, ToolCallSpec

MODEL = "gpt-4o-mini-2024-07-18"
ENDPOINTS = ["/v1/chat", "/v1/agent", "/v1/reason", "/v1/function-call", "/v1/stream"]
TICKET_SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"enum": ["billing", "bug", "question"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["category", "urgency"],
    "additionalProperties": False,
}


@pytest.fixture
def llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", "sk-test")
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def settings(settings: Settings, llm: FakeOpenAIServer) -> Settings:
    settings.default_model = f"openai-compatible:{llm.base_url}#{MODEL}"
    settings.tools = ["endpoint_tools:TOOLS"]
    endpoint_tools.LOOKUPS.clear()
    endpoint_tools.TICKETS.clear()
    return settings


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["type"] and body["title"]
    return body


def sse(r: httpx.Response) -> list[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) of every event in an SSE body, up to `end`."""
    out: list[tuple[int, str, dict[str, Any]]] = []
    frame: dict[str, str] = {}
    for line in r.iter_lines():
        if line == "":
            if "id" in frame:
                out.append((int(frame["id"]), frame["event"], json.loads(frame["data"])))
                if frame["event"] == "end":
                    break
            frame = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(": ")
            frame[field] = value
    return out


def task_ids(c: httpx.Client) -> list[str]:
    return [t["id"] for t in c.get("/v1/tasks", params={"limit": 200}).json()["items"]]


# -- chat ---------------------------------------------------------------------------------------------------------


def test_chat_remembers_the_session_sync_then_streamed(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(Reply(text="Paris is the capital of France."), Reply(text="About two million people live there."))
    with live.client() as c:
        first = c.post("/v1/chat", json={"message": "What is the capital of France?", "system": "Be brief."})
        assert first.status_code == 200, first.text
        body = first.json()
        session = body["session"]
        assert session.startswith("ses_") and first.headers["x-keel-session"] == session
        assert first.headers["location"] == f"/v1/tasks/{body['task_id']}"
        assert body["status"] == "succeeded" and body["envelope"]["status"] == "success"
        assert body["envelope"]["result"] == {"answer": "Paris is the capital of France.", "session": session}

        with c.stream(
            "POST", "/v1/chat", json={"message": "How many people live there?", "session": session, "stream": True}
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-keel-session"] == session
            tid = r.headers["x-keel-task-id"]
            assert r.headers["location"] == f"/v1/tasks/{tid}"
            events = sse(r)
        ids = [i for i, _, _ in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        tokens = "".join(d["text"] for _, e, d in events if e == "token")
        assert tokens == "About two million people live there."
        assert events[-1][1] == "end" and events[-1][2]["envelope"]["result"]["answer"] == tokens
        # Both turns are tasks like any other.
        assert {body["task_id"], tid} <= set(task_ids(c))
        turns = c.get(f"/v1/sessions/{session}").json()["turns"]
    second = llm.requests[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0]["content"] == "What is the capital of France?"
    assert second[1]["content"] == "Paris is the capital of France."
    assert [t["content"] for t in turns][-1] == "About two million people live there." and len(turns) == 4


def test_chat_answers_202_when_the_model_is_slow_and_loses_nothing(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(Hang(seconds=1.5, reply=Reply(text="late but complete")))
    with live.client() as c:
        r = c.post("/v1/chat", json={"message": "take your time", "wait_s": 0.2})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["status"] in ("queued", "running") and body["session"].startswith("ses_")
        assert r.headers["location"] == body["links"]["self"] and r.headers["x-keel-session"] == body["session"]
        done = wait_terminal(c, body["id"])
    assert done["status"] == "succeeded"
    assert done["envelope"]["result"]["answer"] == "late but complete"  # type: ignore[index]


def test_chat_idempotency_key_replays_the_same_task_and_session(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(Reply(text="once"))
    with live.client() as c:
        headers = {"Idempotency-Key": "chat-1"}
        a = c.post("/v1/chat", json={"message": "hi"}, headers=headers)
        b = c.post("/v1/chat", json={"message": "hi"}, headers=headers)
        other = c.post("/v1/chat", json={"message": "something else"}, headers=headers)
    assert a.status_code == b.status_code == 200
    assert a.json()["task_id"] == b.json()["task_id"] and a.json()["session"] == b.json()["session"]
    assert b.headers["idempotent-replayed"] == "true"
    assert_problem(other, 422)
    assert len(llm.requests) == 1


# -- agent --------------------------------------------------------------------------------------------------------


def test_agent_runs_tools_as_a_task(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(
        Reply(tool_calls=[ToolCallSpec(name="lookup", arguments={"sku": "A1", "qty": 2})], finish_reason="tool_calls"),
        Reply(text="Two A1 cost 24."),
    )
    with live.client() as c:
        r = c.post("/v1/agent", json={"goal": "What do two A1 cost?", "tools": ["lookup"], "metadata": {"t": 1}})
        assert r.status_code == 202, r.text
        assert r.headers["location"] == r.json()["links"]["self"]
        done = wait_terminal(c, r.json()["id"])
        bad = c.post("/v1/agent", json={"goal": "x", "tools": ["lookup", "nope"]})
    assert done["status"] == "succeeded" and done["workflow"] == "agent" and done["metadata"] == {"t": 1}
    result = done["envelope"]["result"]  # type: ignore[index]
    assert result["answer"] == "Two A1 cost 24." and result["turns"] == 2
    [call] = result["tool_calls"]
    assert call["tool"] == "lookup" and call["ok"] and call["result"] == {"sku": "A1", "qty": 2, "price": 24}
    assert endpoint_tools.LOOKUPS == ["A1"]
    assert [t["function"]["name"] for t in llm.requests[0]["tools"]] == ["lookup"]
    assert [e["pointer"] for e in assert_problem(bad, 422)["errors"]] == ["/tools/1"]


# -- reason -------------------------------------------------------------------------------------------------------


def test_reason_success(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(Reply(text='```json\n{"category": "billing", "urgency": 4}\n```'))
    with live.client() as c:
        r = c.post("/v1/reason", json={"prompt": "Classify", "context": "charged twice", "schema": TICKET_SCHEMA})
    assert r.status_code == 200, r.text
    env = r.json()["envelope"]
    assert env["status"] == "success" and env["result"] == {"category": "billing", "urgency": 4}
    sent = llm.requests[0]
    assert sent["response_format"]["json_schema"]["schema"] == TICKET_SCHEMA
    assert "charged twice" in sent["messages"][-1]["content"]


def test_reason_violation_after_repairs_is_partial_success_with_pointers(
    live: LiveServer, llm: FakeOpenAIServer
) -> None:
    llm.script(Reply(text='{"category": "weather"}'), Reply(text='{"category": "weather", "urgency": 9}'))
    with live.client() as c:
        r = c.post("/v1/reason", json={"prompt": "Classify", "schema": TICKET_SCHEMA, "repairs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    env = body["envelope"]
    assert body["status"] == "partial_success" and env["status"] == "partial_success"
    assert env["result"] == {"category": "weather", "urgency": 9}
    assert [(e["type"], e["pointer"]) for e in env["errors"]] == [
        ("schema_violation", "/category"),
        ("schema_violation", "/urgency"),
    ]
    assert [s["name"] for s in env["metadata"]["steps"]] == ["reason", "reason:repair-1"]
    repair = llm.requests[1]["messages"][-1]["content"]
    assert "at /category" in repair and "'urgency' is a required property" in repair


def test_reason_not_json_fails_as_invalid_json(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(Reply(text="I think it is billing."))
    with live.client() as c:
        r = c.post("/v1/reason", json={"prompt": "Classify", "schema": TICKET_SCHEMA, "repairs": 0})
    assert r.status_code == 200, r.text
    env = r.json()["envelope"]
    assert env["status"] == "failed" and [e["type"] for e in env["errors"]] == ["invalid_json"]


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "nope"},
        {"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}},
        {"$ref": "#/$defs/missing"},
        {"type": "object", "properties": {"x": {"description": "x" * 40_000}}},
        json.loads('{"not":' * 40 + "{}" + "}" * 40),
    ],
)
def test_reason_rejects_a_bad_schema_before_any_task(
    live: LiveServer, llm: FakeOpenAIServer, schema: dict[str, Any]
) -> None:
    with live.client() as c:
        before = task_ids(c)
        r = c.post("/v1/reason", json={"prompt": "Classify", "schema": schema})
        after = task_ids(c)
        plain = c.post("/v1/tasks", json={"workflow": "reason", "input": {"prompt": "Classify", "schema": schema}})
        assert task_ids(c) == before
    body, plain_body = assert_problem(r, 422), assert_problem(plain, 422)
    assert [e["pointer"] for e in body["errors"]] == ["/schema"]
    assert [e["pointer"] for e in plain_body["errors"]] == ["/input/schema"]
    # One problem shape, whichever layer refused the request: FastAPI's body check or the workflow's own.
    assert body["type"] == plain_body["type"] == "urn:keel:problem:validation_error"
    assert "context" not in plain_body
    assert before == after and llm.requests == []


# -- function-call ------------------------------------------------------------------------------------------------


def test_function_call_reports_calls_without_running_them(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(
        Reply(
            text="Looking up.",
            tool_calls=[
                ToolCallSpec(name="lookup", arguments={"sku": "A1"}, id="c1"),
                ToolCallSpec(name="lookup", arguments={"sku": "B2", "qty": 0}, id="c2"),
            ],
            finish_reason="tool_calls",
        )
    )
    with live.client() as c:
        r = c.post("/v1/function-call", json={"prompt": "Price A1 and zero B2", "tools": ["lookup"]})
    assert r.status_code == 200, r.text
    env = r.json()["envelope"]
    assert env["status"] == "partial_success"
    ok, bad = env["result"]["calls"]
    assert ok == {"id": "c1", "tool": "lookup", "arguments": {"sku": "A1"}, "valid": True}
    assert bad["valid"] is False and [p["pointer"] for p in bad["problems"]] == ["/qty"]
    assert [(e["type"], e["pointer"]) for e in env["errors"]] == [("invalid_tool_args", "/calls/1/arguments/qty")]
    assert env["result"]["text"] == "Looking up." and env["result"]["executed"] is False
    assert endpoint_tools.LOOKUPS == [] and env["metadata"]["tools_called"] == []
    assert [t["function"]["name"] for t in llm.requests[0]["tools"]] == ["lookup"]


def test_function_call_executes_reads_and_parks_writes_for_approval(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(
        Reply(tool_calls=[ToolCallSpec(name="lookup", arguments={"sku": "A1"})], finish_reason="tool_calls"),
        Reply(
            tool_calls=[ToolCallSpec(name="create_ticket", arguments={"title": "refund"})], finish_reason="tool_calls"
        ),
    )
    with live.client() as c:
        read = c.post("/v1/function-call", json={"prompt": "Price A1", "execute": True})
        write = c.post(
            "/v1/function-call",
            json={
                "messages": [{"role": "user", "content": "Open a refund ticket"}],
                "execute": True,
                "tools": ["create_ticket"],
                "approval": "always",
            },
        )
        assert write.status_code == 202, write.text
        parked = c.get(write.headers["location"]).json()
    assert read.status_code == 200, read.text
    [call] = read.json()["envelope"]["result"]["calls"]
    assert call["valid"] and call["ok"] and call["result"] == {"sku": "A1", "qty": 1, "price": 12}
    assert endpoint_tools.LOOKUPS == ["A1"]
    # No allowlist: every tool the key may use (not send_email or fetch_url, which need scopes it lacks).
    offered = {t["function"]["name"] for t in llm.requests[0]["tools"]}
    assert {"lookup", "create_ticket", "read_document"} <= offered and not {"send_email", "fetch_url"} & offered
    assert write.json()["status"] == "waiting_for_approval" and write.headers["retry-after"] == "30"
    assert parked["status"] == "waiting_for_approval"
    [pending] = parked["envelope"]["result"]["pending_decisions"]
    assert pending["tool"] == "create_ticket"
    assert endpoint_tools.TICKETS == []

    # A person approves: the task resumes from its checkpoints (the model is not asked again) and the write runs.
    with live.client(live.new_key("acme", "tasks:read,tasks:approve")) as approver:
        tid = write.json()["id"]
        ok = approver.post(f"/v1/tasks/{tid}/approvals/{pending['call_id']}", json={"decision": "approve"})
        assert ok.status_code == 200, ok.text
        done = wait_terminal(approver, tid)
    assert done["status"] == "succeeded", done
    [made] = done["envelope"]["result"]["calls"]  # type: ignore[index]
    assert made["ok"] and made["result"] == {"ticket": 1, "title": "refund"}
    assert endpoint_tools.TICKETS == ["refund"] and len(llm.requests) == 2


# -- stream -------------------------------------------------------------------------------------------------------


def test_stream_relays_tokens_and_resumes_by_last_event_id(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(Reply(text="Logs outlive the crash.", chunk_chars=5))
    with live.client() as c:
        with c.stream("POST", "/v1/stream", json={"prompt": "haiku", "max_tokens": 32}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            tid = r.headers["x-keel-task-id"]
            assert r.headers["location"] == f"/v1/tasks/{tid}"
            events = sse(r)
        tokens = [(i, d["text"]) for i, e, d in events if e == "token"]
        assert "".join(t for _, t in tokens) == "Logs outlive the crash." and len(tokens) >= 3
        end_id, end, data = events[-1]
        assert end == "end" and data["envelope"]["status"] == "success"
        assert data["envelope"]["result"] == {"answer": "Logs outlive the crash."}
        # A client that dropped after the first token resumes exactly after it.
        cut = tokens[0][0]
        with connect_sse(c, "GET", f"/v1/tasks/{tid}/events", headers={"Last-Event-ID": str(cut)}) as source:
            resumed = [int(e.id) for e in source.iter_sse() if e.id]
        assert resumed == [i for i, _, _ in events if i > cut] and resumed[-1] == end_id
        assert c.get(f"/v1/tasks/{tid}").json()["workflow"] == "ask"


# -- the shared HTTP contract -------------------------------------------------------------------------------------


def test_auth_scopes_and_problem_details(live: LiveServer, llm: FakeOpenAIServer) -> None:
    reader = live.new_key("acme", "tasks:read")
    for path in ENDPOINTS:
        assert_problem(httpx.post(live.url + path, json={}), 401)
        with live.client(reader) as c:
            assert_problem(c.post(path, json={"prompt": "x"}), 403)
        with live.client() as c:
            bad = c.post(path, content=b'{"message": ', headers={"content-type": "application/json"})
            assert assert_problem(bad, 422)["type"] == "urn:keel:problem:malformed_json"
            extra = assert_problem(c.post(path, json={"prompt": "x", "message": "x", "goal": "x", "surprise": 1}), 422)
            assert "/surprise" in [e["pointer"] for e in extra["errors"]]
            huge = c.post(path, json={"prompt": "x" * 100_000})
            assert_problem(huge, 413)
    with live.client() as c:
        both = assert_problem(c.post("/v1/function-call", json={"prompt": "x", "messages": []}), 422)
        assert both["errors"]
        long_wait = assert_problem(c.post("/v1/chat", json={"message": "x", "wait_s": 500}), 422)
        assert [e["pointer"] for e in long_wait["errors"]] == ["/wait_s"]
        assert task_ids(c) == []
    assert llm.requests == []


def test_openapi_documents_every_endpoint(live: LiveServer) -> None:
    spec = httpx.get(live.url + "/openapi.json").json()
    for path in ENDPOINTS:
        op = spec["paths"][path]["post"]
        assert op["summary"] and op["description"] and "endpoints" in op["tags"]
        assert op["requestBody"]["content"]["application/json"]["examples"]
        for status in ("401", "403", "413", "422"):
            assert "application/problem+json" in op["responses"][status]["content"], (path, status)
        assert {"200", "202"} & set(op["responses"])
    assert "text/event-stream" in spec["paths"]["/v1/stream"]["post"]["responses"]["200"]["content"]
    assert "202" in spec["paths"]["/v1/chat"]["post"]["responses"]
