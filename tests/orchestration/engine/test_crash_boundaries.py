"""Acceptance: crash recovery at every step boundary, with real `keel serve` subprocesses and `kill -9`.

A 10-step workflow (``boundary_workflows.boundary``) is killed at each of its 11 step boundaries in turn: before
step 1, after each step's checkpoint, and after the last one (before the task is finished). After every kill a
fresh process is started on the same data dir and picks the task up again. Every step body appends a line to a
ledger file, so the test counts real executions: each body runs exactly once across the 12 processes, step k in
process k, and the final result equals an uninterrupted run's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from boundary_workflows import BoundaryInput, boundary
from conftest import free_port, make_key, wait_terminal
from keel.memory.types import BlobRef, StepCheckpoint
from keel.orchestration.engine.context import WorkflowContext
from keel_processes import KeelProcess, Servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TESTS_DIR = Path(__file__).resolve().parents[2]
SCOPES = frozenset({"tasks:read", "tasks:write"})
STEPS = 10
BOUNDARIES = list(range(STEPS + 1))  # 0: before step 1; k: right after step k's checkpoint


BOUNDARY_ENV = {
    "KEEL_MAX_TASK_ATTEMPTS": "50",  # one lease per process: 12 here, well over the default of 5
    "KEEL_WORKFLOWS": "boundary_workflows:boundary",
    "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]),
}


def start(servers: Servers, data_dir: Path) -> KeelProcess:
    return servers.start(free_port(), data_dir, env=BOUNDARY_ENV, timeout=20)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, server: KeelProcess) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if server.proc.poll() is not None:
            raise AssertionError(f"keel serve died while waiting for {what}:\n{server.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{server.output()}")
        time.sleep(0.02)


def api(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def submit(client: httpx.Client, ledger: Path, control: Path) -> str:
    inp = {"steps": STEPS, "ledger": str(ledger), "control": str(control)}
    r = client.post("/v1/tasks", json={"workflow": "boundary", "input": inp})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def read_ledger(path: Path) -> list[dict[str, str]]:
    """``step-3 pid=123 token=...`` lines as ``{"step": "step-3", "pid": "123", "token": "..."}``."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        step, *fields = line.split()
        rows.append({"step": step, **dict(f.split("=", 1) for f in fields)})
    return rows


