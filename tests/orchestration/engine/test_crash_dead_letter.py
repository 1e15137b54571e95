"""Issue 21, defect 3, against real `keel serve` processes killed with SIGKILL.

A long task whose server is killed from outside again and again, making progress between the kills, is not a
poison task and must finish; a task that kills its worker at the same step on every lease still must be
dead-lettered. The rule: :func:`keel.memory.types.leases_without_progress`.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port, make_key, wait_terminal
from keel_processes import KeelProcess, Servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TESTS_DIR = Path(__file__).resolve().parents[2]
SCOPES = frozenset({"tasks:read", "tasks:write"})
ENV = {  # the default limit: five leases in a row without a new checkpoint
    "KEEL_MAX_TASK_ATTEMPTS": "5",
    "KEEL_WORKFLOWS": "poison_workflows:poison",
    "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]),
}


def api(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def steps_done(client: httpx.Client, task_id: str) -> int:
    body = client.get(f"/v1/tasks/{task_id}").json()
    return round(float(body["progress"] or 0) * 40)


def start_or_crash(servers: Servers, port: int, data_dir: Path) -> KeelProcess | None:
    """A server, or None when the poison task killed it before it answered (it is leased at start-up)."""
    try:
        return servers.start(port, data_dir, env=ENV)
    except AssertionError as exc:
        if "exited with -9" in str(exc):
            return None
        raise


def test_a_task_that_progresses_between_kills_is_never_dead_lettered(servers: Servers, tmp_path: Path) -> None:
    kills = 6  # past the limit of five: the old rule (every lease counts) dead-lettered it at the sixth start
    port, data_dir = free_port(), tmp_path / "keel"
    data_dir.mkdir()
    key = make_key(data_dir, "acme", SCOPES)
    server = servers.start(port, data_dir, env=ENV)
    with api(server.url, key) as c:
        r = c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 40, "step_seconds": 0.1}})
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
    progress = [0]
    for _ in range(kills):
        with api(server.url, key) as c:
            deadline = time.monotonic() + 20
            while steps_done(c, task_id) < progress[-1] + 2:  # this lease checkpointed at least two steps
                assert time.monotonic() < deadline, f"no progress after a restart:\n{server.output()}"
                time.sleep(0.02)
            progress.append(steps_done(c, task_id))
            assert c.get(f"/v1/tasks/{task_id}").json()["status"] == "running"
        server.kill9()
        server = servers.start(port, data_dir, env=ENV)
    assert progress[-1] < 40, "the task finished before the last kill; raise its steps"
    with api(server.url, key) as c:
        body = wait_terminal(c, task_id, timeout=30)
    assert body["status"] == "succeeded", body
    assert body["dead_lettered"] is False
    assert body["attempts"] == kills + 1
    envelope = body["envelope"]
    assert isinstance(envelope, dict) and envelope["result"]["steps"] == [{"step": i, "ok": True} for i in range(1, 41)]


def test_a_task_that_crashes_its_worker_at_the_same_step_is_dead_lettered(servers: Servers, tmp_path: Path) -> None:
    port, data_dir = free_port(), tmp_path / "keel"
    data_dir.mkdir()
    key = make_key(data_dir, "acme", SCOPES)
    server: KeelProcess | None = servers.start(port, data_dir, env=ENV)
    assert server is not None
    with api(server.url, key) as c:
        r = c.post("/v1/tasks", json={"workflow": "poison", "input": {}})
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
    crashes = 0
    while True:
        deadline = time.monotonic() + 20
        while server is not None and server.proc.poll() is None:  # the poison step kills it, or it dead-letters
            with api(server.url, key) as c, contextlib.suppress(httpx.TransportError):
                if c.get(f"/v1/tasks/{task_id}").json()["status"] == "failed":
                    break
            assert time.monotonic() < deadline, f"the server neither crashed nor dead-lettered:\n{server.output()}"
            time.sleep(0.05)
        if server is not None and server.proc.poll() is None:
            break
        crashes += 1
        assert crashes <= 10, "never dead-lettered"
        server = start_or_crash(servers, port, data_dir)
    # Run 1 checkpointed `fine`; runs 1..6 each died in `crash`. At the seventh lease, five leases in a row
    # (2..6) had recorded nothing: dead-lettered, and the server is still up.
    assert server is not None
    with api(server.url, key) as c:
        body = c.get(f"/v1/tasks/{task_id}").json()
    assert crashes == 6
    assert body["status"] == "failed" and body["dead_lettered"] is True, body
    assert body["envelope"]["errors"][0]["type"] == "dead_letter"
