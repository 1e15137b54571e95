"""Retention of the workflow-memory tier (issue 21): ended tasks expire after KEEL_TASK_RETENTION_DAYS with their
events, steps, blobs and idempotency keys, deleted by the sweeper in bounded batches and counted per tier."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import LiveServer, make_key, wait_terminal
from keel.backends.sqlite import SQLiteStore
from keel.memory.types import StepCheckpoint, TaskStatus
from keel.observability import Observer, use
from keel.orchestration.engine import runner
from keel.orchestration.engine.runner import sweep_expired
from keel.settings import Settings
from keel.testing.conformance import _new
from test_metrics import scrape, value

DAY = 86_400.0
BODY = {"workflow": "diagnostic", "input": {"steps": 2}}
T0 = 1_000_000.0


async def ended_tasks(store: SQLiteStore, n: int, finished_at: float) -> list[str]:
    ids = []
    for _ in range(n):
        created = await store.create_task(_new(), None, finished_at - 10)
        assert created.task is not None
        ids.append(created.task.id)
    for task_id in ids:
        await store.finish(None, task_id, TaskStatus.cancelled, {"status": "failed", "errors": []}, finished_at)
    return ids


async def test_the_sweep_deletes_in_bounded_batches_and_counts_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "RETENTION_BATCH", 2)
    monkeypatch.setattr(runner, "RETENTION_BATCHES", 2)  # at most 4 a sweep
    store = SQLiteStore(tmp_path / "k.db")
    old = await ended_tasks(store, 5, T0)
    kept = await ended_tasks(store, 1, T0 + 5 * DAY)
    running = await store.create_task(_new(), None, T0)
    assert running.task is not None
    lease = await store.lease_next("w", T0, 100 * DAY, 5)
    assert lease is not None and lease.task_id == running.task.id
    await store.record_step(lease, StepCheckpoint(key="s", seq=1, fn="f", result={"n": 1}), [], T0)
    observer = Observer()
    with use(observer):
        await sweep_expired(store, T0 + 7 * DAY, approval_ttl_s=None, task_retention_s=3 * DAY)
        assert [await store.get_task(t) is None for t in old].count(True) == 4  # bounded: the rest next sweep
        await sweep_expired(store, T0 + 7 * DAY, approval_ttl_s=None, task_retention_s=3 * DAY)
        await sweep_expired(store, T0 + 7 * DAY, approval_ttl_s=None, task_retention_s=None)  # 0: kept forever
    assert [(await store.get_task(t), await store.read(t, 0)) for t in old] == [(None, [])] * 5
    assert await store.get_task(kept[0]) is not None  # finished 2 days before the sweep: younger than 3
    assert await store.load_steps(running.task.id)  # a task that has not ended is never swept
    assert observer.metrics is not None
    assert observer.metrics.registry.get_sample_value("keel_retention_deleted_total", {"tier": "tasks"}) == 5
    await store.aclose()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.task_retention_days = 2 / DAY  # two seconds
    settings.memory_sweep_s = 0.2
    return settings


def test_a_task_stays_readable_and_resumable_until_it_expires(live: LiveServer) -> None:
    admin = make_key(live.data_dir, "ops", frozenset({"metrics"}))
    with live.client() as c:
        r = c.post(
            "/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 2}}, headers={"Idempotency-Key": "k1"}
        )
        assert r.status_code == 202
        task_id = r.json()["id"]
        wait_terminal(c, task_id)
        ended = time.monotonic()
        # While kept: its stream resumes from any event it issued.
        resumed = c.get(f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": "1", "accept": "text/event-stream"})
        assert resumed.status_code == 200 and "event: end" in resumed.text
        replay = c.post(
            "/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 2}}, headers={"Idempotency-Key": "k1"}
        )
        assert replay.json()["id"] == task_id
        deadline = ended + 15
        while c.get(f"/v1/tasks/{task_id}").status_code == 200:
            assert time.monotonic() < deadline, "the task was never swept"
            time.sleep(0.1)
        assert time.monotonic() - ended >= 1.5  # not before its retention ran out
        assert c.get(f"/v1/tasks/{task_id}/events").status_code == 404
        # The idempotency key went with the task: the same request makes a new one.
        again = c.post(
            "/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 2}}, headers={"Idempotency-Key": "k1"}
        )
        assert again.status_code == 202 and again.json()["id"] != task_id
    assert value(scrape(live, admin), "keel_retention_deleted_total", tier="tasks") >= 1
