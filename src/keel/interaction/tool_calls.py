"""The MCP endpoint's backend: every ``tools/call`` runs as a keel task of the ``tool_call`` workflow, so a call
over MCP gets what a call from a workflow gets: the task's allowlist and the caller's scopes, schema checks
before anything runs, the effect ledger for writes, approvals, budgets, events and an audit trail."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from typing import Any

from keel.errors import IdempotencyKeyReused, ToolNotAllowed
from keel.interaction.mcp import ToolOutcome
from keel.memory.types import ApiKey, Task, TaskStatus
from keel.orchestration.tools import Tool, canonical_json, permitted
from keel.service import Idempotency, Keel, Progress, Submission


class TaskToolBackend:
    """:class:`~keel.interaction.mcp.ToolBackend` over the service. ``keel`` gives the service once the app's
    lifespan has built it (the endpoint is built before, and no call comes sooner)."""

    def __init__(self, keel: Callable[[], Keel], *, wait_s: float = 600.0) -> None:
        self._keel = keel
        self.wait_s = wait_s

    def tools_for(self, key: ApiKey) -> list[Tool]:
        return self._keel().tools_for(key)

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
        call = {"tool": name, "args": args}
        # The same key as a REST Idempotency-Key: a retried call gets the first call's task (and its one effect).
        idempotency = None
        if idempotency_key is not None:
            digest = hashlib.sha256(canonical_json(call).encode()).hexdigest()
            idempotency = Idempotency.of("mcp", idempotency_key, digest)
        sub = Submission(workflow="tool_call", input=call, tools=[name], metadata={"via": "mcp"})
        try:
            task = (await keel.submit(key, sub, idempotency)).task
        except IdempotencyKeyReused:
            raise IdempotencyKeyReused("this idempotency_key was already used for a different call") from None
        try:
            task = await keel.wait(task, wait_s=self.wait_s, progress=progress)
        except asyncio.CancelledError:
            # The MCP client cancelled (notifications/cancelled): so is the task, keeping what it did.
            with contextlib.suppress(Exception):
                await asyncio.shield(keel.cancel(key.tenant, task.id))
            raise
        return _outcome(task)


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
