"""The effect ledger: how a write tool's effect happens once, whatever crashes, retries and replays do.

A write call's idempotency key is ``hash(task id, step path, tool name, canonical arguments)``. Before the tool
runs, its row is written durably as ``pending``; after, as ``applied`` (with the result) or ``failed``. On a
replay, retry or resume the row answers instead of the tool:

* ``applied``: the stored result comes back; the tool does not run again.
* ``failed``: the stored failure comes back.
* ``pending`` found by a later run, or an interruption (timeout, lost connection, 5xx) during the call: the
  effect may or may not have happened. The row becomes ``outcome_unknown``; the tool's ``reconcile(key)``
  decides (applied: keep its result; not applied: run it; cannot tell: ask). Without a reconcile hook the task
  asks a person (``waiting_for_approval``) instead of running the call blindly a second time.

The key goes to the tool as ``ToolContext.idempotency_key``, for it to pass on as the downstream system's own
``Idempotency-Key``, so that a person's "run it again" is safe too where that system honours keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import pydantic
import pydantic_core

from keel.errors import (
    ApprovalDenied,
    AwaitingDecision,
    InputError,
    ToolError,
    UpstreamError,
)
from keel.memory.types import Decision, DecisionKind, EffectRecord, EffectSettlement, EffectStatus, Verdict
from keel.orchestration.tools import Reconciled, Tool, ToolContext, call_id_of

log = logging.getLogger("keel.effects")

if TYPE_CHECKING:
    from keel.orchestration.engine.context import WorkflowContext


def definite_failure(exc: BaseException) -> bool:
    """True when the tool certainly did not apply its effect: it refused, or the request was rejected as invalid."""
    if isinstance(exc, (ToolError, InputError, pydantic.ValidationError, ValueError)):
        return True
    if isinstance(exc, UpstreamError):
        return exc.status_code is not None and 400 <= exc.status_code < 500 and exc.status_code not in (408, 429)
    return False


def unknown_call_id(key: str, executions: int) -> str:
    """One question per interrupted execution: a second interruption after "run it again" asks again."""
    return f"{call_id_of(key)}-u{executions}"


async def apply_write(
    ctx: WorkflowContext, tool: Tool, args: Any, raw: dict[str, Any], step: str, key: str, tc: ToolContext
) -> Any:
    """The body of a write tool's durable step."""
    journal = ctx.journal
    fresh = EffectRecord(key=key, task_id=ctx.task_id, step=step, tool=tool.name, args=raw, executions=1)
    rec, created = await journal.begin_effect(fresh)
    if not created:
        if rec.status is EffectStatus.applied:
            await ctx.emit_nowait("effect_replayed", {"step": step, "tool": tool.name, "key": key})
            return rec.result
        if rec.status is EffectStatus.failed:
            err = rec.error or {}
            raise ToolError(err.get("message", "the call failed"), type=err.get("type", "tool_error"), tool=tool.name)
        if rec.status is EffectStatus.pending:
            # A run before this one recorded the call but never its outcome: it crashed in between.
            await journal.settle_effect(EffectSettlement(key=key, status=EffectStatus.outcome_unknown))
            await ctx.emit("effect_outcome_unknown", {"step": step, "tool": tool.name, "key": key, "why": "crash"})
        applied, result = await _settle_unknown(ctx, tool, raw, step, key, rec.executions, tc)
        if applied:
            return result
        rec.executions += 1
        await journal.settle_effect(EffectSettlement(key=key, status=EffectStatus.pending, executions=rec.executions))
    return await _execute(ctx, tool, args, raw, step, key, rec.executions, tc)


async def _execute(
    ctx: WorkflowContext, tool: Tool, args: Any, raw: dict[str, Any], step: str, key: str, executions: int, tc: Any
) -> Any:
    journal = ctx.journal
    await ctx.emit_nowait("effect_started", {"step": step, "tool": tool.name, "key": key, "execution": executions})
    try:
        result = await tool.invoke(args, tc)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await asyncio.shield(journal.settle_effect(EffectSettlement(key=key, status=EffectStatus.outcome_unknown)))
        raise
    except Exception as exc:
        if definite_failure(exc):
            error = {"type": getattr(exc, "type", "tool_error"), "message": getattr(exc, "message", str(exc))}
            await journal.settle_effect(EffectSettlement(key=key, status=EffectStatus.failed, error=error))
            raise
        await journal.settle_effect(
            EffectSettlement(
                key=key, status=EffectStatus.outcome_unknown, error={"message": f"{type(exc).__name__}: {exc}"}
            )
        )
        await ctx.emit("effect_outcome_unknown", {"step": step, "tool": tool.name, "key": key, "why": str(exc)[:300]})
        applied, result = await _settle_unknown(ctx, tool, raw, step, key, executions, tc, cause=exc)
        if applied:
            return result
        # reconcile says it did not happen: the call failed cleanly, with the error it raised.
        await journal.settle_effect(
            EffectSettlement(key=key, status=EffectStatus.failed, error={"type": "tool_error", "message": str(exc)})
        )
        raise
    stored = await _applied(ctx, key, result)
    await ctx.emit_nowait("effect_applied", {"step": step, "tool": tool.name, "key": key})
    return stored


