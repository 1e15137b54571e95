"""Acceptance: a task survives `kill -9` of its `keel serve` process, and its SSE stream resumes losslessly.

Each test drives real `keel serve` subprocesses on loopback with a temporary data dir. A follower thread reads
`GET /v1/tasks/{id}/events`, reconnecting with `Last-Event-ID` whenever the connection drops or is refused, the
way any SSE client would.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from conftest import free_port, make_key, wait_terminal
from keel_processes import Servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SCOPES = frozenset({"tasks:read", "tasks:write"})


@dataclass
class Ev:
    id: int
    type: str
    data: dict[str, Any]


class Follower(threading.Thread):
    """Follows a task's SSE stream until `end`, reconnecting with Last-Event-ID on any transport error."""

    def __init__(self, url: str, key: str, task_id: str, *, timeout: float = 40) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.task_id, self.timeout = url, key, task_id, timeout
        self.events: list[Ev] = []
        self.connections = 0  # streams that opened with 200
        self.transport_errors = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def snapshot(self) -> list[Ev]:
        with self._lock:
            return list(self.events)

    def count(self, type: str) -> int:
        return sum(1 for e in self.snapshot() if e.type == type)

    @property
    def ended(self) -> bool:
        events = self.snapshot()
        return bool(events) and events[-1].type == "end"

    def run(self) -> None:
        try:
            self._follow()
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            self.error = exc

    def _follow(self) -> None:
        deadline = time.monotonic() + self.timeout
        auth = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, headers=auth, timeout=httpx.Timeout(10.0)) as client:
            while time.monotonic() < deadline:
                events = self.snapshot()
                headers = {"Last-Event-ID": str(events[-1].id)} if events else {}
                try:
                    with connect_sse(client, "GET", f"/v1/tasks/{self.task_id}/events", headers=headers) as source:
                        status = source.response.status_code
                        if status != 200:
                            raise AssertionError(f"events answered {status}: {source.response.read()!r}")
                        self.connections += 1
                        for sse in source.iter_sse():
                            if not sse.data:  # the opening `retry:` hint carries no event
                                continue
                            with self._lock:
                                self.events.append(Ev(int(sse.id), sse.event, json.loads(sse.data)))
                            if sse.event == "end":
                                return
                except httpx.TransportError:  # refused while the server is down, or cut by the kill
                    self.transport_errors += 1
                    time.sleep(0.05)
            raise AssertionError(f"stream did not reach `end` within {self.timeout}s")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def submit(client: httpx.Client, steps: int, step_seconds: float) -> str:
    r = client.post(
        "/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": steps, "step_seconds": step_seconds}}
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def api(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_kill9_mid_task_resumes_stream_and_task_without_rerunning_steps(servers: Servers, tmp_path: Path) -> None:
    steps, kill_after = 10, 3
    port, data_dir = free_port(), tmp_path / "keel"
    data_dir.mkdir()
    key = make_key(data_dir, "acme", SCOPES)
    first = servers.start(port, data_dir)
    with api(first.url, key) as c:
        task_id = submit(c, steps, 0.4)

    follower = Follower(first.url, key, task_id)
    follower.start()
    wait_for(lambda: follower.count("step_completed") >= kill_after or follower.error is not None, 15, "steps")
    assert follower.error is None, follower.error
    first.kill9()
    seen_at_kill = follower.snapshot()
    assert seen_at_kill[-1].type != "end", "the task finished before the kill; nothing was tested"

    second = servers.start(port, data_dir)  # same port, same data dir: the follower reconnects on its own
    follower.join(timeout=40)
    assert not follower.is_alive(), "follower still running"
    assert follower.error is None, f"{follower.error!r}\n{second.output()}"
    events = follower.events

    # One lossless, ordered stream across the crash: ids 1..N, no gap, duplicate or reordering; `end` last.
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert events[-1].type == "end" and events[-1].data["status"] == "succeeded"
    assert [e.type for e in events].count("end") == 1
    assert follower.connections >= 2 and follower.transport_errors >= 1
    assert [e.id for e in events[: len(seen_at_kill)]] == [e.id for e in seen_at_kill]

    # The second process leased the task again (attempt 2)...
    running = [i for i, e in enumerate(events) if e.type == "status" and e.data["status"] == "running"]
    assert [events[i].data["attempt"] for i in running] == [1, 2]
    restart = running[1]
    assert restart >= len(seen_at_kill)  # after everything the client had seen before the kill

    # ...and did not re-run what the first one had checkpointed.
    done_before = [e.data["step"] for e in events[:restart] if e.type == "step_completed"]
    done_after = [e.data["step"] for e in events[restart:] if e.type == "step_completed"]
    assert len(done_before) >= kill_after
    assert done_before + done_after == [f"step-{i}" for i in range(1, steps + 1)]

    with api(second.url, key) as c:
        body = wait_terminal(c, task_id, timeout=10)
    assert body["status"] == "succeeded"
    assert body["attempts"] == 2
    envelope: dict[str, Any] = body["envelope"]  # type: ignore[assignment]
    assert envelope["status"] == "success"
    assert envelope["result"]["steps"] == [{"step": i, "ok": True} for i in range(1, steps + 1)]
    recorded = envelope["metadata"]["steps"]
    assert all(s["status"] == "completed" for s in recorded)
    replayed = [s["name"] for s in recorded if s["replayed"]]
    completed = [s["name"] for s in recorded if not s["replayed"]]
    assert len(replayed) == len(done_before) >= kill_after
    assert replayed == done_before
    assert completed == done_after
    assert events[-1].data["envelope"] == envelope


def test_reconnect_after_end_returns_204_even_after_restart(servers: Servers, tmp_path: Path) -> None:
    port, data_dir = free_port(), tmp_path / "keel"
    data_dir.mkdir()
    key = make_key(data_dir, "acme", SCOPES)
    server = servers.start(port, data_dir)
    with api(server.url, key) as c:
        task_id = submit(c, 2, 0.05)
        follower = Follower(server.url, key, task_id, timeout=20)
        follower.run()  # inline: read the whole stream once
        assert follower.error is None, follower.error
        end = follower.events[-1]
        assert end.type == "end"
        assert [e.id for e in follower.events] == list(range(1, end.id + 1))
        assert wait_terminal(c, task_id)["status"] == "succeeded"

    def check(url: str) -> None:
        path = f"/v1/tasks/{task_id}/events"
        with api(url, key) as c:
            for headers, params in (({"Last-Event-ID": str(end.id)}, {}), ({}, {"last_event_id": end.id})):
                with connect_sse(c, "GET", path, headers=headers, params=params) as source:
                    assert source.response.status_code == 204
                    assert source.response.read() == b""
            # One before the end: exactly the `end` event, then the stream closes.
            with connect_sse(c, "GET", path, headers={"Last-Event-ID": str(end.id - 1)}) as source:
                assert source.response.status_code == 200
                got = [(int(s.id), s.event) for s in source.iter_sse() if s.data]
            assert got == [(end.id, "end")]

    check(server.url)
    server.kill9()
    check(servers.start(port, data_dir).url)  # the log is durable: same answers from a fresh process


def test_client_disconnect_mid_stream_does_not_cancel_task(servers: Servers, tmp_path: Path) -> None:
    steps = 6
    port, data_dir = free_port(), tmp_path / "keel"
    data_dir.mkdir()
    key = make_key(data_dir, "acme", SCOPES)
    server = servers.start(port, data_dir)
    with api(server.url, key) as c:
        task_id = submit(c, steps, 0.2)

        def until_two_steps() -> None:  # read until the second step has completed, then hang up mid-stream
            auth = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=server.url, headers=auth, timeout=10) as sc:
                with connect_sse(sc, "GET", f"/v1/tasks/{task_id}/events") as source:
                    assert source.response.status_code == 200
                    completed = 0
                    for sse in source.iter_sse():
                        assert sse.event != "end", "the task ended before the client hung up"
                        completed += sse.event == "step_completed"
                        if completed == 2:
                            return  # leaving the block closes the connection with the body unread

        until_two_steps()
        assert c.get(f"/v1/tasks/{task_id}").json()["status"] == "running"
        body = wait_terminal(c, task_id, timeout=20)
        assert body["status"] == "succeeded"
        assert body["attempts"] == 1
        envelope: dict[str, Any] = body["envelope"]  # type: ignore[assignment]
        assert envelope["status"] == "success" and envelope["errors"] == []
        assert [s["status"] for s in envelope["metadata"]["steps"]] == ["completed"] * steps

    assert server.proc.poll() is None, f"server died:\n{server.output()}"
    # A fresh reader still gets the full, gap-free log.
    replay = Follower(server.url, key, task_id, timeout=10)
    replay.run()
    assert replay.error is None, replay.error
    assert [e.id for e in replay.events] == list(range(1, len(replay.events) + 1))
    assert replay.events[-1].type == "end" and replay.events[-1].data["status"] == "succeeded"
    assert [e.type for e in replay.events].count("step_completed") == steps


