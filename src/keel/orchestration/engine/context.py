"""The workflow context: everything a workflow may touch, and the only way it reaches the engine.

A workflow is plain async Python. ``await ctx.step(name, fn, *args)`` is a durable step: a finished step's result
(or its final failure) is recorded in the workflow store, and when the run resumes after a crash, or is replayed,
the recorded outcome comes back instead of running ``fn`` again. Time, ids and randomness come from the context
(``ctx.now()``, ``ctx.uuid()``, ``ctx.random()``), so that a replay takes the same path as the original run.

The context talks to its engine through a :class:`Journal`, a handful of async methods. The embedded engine
implements it on the store under a fenced lease; the replayer implements it on a recorded history; a
distributed engine implements it on its own history. Workflow code never sees which.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import inspect
import random as _random
import time
import typing
import uuid as _uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, overload

import httpx
import pydantic
import pydantic_core
from pydantic import BaseModel, TypeAdapter

from keel import observability
from keel.errors import (
    AwaitingDecision,
    BranchesFailed,
    BudgetExceeded,
    ConfigError,
    LeaseLost,
    Nondeterminism,
    StepFailed,
    StreamCut,
    ToolArgsInvalid,
    ToolNotAllowed,
    UpstreamError,
    WorkflowError,
)
from keel.memory.blobs import looks_small
from keel.memory.types import (
    BlobRef,
    Decision,
    EffectRecord,
    EffectSettlement,
    ModelCallRecord,
    StepCheckpoint,
    StepStatus,
)
from keel.orchestration.engine.budget import Budget, BudgetMeter
from keel.orchestration.engine.effects import apply_write, approval_request
from keel.orchestration.engine.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy
from keel.orchestration.llm import generation
from keel.orchestration.llm.models import Message, Model, ModelRegistry, ModelSettings
from keel.orchestration.llm.models.base import ToolCall, ToolSpec
from keel.orchestration.tools import Tool, ToolCatalog, ToolContext, call_id_of, effect_key, permitted
from keel.orchestration.tools.services import Services

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class Journal(Protocol):
    """The engine side of a context: where steps, events and state go."""

    task_id: str
    run_attempt: int

    async def emit(self, type: str, data: dict[str, Any], *, durable: bool = True, live: bool = False) -> None:
        """Append an event. ``durable=False`` may return before the commit, which the next write then shares;
        ``live`` asks for that commit soon (a token a reader waits for) rather than with the step's checkpoint."""
        ...

    async def record_step(self, step: StepCheckpoint, events: Sequence[tuple[str, dict[str, Any]]]) -> None: ...

    async def set_state(self, key: str, value: Any, event: tuple[str, dict[str, Any]] | None) -> None: ...

    async def set_progress(self, fraction: float, step: str | None) -> None: ...

    async def load_blob(self, ref: BlobRef) -> Any: ...

    def record_model_call(self, call: ModelCallRecord) -> None:
        """Count a model call in the per-model and per-tenant counters (not part of the run's history)."""
        ...

    async def begin_effect(self, effect: EffectRecord) -> tuple[EffectRecord, bool]:
        """The write's ledger row, inserted as pending unless its key exists (see :mod:`effects`)."""
        ...

    async def settle_effect(self, settlement: EffectSettlement) -> None: ...


@dataclass(kw_only=True, slots=True)
class StepCall:
    """A step not yet run, for :meth:`WorkflowContext.gather`. Build it with :meth:`WorkflowContext.call`."""

    name: str
    fn: Callable[..., Any]
    """Async, or plain (run in a worker thread)."""
    args: tuple[Any, ...] = ()
    kind: str = "step"
    timeout: float | None = None
    """Seconds for the whole step, retries included. On expiry the step fails with type ``timeout``."""
    retry: RetryPolicy | None = None

    async def attempt(self) -> Any:
        """One try of the step. Each try gets its own copy of the arguments: a failed try that mutated them must
        not hand its partial state to the next one. Every engine runs a try through here."""
        return await _call(self.fn, copy.deepcopy(self.args))


@dataclass(kw_only=True, slots=True)
class PendingStep:
    """A step the history does not have, about to run: what a :class:`StepRunner` gets, and what the step's
    checkpoint is made of once it ends."""

    call: StepCall
    key: str
    """The step's name in this run (``name``, ``name#2``, …): its checkpoint's key."""
    seq: int
    fn_id: str
    """Which code the step runs, checked on replay (see :class:`~keel.errors.Nondeterminism`)."""
    run_attempt: int
    """The task's run (lease attempt) the step runs in."""

    def checkpoint(
        self,
        *,
        tries: int,
        usage: dict[str, float],
        started: float | None,
        finished_at: float,
        result: Any = None,
        error: dict[str, Any] | None = None,
    ) -> StepCheckpoint:
        """The step's recorded outcome: failed when there is an ``error`` (see :func:`step_error`), else
        completed with ``result`` (already JSON). ``started`` is the ``time.perf_counter()`` its first try began
        at (None: it never ran here)."""
        return StepCheckpoint(
            key=self.key,
            seq=self.seq,
            fn=self.fn_id,
            kind=self.call.kind,
            status=StepStatus.failed if error is not None else StepStatus.completed,
            run_attempt=self.run_attempt,
            tries=tries,
            result=result,
            error=error,
            usage=dict(usage),
            duration_ms=_ms(started) if started is not None else 0.0,
            finished_at=finished_at,
        )


