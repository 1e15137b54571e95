"""Orchestration outcomes as a client sees them over HTTP: workflows loaded with KEEL_WORKFLOWS, a plan that
needs clarification, and the plan on the event stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import api_workflows
from conftest import LiveServer, make_key, start_server, wait_terminal
from keel.settings import Settings


@pytest.fixture
def triage_server(settings: Settings) -> Iterator[LiveServer]:
    settings.workflows = ["api_workflows:WORKFLOWS"]
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key = make_key(settings.data_dir, "acme", frozenset({"tasks:read", "tasks:write"}))
    server, thread = start_server(settings)
    try:
        yield LiveServer(
            url=f"http://127.0.0.1:{settings.port}", data_dir=settings.data_dir, settings=settings, key=key
        )
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_low_confidence_plan_ends_needs_clarification_before_any_tool(triage_server: LiveServer) -> None:
    api_workflows.TOOL_RUNS.clear()
    with triage_server.client() as c:
        r = c.post("/v1/tasks", json={"workflow": "triage", "input": {"intent": "do the thing", "confidence": 0.2}})
        assert r.status_code == 202
        task_id = r.json()["id"]
        done = wait_terminal(c, task_id)
        stream = c.get(f"/v1/tasks/{task_id}/events").text
    assert done["status"] == "needs_clarification"
    env: dict[str, Any] = done["envelope"]  # type: ignore[assignment]
    assert env["status"] == "needs_clarification"
    assert env["result"]["questions"] and env["result"]["confidence"] == 0.2
    assert [e["type"] for e in env["errors"]] == ["needs_clarification"]
    assert env["metadata"]["plan"]["confidence"] == 0.2
    assert [s["kind"] for s in env["metadata"]["steps"]] == ["model"]  # the planner's call, and nothing else
    assert api_workflows.TOOL_RUNS == []
    assert "event: plan" in stream and "event: step_started" in stream


def test_confident_plan_runs_its_tools(triage_server: LiveServer) -> None:
    api_workflows.TOOL_RUNS.clear()
    with triage_server.client() as c:
        r = c.post("/v1/tasks", json={"workflow": "triage", "input": {"intent": "find risks"}})
        done = wait_terminal(c, r.json()["id"])
    env: dict[str, Any] = done["envelope"]  # type: ignore[assignment]
    assert done["status"] == "succeeded" and env["status"] == "success"
    assert env["result"] == {"answer": {"query": "find risks", "hits": 2}}
    assert env["metadata"]["tools_called"] == [{"tool": "search", "step": "plan:s"}]
    assert env["metadata"]["budget"]["used"]["tool_calls"] == 1
    assert api_workflows.TOOL_RUNS == ["find risks"]


def test_unknown_workflow_module_fails_at_startup(settings: Settings) -> None:
    from keel.app import create_app
    from keel.errors import ConfigError

    settings.workflows = ["no_such_module:X"]
    with pytest.raises(ConfigError, match="no_such_module"):
        create_app(settings)


def test_default_model_answers_and_model_stats_are_served(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from keel.testing.fake_llm import FakeOpenAIServer, Reply

    with FakeOpenAIServer() as llm:
        llm.script(Reply(text="Currency risk.", model="gpt-4o-mini-2024-07-18", input_tokens=40, output_tokens=3))
        monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", "sk-test")
        settings.default_model = f"openai-compatible:{llm.base_url}#gpt-4o-mini-2024-07-18"
        settings.workflows = ["api_workflows:WORKFLOWS"]
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        key = make_key(settings.data_dir, "acme", frozenset({"tasks:read", "tasks:write"}))
        admin = make_key(settings.data_dir, "ops", frozenset({"operator"}))
        server, thread = start_server(settings)
        live = LiveServer(
            url=f"http://127.0.0.1:{settings.port}", data_dir=settings.data_dir, settings=settings, key=key
        )
        try:
            with live.client() as c:
                r = c.post("/v1/tasks", json={"workflow": "ask_default", "input": {"question": "Risks?"}})
                done = wait_terminal(c, r.json()["id"])
                assert c.get("/v1/models/stats").status_code == 403  # the operator's only
            with live.client(admin) as c:
                stats = c.get("/v1/models/stats").json()
                one = c.get("/v1/models/stats", params={"model_id": "nope"}).json()
        finally:
            server.should_exit = True
            thread.join(timeout=15)
    env: dict[str, Any] = done["envelope"]  # type: ignore[assignment]
    assert done["status"] == "succeeded" and env["result"] == "Currency risk."
    assert env["metadata"]["model_ids"] == ["gpt-4o-mini-2024-07-18"]
    assert env["metadata"]["tokens"] == {"input": 40, "output": 3, "total": 43}
    assert llm.requests[0]["model"] == "gpt-4o-mini-2024-07-18"
    [row] = stats
    assert row["model_id"] == "gpt-4o-mini-2024-07-18" and row["provider"] == "openai-compatible"
    assert (row["calls"], row["errors"], row["input_tokens"], row["output_tokens"]) == (1, 0, 40, 3)
    assert row["json_valid_rate"] is None and row["latency_ms_mean"] > 0
    assert one == []


def test_builtin_ask_streams_tokens(live: LiveServer) -> None:
    with live.client() as c:
        r = c.post("/v1/tasks", json={"workflow": "ask", "input": {"question": "echo these words", "model": "test"}})
        task_id = r.json()["id"]
        done = wait_terminal(c, task_id)
        stream = c.get(f"/v1/tasks/{task_id}/events").text
        bad = c.post("/v1/tasks", json={"workflow": "ask", "input": {"question": ""}})
    env: dict[str, Any] = done["envelope"]  # type: ignore[assignment]
    assert done["status"] == "succeeded" and env["result"] == {"answer": "echo these words"}
    assert stream.count("event: token") == 3
    assert bad.status_code == 422


def test_unavailable_model_is_a_typed_envelope_error(live: LiveServer) -> None:
    with live.client() as c:
        r = c.post("/v1/tasks", json={"workflow": "ask", "input": {"question": "hi", "model": "gemini:pro"}})
        done = wait_terminal(c, r.json()["id"])
    env: dict[str, Any] = done["envelope"]  # type: ignore[assignment]
    assert done["status"] == "failed"
    assert [e["type"] for e in env["errors"]] == ["model_unavailable"] and "unknown model" in env["errors"][0][
        "message"
    ]
