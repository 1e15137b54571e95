"""Tools and the people who approve them: the tool catalog, a paused task's decisions, and its effect ledger."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from keel.errors import NotFound
from keel.interaction.auth import require
from keel.interaction.schemas import DecisionBody, DecisionView, EffectView, ToolView
from keel.memory.types import ApiKey, Decision, DecisionKind
from keel.orchestration.tools import permitted

router = APIRouter(prefix="/v1")
PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key", **PROBLEM},
    403: {"description": "The key lacks a scope", **PROBLEM},
    404: {"description": "No such task (or call) for this tenant", **PROBLEM},
}
Reader = Annotated[ApiKey, Depends(require("tasks:read"))]
Approver = Annotated[ApiKey, Depends(require("tasks:approve"))]


@router.get("/tools", response_model=list[ToolView], responses=ERRORS, summary="List tools", tags=["tools"])
async def list_tools(request: Request, key: Reader) -> list[ToolView]:
    """Every registered tool, with its JSON Schema, effect, scopes and approval rule. `permitted` says whether
    this key may give it to a task. The same tools are served over MCP at `/mcp`."""
    catalog = request.app.state.keel.tools
    return [ToolView(**t.describe(), permitted=permitted(t, key.scopes)) for t in catalog]


@router.get(
    "/tasks/{task_id}/approvals",
    response_model=list[DecisionView],
    responses=ERRORS,
    summary="A task's decisions",
    tags=["tools"],
)
async def list_decisions(task_id: str, request: Request, key: Reader) -> list[DecisionView]:
    """The tool calls this task asked a person about, pending (verdict null) and decided."""
    store = request.app.state.keel.store
    if await store.get_task(task_id, key.tenant) is None:
        raise NotFound(f"no task {task_id}")
    return [DecisionView(**d.public()) for d in await store.load_decisions(task_id)]


@router.post(
    "/tasks/{task_id}/approvals/{call_id}",
    response_model=DecisionView,
    responses={**ERRORS, 422: {"description": "Already decided otherwise, or the wrong verdict", **PROBLEM}},
    summary="Approve or deny a tool call",
    tags=["tools"],
)
async def decide(task_id: str, call_id: str, body: DecisionBody, request: Request, key: Approver) -> DecisionView:
    """Answer a paused task (`waiting_for_approval`). Once nothing it waits on is undecided, it is queued again and
    resumes from its checkpoints. Repeating the same decision is harmless; a different one is refused (422)."""
    keel = request.app.state.keel
    decision = Decision(
        task_id=task_id,
        call_id=call_id,
        kind=DecisionKind.approval,  # the stored kind wins; this carries the answer
        tool="",
        args={},
        step="",
        reason="",
        verdict=body.decision,
        result=body.result,
        note=body.note,
        decided_by=f"{key.tenant}:{key.id}",
    )
    stored = await keel.store.decide(task_id, key.tenant, decision, keel.clock())
    keel.runtime.wake()
    keel.notifier.notify(task_id)
    return DecisionView(**stored.public())


@router.get(
    "/tasks/{task_id}/effects",
    response_model=list[EffectView],
    responses=ERRORS,
    summary="A task's write effects",
    tags=["tools"],
)
async def list_effects(task_id: str, request: Request, key: Reader) -> list[EffectView]:
    """The effect ledger: every write-tool call of the task, by idempotency key, with its state
    (`pending`, `applied`, `failed`, `outcome_unknown`) and how many times keel started it."""
    store = request.app.state.keel.store
    if await store.get_task(task_id, key.tenant) is None:
        raise NotFound(f"no task {task_id}")
    return [
        EffectView(
            key=e.key,
            step=e.step,
            tool=e.tool,
            args=e.args,
            status=e.status,
            result=e.result,
            error=e.error,
            executions=e.executions,
            created_at=e.created_at,
            updated_at=e.updated_at,
        )
        for e in await store.list_effects(task_id)
    ]
