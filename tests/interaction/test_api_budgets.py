"""Budgets over HTTP: validated at submission (422 before anything is stored), enforced as breakers, visible
live as `budget` events and in the envelope."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import LiveServer, wait_terminal


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
