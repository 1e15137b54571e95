"""Workflows: plain async functions taking a context and a validated input model, and their registry.

See :mod:`keel.orchestration.context` for what a workflow may do with its context.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import typing
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field

from keel.errors import ConfigError, WorkflowError
from keel.orchestration.context import WorkflowContext

if TYPE_CHECKING:
    from keel.memory.types import DocumentRecord
    from keel.settings import Settings

__all__ = ["Admission", "Workflow", "WorkflowContext", "WorkflowRegistry", "default_registry", "workflow"]

I = TypeVar("I", bound=BaseModel)  # noqa: E741
WorkflowFn = Callable[[WorkflowContext, Any], Coroutine[Any, Any, Any]]


class Admission(Protocol):
    """What an ``admit`` hook may read at submission (:class:`keel.service.Keel` is one): the settings and the
    tenant's documents; nothing that runs or stores anything."""

    @property
    def settings(self) -> Settings: ...

    async def find_document(self, tenant: str, document_id: str) -> DocumentRecord | None:
        """The tenant's document, or None (unknown, expired or deleted)."""
        ...


@dataclass(kw_only=True, slots=True)
class Workflow(Generic[I]):
    name: str
    input_model: type[I]
    fn: Callable[[WorkflowContext, I], Coroutine[Any, Any, Any]]
    estimate: Callable[[I], float | None] = lambda _: None
    description: str = ""
    admit: Callable[[Admission, str, I], Awaitable[None]] | None = None
    """Checks at submission, before anything is stored or any model is called: ``admit(app, tenant, input)``
    raises a :class:`keel.errors.KeelError` (an :class:`~keel.errors.InputError` is a 422) for input that cannot
    work, such as a document id the tenant does not have, or a URL the SSRF rules refuse."""


def workflow(
    fn: WorkflowFn | None = None,
    *,
    name: str | None = None,
    estimate: Callable[[Any], float | None] | None = None,
) -> Any:
    """Turn ``async def analyse(ctx: WorkflowContext, req: Request) -> Report`` into a registrable
    :class:`Workflow`; the input model is read from the second parameter's annotation.

    Usable bare (``@workflow``) or with options (``@workflow(name="analyse", estimate=lambda req: 30.0)``).
    """

    def wrap(f: WorkflowFn) -> Workflow[Any]:
        params = list(inspect.signature(f).parameters.values())
        if len(params) != 2:
            raise ConfigError(f"workflow {f.__name__} must take (ctx, input), not {len(params)} parameter(s)")
        hint = typing.get_type_hints(f).get(params[1].name)
        if not (isinstance(hint, type) and issubclass(hint, BaseModel)):
            raise ConfigError(f"workflow {f.__name__}: annotate its input with a pydantic model, got {hint!r}")
        return Workflow(
            name=name or f.__name__,
            input_model=hint,
            fn=f,
            estimate=estimate or (lambda _: None),
            description=inspect.getdoc(f) or "",
        )

    return wrap(fn) if fn is not None else wrap


class WorkflowRegistry:
    def __init__(self) -> None:
        self._workflows: dict[str, Workflow[Any]] = {}

    def register(self, wf: Workflow[Any]) -> None:
        if wf.name in self._workflows:
            raise ConfigError(f"workflow {wf.name!r} is registered twice")
        self._workflows[wf.name] = wf

    def load(self, spec: str) -> None:
        """Register workflows from ``package.module:attr``: a Workflow, or a list of them."""
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
            obj = getattr(module, attr) if attr else None
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load workflows from {spec!r}: {exc}") from exc
        items = obj if isinstance(obj, list | tuple) else [obj]
        for item in items:
            if not isinstance(item, Workflow):
                raise ConfigError(f"{spec!r} is not a Workflow (decorate it with @keel.workflow)")
            self.register(item)

    def get(self, name: str) -> Workflow[Any] | None:
        return self._workflows.get(name)

    def names(self) -> list[str]:
        return sorted(self._workflows)


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
    from keel.orchestration.models import Message, ModelSettings
    from keel.orchestration.models.base import Role

    model = ctx.model(inp.model)
    messages = [Message(role="system", content=inp.system)] if inp.system else []
    if inp.session:
        history = await ctx.step("session.load", _session_loader(ctx, inp.session, inp.history_turns))
        messages += [Message(role=cast(Role, t["role"]), content=t["content"]) for t in history]
    messages.append(Message(role="user", content=inp.question))
    answer = await ctx.generate(
        "answer", model, messages, settings=ModelSettings(max_tokens=inp.max_tokens, temperature=0.2)
    )
    if inp.session:
        await ctx.step("session.save", _session_saver(ctx, inp.session, inp.question, answer))
    await ctx.progress(1.0, "answer")
    return {"answer": answer, **({"session": inp.session} if inp.session else {})}


def _session_loader(ctx: WorkflowContext, session: str, last: int) -> Callable[[], Awaitable[list[dict[str, str]]]]:
    async def load() -> list[dict[str, str]]:
        from keel.orchestration.memory_workflows import memory_of

        memory = memory_of(ctx)
        found = await memory.sessions.get_session(ctx.tenant, session, memory.clock(), last=last)
        return [{"role": t.role, "content": t.content} for t in found.turns] if found else []

    return load


def _session_saver(ctx: WorkflowContext, session: str, question: str, answer: str) -> Callable[[], Awaitable[int]]:
    async def save() -> int:
        from keel.memory.types import SessionTurn
        from keel.orchestration.memory_workflows import memory_of

        memory = memory_of(ctx)
        turns = [SessionTurn(role="user", content=question), SessionTurn(role="assistant", content=answer)]
        stored = await memory.sessions.append_turns(ctx.tenant, session, turns, memory.session_ttl_s, memory.clock())
        return len(stored.turns)

    return save


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


def default_registry() -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.register(DIAGNOSTIC)
    registry.register(ASK)
    registry.register(TOOL_CALL)
    from keel.orchestration.memory_workflows import INGEST, MEMORY_REINDEX

    registry.register(INGEST)
    registry.register(MEMORY_REINDEX)
    from keel.orchestration.document_analysis import DOCUMENT_ANALYSIS

    registry.register(DOCUMENT_ANALYSIS)
    from keel.orchestration.endpoint_workflows import AGENT, FUNCTION_CALL, REASON

    registry.register(AGENT)
    registry.register(REASON)
    registry.register(FUNCTION_CALL)
    return registry
