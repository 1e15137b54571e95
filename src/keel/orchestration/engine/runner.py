"""The task runner: one run of one task, from its context to its end, the same on every engine.

An engine leases a task from keel's queue and hands it here with a journal (where the run's writes go) and a
:class:`RunHost` (the engine's side of the run: its heartbeat, what a cancellation meant, where the run's end is
written). :class:`TaskRunner` builds the :class:`~keel.orchestration.engine.context.WorkflowContext`, runs the workflow
under its deadline, and ends the task: finished with its envelope, parked as ``waiting_for_approval``, or failed.
The embedded engine (:mod:`keel.orchestration.engine.runtime`) and Temporal (:mod:`keel.backends.temporal`) both call
it, so each rule about how a task ends is written once, here: the statuses, the envelope, the cancelled envelope, and
the tenant's usage. The queue side both engines share (leasing, wake-ups, the sweeper) is :class:`TaskQueue`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from keel import logs, observability
from keel.errors import AwaitingDecision, BudgetExceeded, ClarificationNeeded, LeaseLost, WorkflowError
from keel.memory.retrieval import Memory
from keel.memory.stores import EventSpec, SessionStore, Store, VectorStore
from keel.memory.types import (
    BlobRef,
    Decision,
    EffectRecord,
    EffectSettlement,
    EffectStatus,
    Event,
    Lease,
    ModelCallRecord,
    StepCheckpoint,
    Task,
    TaskStatus,
)
from keel.orchestration.engine.budget import Budget
from keel.orchestration.engine.context import EnvelopeError, Journal, StepRunner, WorkflowContext
from keel.orchestration.engine.envelope import Envelope, build_envelope
from keel.orchestration.engine.workflow import WorkflowRegistry
from keel.orchestration.llm.models import ModelRegistry
from keel.orchestration.tools import ToolCatalog
from keel.orchestration.tools.services import Services

log = logging.getLogger("keel.runtime")


# -- the run ---------------------------------------------------------------------------------------------------------


class Interruption(StrEnum):
    """What a cancelled run means, as its engine tells (:meth:`RunHost.interrupted`)."""

    cancelled = "cancelled"
    """Its user cancelled the task: the runner ends it as cancelled, keeping its partial result."""
    handed_back = "handed_back"
    """A graceful stop or a lost lease: nothing terminal is written; the task's next owner resumes it."""
    engine_stopped = "engine_stopped"
    """The engine's own task was cancelled: the cancellation goes on up, and nothing is written."""


class HandedBack(Exception):  # noqa: N818 - it says what happened to the run, not that something went wrong
    """Raised inside a run by its engine to stop it without ending the task (Temporal: the worker is stopping, so
    another worker replays the workflow). Nothing is written; the exception reaches the engine."""


class RunHost(Protocol):
    """The engine's side of one run: what the runner cannot decide alone."""

    def watch(self, run: asyncio.Future[Any]) -> AbstractContextManager[None]:
        """While the workflow runs: hold the task's lease, and cancel ``run`` when the task is cancelled or the
        lease is lost. Whatever the watch started ends when the context exits."""
        ...

    async def interrupted(self) -> Interruption:
        """The run was cancelled: say why."""
        ...

    async def finish(self, status: TaskStatus, envelope: dict[str, Any]) -> None:
        """Write the task's terminal status and envelope (see :meth:`StoreJournal.finish`)."""
        ...

    async def park(self, requests: list[Decision], envelope: dict[str, Any]) -> None:
        """Park the task as ``waiting_for_approval`` with the decisions it asks for (see :meth:`StoreJournal.park`)."""
        ...


