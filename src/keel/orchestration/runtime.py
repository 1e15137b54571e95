"""The embedded engine: an in-process worker pool that leases tasks from the durable queue.

Each run holds its lease with heartbeats; every write it makes is fenced by the lease's token, so a worker
whose lease expired cannot commit. A cancel request reaches the running coroutine as asyncio cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from keel.errors import AwaitingDecision, BudgetExceeded, ClarificationNeeded, LeaseLost, WorkflowError
from keel.memory.stores import EventSpec, Store
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
from keel.orchestration.budget import Budget
from keel.orchestration.context import EnvelopeError, WorkflowContext
from keel.orchestration.envelope import Envelope, build_envelope
from keel.orchestration.models import ModelRegistry
from keel.orchestration.tools import ToolCatalog
from keel.orchestration.workflow import WorkflowRegistry

log = logging.getLogger("keel.runtime")


class Notifier:
    """In-process wake-ups for SSE readers; the durable log stays the source of truth."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def notify(self, task_id: str) -> None:
        for ev in self._waiters.get(task_id, ()):
            ev.set()

    async def wait(self, task_id: str, timeout: float) -> None:
        ev = asyncio.Event()
        self._waiters.setdefault(task_id, set()).add(ev)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), timeout)
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(ev)
                if not waiters:
                    del self._waiters[task_id]