def test_kill9_mid_stream_every_token_a_reader_saw_is_in_the_log(servers: Servers, tmp_path: Path) -> None:
    """Tokens reach readers one commit after they are emitted, never before it. So a `kill -9` mid-stream loses no
    token anyone saw: the step that emitted them had not finished, so the next attempt runs it again and streams
    its tokens again, after the ones already seen and with new ids."""
    port, data_dir = free_port(), tmp_path / "keel"
    data_dir.mkdir()
    key = make_key(data_dir, "acme", SCOPES)
    path = os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])
    env = {"KEEL_WORKFLOWS": "stream_workflows:WORKFLOWS", "PYTHONPATH": path}
    first = servers.start(port, data_dir, env=env)
    n = 400
    with api(first.url, key) as c:
        r = c.post("/v1/tasks", json={"workflow": "stream", "input": {"n": n, "pace_ms": 5}})
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
    follower = Follower(first.url, key, task_id)
    follower.start()
    wait_for(lambda: follower.count("token") >= 50 or follower.error is not None, 15, "tokens")
    first.kill9()
    seen_at_kill = follower.snapshot()
    assert seen_at_kill[-1].type != "end", "the stream finished before the kill; nothing was tested"

    second = servers.start(port, data_dir, env=env)
    follower.join(timeout=40)
    assert follower.error is None, f"{follower.error!r}\n{second.output()}"
    events = follower.events
    assert [e.id for e in events] == list(range(1, len(events) + 1)), "one gapless stream across the crash"

    # What the reader saw before the kill is exactly what the log holds under those ids: nothing it saw was lost.
    replay = Follower(second.url, key, task_id, timeout=10)
    replay.run()
    assert replay.error is None, replay.error
    assert replay.events == events
    assert replay.events[: len(seen_at_kill)] == seen_at_kill

    # The interrupted step ran again on attempt 2 and streamed every token, after attempt 1's.
    first_tokens = [e.data["i"] for e in events if e.type == "token" and e.data["attempt"] == 1]
    second_tokens = [e.data["i"] for e in events if e.type == "token" and e.data["attempt"] == 2]
    assert first_tokens == list(range(len(first_tokens))) and len(first_tokens) >= 50
    assert second_tokens == list(range(n))
    assert events[-1].type == "end" and events[-1].data["status"] == "succeeded"
