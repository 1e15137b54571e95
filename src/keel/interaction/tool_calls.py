"""The MCP endpoint's backend: every ``tools/call`` runs as a keel task of the ``tool_call`` workflow, so a call
over MCP gets what a call from a workflow gets: the task's allowlist and the caller's scopes, schema checks
before anything runs, the effect ledger for writes, approvals, budgets, events and an audit trail."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from keel.errors import IdempotencyKeyReused, ToolNotAllowed
from keel.interaction.mcp import ToolOutcome
from keel.memory.types import ApiKey, CreateOutcome, IdempotencyClaim, NewTask, Task, TaskStatus
from keel.orchestration.tools import Tool, canonical_json, permitted

Progress = Callable[[float, str | None], Awaitable[None]]


class TaskToolBackend:
    def __init__(self, keel: Callable[[], Any], *, wait_s: float = 600.0) -> None:
        self._keel = keel
        self.wait_s = wait_s

    def tools_for(self, key: ApiKey) -> list[Tool]:
        return [t for t in self._keel().tools if permitted(t, key.scopes)]

    async def call(
        self,
        key: ApiKey,
        name: str,
        args: dict[str, Any],
        *,
        progress: Progress | None = None,
        idempotency_key: str | None = None,
    ) -> ToolOutcome:
        keel = self._keel()
        tool = keel.tools.get(name)
        if tool is None or not permitted(tool, key.scopes):
            raise ToolNotAllowed(f"no tool {name!r} for this key", tool=name)
        tool.validate(args)  # a bad call is refused before a task exists
        claim = None
        if idempotency_key is not None:
            # The same key as a REST Idempotency-Key: a retried call gets the first call's task (and its one effect).
            claim = IdempotencyClaim(
                key=f"mcp:{idempotency_key}",
                request_hash=hashlib.sha256(canonical_json({"tool": name, "args": args}).encode()).hexdigest(),
                expires_at=keel.clock() + keel.settings.idempotency_ttl_hours * 3600,
            )
        created = await keel.store.create_task(
            NewTask(
                tenant=key.tenant,
                workflow="tool_call",
                input={"tool": name, "args": args},
                policy={"tools": [name], "scopes": sorted(key.scopes), "approval": "auto"},
                metadata={"via": "mcp"},
            ),
            claim,
            keel.clock(),
        )
        if created.outcome is CreateOutcome.key_reused:
            raise IdempotencyKeyReused("this idempotency_key was already used for a different call")
        task: Task = created.task
        keel.runtime.wake()
        try:
            task = await self._settle(keel, task.id, progress)
        except asyncio.CancelledError:
            # The MCP client cancelled (notifications/cancelled): so is the task, keeping what it did.
            with contextlib.suppress(Exception):
                await asyncio.shield(keel.store.request_cancel(task.id, key.tenant))
                keel.runtime.cancel(task.id)
            raise
        return _outcome(task)

    async def _settle(self, keel: Any, task_id: str, progress: Progress | None) -> Task:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        reported = -1.0
        while True:
            task: Task = await keel.store.get_task(task_id)
            if task.status.terminal or task.status is TaskStatus.waiting_for_approval:
                return task
            if progress is not None and task.progress > reported:
                reported = task.progress
                await progress(task.progress, task.current_step)
            if loop.time() > deadline:
                return task
            await keel.notifier.wait(task_id, keel.settings.poll_interval_s)


def _outcome(task: Task) -> ToolOutcome:
    env = task.envelope or {}
    if task.status is TaskStatus.succeeded:
        return ToolOutcome(result=(env.get("result") or {}).get("result"), task_id=task.id)
    if task.status is TaskStatus.waiting_for_approval:
        pending = (env.get("result") or {}).get("pending_decisions") or []
        ids = ", ".join(d["call_id"] for d in pending)
        return ToolOutcome(
            result={"task_id": task.id, "status": task.status.value, "pending_decisions": pending},
            is_error=True,
            message=f"the call waits for a person's approval (task {task.id}; decide with "
            f"POST /v1/tasks/{task.id}/approvals/<call_id>: {ids})",
            task_id=task.id,
        )
    if not task.status.terminal:
        return ToolOutcome(
            result={"task_id": task.id, "status": task.status.value},
            is_error=True,
            message=f"the call is still running as task {task.id}; poll GET /v1/tasks/{task.id}",
            task_id=task.id,
        )
    errors = env.get("errors") or []
    message = "; ".join(f"{e.get('type')}: {e.get('message')}" for e in errors) or task.status.value
    return ToolOutcome(result={"task_id": task.id, "errors": errors}, is_error=True, message=message, task_id=task.id)