def all_events(url: str, key: str, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    with api(url, key) as c, connect_sse(c, "GET", f"/v1/tasks/{task_id}/events") as source:
        assert source.response.status_code == 200
        events = [(sse.event, json.loads(sse.data)) for sse in source.iter_sse() if sse.data]
    assert events and events[-1][0] == "end"
    return events


class _Journal:
    """Just enough engine for an in-process, uninterrupted run of a workflow under a given task id."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.run_attempt = 1
        self.recorded: list[str] = []

    async def emit(self, type: str, data: dict[str, Any], *, durable: bool = True, live: bool = False) -> None:
        pass

    async def record_step(self, step: StepCheckpoint, events: Sequence[tuple[str, dict[str, Any]]]) -> None:
        self.recorded.append(step.key)

    async def set_state(self, key: str, value: Any, event: tuple[str, dict[str, Any]] | None) -> None:
        pass

    async def set_progress(self, fraction: float, step: str | None) -> None:
        pass

    async def load_blob(self, ref: BlobRef) -> Any:
        raise AssertionError("an uninterrupted run loads no blobs")


def uninterrupted_run(task_id: str, ledger: Path, control: Path) -> Any:
    """Run the workflow start to finish in this process, seeded like task ``task_id``, without any crash."""
    journal = _Journal(task_id)
    ctx = WorkflowContext(journal=journal, started_at=time.time())
    inp = BoundaryInput(steps=STEPS, ledger=str(ledger), control=str(control))
    result = asyncio.run(boundary.fn(ctx, inp))
    assert journal.recorded == ctx.executed == [f"step-{i}" for i in range(1, STEPS + 1)]
    return json.loads(json.dumps(result))  # as the API would return it


def test_kill9_at_every_step_boundary_runs_each_step_once(servers: Servers, tmp_path: Path) -> None:
    data_dir = tmp_path / "keel"
    data_dir.mkdir()
    key = make_key(data_dir, "acme", SCOPES)
    ledger, control = tmp_path / "ledger.txt", tmp_path / "control"
    control.mkdir()
    for k in BOUNDARIES:
        (control / f"pause-{k}").touch()  # they fire one per process: a restart replays past the earlier ones
    base_ledger, base_control = tmp_path / "baseline-ledger.txt", tmp_path / "baseline-control"
    base_control.mkdir()  # no pause files: this task runs straight through

    server = start(servers, data_dir)
    with api(server.url, key) as c:
        task_id = submit(c, ledger, control)
        baseline_id = submit(c, base_ledger, base_control)
        baseline = wait_terminal(c, baseline_id, timeout=30)

    for k in BOUNDARIES:
        paused = control / f"paused-{k}"
        wait_for(paused.exists, 30, f"the pause at boundary {k}", server)
        with api(server.url, key) as c:
            task = c.get(f"/v1/tasks/{task_id}").json()
        assert task["status"] == "running" and task["attempts"] == k + 1, task
        # Exactly steps 1..k have run, each once, the last of them in this process.
        rows = read_ledger(ledger)
        assert [r["step"] for r in rows] == [f"step-{i}" for i in range(1, k + 1)]
        assert all(r["pid"] == str(servers.running[i].proc.pid) for i, r in enumerate(rows, start=1))
        assert server.proc.poll() is None, server.output()
        server.kill9()
        server = start(servers, data_dir)

    with api(server.url, key) as c:
        body = wait_terminal(c, task_id, timeout=30)
    assert server.proc.poll() is None, server.output()
    kills = len(BOUNDARIES)
    assert len(servers.running) == kills + 1
    assert [s.proc.returncode for s in servers.running[:-1]] == [-signal.SIGKILL] * kills

    # The task finished once, in the last process, on its (kills + 1)-th lease.
    assert body["status"] == "succeeded", body
    assert body["attempts"] == kills + 1
    envelope: dict[str, Any] = body["envelope"]  # type: ignore[assignment]
    assert envelope["status"] == "success" and envelope["errors"] == [], envelope
    assert sorted(p.name for p in control.iterdir()) == sorted(f"paused-{k}" for k in BOUNDARIES)

    # Each step body ran exactly once across all 12 processes: step k in process k (process 0 stopped before
    # step 1, the last one only replayed and finished). All of them saw the same context-drawn token.
    rows = read_ledger(ledger)
    assert [r["step"] for r in rows] == [f"step-{i}" for i in range(1, STEPS + 1)]
    assert [r["pid"] for r in rows] == [str(servers.running[i].proc.pid) for i in range(1, STEPS + 1)]
    result = envelope["result"]
    assert {r["token"] for r in rows} == {result["token"]}

    # The last run executed nothing: it replayed all ten checkpoints, each recorded by the run that executed it.
    recorded = envelope["metadata"]["steps"]
    assert [s["name"] for s in recorded] == [f"step-{i}" for i in range(1, STEPS + 1)]
    assert all(s["status"] == "completed" and s["replayed"] and s["attempts"] == 1 for s in recorded), recorded
    assert [s["run_attempt"] for s in recorded] == [i + 1 for i in range(1, STEPS + 1)]

    # The event log agrees: one lease per process, and every step started and completed exactly once.
    events = all_events(server.url, key, task_id)
    leases = [d["attempt"] for t, d in events if t == "status" and d["status"] == "running"]
    assert leases == list(range(1, kills + 2))
    assert [d["step"] for t, d in events if t == "step_started"] == [f"step-{i}" for i in range(1, STEPS + 1)]
    assert [d["step"] for t, d in events if t == "step_completed"] == [f"step-{i}" for i in range(1, STEPS + 1)]
    assert events[-1][1]["status"] == "succeeded"

    # The result equals an uninterrupted run's. Exactly, for a run seeded like this task (same ids and draws)...
    (tmp_path / "inproc-control").mkdir()
    expected = uninterrupted_run(task_id, tmp_path / "inproc-ledger.txt", tmp_path / "inproc-control")
    assert result == expected
    inproc_rows = read_ledger(tmp_path / "inproc-ledger.txt")
    assert [(r["step"], r["token"]) for r in inproc_rows] == [(r["step"], r["token"]) for r in rows]
    # ...and, for the uninterrupted task the first server ran alongside, in everything not seeded by the task id.
    assert baseline["status"] == "succeeded" and baseline["attempts"] == 1, baseline
    base_result = baseline["envelope"]["result"]  # type: ignore[index]
    assert base_result["steps"] == result["steps"] and base_result["acc"] == result["acc"]
    assert base_result["token"] != result["token"]  # the seeded part is per task, so the exact check above counts
    base_rows = read_ledger(base_ledger)
    assert [r["step"] for r in base_rows] == [f"step-{i}" for i in range(1, STEPS + 1)]
    assert {r["pid"] for r in base_rows} == {str(servers.running[0].proc.pid)}
    assert all(s["replayed"] is False for s in baseline["envelope"]["metadata"]["steps"])  # type: ignore[index]