@dataclass(kw_only=True, slots=True)
class ModelTurn:
    """A model's answer when it was offered tools: its text, and the calls it asked for (not yet run)."""

    text: str
    tool_calls: list[ToolCall]


@dataclass(kw_only=True, slots=True)
class StepInfo:
    """One step as the envelope's metadata lists it."""

    name: str
    kind: str
    status: str
    duration_ms: float
    attempts: int = 1
    errors: list[str] = field(default_factory=list)
    replayed: bool = False
    run_attempt: int = 1
    tokens: int = 0
    cost_usd: float = 0.0

    @classmethod
    def of(cls, cp: StepCheckpoint, *, replayed: bool) -> StepInfo:
        """A recorded step as the envelope lists it, from its checkpoint alone: so a step reads the same whether
        this run executed it, replayed it after a resume, or another engine ran it as its own unit of work."""
        return cls(
            name=cp.key,
            kind=cp.kind,
            status=cp.status.value,
            duration_ms=cp.duration_ms,
            attempts=cp.tries,
            errors=[cp.error["message"]] if cp.error else [],
            replayed=replayed,
            run_attempt=cp.run_attempt,
            **_spend(cp.usage),
        )


@dataclass(kw_only=True, slots=True)
class EnvelopeError:
    type: str
    message: str
    severity: str = "error"
    recovery_suggested: bool = False
    step: str | None = None
    pointer: str | None = None


@dataclass(kw_only=True, slots=True)
class BranchError:
    index: int
    step: str
    type: str
    message: str
    pointer: str | None = None


@dataclass(kw_only=True, slots=True)
class MapResult(Generic[T]):
    """Outcome of parallel branches: ``results`` is aligned with the inputs, ``None`` where a branch failed."""

    results: list[T | None]
    errors: list[BranchError]

    @property
    def succeeded(self) -> list[T]:
        failed = {e.index for e in self.errors}
        return [r for i, r in enumerate(self.results) if i not in failed]  # type: ignore[misc]

    @property
    def ok(self) -> int:
        return len(self.results) - len(self.errors)


@dataclass(slots=True)
class StepScope:
    """The step running in this asyncio task, as the code inside it sees it (``ctx.charge_usage``, the key a
    model call is recorded under)."""

    key: str
    usage: dict[str, float]
    """What the step has spent so far; its checkpoint records it."""
    deferred: bool = False
    """The step runs away from its workflow (a Temporal activity): its usage reaches the task's budget from the
    step's result, in workflow code, so that a replay charges exactly what the original run charged."""


def step_usage(kind: str) -> dict[str, float]:
    """What starting a step charges to the budget, before anything it spends: one step, and one tool call if a
    tool runs in it."""
    return {"steps": 1, **({"tool_calls": 1} if kind == "tool" else {})}


_scope: contextvars.ContextVar[StepScope | None] = contextvars.ContextVar("keel_step_scope", default=None)


@contextlib.contextmanager
def step_scope(key: str, kind: str, *, deferred: bool = False) -> Iterator[StepScope]:
    """Run a step's tries inside this: what they charge goes to the step, and a step started inside it is refused
    (steps do not nest). Every engine runs a step's tries in one."""
    scope = StepScope(key=key, usage=step_usage(kind), deferred=deferred)
    token = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(token)


def step_error(exc: BaseException, timeout: float | None = None) -> dict[str, Any]:
    """A step's final failure as its checkpoint records it: the envelope error's type and message (see
    :func:`classify`), and the JSON pointer the error is about, if any."""
    type_, message = classify(exc, timeout)
    pointer = getattr(exc, "pointer", None)
    return {"type": type_, "message": message, **({"pointer": pointer} if pointer is not None else {})}


