"""The pure mapping behind the OpenAI-compatible edge, without a server: task ↔ response ids, a task as a Response,
an event log as numbered Responses events (resumable anywhere with the same numbers) and as chat chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from conftest import LiveServer
from keel.interaction.openai_stream import (
    ChunkEncoder,
    numbered,
    response_id_of,
    response_of,
    task_id_of,
)
from keel.memory.types import Event, Task, TaskStatus

ENVELOPE = {
    "status": "success",
    "result": {"answer": "Hello world", "session": "ses_1"},
    "errors": [],
    "metadata": {"tokens": {"input": 3, "output": 2, "total": 5}},
}


def task(status: TaskStatus = TaskStatus.queued, envelope: dict[str, Any] | None = None, **input: Any) -> Task:
    return Task(
        id="tsk_0001",
        tenant="acme",
        workflow="respond",
        input={"messages": [{"role": "user", "content": "hi"}], **input},
        status=status,
        progress=0.0,
        current_step=None,
        created_at=1000.0,
        updated_at=1000.0,
        started_at=None,
        finished_at=1001.0 if status.terminal else None,
        attempts=1,
        cancel_requested=False,
        envelope=envelope,
        webhook_url=None,
        webhook_secret=None,
        budget={},
        metadata={"openai": {"model": "test", "metadata": {"k": "v"}}},
        estimated_duration_s=None,
    )


def log(end_status: str = "succeeded", envelope: dict[str, Any] = ENVELOPE) -> list[Event]:
    specs: list[tuple[str, dict[str, Any]]] = [
        ("status", {"status": "queued"}),
        ("status", {"status": "running", "attempt": 1}),
        ("step_started", {"step": "answer"}),
        ("token", {"step": "answer", "text": "Hello "}),
        ("token", {"step": "answer", "text": "world"}),
        ("end", {"status": end_status, "envelope": envelope}),
    ]
    made = enumerate(specs, 1)
    return [Event(task_id="tsk_0001", seq=i, type=t, data=d, created_at=1000.0 + i) for i, (t, d) in made]


async def aiter(events: list[Event]) -> AsyncIterator[Event]:
    for e in events:
        yield e


def encode(t: Task, events: list[Event], after: int = -1) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        return [e async for e in numbered(t, aiter(events), after)]

    return asyncio.run(collect())


def test_ids_map_both_ways_and_refuse_what_keel_never_issued() -> None:
    assert response_id_of("tsk_01ab") == "resp_01ab" and task_id_of("resp_01ab") == "tsk_01ab"
    assert task_id_of("tsk_01ab") is None and task_id_of("msg_1") is None


def test_a_log_becomes_numbered_responses_events() -> None:
    events = encode(task(), log())
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created",
        "keel.event",  # status queued
        "response.in_progress",
        "keel.event",  # step_started
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "queued" and events[2]["response"]["status"] == "in_progress"
    assert events[3]["keel"]["type"] == "step_started" and events[3]["keel"]["seq"] == 3
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output_text"] == "Hello world"
    assert final["usage"]["total_tokens"] == 5 and final["keel"]["envelope"]["status"] == "success"


def test_resuming_after_any_number_gives_exactly_the_rest() -> None:
    whole = encode(task(), log())
    for n in range(-1, len(whole)):
        assert encode(task(), log(), after=n) == whole[n + 1 :]


def test_a_cancelled_answer_keeps_the_text_it_streamed() -> None:
    cancelled = {"status": "failed", "result": None, "errors": [{"type": "cancelled", "message": "cancelled"}]}
    events = encode(task(), log("cancelled", cancelled))
    assert events[-1]["type"] == "response.cancelled"
    assert events[-1]["response"]["status"] == "cancelled" and events[-1]["response"]["output_text"] == "Hello world"
    # the same rule when the task is read, not streamed
    assert response_of(task(TaskStatus.cancelled, cancelled), "Hello world").output_text == "Hello world"


def test_a_task_as_a_response_by_status() -> None:
    assert response_of(task()).status == "queued" and response_of(task()).output == []
    done = response_of(task(TaskStatus.succeeded, ENVELOPE))
    assert done.status == "completed" and done.output_text == "Hello world" and done.metadata == {"k": "v"}
    partial = response_of(task(TaskStatus.partial_success, {**ENVELOPE, "status": "partial_success"}))
    assert partial.status == "incomplete" and partial.incomplete_details is not None
    assert partial.incomplete_details.reason == "partial_success"
    failed_env = {"status": "failed", "result": None, "errors": [{"type": "timeout", "message": "too slow"}]}
    failed = response_of(task(TaskStatus.failed, failed_env))
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "timeout"
    other = task(TaskStatus.succeeded, {"status": "success", "result": {"steps": [1]}, "errors": []})
    other.workflow, other.metadata = "diagnostic", {}
    assert response_of(other).output_text == '{"steps": [1]}' and response_of(other).model == "keel:diagnostic"


def test_chat_chunks_and_a_failure_the_sdk_raises() -> None:
    encoder = ChunkEncoder(task(), "test", include_usage=True)
    chunks = [c for e in log() for c in encoder.feed(e)]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello world"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["total_tokens"] == 5
    failed = {"status": "failed", "result": None, "errors": [{"type": "timeout", "message": "too slow"}]}
    encoder = ChunkEncoder(task(), "test", include_usage=False)
    last = [c for e in log("failed", failed) for c in encoder.feed(e)][-1]
    assert last == {"error": {"type": "failed", "code": "timeout", "message": "too slow"}}


@pytest.mark.parametrize(
    "body",
    [
        {"model": "test", "input": []},
        {"model": "test", "input": {"not": "a workflow"}},
        {"model": "test", "input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
        {"model": "test", "input": "x", "temperature": 5},
        {"model": "test", "input": "x", "unknown_field": 1},
        {"model": "keel:diagnostic", "input": "not json"},
        {"model": "keel:diagnostic", "input": "{}", "instructions": "no"},
    ],
)
def test_bad_bodies_are_422_problems_and_store_nothing(live: LiveServer, body: dict[str, Any]) -> None:
    with live.client() as c:
        r = c.post("/v1/responses", json=body)
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert c.get("/v1/tasks").json()["items"] == []


def test_a_bad_resume_cursor_is_a_422(live: LiveServer) -> None:
    with live.client() as c:
        resp = c.post("/v1/responses", json={"model": "test", "input": "hi"}).json()
        assert resp["status"] == "completed"
        r = c.get(f"/v1/responses/{resp['id']}", params={"stream": "true", "starting_after": -5})
        assert r.status_code == 422
        r = c.get(f"/v1/responses/{resp['id']}?stream=true", headers={"Last-Event-ID": "abc"})
        assert r.status_code == 422
        # Issue 21, defect 1: an id past a 64-bit integer is a 422 here too (one parser: keel.interaction.sse).
        for value in [str(2**63 + 1), "9" * 30, "7" * 5000]:
            r = c.get(f"/v1/responses/{resp['id']}?stream=true", headers={"Last-Event-ID": value}, timeout=5)
            assert r.status_code == 422, r.text
            r = c.get(f"/v1/responses/{resp['id']}", params={"stream": "true", "starting_after": value}, timeout=5)
            assert r.status_code == 422, r.text
        assert httpx.get(live.url + f"/v1/responses/{resp['id']}").status_code == 401