@dataclass(kw_only=True)
class TaskRunner:
    """What every engine runs a task with: the workflows, and the models, tools and services a context gets."""

    registry: WorkflowRegistry
    models: ModelRegistry | None = None
    tools: ToolCatalog = field(default_factory=ToolCatalog)
    services: Services | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    """How step retries wait out their backoff (see ``WorkflowContext(sleep=…)``)."""

    def context(
        self,
        task: Task,
        journal: Journal,
        *,
        clock: Callable[[], float],
        state: dict[str, Any],
        decisions: Sequence[Decision],
        history: Sequence[StepCheckpoint] = (),
        steps: StepRunner | None = None,
    ) -> WorkflowContext:
        """The context of one run of ``task``: its budget and deadline (counted from submission, so a restart does
        not reset it), its progress, policy and the decisions people made, on the engine's journal and clock."""
        budget = Budget.from_dict(task.budget)
        return WorkflowContext(
            journal=journal,
            history=history,
            state=state,
            budget=budget,
            started_at=task.started_at or task.created_at,
            deadline_at=task.created_at + budget.deadline_s if budget.deadline_s is not None else None,
            clock=clock,
            progress=task.progress,
            models=self.models,
            tools=self.tools,
            policy=task.policy,
            decisions=decisions,
            services=self.services,
            tenant=task.tenant,
            steps=steps,
            sleep=self.sleep,
        )

    async def run(self, task: Task, ctx: WorkflowContext, host: RunHost) -> TaskStatus | None:
        """Run ``task``'s workflow on ``ctx`` and end the task through ``host``. Returns the status written, or None
        when the run was handed back unfinished (a lost lease, a graceful stop). Every line logged meanwhile (the
        steps and heartbeats too) carries the task's id, tenant and the request that created it."""
        with logs.task_scope(task.id, task.tenant, task.policy.get("request_id")):
            log.info("running %s (attempt %d)", task.workflow, task.attempts)
            with observability.current().task_run(task) as seen:
                seen.status = await self._run(task, ctx, host)
            log.info("run ended: %s", seen.status.value if seen.status is not None else "handed back")
        return seen.status

    async def _run(self, task: Task, ctx: WorkflowContext, host: RunHost) -> TaskStatus | None:
        started = time.perf_counter()
        wf = self.registry.get(task.workflow)
        extra: list[EnvelopeError] = []
        result: Any = None
        if wf is None:
            status = TaskStatus.failed
            extra.append(EnvelopeError(type="unknown_workflow", message=f"no workflow named {task.workflow!r}"))
        elif task.cancel_requested:
            status, result = TaskStatus.cancelled, ctx.partial or None
        else:
            run = asyncio.ensure_future(_under_deadline(ctx, wf.fn, wf.input_model.model_validate(task.input)))
            with host.watch(run):
                try:
                    result = await run
                    status = finished_status(ctx)
                except asyncio.CancelledError:
                    why = await host.interrupted()
                    if why is Interruption.engine_stopped:
                        raise
                    if why is Interruption.handed_back:
                        return None
                    status, result = TaskStatus.cancelled, ctx.partial or None
                    extra.append(EnvelopeError(type="cancelled", message="the task was cancelled", severity="warning"))
                except LeaseLost:
                    log.warning("lease on %s lost; its next owner resumes it from its checkpoints", task.id)
                    return None
                except HandedBack:
                    raise
                except AwaitingDecision as exc:
                    requests = [r for r in exc.requests if isinstance(r, Decision)]
                    await host.park(requests, parked_envelope(task.id, ctx, requests, started))
                    return TaskStatus.waiting_for_approval
                except Exception as exc:
                    status, result, error = _ending(exc, ctx)
                    if error.type == "internal_error":
                        log.exception("workflow %s crashed on task %s", task.workflow, task.id)
                    extra.append(error)
        await host.finish(status, _validated(build_envelope(status, ctx, result, started, extra)))
        return status


async def _under_deadline(ctx: WorkflowContext, fn: Callable[[WorkflowContext, Any], Any], inp: Any) -> Any:
    """Run the workflow under its deadline; the deadline is a budget, so crossing it is a breaker."""
    deadline = ctx.meter.deadline_at
    if deadline is None:
        return await fn(ctx, inp)
    ctx.meter.check_deadline()
    try:
        async with asyncio.timeout(max(deadline - ctx.meter.clock(), 0.0)) as cm:
            return await fn(ctx, inp)
    except TimeoutError:
        if cm.expired():
            ctx.meter.check_deadline()
            limit = ctx.meter.budget.deadline_s or 0.0
            raise BudgetExceeded("deadline", limit=limit, used=limit) from None
        raise


def finished_status(ctx: WorkflowContext) -> TaskStatus:
    """A run that returned: a success, unless part of the work failed or part of the input was left out."""
    failed_parts = ctx.incomplete or any(e.severity == "error" for e in ctx.errors)
    return TaskStatus.partial_success if failed_parts else TaskStatus.succeeded