def step_events(cp: StepCheckpoint, budget: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The events a step's checkpoint is committed with: how the step ended, and the task's budget after it."""
    if cp.status is StepStatus.failed:
        end = {"step": cp.key, "kind": cp.kind, "tries": cp.tries, "error": cp.error}
        return [("step_failed", end), ("budget", budget)]
    end = {"step": cp.key, "kind": cp.kind, "tries": cp.tries, "duration_ms": cp.duration_ms}
    return [("step_completed", end), ("budget", budget)]


class StepRunner(Protocol):
    """How a step not yet recorded is run. The embedded engine runs it here, in the workflow's own loop; a
    distributed engine runs it as its own unit of work (a Temporal activity), records its checkpoint, and hands
    it to :meth:`WorkflowContext.settle`."""

    async def execute(self, ctx: WorkflowContext, step: PendingStep) -> Any: ...


class WorkflowContext:
    """What a workflow may touch. Nothing in a workflow reaches past it."""

    def __init__(
        self,
        *,
        journal: Journal,
        history: Sequence[StepCheckpoint] = (),
        state: dict[str, Any] | None = None,
        budget: Budget | None = None,
        started_at: float,
        deadline_at: float | None = None,
        clock: Callable[[], float] = time.time,
        progress: float = 0.0,
        strict_replay: bool = False,
        models: ModelRegistry | None = None,
        tools: ToolCatalog | None = None,
        policy: dict[str, Any] | None = None,
        decisions: Sequence[Decision] = (),
        services: Services | None = None,
        tenant: str = "",
        steps: StepRunner | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.task_id = journal.task_id
        self._steps = steps
        self._sleep = sleep
        """How a step's retries wait out their backoff (the embedded engine's; Temporal keeps its own timers).
        Tests pass a fast one: the wait is never part of a run's history."""
        self.tenant = tenant
        self.policy: dict[str, Any] = dict(policy or {})
        self._catalog = tools or ToolCatalog()
        self.decisions: dict[str, Decision] = {d.call_id: d for d in decisions}
        self.services = services
        self.tainted: list[str] = []
        """Why the task counts as having read untrusted content (documents, fetched pages, other systems)."""
        self._models = models
        self.attempt = journal.run_attempt
        self._journal = journal
        self._history = {cp.key: cp for cp in history}
        self._clock = clock
        self._time = started_at
        self._rng = _random.Random(f"keel:{self.task_id}")
        self._names: dict[str, int] = {}
        self._seq = 0
        self._progress = progress
        self._strict = strict_replay
        self.meter = BudgetMeter(budget=budget or Budget(), deadline_at=deadline_at, clock=clock)
        self.steps: list[StepInfo] = []
        self.errors: list[EnvelopeError] = []
        state = state or {}
        self.partial: dict[str, Any] = dict(state.get("partial", {}))  # written by keel before per-key rows
        self.partial.update({k.removeprefix("partial:"): v for k, v in state.items() if k.startswith("partial:")})
        self.metadata: dict[str, Any] = {"model_ids": [], "model_calls": [], "tools_called": [], "reductions": {}}
        self.incomplete = False
        """Part of the input was left out (see :meth:`skipped`): a success becomes a partial success."""
        self.executed: list[str] = []
        """Keys of the steps this run actually executed (not replayed): what a crash test counts."""

    @property
    def journal(self) -> Journal:
        """The engine side of this run: what the effect ledger and an engine's step runner write through."""
        return self._journal

    # -- deterministic sources -------------------------------------------------------------------

    def now(self) -> float:
        """Workflow time: the start of the run, advanced to each step's recorded finish. Replays see the same."""
        return self._time

    def random(self) -> float:
        return self._rng.random()

    def uuid(self) -> _uuid.UUID:
        return _uuid.UUID(int=self._rng.getrandbits(128), version=4)

    @property
    def rng(self) -> _random.Random:
        """A deterministic ``random.Random`` for choices and shuffles."""
        return self._rng

    # -- events, progress, partial results ---------------------------------------------------------

    async def emit(self, type: str, data: dict[str, Any]) -> None:
        await self._journal.emit(type, data)

    async def emit_nowait(self, type: str, data: dict[str, Any]) -> None:
        """Append an event without waiting for its commit (tokens): it commits at once, or with the next batch
        if the previous one is still committing, and readers see it when it has."""
        await self._journal.emit(type, data, durable=False, live=True)

    def record_model_call(self, call: ModelCallRecord) -> None:
        """Account for a call as it happens: the envelope's ``model_calls`` (so that a failed, refused or cancelled
        call is there even when its step never completes), the per-model counters, the circuit breaker, metrics."""
        self.metadata["model_calls"].append(call.as_metadata())
        self._journal.record_model_call(call)
        if self._models is not None and self._models.breaker is not None:
            self._models.breaker.record(call)
        observability.current().model_call(call)

    def note_model_call(self, entry: dict[str, Any]) -> None:
        """An envelope ``model_calls`` entry that is not a call made (a model a fallback chain skipped)."""
        self.metadata["model_calls"].append(entry)

    async def progress(self, fraction: float, step: str | None = None) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        if fraction < self._progress:
            return  # replayed steps after a resume must not move the bar backwards
        self._progress = fraction
        await self._journal.set_progress(fraction, step)

    async def partial_result(self, key: str, value: Any) -> None:
        """Record a piece of the result that survives failure, cancellation and budget breakers."""
        value = pydantic_core.to_jsonable_python(value)
        if key in self.partial and self.partial[key] == value:
            return  # a resumed run re-deriving a partial result it already stored: nothing to write
        self.partial[key] = value
        # Each key is its own row, so recording one more piece never rewrites the others (pydantic-ai #7157).
        event_value = value if looks_small(value, 4096) else {"omitted": "large value; read the task's envelope"}
        await self._journal.set_state(f"partial:{key}", value, ("partial_result", {"key": key, "value": event_value}))

    def warn(
        self,
        type: str,
        message: str,
        *,
        step: str | None = None,
        recovery_suggested: bool = False,
        pointer: str | None = None,
    ) -> None:
        """An envelope warning: the output is usable, but the caller should know."""
        self._note("warning", type, message, step, recovery_suggested, pointer)

    def error(
        self,
        type: str,
        message: str,
        *,
        step: str | None = None,
        recovery_suggested: bool = False,
        pointer: str | None = None,
    ) -> None:
        """An envelope error: part of the work failed, so the task ends partial_success at best."""
        self._note("error", type, message, step, recovery_suggested, pointer)

    def skipped(self, type: str, message: str, *, step: str | None = None, recovery_suggested: bool = True) -> None:
        """Part of the input was left out for a reason the caller can act on (an encrypted document that needs
        its password): an envelope warning, and the task ends partial_success at best, because the result does
        not cover everything that was asked."""
        self.incomplete = True
        self._note("warning", type, message, step, recovery_suggested, None)

    def _note(
        self, severity: str, type: str, message: str, step: str | None, recovery: bool, pointer: str | None
    ) -> None:
        self.errors.append(
            EnvelopeError(
                type=type,
                message=message,
                severity=severity,
                step=step,
                recovery_suggested=recovery,
                pointer=pointer,
            )
        )

    # -- durable steps -----------------------------------------------------------------------------

    def call(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> StepCall:
        return StepCall(name=name, fn=fn, args=args, timeout=timeout, retry=retry)

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> T: ...

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., T],
        *args: Any,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> T: ...

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> Any:
        """Run ``fn(*args)`` once, durably. Raises :class:`StepFailed` when it fails for good.

        ``fn`` may be async, or a plain function, which then runs in a worker thread. ``timeout`` covers the
        whole step, retries included.
        """
        return await self._run(StepCall(name=name, fn=fn, args=args, timeout=timeout, retry=retry))

    @property
    def tools(self) -> ToolCatalog:
        """The tools this task may call: the registered ones, narrowed by the task's allowlist and scopes."""
        allowed = self.policy.get("tools")
        scopes = self.policy.get("scopes")
        narrowed = self._catalog.only(allowed)
        if scopes is None:
            return narrowed
        return ToolCatalog(t for t in narrowed if permitted(t, scopes))

    def taint(self, reason: str) -> None:
        """Note that the task has read untrusted content: from now on its writes need approval (``auto`` tools).

        Call it from workflow code, not inside a step, so that a replay taints at the same point."""
        if reason not in self.tainted:
            self.tainted.append(reason)

    def _permit(self, tool: Tool | str) -> Tool:
        name = tool if isinstance(tool, str) else tool.name
        allowed = self.policy.get("tools")
        if allowed is not None and name not in allowed:
            raise ToolNotAllowed(f"{name} is not in this task's tool allowlist", tool=name)
        found = self._catalog.get(name) if isinstance(tool, str) else tool
        if found is None:
            raise ToolNotAllowed(f"no tool named {name!r}; known: {', '.join(self._catalog.names())}", tool=name)
        scopes = self.policy.get("scopes")
        if scopes is not None and not permitted(found, scopes):
            missing = ", ".join(sorted(found.scopes - set(scopes)))
            raise ToolNotAllowed(f"{name} needs the scope(s) {missing}, which the submitting key lacks", tool=name)
        return found

    async def tool(
        self,
        tool: Tool | str,
        args: dict[str, Any] | BaseModel,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> Any:
        """Call a tool as a durable step, and return its (JSON) result.

        The tool must be allowed (the task's allowlist and the submitter's scopes) and its arguments valid;
        otherwise the call fails as a recorded step (``tool_not_allowed``, ``invalid_tool_args``), never retried.
        Read tools are retried like any step. Write tools go through the effect ledger (their effect happens
        once) and, when they need one, wait for a person's approval: the task is parked as
        ``waiting_for_approval`` and resumes here once someone decides.
        """
        raw = args.model_dump(mode="json") if isinstance(args, BaseModel) else args
        label = name or f"tool:{tool if isinstance(tool, str) else tool.name}"
        key = self._key(label)
        fn_id = f"tool:{tool if isinstance(tool, str) else tool.name}"
        recorded = self._history.get(key)
        if recorded is not None:
            value = await self._replay(recorded, fn_id, StepCall(name=label, fn=_tool_body, kind="tool"))
            found = self._catalog.get(fn_id.removeprefix("tool:")) if isinstance(tool, str) else tool
            if found is not None and found.untrusted_output:
                self.taint(f"{found.name} output")
            return value
        try:
            resolved = self._permit(tool)
            parsed = resolved.validate(raw)
        except (ToolNotAllowed, ToolArgsInvalid) as exc:
            return await self._refuse(exc, label, raw, fn_id, key)
        ekey = effect_key(self.task_id, key, resolved.name, raw)
        tc = ToolContext(
            tool=resolved.name,
            call_id=call_id_of(ekey),
            task_id=self.task_id,
            tenant=self.tenant,
            idempotency_key=ekey if resolved.effect == "write" else None,
            services=self.services,
        )
        try:
            request = approval_request(self, resolved, raw, key, ekey)
        except WorkflowError as denied:
            return await self._refuse(denied, label, raw, fn_id, key)
        if request is not None:
            raise AwaitingDecision([request])
        if resolved.effect == "write":

            async def write(_: Any) -> Any:
                return await apply_write(self, resolved, parsed, raw, key, ekey, tc)

            body: Callable[[Any], Awaitable[Any]] = write
            policy = retry or NO_RETRY
        else:

            async def read(_: Any) -> Any:
                return pydantic_core.to_jsonable_python(await resolved.invoke(parsed, tc))

            body = read
            policy = retry or DEFAULT_RETRY
        call = StepCall(name=label, fn=body, args=(raw,), kind="tool", timeout=timeout, retry=policy)
        value = await self._run(call, fn_id=fn_id, key=key)
        if resolved.untrusted_output:
            self.taint(f"{resolved.name} output")
        return value

    async def _refuse(self, exc: WorkflowError, label: str, raw: Any, fn_id: str, key: str) -> Any:
        """A call keel refused (not allowed, invalid, denied): recorded like any failed step, so the model (or the
        caller) sees it, and a replay sees it again."""

        async def refuse(_: Any) -> Any:
            raise exc

        return await self._run(StepCall(name=label, fn=refuse, args=(raw,), kind="tool"), fn_id=fn_id, key=key)

    async def generate(
        self,
        name: str,
        model: Model,
        prompt: str | Sequence[Message],
        *,
        output_type: type[M] | None = None,
        json_schema: dict[str, Any] | None = None,
        settings: ModelSettings | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        repairs: int = 1,
        stream: bool = True,
        tools: Sequence[ToolSpec] = (),
        repairing: bool = False,
    ) -> Any:
        """Ask a model, as a durable step; tokens stream into the task's log as ``token`` events.

        With ``output_type`` the answer is validated before anything uses it: a refusal, a truncation, non-JSON,
        the wrong shape or drifted field names become a ``ModelOutputError`` (an envelope error with a JSON
        pointer); the wrong shape is re-asked ``repairs`` times first. ``json_schema`` asks for JSON of that shape
        but returns the raw text; given with ``output_type``, it is what the model is asked for (a narrower schema,
        e.g. with enums only known at run time) while ``output_type`` validates the answer. Rate limits, 5xx and
        cut streams are retried (``retry``). Tokens and cost are charged to the task's budget; every call is
        recorded in the envelope and the per-model counters.
        With ``tools`` the model may answer with tool calls: the result is then a :class:`ModelTurn` (text and
        calls; nothing is executed here, see :func:`keel.orchestration.llm.agent.run_agent`).
        ``repairing`` says this step re-asks after an answer the caller found unusable (a repair loop of its own,
        as ``/v1/reason``'s): its calls count as repairs in the per-model rates.
        """
        messages = generation.messages_of(prompt)
        if json_schema is None and output_type is not None:
            json_schema = output_type.model_json_schema()
        schema = json_schema

        async def ask(_: str) -> dict[str, Any]:
            scope = _scope.get()
            key = scope.key if scope is not None else name
            out: dict[str, Any] = await generation.ask(
                self,
                key,
                model,
                messages,
                output_type=output_type,
                schema=schema,
                settings=settings,
                repairs=repairs,
                stream=stream,
                tools=tools,
                repairing=repairing,
            )
            for record in out["calls"]:  # live, for a trace page; the envelope lists them all at the end
                await self.emit("model_call", {"step": key, **record})
            return out

        ran = False  # whether this run asked the model (its calls are in the envelope already) or replayed the step

        async def run_step(key: str) -> dict[str, Any]:
            nonlocal ran
            ran = True
            return await ask(key)

        call = StepCall(name=name, fn=run_step, args=(model.name,), kind="model", timeout=timeout, retry=retry)
        out: dict[str, Any] = await self._run(call, fn_id=f"model:{output_type.__name__ if output_type else 'text'}")
        generation.absorb(self, model, out, replayed=not ran)
        if tools:
            calls = [ToolCall(id=c["id"], name=c["name"], arguments=c["arguments"]) for c in out["tool_calls"]]
            return ModelTurn(text=out["output"] if isinstance(out["output"], str) else "", tool_calls=calls)
        if output_type is not None:
            return output_type.model_validate(out["output"])
        return out["output"]

    def model(self, spec: str | None = None) -> Model:
        """The configured model (``KEEL_DEFAULT_MODEL``), or the one ``spec`` names, built once per process."""
        if self._models is None:
            self._models = ModelRegistry("test")
        try:
            return self._models.get(spec)
        except ConfigError as exc:  # e.g. the local extra is not installed: say so in the envelope
            raise WorkflowError(exc.message, type="model_unavailable") from exc

    def charge_usage(self, usage: dict[str, float]) -> None:
        """Charge usage (model calls, tokens, cost) to the running step and the task's budget."""
        scope = _scope.get()
        if scope is not None:
            for k, v in usage.items():
                scope.usage[k] = scope.usage.get(k, 0) + v
            if scope.deferred:
                return
        self.meter.used.add(usage)

    # -- parallel branches -------------------------------------------------------------------------

    async def map(
        self,
        fn: Callable[[Any], Awaitable[T]],
        items: Sequence[Any],
        *,
        name: str | None = None,
        timeout_per_item: float | None = None,
        min_success: int | None = None,
        concurrency: int | None = 32,
        retry: RetryPolicy | None = None,
    ) -> MapResult[T]:
        """Run ``fn(item)`` for every item as its own durable step, concurrently, each with its own timeout.

        With at least ``min_success`` successes (default: all) the run goes on and each failure becomes an
        envelope error; below it, :class:`BranchesFailed` is raised after the successes are saved as partial
        results under ``name``.
        """
        label = name or str(getattr(fn, "__name__", "map"))
        calls = [
            StepCall(name=f"{label}[{i}]", fn=fn, args=(item,), timeout=timeout_per_item, retry=retry)
            for i, item in enumerate(items)
        ]
        return await self.gather(*calls, name=label, min_success=min_success, concurrency=concurrency)

    async def gather(
        self,
        *calls: StepCall,
        name: str = "gather",
        min_success: int | None = None,
        concurrency: int | None = None,
    ) -> MapResult[Any]:
        need = len(calls) if min_success is None else min_success
        if not 0 <= need <= len(calls):
            raise ConfigError(f"min_success={need} but there are {len(calls)} branches")
        sem = asyncio.Semaphore(concurrency) if concurrency else None

        async def branch(call: StepCall) -> Any:
            async with sem if sem is not None else contextlib.nullcontext():
                return await self._run(call)

        outcomes = await _all_settled([branch(c) for c in calls], fatal=_FATAL)
        results: list[Any] = []
        errors: list[BranchError] = []
        for i, (call, outcome) in enumerate(zip(calls, outcomes, strict=True)):
            if isinstance(outcome, StepFailed):
                results.append(None)
                errors.append(
                    BranchError(
                        index=i,
                        step=outcome.step or call.name,
                        type=outcome.type,
                        message=outcome.message,
                        pointer=outcome.pointer,
                    )
                )
            else:
                results.append(outcome)
        out: MapResult[Any] = MapResult(results=results, errors=errors)
        for e in errors:
            self.error(e.type, e.message, step=e.step, recovery_suggested=e.type in _TRANSIENT, pointer=e.pointer)
        if out.ok < need:
            await self.partial_result(name, [r for i, r in enumerate(results) if i not in {e.index for e in errors}])
            raise BranchesFailed(
                f"{out.ok} of {len(calls)} branches of {name!r} succeeded; {need} required",
                type="min_success_not_met",
                step=name,
            )
        return out

    async def concurrently(self, *aws: Awaitable[Any]) -> list[Any]:
        """Run workflow-level coroutines (each may take steps) at once. Each yields its value, or the
        :class:`StepFailed` that ended it; a breaker, a lost lease or a cancellation stops them all, and no
        coroutine outlives the call."""
        return await _all_settled(list(aws), fatal=_FATAL)

    # -- planning and map-reduce (see planner.py and reduce.py) ------------------------------------

    async def plan(self, intent: str, catalog: Any, *, model: Model, **kwargs: Any) -> Any:
        from keel.orchestration.llm.planner import make_plan

        return await make_plan(self, intent, catalog, model=model, **kwargs)

    async def run_plan(self, plan: Any, catalog: Any, *, model: Model, **kwargs: Any) -> Any:
        from keel.orchestration.llm.planner import execute_plan

        return await execute_plan(self, plan, catalog, model=model, **kwargs)

    async def reduce_to_fit(self, texts: Sequence[str], model: Model, instruction: str, **kwargs: Any) -> Any:
        from keel.orchestration.llm.reduce import reduce_to_fit

        return await reduce_to_fit(self, texts, model, instruction, **kwargs)

    # -- the step machinery ------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        n = self._names.get(name, 0) + 1
        self._names[name] = n
        return name if n == 1 else f"{name}#{n}"

    async def _run(self, call: StepCall, fn_id: str | None = None, key: str | None = None) -> Any:
        if _scope.get() is not None:
            raise ConfigError(f"step {call.name!r} was started inside another step; steps do not nest")
        key = key or self._key(call.name)
        self._seq += 1
        seq = self._seq
        fn_id = fn_id or _fn_id(call.fn)
        recorded = self._history.get(key)
        if recorded is not None:
            return await self._replay(recorded, fn_id, call)
        if self._strict:
            # Either the code diverged, or the recorded run simply stopped here; the replayer tells which by
            # checking that every recorded step was used.
            raise HistoryExhausted(f"step {key!r} ({fn_id}) is not in the recorded history", type="nondeterminism")
        return await self._execute(call, key, seq, fn_id)

    async def _replay(self, cp: StepCheckpoint, fn_id: str, call: StepCall) -> Any:
        return await self.settle(cp, fn_id, call, replayed=True)

    async def settle(self, cp: StepCheckpoint, fn_id: str, call: StepCall, *, replayed: bool) -> Any:
        """Take a step's recorded outcome into the run: its usage, time, tools and step list, then its value (or
        its failure, raised as :class:`StepFailed`). Replays come here, and so do steps a :class:`StepRunner` ran
        elsewhere (``replayed=False``)."""
        if cp.fn and cp.fn != fn_id:
            raise Nondeterminism(
                f"step {cp.key!r} was recorded as {cp.fn} but the code now calls {fn_id}",
                type="nondeterminism",
                step=cp.key,
            )
        self.meter.used.add(cp.usage)
        if cp.kind == "tool":
            self.metadata["tools_called"].append({"tool": fn_id.removeprefix("tool:"), "step": cp.key})
        return await self._conclude(cp, call, replayed=replayed)

    async def _conclude(
        self, cp: StepCheckpoint, call: StepCall, *, replayed: bool, cause: BaseException | None = None
    ) -> Any:
        """The end of every step, from its checkpoint alone, whoever ran it: workflow time, the step list, then
        its value or its failure (raised as :class:`StepFailed`, chained to ``cause`` when this run saw it)."""
        self._time = max(self._time, cp.finished_at)
        if not replayed:
            self.executed.append(cp.key)
        self.steps.append(StepInfo.of(cp, replayed=replayed))
        if cp.status is StepStatus.failed:
            err = cp.error or {}
            type_ = err.get("type", "step_failed")
            failure = StepFailed(
                err.get("message", "step failed"),
                type=type_,
                step=cp.key,
                pointer=err.get("pointer"),
                recovery_suggested=not replayed and type_ in _TRANSIENT,
            )
            if cause is not None:
                raise failure from cause
            raise failure
        value = await self._journal.load_blob(cp.result) if isinstance(cp.result, BlobRef) else cp.result
        if not replayed:
            self.meter.check_spend()
        return _revive(call.fn, value)

    async def _execute(self, call: StepCall, key: str, seq: int, fn_id: str) -> Any:
        step = PendingStep(call=call, key=key, seq=seq, fn_id=fn_id, run_attempt=self.attempt)
        if self._steps is not None:
            return await self._steps.execute(self, step)
        self.meter.before_step(call.kind)
        if call.kind == "tool":
            self.metadata["tools_called"].append({"tool": fn_id.removeprefix("tool:"), "step": key})
        policy = call.retry or DEFAULT_RETRY
        tries = 0
        started = time.perf_counter()
        result: Any = None
        error: dict[str, Any] | None = None
        cause: Exception | None = None
        with step_scope(key, call.kind) as scope, observability.current().step(key, call.kind, fn_id) as seen:
            self.meter.used.add(scope.usage)
            await self._journal.emit(
                "step_started", {"step": key, "kind": call.kind, "attempt": self.attempt}, durable=False
            )
            try:
                async with asyncio.timeout(call.timeout):
                    # The first try runs bare; tenacity takes over only on failure.
                    tries = 1
                    try:
                        value = await call.attempt()
                    except Exception as first:
                        if policy.max_attempts <= 1 or not policy.is_retryable(first):
                            raise
                        await self._sleep(policy.wait_after(1, first))
                        async for attempt in policy.retrying(already=1, sleep=self._sleep):
                            with attempt:
                                tries += 1
                                await self._journal.emit("step_retrying", {"step": key, "try": tries})
                                value = await call.attempt()
            except _STOPS as exc:
                # Never recorded: the next run executes the step again. Listed with what this run knows of it.
                cancelled = isinstance(exc, asyncio.CancelledError)
                self.steps.append(
                    StepInfo(
                        name=key,
                        kind=call.kind,
                        status="cancelled" if cancelled else "stopped",
                        duration_ms=_ms(started),
                        attempts=tries,
                        run_attempt=self.attempt,
                    )
                )
                if cancelled:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._journal.emit("step_cancelled", {"step": key, "kind": call.kind}))
                raise
            except Exception as exc:
                error, cause = step_error(exc, call.timeout), exc
            seen.tries, seen.error = tries, error
        if cause is None:
            result = pydantic_core.to_jsonable_python(value)
        now = self._clock()
        cp = step.checkpoint(
            tries=tries, usage=scope.usage, started=started, finished_at=now, result=result, error=error
        )
        await self._journal.record_step(cp, step_events(cp, self.meter.snapshot()))
        return await self._conclude(cp, call, replayed=False, cause=cause)


