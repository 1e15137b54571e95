"""The workflows behind the endpoint families (``/v1/agent``, ``/v1/reason``, ``/v1/function-call``).

Each is an ordinary workflow, so a call to one of those endpoints is a durable task like any other: crash-safe,
listed by ``GET /v1/tasks``, answered with the envelope, and also reachable as ``POST /v1/tasks`` with
``"workflow": "agent" | "reason" | "function_call"``. (``/v1/chat`` and ``/v1/stream`` run the built-in ``ask``.)
"""

from __future__ import annotations

import json
from typing import Any, Literal, Self, cast

import jsonschema
import jsonschema.validators
import referencing.exceptions
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from keel.errors import StepFailed, ToolArgsInvalid, WorkflowError
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import Workflow
from keel.orchestration.llm.agent import run_agent
from keel.orchestration.llm.models import Message, ModelSettings
from keel.orchestration.llm.models.base import Role, ToolSpec
from keel.orchestration.llm.models.structured import strip_fences

__all__ = [
    "AGENT",
    "FUNCTION_CALL",
    "REASON",
    "AgentInput",
    "FunctionCallInput",
    "ReasonInput",
    "check_output_schema",
]

SCHEMA_MAX_BYTES = 32 * 1024
SCHEMA_MAX_DEPTH = 32
_MAX_PROBLEMS = 20


# -- agent ------------------------------------------------------------------------------------------------------


class AgentInput(BaseModel):
    """Input of the ``agent`` workflow: a goal pursued with tools. The tools offered are the task's (its
    allowlist, narrowed by the submitting key's scopes)."""

    model_config = ConfigDict(extra="forbid")

    goal: str = Field(min_length=1, max_length=20_000, description="What the agent should achieve.")
    max_turns: int = Field(8, ge=1, le=50, description="Model turns at most; more fails the task as `max_turns`.")
    system: str | None = Field(None, max_length=20_000, description="An optional system prompt.")
    model: str | None = Field(
        None, max_length=500, description="A model spec; the server's KEEL_DEFAULT_MODEL when omitted."
    )


async def agent(ctx: WorkflowContext, inp: AgentInput) -> dict[str, Any]:
    model = ctx.model(inp.model)
    out = await run_agent(
        ctx, model, inp.goal, tools=ctx.policy.get("tools"), system=inp.system, max_turns=inp.max_turns
    )
    await ctx.progress(1.0, "agent")
    return {"answer": out.output, "turns": out.turns, "tool_calls": out.tool_calls}


AGENT: Workflow[AgentInput] = Workflow(
    name="agent",
    input_model=AgentInput,
    fn=agent,
    estimate=lambda inp: 3.0 * inp.max_turns,
    description="Pursue a goal with tools: every model turn and tool call is a durable step; writes keep the "
    "ledger and the approval rules.",
)


# -- reason: JSON that satisfies a caller's schema --------------------------------------------------------------


