"""What tests of the engine share: a registry of given workflows, an embedded engine that polls fast, and
waiting for a task to settle."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from keel.memory.types import Task, TaskStatus
from keel.orchestration.engine.runtime import EmbeddedEngine
from keel.orchestration.engine.workflow import Workflow, WorkflowRegistry


def registry_of(*wfs: Workflow[Any]) -> WorkflowRegistry:
    reg = WorkflowRegistry()
    for wf in wfs:
        reg.register(wf)
    return reg


def engine_for(store: Any, *wfs: Workflow[Any], **kw: Any) -> EmbeddedEngine:
    kw.setdefault("poll_s", 0.02)
    kw.setdefault("lease_s", 5)
    return EmbeddedEngine(store, registry_of(*wfs), **kw)


async def wait_terminal(store: Any, task_id: str, timeout: float = 10.0) -> Task:
    deadline = time.monotonic() + timeout
    while True:
        task = await store.get_task(task_id)
        assert task is not None
        if task.status.terminal or task.status is TaskStatus.waiting_for_approval:
            return task
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} still {task.status} after {timeout}s")
        await asyncio.sleep(0.01)