async def _applied(ctx: WorkflowContext, key: str, result: Any) -> Any:
    """Settle the row as applied with ``result`` (the tool's, reconcile's or a person's), as the step stores it."""
    stored = pydantic_core.to_jsonable_python(result)
    await ctx.journal.settle_effect(EffectSettlement(key=key, status=EffectStatus.applied, result=stored))
    return stored


async def _settle_unknown(
    ctx: WorkflowContext,
    tool: Tool,
    raw: dict[str, Any],
    step: str,
    key: str,
    executions: int,
    tc: Any,
    *,
    cause: BaseException | None = None,
) -> tuple[bool, Any]:
    """(True, result) when the effect is known to have happened; (False, None) when it certainly did not and may
    run now. Otherwise the task waits for a person (raises AwaitingDecision)."""
    journal = ctx.journal
    if tool.reconcile is not None:
        try:
            verdict = await tool.reconcile(key, tc)
        except Exception as exc:  # the downstream cannot say right now: that is "cannot tell", not a failed call
            log.warning("reconcile of %s (%s) failed: %s", tool.name, key, exc)
            verdict = Reconciled(applied=None)
        await ctx.emit("effect_reconciled", {"step": step, "tool": tool.name, "key": key, "applied": verdict.applied})
        if verdict.applied is True:
            return True, await _applied(ctx, key, verdict.result)
        if verdict.applied is False:
            return False, None
    call_id = unknown_call_id(key, executions)
    decision = ctx.decisions.get(call_id)
    if decision is None or decision.verdict is None:
        why = f"{tool.name} was interrupted ({cause or 'the process stopped'}); keel cannot tell whether it ran"
        raise AwaitingDecision([_question(ctx, DecisionKind.outcome_unknown, call_id, tool, raw, step, key, why)])
    if decision.verdict is Verdict.applied:
        return True, await _applied(ctx, key, decision.result)
    if decision.verdict is Verdict.deny:
        await journal.settle_effect(
            EffectSettlement(
                key=key,
                status=EffectStatus.failed,
                error={"type": "approval_denied", "message": "a person abandoned the call"},
            )
        )
        raise ApprovalDenied(f"{tool.name}: a person chose not to run the interrupted call again", tool=tool.name)
    return False, None  # approve: run it again, under the same idempotency key


def approval_request(ctx: WorkflowContext, tool: Tool, raw: dict[str, Any], step: str, key: str) -> Decision | None:
    """The approval this call still needs, or None. Raises ApprovalDenied when a person said no."""
    reason = needs_approval(ctx, tool)
    if reason is None:
        return None
    call_id = call_id_of(key)
    decision = ctx.decisions.get(call_id)
    if decision is not None and decision.verdict is Verdict.approve:
        return None
    if decision is not None and decision.verdict is Verdict.deny:
        note = f": {decision.note}" if decision.note else ""
        raise ApprovalDenied(f"{tool.name}: the call was denied{note}", tool=tool.name)
    return _question(ctx, DecisionKind.approval, call_id, tool, raw, step, key, reason)


def _question(
    ctx: WorkflowContext,
    kind: DecisionKind,
    call_id: str,
    tool: Tool,
    raw: dict[str, Any],
    step: str,
    key: str,
    reason: str,
) -> Decision:
    """What a person is asked about a write call: to approve it, or to say whether an interrupted one ran."""
    return Decision(
        task_id=ctx.task_id,
        call_id=call_id,
        kind=kind,
        tool=tool.name,
        args=raw,
        step=step,
        reason=reason,
        effect_key=key,
    )


def needs_approval(ctx: WorkflowContext, tool: Tool) -> str | None:
    mode = ctx.policy.get("approval", "auto")
    if tool.approval == "always":
        return f"{tool.name} always needs approval"
    if tool.effect != "write" or tool.approval == "never":
        return None
    if mode == "always":
        return "this task's policy asks for approval of every write"
    if ctx.tainted:
        return f"the task has read untrusted content ({ctx.tainted[0]}) and {tool.name} changes the world"
    return None