def check_output_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Accept a caller's JSON Schema, or raise ``ValueError`` saying what is wrong with it: it must be a valid
    schema (of its ``$schema`` draft; 2020-12 when it names none or an unknown one), at most 32 KiB of JSON and
    32 levels deep, and its ``$ref``s must point inside it (nothing is ever fetched)."""
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > SCHEMA_MAX_BYTES:
        raise ValueError(f"the schema is {size} bytes of JSON; at most {SCHEMA_MAX_BYTES} are accepted")
    _check_refs(schema, schema, "", 0)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message} (at {_pointer(exc.absolute_path)})") from None
    return schema


def _check_refs(node: Any, root: dict[str, Any], where: str, depth: int) -> None:
    if depth > SCHEMA_MAX_DEPTH:
        raise ValueError(f"the schema nests deeper than {SCHEMA_MAX_DEPTH} levels")
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                if not value.startswith("#"):
                    raise ValueError(f"{key} at {where or '/'} must point inside the schema (start with '#')")
                if value.startswith("#/") and _resolve(root, value[1:]) is None:
                    raise ValueError(f"{key} {value!r} at {where or '/'} points at nothing in the schema")
            _check_refs(value, root, f"{where}/{_escape(str(key))}", depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_refs(value, root, f"{where}/{i}", depth + 1)


def _resolve(root: Any, pointer: str) -> Any:
    node = root
    for raw in pointer.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _pointer(path: Any) -> str:
    return "/" + "/".join(_escape(str(p)) for p in path)


class ReasonInput(BaseModel):
    """Input of the ``reason`` workflow: a question answered as JSON valid against the caller's JSON Schema."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    prompt: str = Field(min_length=1, max_length=20_000, description="The question or instruction.")
    output_schema: dict[str, Any] = Field(
        alias="schema",
        description="The JSON Schema the answer must satisfy (checked before the task is created).",
    )
    context: str | None = Field(None, max_length=200_000, description="Material to reason over, sent as is.")
    model: str | None = Field(
        None, max_length=500, description="A model spec; the server's KEEL_DEFAULT_MODEL when omitted."
    )
    repairs: int = Field(1, ge=0, le=3, description="Re-asks, with the problems listed, when the answer violates.")
    max_tokens: int = Field(1024, ge=1, le=8192, description="Cap on each answer's length, in tokens.")

    @field_validator("output_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_output_schema(v)


def _violations(validator: Any, value: Any) -> list[tuple[str, str]]:
    errors = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
    return [(_pointer(e.absolute_path), e.message) for e in errors]


async def reason(ctx: WorkflowContext, inp: ReasonInput) -> Any:
    schema = inp.output_schema
    model = ctx.model(inp.model)
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    question = inp.prompt + (f"\n\nContext:\n{inp.context}" if inp.context else "")
    messages = [
        Message(
            role="system",
            content="Answer with one JSON value only (no prose, no code fences), valid against this JSON Schema:\n"
            + json.dumps(schema),
        ),
        Message(role="user", content=question),
    ]
    settings = ModelSettings(max_tokens=inp.max_tokens, temperature=0)
    best: tuple[Any, list[tuple[str, str]], str] | None = None  # (value, violations, step)
    for attempt in range(inp.repairs + 1):
        step = "reason" if attempt == 0 else f"reason:repair-{attempt}"
        text: str = await ctx.generate(
            step, model, messages, json_schema=schema, settings=settings, repairing=attempt > 0
        )
        try:
            value = json.loads(strip_fences(text))
        except json.JSONDecodeError as exc:
            problems = [("", f"the answer is not JSON ({exc.msg} at character {exc.pos})")]
            feedback = "Your answer is not JSON: " + problems[0][1]
        else:
            try:
                problems = _violations(validator, value)
            except referencing.exceptions.Unresolvable as exc:  # e.g. an anchor it cannot find
                raise WorkflowError(f"the schema cannot be applied: {exc}", type="invalid_schema") from None
            if not problems:
                await ctx.progress(1.0, step)
                return value
            if best is None or len(problems) <= len(best[1]):
                best = (value, problems, step)
            feedback = "Your answer does not satisfy the schema:\n" + "\n".join(
                f"- at {p or '/'}: {m}" for p, m in problems[:_MAX_PROBLEMS]
            )
        if attempt < inp.repairs:
            messages += [
                Message(role="assistant", content=text),
                Message(role="user", content=feedback + "\nAnswer again with the corrected JSON only."),
            ]
            await ctx.emit("reason_repair", {"step": step, "attempt": attempt + 1, "problems": len(problems)})
    if best is None:
        raise WorkflowError(
            f"the model did not answer with JSON in {inp.repairs + 1} attempt(s)", type="invalid_json", pointer=""
        )
    value, problems, step = best
    for pointer, message in problems:
        ctx.error("schema_violation", message, step=step, pointer=pointer, recovery_suggested=True)
    await ctx.progress(1.0, step)
    return value


REASON: Workflow[ReasonInput] = Workflow(
    name="reason",
    input_model=ReasonInput,
    fn=reason,
    estimate=lambda inp: (1 + inp.repairs) * (1.0 + inp.max_tokens / 50),
    description="Answer as JSON valid against a caller's JSON Schema, re-asking with the violations; what still "
    "violates comes back as `schema_violation` errors with pointers (partial_success).",
)


# -- function_call: the model's tool calls, checked, optionally run ----------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class FunctionCallInput(BaseModel):
    """Input of the ``function_call`` workflow: one model turn offered the task's tools."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, min_length=1, max_length=20_000, description="A single user message.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=200, description="A conversation, instead of `prompt`."
    )
    execute: bool = Field(
        False,
        description="Run the valid calls (through the effect ledger and the approval rules) and attach results.",
    )
    system: str | None = Field(None, max_length=20_000, description="An optional system prompt.")
    model: str | None = Field(
        None, max_length=500, description="A model spec; the server's KEEL_DEFAULT_MODEL when omitted."
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self


async def function_call(ctx: WorkflowContext, inp: FunctionCallInput) -> dict[str, Any]:
    model = ctx.model(inp.model)
    offered = ctx.tools
    specs = [ToolSpec(name=t.name, description=t.description, parameters=t.input_schema) for t in offered]
    if not specs:
        raise WorkflowError("no tool is available to this task", type="no_tools")
    messages = [Message(role="system", content=inp.system)] if inp.system else []
    if inp.messages is not None:
        messages += [Message(role=cast(Role, m.role), content=m.content) for m in inp.messages]
    else:
        messages.append(Message(role="user", content=inp.prompt or ""))
    turn = await ctx.generate("function_call", model, messages, tools=specs)
    calls: list[dict[str, Any]] = []
    for i, call in enumerate(turn.tool_calls):
        args = call.parsed()
        entry: dict[str, Any] = {
            "id": call.id,
            "tool": call.name,
            "arguments": call.arguments if args is None else args,
        }
        problems: list[tuple[str, str]] = []
        tool = offered.get(call.name)
        if tool is None:
            problems = [("", f"no tool named {call.name!r} was offered")]
        elif args is None:
            problems = [("", "the arguments are not a JSON object")]
        else:
            try:
                tool.validate(args)
            except ToolArgsInvalid as exc:
                problems = exc.issues or [(exc.pointer or "", exc.message)]
        entry["valid"] = not problems
        if problems:
            entry["problems"] = [{"pointer": p, "message": m} for p, m in problems]
            for pointer, message in problems:
                ctx.error(
                    "invalid_tool_args" if tool is not None else "unknown_tool",
                    f"{call.name}: {message}",
                    step="function_call",
                    pointer=f"/calls/{i}/arguments{pointer}",
                )
        elif inp.execute:
            assert args is not None
            try:
                entry["result"] = await ctx.tool(call.name, args, name=f"function_call:{call.name}")
                entry["ok"] = True
            except StepFailed as exc:
                entry["ok"] = False
                entry["error"] = {"type": exc.type, "message": exc.message}
                ctx.error(exc.type, exc.message, step=exc.step, pointer=f"/calls/{i}", recovery_suggested=True)
        calls.append(entry)
    await ctx.progress(1.0, "function_call")
    return {"calls": calls, "text": turn.text, "executed": inp.execute}


FUNCTION_CALL: Workflow[FunctionCallInput] = Workflow(
    name="function_call",
    input_model=FunctionCallInput,
    fn=function_call,
    estimate=lambda inp: 5.0 if inp.execute else 2.0,
    description="One model turn offered tools: the calls it asks for, each checked against its tool's schema; "
    "with `execute`, the valid ones run under the ledger and approval rules.",
)