class StoreJournal:
    """A run's journal on the store: every write is fenced by the run's lease.

    A non-durable event (``step_started``) is held for up to ``hold_s``: a step that finishes sooner commits it
    in its checkpoint's transaction (one fsync per step instead of two); a longer step has it written on its own,
    so stream readers still see the step start while it runs.
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
        self._held: list[tuple[str, dict[str, Any], float]] = []
        self._held_effect: EffectSettlement | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._queued: list[Awaitable[Event]] = []

    async def emit(self, type: str, data: dict[str, Any], *, durable: bool = True) -> None:
        if not durable:
            self._held.append((type, data, self._clock()))
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self._hold_s, self._release_held)
            return
        await self._write_held()
        await self._store.append(self._lease, type, data, self._clock())
        self._notify(self.task_id)

    def _release_held(self) -> None:
        for type, data, at in self._take_held():
            queued = self._store.append_nowait(self._lease, type, data, at)
            if isinstance(queued, asyncio.Future):
                queued.add_done_callback(self._committed)
            self._queued.append(queued)

    def _take_held(self) -> list[tuple[str, dict[str, Any], float]]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        return held

    def _committed(self, future: asyncio.Future[Event]) -> None:
        # Reading the exception also keeps a lost lease from surfacing as "exception never retrieved".
        if not future.cancelled() and future.exception() is None:
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

    async def settle_effect(
        self,
        key: str,
        status: EffectStatus,
        *,
        result: Any = None,
        error: dict[str, Any] | None = None,
        executions: int | None = None,
    ) -> None:
        await self._write_held()
        if status is EffectStatus.applied:
            # Held for the step's checkpoint, which follows at once: one commit for both. If the process dies
            # first, the row is still pending, which the next run settles through reconcile like any crash
            # between the call and its record.
            self._held_effect = EffectSettlement(key=key, status=status, result=result, executions=executions)
            return
        await self._store.settle_effect(
            self._lease, key, status, self._clock(), result=result, error=error, executions=executions
        )

    async def _write_held(self) -> None:
        """What is held back goes before any other write: the log and the ledger keep the order it happened in."""
        self._release_held()
        await self._flush_effect()

    async def _flush_effect(self) -> None:
        effect, self._held_effect = self._held_effect, None
        if effect is not None:
            await self._store.settle_effect(
                self._lease,
                effect.key,
                effect.status,
                self._clock(),
                result=effect.result,
                executions=effect.executions,
            )

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


async def sweep_expired(store: Store, now: float, *, approval_ttl_s: float | None) -> list[str]:
    """Expired idempotency keys are removed (they are never honoured past their expiry anyway), calls nobody
    approved within ``approval_ttl_s`` are denied, so their tasks go on (the call fails as ``approval_denied``)
    instead of waiting forever, and expired memory (sessions, chunks, documents) is deleted. Returns the tasks
    queued again. Every engine runs it periodically."""
    removed = await store.sweep_idempotency(now)
    if removed:
        log.info("swept %d expired idempotency key(s)", removed)
    requeued: list[str] = []
    if approval_ttl_s:
        requeued = await store.expire_decisions(now - approval_ttl_s, now)
        if requeued:
            log.info("denied the expired approvals of %d task(s)", len(requeued))
    # The memory tiers: expired sessions, chunks and documents. Reads already skip them; this reclaims space.
    sessions = await store.sweep_sessions(now)
    chunks = await store.sweep_chunks(now)
    if sessions or chunks:
        log.info("swept %d expired session(s) and %d expired chunk(s)", sessions, chunks)
    return requeued


class EmbeddedEngine:
    def __init__(
        self,
        store: Store,
        registry: WorkflowRegistry,
        *,
        workers: int = 4,
        lease_s: float = 15.0,
        max_attempts: int = 5,
        poll_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
        models: ModelRegistry | None = None,
        tools: ToolCatalog | None = None,
        services: Any = None,
        approval_ttl_s: float | None = 72 * 3600,
        sweep_s: float = 60.0,
    ) -> None:
        self.store = store
        self.approval_ttl_s = approval_ttl_s
        self.sweep_s = sweep_s
        self.models = models
        self.tools = tools or ToolCatalog()
        self.services = services
        self.registry = registry
        self.workers = workers
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}"
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._runs: dict[str, asyncio.Task[Any]] = {}
        self._cancel_requested: set[str] = set()
        self._stopping = False

    async def start(self, *, recover: bool = True) -> None:
        if recover:
            n = await self.store.requeue_running()
            if n:
                log.info("re-queued %d task(s) left running by a dead process", n)
        self._loops = [asyncio.create_task(self._worker(i), name=f"keel-worker-{i}") for i in range(self.workers)]
        self._loops.append(asyncio.create_task(self._sweeper(), name="keel-sweeper"))

    async def stop(self) -> None:
        self._stopping = True
        for run in list(self._runs.values()):
            run.cancel()
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, task_id: str) -> None:
        run = self._runs.get(task_id)
        if run is not None:
            self._cancel_requested.add(task_id)
            run.cancel()

    async def _worker(self, index: int) -> None:
        while not self._stopping:
            try:
                lease = await self.store.lease_next(self.owner, self.clock(), self.lease_s, self.max_attempts)
            except Exception:
                log.exception("leasing failed; retrying")
                lease = None
            if lease is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                continue
            self.notifier.notify(lease.task_id)
            await self._execute(lease)

    async def _sweeper(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception:
                log.exception("sweep failed")
            await asyncio.sleep(self.sweep_s)

    async def sweep_once(self) -> None:
        """See :func:`sweep_expired`; tasks whose approvals expired are woken."""
        requeued = await sweep_expired(self.store, self.clock(), approval_ttl_s=self.approval_ttl_s)
        for task_id in requeued:
            self.notifier.notify(task_id)
        if requeued:
            self.wake()

    async def _heartbeat(self, lease: Lease, run: asyncio.Task[Any]) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            state = await self.store.renew_lease(lease, self.clock(), self.lease_s)
            if not state.held:
                log.warning("lost lease on %s; abandoning the run", lease.task_id)
                run.cancel()
                return
            if state.cancel_requested:
                self._cancel_requested.add(lease.task_id)
                run.cancel()
                return

    async def _context(self, task: Task, lease: Lease) -> tuple[WorkflowContext, StoreJournal]:
        budget = Budget.from_dict(task.budget)
        journal = StoreJournal(self.store, lease, self.clock, self.notifier.notify, tenant=task.tenant)
        ctx = WorkflowContext(
            journal=journal,
            history=await self.store.load_steps(task.id),
            state=await self.store.load_state(task.id),
            budget=budget,
            started_at=task.started_at or task.created_at,
            deadline_at=task.created_at + budget.deadline_s if budget.deadline_s is not None else None,
            clock=self.clock,
            progress=task.progress,
            models=self.models,
            tools=self.tools,
            policy=task.policy,
            decisions=await self.store.load_decisions(task.id),
            services=self.services,
            tenant=task.tenant,
        )
        return ctx, journal

    async def _execute(self, lease: Lease) -> None:
        task = await self.store.get_task(lease.task_id)
        if task is None:
            return
        ctx, journal = await self._context(task, lease)
        try:
            await self._execute_in(task, lease, ctx, journal)
        finally:
            journal.close()

    async def _execute_in(self, task: Task, lease: Lease, ctx: WorkflowContext, journal: StoreJournal) -> None:
        started = time.perf_counter()
        wf = self.registry.get(task.workflow)
        extra: list[EnvelopeError] = []
        result: Any = None
        if task.cancel_requested:
            self._cancel_requested.add(task.id)
        if wf is None:
            status = TaskStatus.failed
            extra.append(EnvelopeError(type="unknown_workflow", message=f"no workflow named {task.workflow!r}"))
        elif task.id in self._cancel_requested:
            status, result = TaskStatus.cancelled, ctx.partial or None
        else:
            run: asyncio.Task[Any] = asyncio.create_task(
                self._run(ctx, wf.fn, wf.input_model.model_validate(task.input))
            )
            self._runs[task.id] = run
            hb = asyncio.create_task(self._heartbeat(lease, run))
            try:
                result = await run
                status = finished_status(ctx)
            except asyncio.CancelledError:
                verdict = await self._interrupted(task.id, lease)
                if verdict == "raise":
                    raise
                if verdict == "leave":
                    return
                status, result = TaskStatus.cancelled, ctx.partial or None
                extra.append(EnvelopeError(type="cancelled", message="the task was cancelled", severity="warning"))
            except LeaseLost:
                return
            except AwaitingDecision as exc:
                await self._park(task, lease, ctx, journal, exc, started)
                return
            except Exception as exc:
                status, result, error = _outcome(exc, ctx)
                if error.type == "internal_error":
                    log.exception("workflow %s crashed on task %s", task.workflow, task.id)
                extra.append(error)
            finally:
                hb.cancel()
                self._runs.pop(task.id, None)
        self._cancel_requested.discard(task.id)
        await journal.drain()
        tenant = await self._tenant_usage(task.tenant)
        envelope = build_envelope(status, ctx, result, started, extra, tenant=tenant)
        try:
            await self.store.finish(lease, task.id, status, _validated(envelope), self.clock())
        except LeaseLost:
            log.warning("lease on %s lost before finishing; another worker owns it", task.id)
            return
        self.notifier.notify(task.id)

    async def _park(
        self,
        task: Task,
        lease: Lease,
        ctx: WorkflowContext,
        journal: StoreJournal,
        exc: AwaitingDecision,
        started: float,
    ) -> None:
        """Stop the run until a person decides: the task waits as ``waiting_for_approval`` (holding no worker),
        its envelope says what is asked, and a decision queues it again to resume from its checkpoints."""
        requests = [r for r in exc.requests if isinstance(r, Decision)]
        await journal.drain()
        envelope = parked_envelope(task.id, ctx, requests, started)
        try:
            await self.store.request_decisions(lease, requests, envelope, self.clock())
        except LeaseLost:
            log.warning("lease on %s lost before parking it; another worker owns it", task.id)
            return
        self.notifier.notify(task.id)
        self._cancel_requested.discard(task.id)

    async def _tenant_usage(self, tenant: str) -> dict[str, Any] | None:
        try:
            usage = await self.store.tenant_usage(tenant, self.clock())
        except Exception:  # accounting must not fail a finished task
            log.exception("could not read tenant usage")
            return None
        return {"since": usage.since, "model_calls": usage.calls, "cost_usd": round(usage.cost_usd, 10)}

    async def _interrupted(self, task_id: str, lease: Lease) -> str:
        """A run was cancelled: by its user ("cancelled": write it so), by a graceful stop or a lost lease
        ("leave": nothing terminal, the next owner resumes it), or with this worker itself ("raise")."""
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            if self._stopping:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.release(lease))
            return "raise"
        if task_id in self._cancel_requested:
            return "cancelled"
        if self._stopping:
            with contextlib.suppress(Exception):
                await self.store.release(lease)
        return "leave"

    @staticmethod
    async def _run(ctx: WorkflowContext, fn: Callable[[WorkflowContext, Any], Any], inp: Any) -> Any:
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


def _outcome(exc: Exception, ctx: WorkflowContext) -> tuple[TaskStatus, Any, EnvelopeError]:
    """How a run that raised ends: its status, its (partial) result and the envelope error that explains it."""
    partial = ctx.partial or None
    if isinstance(exc, BudgetExceeded):
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
