"""Budgets over HTTP: validated at submission (422 before anything is stored), enforced as breakers, visible
live as `budget` events and in the envelope."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from conftest import LiveServer, wait_terminal
from keel.testing.fake_llm import FakeOpenAIServer, Reply


@pytest.mark.parametrize(
    ("budget", "pointer"),
    [
        ({"max_tool_calls": -1}, "/budget/max_tool_calls"),
        ({"max_cost_usd": "lots"}, "/budget/max_cost_usd"),
        ({"deadline_s": 0}, "/budget/deadline_s"),
        ({"max_wishes": 3}, "/budget/max_wishes"),
    ],
)
def test_bad_budget_is_422_before_anything_is_stored(live: LiveServer, budget: dict[str, Any], pointer: str) -> None:
    with live.client() as c:
        r = c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {}, "budget": budget})
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
        assert pointer in [e["pointer"] for e in r.json()["errors"]]
        assert c.get("/v1/tasks").json()["items"] == []


def test_step_budget_stops_the_task_and_keeps_its_partial_result(live: LiveServer) -> None:
    with live.client() as c:
        r = c.post(
            "/v1/tasks",
            json={"workflow": "diagnostic", "input": {"steps": 5, "step_seconds": 0}, "budget": {"max_steps": 2}},
        )
        assert r.status_code == 202
        task_id = r.json()["id"]
        done = wait_terminal(c, task_id)
        events = c.get(f"/v1/tasks/{task_id}/events", headers={"accept": "text/event-stream"}).text
    assert done["status"] == "partial_success"
    env: dict[str, Any] = done["envelope"]  # type: ignore[assignment]
    assert env["status"] == "partial_success"
    (error,) = [e for e in env["errors"] if e["type"] == "budget_exceeded"]
    assert "steps" in error["message"]
    assert env["result"] == {"completed_steps": [1, 2]}  # the diagnostic's partial result, kept
    assert env["metadata"]["budget"]["limits"]["steps"] == 2
    assert env["metadata"]["budget"]["used"]["steps"] == 2
    assert [s["name"] for s in env["metadata"]["steps"]] == ["step-1", "step-2"]
    assert events.count("event: budget") == 2


def test_deadline_is_a_breaker(live: LiveServer) -> None:
    with live.client() as c:
        r = c.post(
            "/v1/tasks",
            # Generous margins: the run must start and finish a step within the deadline even on a loaded machine.
            json={"workflow": "diagnostic", "input": {"steps": 20, "step_seconds": 0.2}, "budget": {"deadline_s": 2}},
        )
        done = wait_terminal(c, r.json()["id"], timeout=15)
    env: dict[str, Any] = done["envelope"]  # type: ignore[assignment]
    (error,) = [e for e in env["errors"] if e["type"] == "budget_exceeded"]
    assert "deadline" in error["message"]
    completed = [s for s in env["metadata"]["steps"] if s["status"] == "completed"]
    assert 1 <= len(completed) < 20


# -- cost budgets need a known price (issue 19) -------------------------------------------------------------------


@pytest.fixture
def llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        yield server


def test_a_cost_budget_on_an_unpriced_model_is_422_before_anything_is_stored(
    live: LiveServer, llm: FakeOpenAIServer
) -> None:
    spec = f"openai-compatible:{llm.base_url}#mystery-7b"
    with live.client() as c:
        r = c.post(
            "/v1/tasks",
            json={"workflow": "ask", "input": {"question": "hi", "model": spec}, "budget": {"max_cost_usd": 1e-7}},
        )
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
        [error] = r.json()["errors"]
        assert error["pointer"] == "/budget/max_cost_usd" and spec in error["message"]
        assert c.get("/v1/tasks").json()["items"] == []
        assert llm.requests == []  # refused before any model call
        # Without the budget the same model runs, and the envelope says its cost is not known.
        r = c.post("/v1/tasks", json={"workflow": "ask", "input": {"question": "hi", "model": spec}})
        llm.script(Reply(text="hello", model="mystery-7b", input_tokens=5, output_tokens=1))
        env: dict[str, Any] = wait_terminal(c, r.json()["id"])["envelope"]  # type: ignore[assignment]
    assert env["status"] == "success"
    [warning] = [e for e in env["errors"] if e["type"] == "price_unknown"]
    assert warning["severity"] == "warning" and "mystery-7b" in warning["message"]
    assert env["metadata"]["cost_usd"] == 0


def test_a_cost_budget_on_a_priced_model_trips(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(Reply(text="a long answer", model="gpt-4o-mini-2024-07-18", input_tokens=1000, output_tokens=1000))
    body = {
        "workflow": "ask",
        "input": {"question": "hi", "model": "openai:gpt-4o-mini-2024-07-18"},
        "budget": {"max_cost_usd": 1e-7},
    }
    with live.client() as c:
        r = c.post("/v1/tasks", json=body)
        assert r.status_code == 202, r.text
        env: dict[str, Any] = wait_terminal(c, r.json()["id"])["envelope"]  # type: ignore[assignment]
    (error,) = [e for e in env["errors"] if e["type"] == "budget_exceeded"]
    assert "cost" in error["message"]
    assert env["metadata"]["cost_usd"] > 1e-7
    assert not [e for e in env["errors"] if e["type"] == "price_unknown"]


def test_the_test_model_is_free_not_unpriced(live: LiveServer) -> None:
    body = {"workflow": "ask", "input": {"question": "hi"}, "budget": {"max_cost_usd": 0.01}}
    with live.client() as c:
        r = c.post("/v1/tasks", json=body)
        assert r.status_code == 202, r.text
        env: dict[str, Any] = wait_terminal(c, r.json()["id"])["envelope"]  # type: ignore[assignment]
    assert env["status"] == "success" and env["errors"] == []
