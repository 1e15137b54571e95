"""A tool-using model loop on the durable context: the model asks for tools, keel runs them as steps.

Every model turn and every tool call is a durable step, so a crash resumes mid-conversation without asking the
model again or repeating a tool. A call the model gets wrong (unknown tool, a tool outside the task's allowlist,
arguments that fail the tool's schema, arguments that are not JSON) is not fatal: it is recorded, and its error
goes back to the model as the tool's result, so it can correct itself, at most ``max_invalid`` times. Write tools
keep all their guarantees here: the ledger, and approval once the conversation has read untrusted content.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keel.errors import StepFailed, WorkflowError
from keel.orchestration.llm.models import Message, Model
from keel.orchestration.llm.models.base import ToolSpec
from keel.orchestration.tools import Tool

if TYPE_CHECKING:
    from keel.orchestration.engine.context import ModelTurn, WorkflowContext

_CALLER_MISTAKES = {"invalid_tool_args", "tool_not_allowed", "invalid_tool_call"}


@dataclass(kw_only=True, slots=True)
class AgentResult:
    output: str
    turns: int
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """Each call: tool, step, ok, and its result or its error."""
    invalid_calls: int = 0


async def run_agent(
    ctx: WorkflowContext,
    model: Model,
    prompt: str | Sequence[Message],
    *,
    tools: Sequence[Tool | str] | None = None,
    name: str = "agent",
    system: str | None = None,
    max_turns: int = 8,
    max_invalid: int = 3,
    max_result_chars: int = 20_000,
) -> AgentResult:
    """Converse until the model answers without calling a tool. Raises WorkflowError (``max_turns``,
    ``invalid_tool_calls``) when the conversation does not settle within its bounds.

    A tool result longer than ``max_result_chars`` reaches the model cut, with a marker saying so (and an envelope
    warning); the whole result stays in the step's checkpoint. Whole documents belong in a map-reduce
    (``ctx.reduce_to_fit``), not in one tool message."""
    offered = _offered(ctx, tools)
    specs = [ToolSpec(name=t.name, description=t.description, parameters=t.input_schema) for t in offered]
    messages: list[Message] = [Message(role="system", content=system)] if system else []
    messages += [Message(role="user", content=prompt)] if isinstance(prompt, str) else list(prompt)
    result = AgentResult(output="", turns=0)
    for turn in range(1, max_turns + 1):
        result.turns = turn
        answer: ModelTurn | str = await ctx.generate(f"{name}:turn", model, messages, tools=specs)
        if isinstance(answer, str):  # no tool to offer: generate asked without tools, and its answer is the text
            result.output = answer
            return result
        if not answer.tool_calls:
            result.output = answer.text
            return result
        messages.append(Message(role="assistant", content=answer.text, tool_calls=tuple(answer.tool_calls)))
        for call in answer.tool_calls:
            content = await _run_call(ctx, name, call.name, call.arguments, call.parsed(), result)
            if len(content) > max_result_chars:
                step = result.tool_calls[-1]["step"]
                ctx.warn(
                    "tool_result_truncated",
                    f"{call.name} returned {len(content)} characters; the model saw the first {max_result_chars}",
                    step=step,
                )
                content = (
                    content[:max_result_chars]
                    + f"\n[truncated: {max_result_chars} of {len(content)} characters shown; the whole result is"
                    + f" kept in step {step}]"
                )
            messages.append(Message(role="tool", content=content, tool_call_id=call.id))
        if result.invalid_calls > max_invalid:
            raise WorkflowError(
                f"the model made {result.invalid_calls} invalid tool calls (at most {max_invalid} are tolerated)",
                type="invalid_tool_calls",
                step=name,
            )
    raise WorkflowError(f"the model was still calling tools after {max_turns} turns", type="max_turns", step=name)


def _offered(ctx: WorkflowContext, tools: Sequence[Tool | str] | None) -> list[Tool]:
    allowed = ctx.tools
    if tools is None:
        return list(allowed)
    found = []
    for t in tools:
        got = allowed.get(t if isinstance(t, str) else t.name)
        if got is not None:
            found.append(got)
    return found


async def _run_call(
    ctx: WorkflowContext, name: str, tool: str, raw: str, args: dict[str, Any] | None, result: AgentResult
) -> str:
    step = f"{name}:{tool}"
    if args is None:
        result.invalid_calls += 1
        error = {"error": "invalid_tool_call", "message": f"arguments for {tool} must be a JSON object"}
        await ctx.emit("tool_call_invalid", {"step": step, "tool": tool, "arguments": raw[:2000], **error})
        ctx.warn("invalid_tool_call", f"{tool}: the model sent arguments that are not a JSON object", step=step)
        result.tool_calls.append({"tool": tool, "step": step, "ok": False, **error})
        return json.dumps(error)
    try:
        value = await ctx.tool(tool, args, name=step)
    except StepFailed as exc:
        if exc.type in _CALLER_MISTAKES:
            result.invalid_calls += 1
        error = {"error": exc.type, "message": exc.message}
        result.tool_calls.append({"tool": tool, "step": exc.step or step, "ok": False, **error})
        return json.dumps(error)
    result.tool_calls.append({"tool": tool, "step": step, "ok": True, "result": value})
    return json.dumps(value, default=str)
