"""The ``respond`` workflow: one model turn over a conversation, behind the OpenAI-compatible edge
(``POST /v1/responses`` and ``POST /v1/chat/completions``).

It is ``ask`` for clients that send a list of messages instead of one question: ``instructions`` become the system
prompt, a ``session`` (keel's session memory: ``previous_response_id`` on the wire) puts its last turns before the
messages and keeps the new turn, an ``output_schema`` asks for JSON of that shape and checks the answer against it,
and ``tools`` (named in the task's tool allowlist) turn the turn into an agent that may call them. The answer step is
named :data:`ANSWER_STEP`, so an edge can tell its ``token`` events (the answer's text as the model writes it) from
the tokens of an agent's turns.
"""

from __future__ import annotations

import json
from typing import Any, Literal, cast

import jsonschema
import jsonschema.validators
from pydantic import BaseModel, ConfigDict, Field, field_validator

from keel.errors import WorkflowError
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import Workflow
from keel.orchestration.llm.agent import run_agent
from keel.orchestration.llm.models import Message, ModelSettings
from keel.orchestration.llm.models.base import Role
from keel.orchestration.llm.models.structured import strip_fences
from keel.orchestration.workflows.endpoints import check_output_schema
from keel.orchestration.workflows.memory import session_loader, session_saver

__all__ = ["ANSWER_STEP", "RESPOND", "RespondInput", "Turn"]

ANSWER_STEP = "answer"
"""The step whose ``token`` events are the answer's text (without tools; an agent's turns are steps of their own)."""


class Turn(BaseModel):
    """One message of the conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class RespondInput(BaseModel):
    """Input of the ``respond`` workflow: a conversation to answer, with optional session memory, a JSON Schema for
    the answer, and tools."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Turn] = Field(min_length=1, max_length=500, description="The conversation; the last one is new.")
    instructions: str | None = Field(None, max_length=20_000, description="The system prompt.")
    model: str | None = Field(None, max_length=500, description="A model spec; KEEL_DEFAULT_MODEL when omitted.")
    max_output_tokens: int = Field(1024, ge=1, le=32_768, description="Cap on the answer's length, in tokens.")
    temperature: float | None = Field(None, ge=0, le=2)
    session: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="A session id: its last turns go before `messages`, and this turn joins it (its TTL slides).",
    )
    history_turns: int = Field(50, ge=0, le=500, description="How many earlier turns of the session to send.")
    output_schema: dict[str, Any] | None = Field(
        None, description="A JSON Schema the answer must satisfy: the answer is JSON of that shape."
    )
    use_tools: bool = Field(False, description="Let the model call the task's allowed tools (an agent's turns).")
    max_turns: int = Field(8, ge=1, le=50, description="With tools: model turns at most.")

    @field_validator("output_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if v is None else check_output_schema(v)


async def respond(ctx: WorkflowContext, inp: RespondInput) -> dict[str, Any]:
    model = ctx.model(inp.model)
    messages = [Message(role="system", content=inp.instructions)] if inp.instructions else []
    if inp.session and inp.history_turns:
        history = await ctx.step("session.load", session_loader(ctx, inp.session, inp.history_turns))
        messages += [Message(role=cast(Role, t["role"]), content=t["content"]) for t in history]
    messages += [Message(role=m.role, content=m.content) for m in inp.messages]
    settings = ModelSettings(max_tokens=inp.max_output_tokens, temperature=inp.temperature)
    out: dict[str, Any] = {}
    if inp.use_tools:
        agent = await run_agent(ctx, model, messages, tools=ctx.policy.get("tools"), max_turns=inp.max_turns)
        answer = agent.output
        out |= {"turns": agent.turns, "tool_calls": agent.tool_calls}
    else:
        answer = await ctx.generate(ANSWER_STEP, model, messages, json_schema=inp.output_schema, settings=settings)
    if inp.output_schema is not None:
        out["parsed"] = _checked(answer, inp.output_schema)
    if inp.session:
        asked = [m for m in inp.messages if m.role != "system"]
        await ctx.step(
            "session.save",
            session_saver(ctx, inp.session, [*((m.role, m.content) for m in asked), ("assistant", answer)]),
        )
        out["session"] = inp.session
    await ctx.progress(1.0, ANSWER_STEP)
    return {"answer": answer, **out}


def _checked(answer: str, schema: dict[str, Any]) -> Any:
    """The answer as JSON valid against ``schema``; anything else fails the task with the reason."""
    try:
        value = json.loads(strip_fences(answer))
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"the answer is not JSON ({exc.msg} at character {exc.pos})", type="invalid_json") from None
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    problems = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
    if problems:
        where = "/" + "/".join(str(p) for p in problems[0].absolute_path)
        message = f"the answer violates the schema at {where}: {problems[0].message}"
        raise WorkflowError(message, type="schema_violation")
    return value


RESPOND: Workflow[RespondInput] = Workflow(
    name="respond",
    input_model=RespondInput,
    fn=respond,
    estimate=lambda inp: 1.0 + inp.max_output_tokens / 50,
    description="Answer a conversation (the OpenAI-compatible `/v1/responses` and `/v1/chat/completions`): "
    "session memory, structured output against a JSON Schema, tools; the answer streams as `token` events.",
)