def parked_envelope(task_id: str, ctx: WorkflowContext, requests: list[Decision], started: float) -> dict[str, Any]:
    """The provisional envelope of a task waiting for people's decisions: what is asked, and what it has so far."""
    asked = EnvelopeError(
        type="approval_required",
        message=f"waiting for {len(requests)} decision(s): "
        + "; ".join(f"{r.tool} ({r.kind.value}): {r.reason}" for r in requests[:3])
        + f". POST /v1/tasks/{task_id}/approvals/<call_id> with approve or deny.",
        severity="info",
        recovery_suggested=True,
    )
    envelope = build_envelope(
        TaskStatus.waiting_for_approval,
        ctx,
        {"pending_decisions": [r.public() for r in requests], "partial": ctx.partial or None},
        started,
        [asked],
    )
    return _validated(envelope)


def cancelled_envelope(task: Task) -> dict[str, Any]:
    """The envelope of a task cancelled where no run holds it: still queued, or parked waiting for approval. A
    parked task keeps what it finished: its provisional envelope carries the partial result. (A running task is
    cancelled through its engine, and its run writes its envelope.)"""
    waiting = task.status is TaskStatus.waiting_for_approval
    partial = ((task.envelope or {}).get("result") or {}).get("partial") if waiting else None
    return {
        "status": "partial_success" if partial else "failed",
        "result": partial,
        "errors": [
            {
                "type": "cancelled",
                "message": "cancelled while waiting for approval" if waiting else "cancelled before it started",
                "severity": "warning",
                "recovery_suggested": False,
                "step": None,
            }
        ],
    }


def _ending(exc: Exception, ctx: WorkflowContext) -> tuple[TaskStatus, Any, EnvelopeError]:
    """How a run that raised ends: its status, its (partial) result and the envelope error that explains it."""
    partial = ctx.partial or None
    if isinstance(exc, BudgetExceeded):
        observability.current().budget_tripped(exc.budget)
        # A breaker: keep what finished; usable output makes it a partial success.
        status = TaskStatus.partial_success if partial else TaskStatus.failed
        return status, partial, EnvelopeError(type="budget_exceeded", message=exc.message, recovery_suggested=True)
    if isinstance(exc, ClarificationNeeded):
        result = {"questions": exc.questions, "confidence": exc.confidence}
        error = EnvelopeError(type=exc.type, message=exc.message, severity="info", recovery_suggested=True)
        return TaskStatus.needs_clarification, result, error
    if isinstance(exc, WorkflowError):
        error = EnvelopeError(
            type=exc.type,
            message=exc.message,
            step=exc.step,
            recovery_suggested=exc.recovery_suggested,
            pointer=exc.pointer,
        )
        return TaskStatus.failed, partial, error
    return TaskStatus.failed, partial, EnvelopeError(type="internal_error", message=f"{type(exc).__name__}: {exc}")


def _validated(envelope: dict[str, Any]) -> dict[str, Any]:
    # The envelope is checked against its public schema before anything can deliver it.
    return Envelope.model_validate(envelope).model_dump(mode="json")


async def tenant_usage(store: Store, tenant: str, now: float) -> dict[str, Any] | None:
    """The tenant's model calls and spend so far today, for a finished task's envelope; None if it cannot be read
    (accounting must not fail a finished task)."""
    try:
        usage = await store.tenant_usage(tenant, now)
    except Exception:
        log.exception("could not read tenant usage")
        return None
    return {"since": usage.since, "model_calls": usage.calls, "cost_usd": round(usage.cost_usd, 10)}


def _retrieve(future: asyncio.Future[Any]) -> bool:
    """Whether a write succeeded. Reading the exception also keeps a lost lease from surfacing as "exception never
    retrieved": the run learns of it from the next write it awaits."""
    return not future.cancelled() and future.exception() is None


# -- the run's journal on the store -----------------------------------------------------------------------------------


