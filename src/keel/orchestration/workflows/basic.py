"""The small built-in workflows: ``diagnostic`` (a lifecycle probe that needs no model), ``ask`` (one
question to the configured model, streamed) and ``tool_call`` (one tool call as a durable task)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field

from keel.errors import WorkflowError
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import Workflow
from keel.orchestration.llm.models import Message, ModelSettings
from keel.orchestration.llm.models.base import Role
from keel.orchestration.workflows.memory import session_loader, session_saver

# -- the built-in diagnostic workflow ------------------------------------------------------------------


class DiagnosticInput(BaseModel):
    """Input of the built-in ``diagnostic`` workflow: a lifecycle probe that needs no model."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(3, ge=1, le=1000, description="How many durable steps to run.")
    step_seconds: float = Field(0.5, ge=0, le=3600, description="How long each step sleeps.")
    fail_at: int | None = Field(None, ge=1, description="Fail at this step number (1-based).")


async def diagnostic(ctx: WorkflowContext, inp: DiagnosticInput) -> dict[str, Any]:
    async def run_step(i: int) -> dict[str, Any]:
        if inp.step_seconds:
            await asyncio.sleep(inp.step_seconds / 2)
        for word in ("diagnostic", "step", str(i), "ok"):
            await ctx.emit("token", {"text": word + " "})
        if inp.step_seconds:
            await asyncio.sleep(inp.step_seconds / 2)
        if inp.fail_at == i:
            raise WorkflowError(f"diagnostic failure requested at step {i}", type="diagnostic_failure")
        return {"step": i, "ok": True}

    outputs: list[dict[str, Any]] = []
    for i in range(1, inp.steps + 1):
        name = f"step-{i}"
        out = await ctx.step(name, run_step, i)
        outputs.append(out)
        await ctx.partial_result("completed_steps", [o["step"] for o in outputs])
        await ctx.progress(i / inp.steps, name)
    return {"steps": outputs, "message": f"diagnostic ran {inp.steps} steps"}


DIAGNOSTIC: Workflow[DiagnosticInput] = Workflow(
    name="diagnostic",
    input_model=DiagnosticInput,
    fn=diagnostic,
    estimate=lambda inp: inp.steps * inp.step_seconds,
)


# -- the built-in ask workflow ---------------------------------------------------------------------------


class AskInput(BaseModel):
    """Input of the built-in ``ask`` workflow: one question to the configured model, streamed."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=20_000, description="What to ask.")
    system: str | None = Field(None, max_length=20_000, description="An optional system prompt.")
    max_tokens: int = Field(256, ge=1, le=8192, description="Cap on the answer's length, in tokens.")
    model: str | None = Field(
        None, max_length=500, description="A model spec; the server's KEEL_DEFAULT_MODEL when omitted."
    )
    session: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="A session id: the question and answer join that session's memory (its TTL slides), and "
        "its last turns are sent along as context.",
    )
    history_turns: int = Field(20, ge=0, le=200, description="How many earlier turns of the session to send.")


async def ask(ctx: WorkflowContext, inp: AskInput) -> dict[str, Any]:

    model = ctx.model(inp.model)
    messages = [Message(role="system", content=inp.system)] if inp.system else []
    if inp.session:
        history = await ctx.step("session.load", session_loader(ctx, inp.session, inp.history_turns))
        messages += [Message(role=cast(Role, t["role"]), content=t["content"]) for t in history]
    messages.append(Message(role="user", content=inp.question))
    answer = await ctx.generate(
        "answer", model, messages, settings=ModelSettings(max_tokens=inp.max_tokens, temperature=0.2)
    )
    if inp.session:
        await ctx.step("session.save", session_saver(ctx, inp.session, [("user", inp.question), ("assistant", answer)]))
    await ctx.progress(1.0, "answer")
    return {"answer": answer, **({"session": inp.session} if inp.session else {})}


ASK: Workflow[AskInput] = Workflow(
    name="ask",
    input_model=AskInput,
    fn=ask,
    estimate=lambda inp: 1.0 + inp.max_tokens / 50,
    description="Ask the configured model one question; tokens stream as `token` events.",
)


# -- the built-in tool_call workflow ----------------------------------------------------------------------


class ToolCallInput(BaseModel):
    """Input of the built-in ``tool_call`` workflow: one tool call, run as a durable task."""

    model_config = ConfigDict(extra="forbid")

    tool: str = Field(min_length=1, max_length=64, description="A tool name from `GET /v1/tools`.")
    args: dict[str, Any] = Field(default_factory=dict, description="Arguments, checked against the tool's schema.")


async def tool_call(ctx: WorkflowContext, inp: ToolCallInput) -> dict[str, Any]:
    # A caller-supplied call is the caller's own decision, not a model's: it is not tainted by default, so a
    # write runs without approval unless the tool (or the task's policy) always asks for one.
    return {"tool": inp.tool, "result": await ctx.tool(inp.tool, inp.args)}


TOOL_CALL: Workflow[ToolCallInput] = Workflow(
    name="tool_call",
    input_model=ToolCallInput,
    fn=tool_call,
    description="Call one tool through the ledger (writes apply once) and the approval rules. MCP calls run so.",
)
