"""Tools and the people who approve them: the tool catalog, a paused task's decisions, and its effect ledger."""

from __future__ import annotations

from fastapi import APIRouter

from keel.interaction.auth import Approver, Reader
from keel.interaction.deps import App, errors, problem
from keel.interaction.schemas import DecisionBody, DecisionView, EffectView, ToolView
from keel.orchestration.tools import permitted

router = APIRouter(prefix="/v1", tags=["tools"])
ERRORS = errors("No such task (or call) for this tenant")


@router.get("/tools", response_model=list[ToolView], responses=errors(), summary="List tools", operation_id="listTools")
async def list_tools(keel: App, key: Reader) -> list[ToolView]:
    """Every registered tool, with its JSON Schema, effect, scopes and approval rule. `permitted` says whether
    this key may give it to a task. The same tools are served over MCP at `/mcp`."""
    return [ToolView(**t.describe(), permitted=permitted(t, key.scopes)) for t in keel.tools]


@router.get(
    "/tasks/{task_id}/approvals",
    response_model=list[DecisionView],
    responses=ERRORS,
    summary="A task's decisions",
    operation_id="listApprovals",
)
async def list_decisions(task_id: str, keel: App, key: Reader) -> list[DecisionView]:
    """The tool calls this task asked a person about, pending (verdict null) and decided."""
    return [DecisionView(**d.public()) for d in await keel.decisions(key.tenant, task_id)]


@router.post(
    "/tasks/{task_id}/approvals/{call_id}",
    response_model=DecisionView,
    responses={**ERRORS, 422: problem("Already decided otherwise, or the wrong verdict")},
    summary="Approve or deny a tool call",
    operation_id="decideApproval",
)
async def decide(task_id: str, call_id: str, body: DecisionBody, keel: App, key: Approver) -> DecisionView:
    """Answer a paused task (`waiting_for_approval`). Once nothing it waits on is undecided, it is queued again and
    resumes from its checkpoints. Repeating the same decision is harmless; a different one is refused (422)."""
    stored = await keel.decide(key, task_id, call_id, body.decision, result=body.result, note=body.note)
    return DecisionView(**stored.public())


@router.get(
    "/tasks/{task_id}/effects",
    response_model=list[EffectView],
    responses=ERRORS,
    summary="A task's write effects",
    operation_id="listEffects",
)
async def list_effects(task_id: str, keel: App, key: Reader) -> list[EffectView]:
    """The effect ledger: every write-tool call of the task, by idempotency key, with its state
    (`pending`, `applied`, `failed`, `outcome_unknown`) and how many times keel started it."""
    return [EffectView.model_validate(e) for e in await keel.effects(key.tenant, task_id)]