class StoreJournal:
    """A run's journal on the store: every write is fenced by the run's lease.

    A non-durable event (``step_started``) is held for up to ``hold_s``: a step that finishes sooner commits it
    in its checkpoint's transaction (one fsync per step instead of two); a longer step has it written on its own,
    so stream readers still see the step start while it runs.

    A live event (a token: ``durable=False, live=True``) is not held for that long: it goes to the store at once,
    unless this journal's previous release is still committing, and then with everything held when that commit
    lands. So a stream's first token is one commit away from its readers, and a burst commits in as many batches
    as the store has commits to spare (group commit per stream), never one commit per token. Readers are woken
    only once a commit lands: no reader ever sees an event the log could still lose. With ``deliver``, the
    committed events themselves go to this process's readers (``Notifier.committed``), which then need not read
    them back from the log.
    """

    def __init__(
        self,
        store: Store,
        lease: Lease,
        clock: Callable[[], float],
        notify: Callable[[str], None],
        *,
        tenant: str = "",
        hold_s: float = 0.05,
        deliver: Callable[[str, list[Event]], None] | None = None,
    ) -> None:
        self.task_id = lease.task_id
        self.tenant = tenant
        self._stats: set[asyncio.Task[None]] = set()
        self.run_attempt = lease.attempt
        self._store = store
        self._lease = lease
        self._clock = clock
        self._notify = notify
        self._hold_s = hold_s
        self._deliver = deliver
        self._held: list[tuple[str, dict[str, Any], float]] = []
        self._held_effect: EffectSettlement | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._queued: list[Awaitable[Any]] = []
        # The last release's write until it lands; a live event emitted meanwhile is held for the next one.
        self._committing: asyncio.Future[list[Event]] | None = None
        self._live_held = False

    async def emit(self, type: str, data: dict[str, Any], *, durable: bool = True, live: bool = False) -> None:
        if not durable:
            self._held.append((type, data, self._clock()))
            if live:
                if self._committing is None:
                    self._release_held()
                else:
                    self._live_held = True  # released by _committed, in the next batch
            elif self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self._hold_s, self._release_held)
            return
        await self._write_held()
        await self._store.append(self._lease, type, data, self._clock())
        self._notify(self.task_id)

    def _release_held(self) -> None:
        held = self._take_held()
        if not held:
            return
        queued = self._store.append_batch_nowait(self._lease, held, self._clock())
        self._queued.append(queued)
        if isinstance(queued, asyncio.Future):
            self._committing = queued
            queued.add_done_callback(self._committed)

    def _take_held(self) -> list[tuple[str, dict[str, Any], float]]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._live_held = False
        held, self._held = self._held, []
        return held

    def _committed(self, future: asyncio.Future[list[Event]]) -> None:
        if future is self._committing:
            self._committing = None
            if self._live_held:
                self._release_held()
        if not _retrieve(future):
            return
        if self._deliver is not None:
            self._deliver(self.task_id, future.result())  # committed: readers here take them without a read
        else:
            self._notify(self.task_id)

    async def _settle_queued(self) -> None:
        queued, self._queued = self._queued, []
        for q in queued:
            await q  # raises LeaseLost if the lease was lost meanwhile

    async def record_step(self, step: StepCheckpoint, events: Sequence[tuple[str, dict[str, Any]]]) -> None:
        batch: list[EventSpec] = [*self._take_held(), *events]
        effect, self._held_effect = self._held_effect, None
        await self._store.record_step(self._lease, step, batch, self._clock(), effect=effect)
        await self._settle_queued()
        self._notify(self.task_id)

    async def set_state(self, key: str, value: Any, event: tuple[str, dict[str, Any]] | None) -> None:
        await self._write_held()
        await self._store.set_state(self._lease, key, value, event, self._clock())
        self._notify(self.task_id)

    async def set_progress(self, fraction: float, step: str | None) -> None:
        self._release_held()
        await self._store.set_progress(self._lease, fraction, step, self._clock())
        await self.emit("progress", {"progress": fraction, "step": step})

    async def load_blob(self, ref: BlobRef) -> Any:
        return await self._store.load_blob(ref)

    async def begin_effect(self, effect: EffectRecord) -> tuple[EffectRecord, bool]:
        await self._write_held()
        return await self._store.begin_effect(self._lease, effect, self._clock())

    async def settle_effect(self, settlement: EffectSettlement) -> None:
        await self._write_held()
        if settlement.status is EffectStatus.applied:
            # Held for the step's checkpoint, which follows at once: one commit for both. If the process dies
            # first, the row is still pending, which the next run settles through reconcile like any crash
            # between the call and its record.
            self._held_effect = settlement
            return
        await self._store.settle_effect(self._lease, settlement, self._clock())

    async def _write_held(self) -> None:
        """What is held back goes before any other write: the log and the ledger keep the order it happened in."""
        self._release_held()
        await self._flush_effect()

    async def _flush_effect(self) -> None:
        effect, self._held_effect = self._held_effect, None
        if effect is not None:
            await self._store.settle_effect(self._lease, effect, self._clock())

    def record_model_call(self, call: ModelCallRecord) -> None:
        # Counters are not part of the run's history: written alongside, never awaited by the step.
        task = asyncio.create_task(self._store.record_model_call(self.tenant, call))
        self._stats.add(task)
        task.add_done_callback(self._stat_written)

    def _stat_written(self, task: asyncio.Task[None]) -> None:
        self._stats.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not record a model call: %s", task.exception())

    async def drain(self) -> None:
        """Before the run's end is written: nothing held back may land after it."""
        self._release_held()
        with contextlib.suppress(LeaseLost):
            await self._flush_effect()
        with contextlib.suppress(LeaseLost):
            await self._settle_queued()
        if self._stats:
            await asyncio.gather(*self._stats, return_exceptions=True)

    def close(self) -> None:
        """The run stopped without finishing (shutdown, lost lease): drop what is held; the next run re-emits it."""
        self._take_held()

    @property
    def lease(self) -> Lease:
        return self._lease

    async def finish(self, status: TaskStatus, envelope: dict[str, Any]) -> None:
        """End the run: what is held back lands first; then the envelope, with the tenant's usage so far (this
        task's calls included, hence after the drain), goes in with the terminal status. Raises LeaseLost when
        another run owns the task now."""
        await self.drain()
        envelope["metadata"]["tenant_usage"] = await tenant_usage(self._store, self.tenant, self._clock())
        observability.current().stamp(envelope["metadata"])
        await self._store.finish(self._lease, self.task_id, status, envelope, self._clock())

    async def park(self, requests: list[Decision], envelope: dict[str, Any]) -> None:
        """Park the run until people decide: the task waits as ``waiting_for_approval`` (holding no worker) with
        its provisional envelope, and a decision queues it again to resume from its checkpoints."""
        await self.drain()
        observability.current().stamp(envelope["metadata"])
        await self._store.request_decisions(self._lease, requests, envelope, self._clock())


