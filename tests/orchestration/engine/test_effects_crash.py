"""Exactly-once write effects across kill -9, on real `keel serve` processes and a loopback sink.

A write tool charges a sink over HTTP. Its process is SIGKILLed at each point in turn: before the call (the
ledger row is pending, the sink has nothing), after the effect but before the record (the sink has it, the ledger
does not know), and after the record. A fresh process resumes the task. The sink counts raw requests per
idempotency key: it must see exactly one in every case. With a reconcile hook keel settles the unknown outcome
by itself; without one, the task waits for a person and continues on their decision.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import free_port, make_key
from keel_processes import KeelProcess, Servers
from payment_sink import Sink

TESTS = Path(__file__).parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.server.shutdown()
    s.server.server_close()


def wait_status(server: KeelProcess, key: str, task_id: str, want: set[str], timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=5) as c:
        while time.monotonic() < deadline:
            body: dict[str, Any] = c.get(f"/v1/tasks/{task_id}").json()
            if body["status"] in want:
                return body
            time.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached {want}:\n{server.output()}")


@pytest.mark.parametrize("reconcile", [True, False], ids=["reconcile", "no-reconcile"])
@pytest.mark.parametrize("point", ["before_call", "after_effect", "after_record"])
def test_kill9_at_each_point_gives_one_effect(
    servers: Servers, sink: Sink, tmp_path: Path, point: str, reconcile: bool
) -> None:
    data_dir = tmp_path / "keel"
    data_dir.mkdir()
    key = make_key(data_dir, "acme", frozenset({"tasks:read", "tasks:write", "tasks:approve"}))
    env = {
        "KEEL_TOOLS": "effect_tools:TOOLS",
        "KEEL_WORKFLOWS": "effect_tools:WORKFLOWS",
        "PYTHONPATH": str(TESTS),
        "SINK_URL": sink.url,
        "EFFECT_CRASH_AT": point,
        "EFFECT_CRASH_MARK": str(tmp_path / "crashed"),
    }
    first = servers.start(free_port(), data_dir, env=env)
    with httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
        body = {"workflow": "charge_once", "input": {"account": "acme", "amount": 42, "reconcile": reconcile}}
        task_id = c.post("/v1/tasks", json=body).json()["id"]
    first.proc.wait(timeout=20)  # it kills itself at the point
    assert first.proc.returncode == -signal.SIGKILL and (tmp_path / "crashed").exists()
    assert sum(sink.hits.values()) == (0 if point == "before_call" else 1)

    second = servers.start(free_port(), data_dir, env=env)
    task = wait_status(second, key, task_id, {"succeeded", "waiting_for_approval", "failed"})
    unknown = point != "after_record" and not reconcile
    if unknown:
        # No reconcile hook: keel cannot tell whether the charge happened, so it asks instead of re-running.
        assert task["status"] == "waiting_for_approval", task
        [asked] = task["envelope"]["result"]["pending_decisions"]
        assert asked["kind"] == "outcome_unknown" and asked["tool"] == "charge_blind"
        # The person checks the sink: after the effect it happened; before the call it did not, so run it.
        verdict = "applied" if point == "after_effect" else "approve"
        decided: dict[str, Any] = {"decision": verdict}
        if verdict == "applied":
            decided["result"] = {"charged": 42, "charge_id": sink.charges[asked["effect_key"]]["id"]}
        with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
            r = c.post(f"/v1/tasks/{task_id}/approvals/{asked['call_id']}", json=decided)
            assert r.status_code == 200, r.text
        task = wait_status(second, key, task_id, {"succeeded", "failed"})
    assert task["status"] == "succeeded", task
    assert sink.hits == Counter({k: 1 for k in sink.hits}) and len(sink.hits) == 1, sink.hits
    [charge_key] = sink.hits
    assert task["envelope"]["result"]["receipt"]["charge_id"] == sink.charges[charge_key]["id"]
    with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
        [effect] = c.get(f"/v1/tasks/{task_id}/effects").json()
    assert effect["key"] == charge_key and effect["status"] == "applied"
    # Only "before the call" ran the body a second time (the first run never reached the sink).
    assert effect["executions"] == (2 if point == "before_call" else 1)