class HistoryExhausted(Nondeterminism):
    """A strict replay asked for a step the recorded history does not have."""


_TRANSIENT = {"timeout", "rate_limited", "upstream_error", "connection_error"}
_FATAL: tuple[type[BaseException], ...] = (BudgetExceeded, LeaseLost, Nondeterminism, ConfigError)
_STOPS: tuple[type[BaseException], ...] = (asyncio.CancelledError, *_FATAL, AwaitingDecision)
"""What stops a step without failing it: nothing is recorded, and the run itself stops (or parks)."""


def classify(exc: BaseException, timeout: float | None = None) -> tuple[str, str]:
    """An exception as an envelope error: (type, message)."""
    if isinstance(exc, TimeoutError):
        return "timeout", f"timed out after {timeout:g} s" if timeout else "timed out"
    if isinstance(exc, StreamCut):
        return "truncation", exc.message
    if isinstance(exc, pydantic.ValidationError):
        return "schema_violation", _validation_message(exc)
    if isinstance(exc, UpstreamError):
        return ("rate_limited" if exc.status_code == 429 else "upstream_error"), exc.message
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return ("rate_limited" if code == 429 else "upstream_error"), f"HTTP {code} from {exc.request.url}"
    if isinstance(exc, httpx.TransportError):
        return "connection_error", f"{type(exc).__name__}: {exc}"
    if isinstance(exc, WorkflowError):
        return exc.type, exc.message
    return "step_failed", f"{type(exc).__name__}: {exc}"