# -- the queue side of an engine ---------------------------------------------------------------------------------------


RETENTION_BATCH = 200
"""Tasks deleted per transaction by the retention sweep: small enough that other writes never wait long."""
RETENTION_BATCHES = 25
"""Batches per sweep at most; a larger backlog (the first sweep after enabling retention) goes on next sweep."""


async def sweep_tasks(store: Store, now: float, retention_s: float) -> int:
    """The workflow-memory tier's expiry: delete ended tasks that finished more than ``retention_s`` ago, with
    their events, steps, state, decisions, effects, idempotency keys and unshared blobs
    (:meth:`~keel.memory.stores.TaskStore.sweep_tasks`), in bounded batches. Returns how many went."""
    deleted = 0
    for _ in range(RETENTION_BATCHES):
        n = await store.sweep_tasks(now - retention_s, RETENTION_BATCH)
        deleted += n
        if n < RETENTION_BATCH:
            break
    return deleted


async def sweep_expired(
    store: Store,
    now: float,
    *,
    approval_ttl_s: float | None,
    memory: Memory | None = None,
    task_retention_s: float | None = None,
) -> list[str]:
    """Expired idempotency keys are removed (they are never honoured past their expiry anyway), calls nobody
    approved within ``approval_ttl_s`` are denied, so their tasks go on (the call fails as ``approval_denied``)
    instead of waiting forever, expired memory (sessions, chunks, documents) is deleted: through ``memory``'s
    handles when given (sessions may live in Redis), else in ``store``, and ended tasks older than
    ``task_retention_s`` go (:func:`sweep_tasks`; None: kept). What each tier lost is counted in
    ``keel_retention_deleted_total{tier}`` and logged. Returns the tasks queued again. Every engine runs it
    periodically."""
    observer = observability.current()
    removed = await store.sweep_idempotency(now)
    observer.retention_deleted("idempotency_keys", removed)
    if removed:
        log.info("swept %d expired idempotency key(s)", removed)
    if task_retention_s:
        tasks = await sweep_tasks(store, now, task_retention_s)
        observer.retention_deleted("tasks", tasks)
        if tasks:
            log.info("retention: deleted %d task(s) that ended over %g day(s) ago", tasks, task_retention_s / 86400)
    requeued: list[str] = []
    if approval_ttl_s:
        requeued = await store.expire_decisions(now - approval_ttl_s, now)
        if requeued:
            log.info("denied the expired approvals of %d task(s)", len(requeued))
    # The memory tiers: expired sessions, chunks and documents. Reads already skip them; this reclaims space.
    session_store: SessionStore = memory.sessions if memory is not None else store
    vector_store: VectorStore = memory.vectors if memory is not None else store
    sessions = await session_store.sweep_sessions(now)
    chunks = await vector_store.sweep_chunks(now)
    observer.retention_deleted("sessions", sessions)
    observer.retention_deleted("chunks", chunks)
    if sessions or chunks:
        log.info("swept %d expired session(s) and %d expired chunk(s)", sessions, chunks)
    return requeued


