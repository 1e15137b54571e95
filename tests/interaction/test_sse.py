"""The SSE edge: retry first, ids from the durable log, heartbeats, resumption, 204 when finished."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from httpx_sse import connect_sse

from conftest import LiveServer, wait_terminal
from keel.interaction.sse import frames
from keel.memory.types import Event
from keel.settings import Settings


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.sse_heartbeat_s = 0.2
    return settings


def test_stream_frames_and_resume(live: LiveServer) -> None:
    with live.client() as c:
        tid = c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 3, "step_seconds": 0.6}}).json()[
            "id"
        ]
        with c.stream("GET", f"/v1/tasks/{tid}/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line == "" and "event: end" in lines:
                    break
        assert lines[0].startswith(": keel") or lines[0].startswith("retry:")
        assert any(line.startswith("retry: ") for line in lines[:3]), "retry: must come first"
        assert any(line.startswith(":") and "keel" not in line for line in lines), "heartbeat comments expected"
        ids = [int(line.removeprefix("id: ")) for line in lines if line.startswith("id: ")]
        assert ids == list(range(1, len(ids) + 1))
        types = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
        assert types[0] == "status" and types[-1] == "end"
        assert {"step_started", "step_completed", "token", "progress", "partial_result"} <= set(types)

        # Resuming after id k replays exactly k+1.. from the durable log, by header or by query.
        for kwargs in ({"headers": {"Last-Event-ID": "4"}}, {"params": {"last_event_id": 4}}):
            with connect_sse(c, "GET", f"/v1/tasks/{tid}/events", **kwargs) as source:  # type: ignore[arg-type]
                resumed = [int(e.id) for e in source.iter_sse() if e.id]
            assert resumed == ids[4:]

        # Finished and fully read: 204, so EventSource stops reconnecting.
        assert c.get(f"/v1/tasks/{tid}/events", headers={"Last-Event-ID": str(ids[-1])}).status_code == 204
        end = json.loads([line for line in lines if line.startswith("data: ")][-1].removeprefix("data: "))
        assert end["envelope"]["status"] == "success"
        assert wait_terminal(c, tid)["status"] == "succeeded"


def test_bad_last_event_id_is_problem(live: LiveServer) -> None:
    with live.client() as c:
        tid = c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 1, "step_seconds": 0}}).json()[
            "id"
        ]
        r = c.get(f"/v1/tasks/{tid}/events", headers={"Last-Event-ID": "abc"})
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
        assert httpx.get(live.url + f"/v1/tasks/{tid}/events").status_code == 401
        # A cursor the log never issued (past its end) is refused instead of streaming forever.
        past = c.get(f"/v1/tasks/{tid}/events", headers={"Last-Event-ID": "9999"}, timeout=5)
        assert past.status_code == 422 and past.headers["content-type"].startswith("application/problem+json")
        sup = c.get(f"/v1/tasks/{tid}/events", headers={"Last-Event-ID": "²".encode()})  # non-ASCII digit
        assert sup.status_code == 422


HUGE_IDS = [str(2**63 + 1), "9" * 30, "7" * 5000]


def test_a_huge_last_event_id_is_a_422_not_an_overflow(live: LiveServer) -> None:
    """Issue 21, defect 1: past a 64-bit integer, the id overflowed SQLite's INTEGER and answered 500."""
    with live.client() as c:
        tid = c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 1, "step_seconds": 0}}).json()[
            "id"
        ]
        for value in HUGE_IDS:
            for kwargs in ({"headers": {"Last-Event-ID": value}}, {"params": {"last_event_id": value}}):
                r = c.get(f"/v1/tasks/{tid}/events", timeout=5, **kwargs)  # type: ignore[arg-type]
                assert r.status_code == 422, (value[:20], r.text)
                assert r.headers["content-type"].startswith("application/problem+json")
        # The largest id a log can hold is still only a cursor it never issued: 422 too, never a 500.
        assert c.get(f"/v1/tasks/{tid}/events", headers={"Last-Event-ID": str(2**63 - 1)}).status_code == 422


async def test_frames_are_encoded_without_a_server() -> None:
    """The SSE framing is a pure encoder: `retry:` first, then `id:` = sequence number, `event:` = type, JSON data."""

    async def log() -> AsyncIterator[Event]:
        yield Event(task_id="tsk_1", seq=1, type="status", data={"status": "running"}, created_at=0.0)
        yield Event(task_id="tsk_1", seq=2, type="end", data={"status": "succeeded"}, created_at=1.0)

    encoded = b"".join([f.encode() async for f in frames(log(), retry_ms=1500)])
    assert encoded.decode().split("\r\n") == [
        ": keel event stream",
        "retry: 1500",
        "",
        "id: 1",
        "event: status",
        'data: {"status": "running"}',
        "",
        "id: 2",
        "event: end",
        'data: {"status": "succeeded"}',
        "",
        "",
    ]
