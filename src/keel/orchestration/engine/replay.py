"""Replay a recorded run against the current code, as Temporal's ``Replayer`` does.

Every step must come from the history (nothing is executed), the workflow must ask for recorded steps with the
same functions, and it must use all of them. A different decision surfaces as :class:`Nondeterminism`, so a code
change that would break in-flight runs is caught before it ships.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.errors import Nondeterminism, NotFound, WorkflowError
from keel.memory.stores import Store
from keel.memory.types import BlobRef, EffectRecord, EffectSettlement, ModelCallRecord, StepCheckpoint
from keel.orchestration.engine.budget import Budget
from keel.orchestration.engine.context import HistoryExhausted, WorkflowContext
from keel.orchestration.engine.workflow import Workflow


@dataclass(kw_only=True, slots=True)
class History:
    task_id: str
    workflow: str
    input: dict[str, Any]
    started_at: float
    budget: dict[str, Any]
    steps: list[StepCheckpoint]


@dataclass(kw_only=True, slots=True)
class ReplayResult:
    result: Any
    steps: list[str]
    """Keys of the steps the replay asked for, in order."""
    complete: bool = True
    """False when the recorded run stopped before the end (a crash, a breaker, a cancel): the replay followed
    the whole history, then the workflow asked for a step the run never reached."""
    error: tuple[str, str] | None = None
    """(type, message) when the workflow failed the same way the recorded run did."""
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


async def load_history(store: Store, task_id: str) -> History:
    task = await store.get_task(task_id)
    if task is None:
        raise NotFound(f"no task {task_id}")
    return History(
        task_id=task.id,
        workflow=task.workflow,
        input=task.input,
        started_at=task.started_at or task.created_at,
        budget=task.budget,
        steps=await store.load_steps(task_id),
    )


class _ReplayJournal:
    def __init__(self, task_id: str, store: Store | None) -> None:
        self.task_id = task_id
        self.run_attempt = 0
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._store = store

    async def emit(self, type: str, data: dict[str, Any], *, durable: bool = True, live: bool = False) -> None:
        self.events.append((type, data))

    async def record_step(self, step: StepCheckpoint, events: Sequence[tuple[str, dict[str, Any]]]) -> None:
        raise Nondeterminism(f"replay tried to record step {step.key!r}", type="nondeterminism", step=step.key)

    async def set_state(self, key: str, value: Any, event: tuple[str, dict[str, Any]] | None) -> None:
        if event is not None:
            self.events.append(event)

    async def set_progress(self, fraction: float, step: str | None) -> None:
        self.events.append(("progress", {"progress": fraction, "step": step}))

    async def begin_effect(self, effect: EffectRecord) -> tuple[EffectRecord, bool]:
        raise Nondeterminism(f"replay tried to run the write {effect.tool!r}", type="nondeterminism", step=effect.step)

    async def settle_effect(self, settlement: EffectSettlement) -> None:
        raise Nondeterminism("replay tried to settle a write", type="nondeterminism")

    def record_model_call(self, call: ModelCallRecord) -> None:
        return None  # a replay makes no calls

    async def load_blob(self, ref: BlobRef) -> Any:
        if self._store is None:
            raise Nondeterminism(f"blob {ref.id} needs the store", type="nondeterminism")
        return await self._store.load_blob(ref)


async def replay(workflow: Workflow[Any], history: History, *, store: Store | None = None) -> ReplayResult:
    """Re-run ``workflow`` on ``history`` without executing a single step; raise on any divergence."""
    journal = _ReplayJournal(history.task_id, store)
    ctx = WorkflowContext(
        journal=journal,
        history=history.steps,
        budget=Budget.from_dict(history.budget),
        started_at=history.started_at,
        strict_replay=True,
    )
    result: Any = None
    complete, error = True, None
    try:
        result = await workflow.fn(ctx, workflow.input_model.model_validate(history.input))
    except HistoryExhausted:
        complete = False
    except Nondeterminism:
        raise
    except WorkflowError as exc:
        error = (exc.type, exc.message)
    used = [s.name for s in ctx.steps]
    unused = [s.key for s in history.steps if s.key not in set(used)]
    if unused:
        raise Nondeterminism(
            f"the code no longer takes recorded step(s) {', '.join(unused[:5])}", type="nondeterminism", step=unused[0]
        )
    return ReplayResult(result=result, steps=used, complete=complete, error=error, events=journal.events)