@dataclass(kw_only=True)
class TaskQueue:
    """keel's durable queue as an engine takes work from it: leases for this process, a wake-up when a task is
    queued (instead of waiting for the next poll), and the periodic sweep (:func:`sweep_expired`)."""

    store: Store
    owner: str
    """Who holds the leases this queue takes: one per engine instance."""
    clock: Callable[[], float]
    notify: Callable[[str], None]
    """Wakes a task's stream readers (a requeued task has news)."""
    lease_s: float
    max_attempts: int
    """Leases of one task in a row that record no step before it is dead-lettered (see
    :func:`keel.memory.types.leases_without_progress`)."""
    poll_s: float
    approval_ttl_s: float | None
    sweep_s: float
    memory: Memory | None = None
    """The memory layer whose expired sessions and chunks the sweep deletes (None: the store's own)."""
    task_retention_s: float | None = None
    """How long ended tasks are kept (None: until deleted)."""
    _idle: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque, init=False)
    """Workers waiting for work, oldest first: a wake-up goes to one of them, not to all."""
    _wakes: int = field(default=0, init=False)
    """Wake-ups so far: a worker that found nothing looks again, instead of waiting, if one came meanwhile."""

    def wake(self) -> None:
        """A task was queued: one idle worker looks for it. Waking every idle worker made each of them try to
        lease the one task (a write each; 5 lease writes a task with 4 workers, where 1 is needed)."""
        self._wakes += 1
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def next_lease(self) -> Lease | None:
        """The next queued task, leased to this process; None after waiting up to ``poll_s`` (or a wake-up) when
        there is none, or when leasing failed (logged: the caller simply asks again)."""
        wakes = self._wakes
        try:
            lease = await self.store.lease_next(self.owner, self.clock(), self.lease_s, self.max_attempts)
        except Exception:
            log.exception("leasing failed; retrying")
            lease = None
        if lease is None and self._wakes == wakes:  # nothing queued since the lease was tried: wait for news
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, self.poll_s)  # cancels the waiter on a timeout or a stop
            finally:
                with contextlib.suppress(ValueError):  # a wake-up took it off already
                    self._idle.remove(waiter)
        return lease

    async def sweep_once(self) -> None:
        """See :func:`sweep_expired`; tasks whose approvals expired are woken."""
        requeued = await sweep_expired(
            self.store,
            self.clock(),
            approval_ttl_s=self.approval_ttl_s,
            memory=self.memory,
            task_retention_s=self.task_retention_s,
        )
        for task_id in requeued:
            self.notify(task_id)
            self.wake()  # one idle worker per task

    async def sweep_forever(self) -> None:
        """Sweep every ``sweep_s`` for as long as the engine runs; a failed sweep is logged and tried again."""
        while True:
            try:
                await self.sweep_once()
            except Exception:
                log.exception("sweep failed")
            await asyncio.sleep(self.sweep_s)
