"""Workflows: plain async functions taking a context and a validated input model.

``ctx.step(name, fn, *args)`` is a durable step: its result is checkpointed, and on resume after a crash a
completed step returns its stored result instead of running again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from keel.errors import ConfigError, WorkflowError
from keel.memory.stores import EventLog, TaskStore
from keel.memory.types import Lease

I = TypeVar("I", bound=BaseModel)  # noqa: E741
R = TypeVar("R")


@dataclass(kw_only=True, slots=True)
class StepRecord:
    name: str
    status: str
    duration_ms: float
    attempts: int = 1
    errors: list[str] = field(default_factory=list)


@dataclass(kw_only=True, slots=True)
class EnvelopeError:
    type: str
    message: str
    severity: str = "error"
    recovery_suggested: bool = False
    step: str | None = None


class WorkflowContext:
    """What a workflow may touch. Nothing in a workflow reaches past it."""

    def __init__(
        self,
        *,
        lease: Lease,
        store: TaskStore,
        events: EventLog,
        checkpoints: dict[str, Any],
        clock: Callable[[], float],
        on_event: Callable[[str], None],
        progress: float = 0.0,
    ) -> None:
        self._progress = progress
        self.task_id = lease.task_id
        self._lease = lease
        self._store = store
        self._events = events
        self._checkpoints = checkpoints
        self._clock = clock
        self._on_event = on_event
        self.steps: list[StepRecord] = []
        self.errors: list[EnvelopeError] = []
        self.partial: dict[str, Any] = dict(checkpoints.get("__partial__", {}))
        self.tokens = {"input": 0, "output": 0}

    def now(self) -> float:
        return self._clock()

    async def emit(self, type: str, data: dict[str, Any]) -> None:
        await self._events.append(self._lease, type, data, self._clock())
        self._on_event(self.task_id)

    async def progress(self, fraction: float, step: str | None = None) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        if fraction < self._progress:
            return  # replayed steps after a resume must not move the bar backwards
        self._progress = fraction
        await self._store.set_progress(self._lease, fraction, step, self._clock())
        await self.emit("progress", {"progress": fraction, "step": step})

    async def partial_result(self, key: str, value: Any) -> None:
        """Record a piece of the result that survives failure and cancellation."""
        self.partial[key] = value
        await self._store.save_checkpoint(self._lease, "__partial__", self.partial)
        await self.emit("partial_result", {"key": key, "value": value})

    def warn(self, type: str, message: str, *, step: str | None = None, recovery_suggested: bool = False) -> None:
        self.errors.append(
            EnvelopeError(
                type=type,
                message=message,
                severity="warning",
                step=step,
                recovery_suggested=recovery_suggested,
            )
        )

    async def step(self, name: str, fn: Callable[..., Awaitable[R]], *args: Any) -> R:
        if name in self._checkpoints:
            self.steps.append(StepRecord(name=name, status="replayed", duration_ms=0.0))
            return self._checkpoints[name]  # type: ignore[no-any-return]
        await self.emit("step_started", {"step": name})
        start = time.perf_counter()
        try:
            result = await fn(*args)
        except asyncio.CancelledError:
            self.steps.append(StepRecord(name=name, status="cancelled", duration_ms=_ms(start)))
            raise
        except Exception as exc:
            self.steps.append(StepRecord(name=name, status="failed", duration_ms=_ms(start), errors=[str(exc)]))
            await self.emit("step_failed", {"step": name, "error": str(exc)})
            if isinstance(exc, WorkflowError) and exc.step is None:
                exc.step = name
            raise
        # The result and its step_completed event commit together: a crash leaves both or neither.
        await self._store.save_checkpoint(self._lease, name, result, ("step_completed", {"step": name}), self.now())
        self._on_event(self.task_id)
        self._checkpoints[name] = result
        self.steps.append(StepRecord(name=name, status="completed", duration_ms=_ms(start)))
        return result


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


@dataclass(kw_only=True, slots=True)
class Workflow(Generic[I]):
    name: str
    input_model: type[I]
    fn: Callable[[WorkflowContext, I], Coroutine[Any, Any, Any]]
    estimate: Callable[[I], float | None]


class WorkflowRegistry:
    def __init__(self) -> None:
        self._workflows: dict[str, Workflow[Any]] = {}

    def register(self, wf: Workflow[Any]) -> None:
        if wf.name in self._workflows:
            raise ConfigError(f"workflow {wf.name!r} is registered twice")
        self._workflows[wf.name] = wf

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


DIAGNOSTIC = Workflow(
    name="diagnostic",
    input_model=DiagnosticInput,
    fn=diagnostic,
    estimate=lambda inp: inp.steps * inp.step_seconds,
)


def default_registry() -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.register(DIAGNOSTIC)
    return registry