def _validation_message(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        pointer = "/" + "/".join(str(p) for p in err["loc"])
        parts.append(f"{pointer}: {err['msg']}")
    return "; ".join(parts)


async def _all_settled(coros: list[Awaitable[Any]], *, fatal: tuple[type[BaseException], ...]) -> list[Any]:
    """Run branches concurrently; each yields its value or its StepFailed. A fatal error (a budget breaker, a lost
    lease) or a cancellation of the caller cancels every branch, waits for all of them, then propagates:
    no branch outlives the call."""

    async def settle(c: Awaitable[Any]) -> Any:
        try:
            return await c
        except (StepFailed, AwaitingDecision) as exc:
            # A branch waiting for a person does not stop its siblings: they finish, then the run parks once.
            return exc

    tasks = [asyncio.ensure_future(settle(c)) for c in coros]
    if not tasks:
        return []
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if pending:
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            exc = t.exception()
            assert exc is not None
            raise exc
    results = [t.result() for t in tasks]
    waiting = [r for r in results if isinstance(r, AwaitingDecision)]
    if waiting:
        raise AwaitingDecision([req for w in waiting for req in w.requests])
    return results


async def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """Await an async step function; run a plain one (parsing, OCR, embedding: CPU work) in a worker thread so
    it never blocks the event loop. A thread cannot be interrupted: on cancellation its result is discarded."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    if inspect.iscoroutinefunction(target):
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    return await result if inspect.isawaitable(result) else result


async def _tool_body(_: Any) -> Any:
    """Stands for a tool's body when its step replays (the recorded result is returned as stored JSON)."""
    raise AssertionError("a replayed tool step never runs its body")


def _fn_id(fn: Callable[..., Any]) -> str:
    target = fn.func if isinstance(fn, functools.partial) else fn
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def _adapter(target: Callable[..., Any]) -> TypeAdapter[Any] | None:
    try:
        ret = typing.get_type_hints(target).get("return")
    except Exception:
        return None
    if ret is None or ret is Any or ret is type(None):
        return None
    try:
        return TypeAdapter(ret)
    except Exception:
        return None


_ADAPTERS: dict[Any, TypeAdapter[Any] | None] = {}


def _revive(fn: Callable[..., Any], value: Any) -> Any:
    """Stored JSON back to the step's declared return type, so a fresh run and a replay return the same thing."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    # Closures made anew on every call (a step defined inside a workflow) share their code object and globals:
    # key on those, so the type adapter is built once per step function, not once per call.
    code = getattr(target, "__code__", None)
    key = (code, id(getattr(target, "__globals__", None))) if code is not None else target
    try:
        if key not in _ADAPTERS:
            if len(_ADAPTERS) > 4096:
                _ADAPTERS.clear()
            _ADAPTERS[key] = _adapter(target)
        adapter = _ADAPTERS[key]
    except TypeError:  # an unhashable callable
        adapter = _adapter(target)
    return adapter.validate_python(value) if adapter is not None else value


def _spend(usage: dict[str, float]) -> dict[str, Any]:
    return {
        "tokens": int(usage.get("input_tokens", 0) + usage.get("output_tokens", 0)),
        "cost_usd": round(float(usage.get("cost_usd", 0.0)), 10),
    }


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
