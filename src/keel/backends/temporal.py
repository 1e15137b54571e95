"""Temporal as keel's distributed workflow engine (``KEEL_ENGINE=temporal``), behind the same seam as the
embedded one.

The mapping:

* **A keel task is a Temporal workflow** (``keel.task``, workflow id = task id). A dispatcher in each worker
  process leases queued tasks from keel's store and starts their workflows; the workflow renews that lease while
  it runs (as the embedded engine's heartbeat does), so keel's own queue, fencing and dead-lettering keep working.
* **Each ``ctx.step``, model call and tool call is a Temporal activity** (``keel.step``), scheduled by the
  workflow with the step's timeout (``schedule_to_close``) and its :class:`~keel.orchestration.retry.RetryPolicy`
  mapped onto Temporal's (``Retry-After`` becomes ``next_retry_delay``; a non-retryable error is non-retryable).
  Steps are local activities: the step's function may be a closure of the workflow's code, which only the process
  running that code can call. A cancellation reaches the running step at once, in the same process.
* **keel keeps its records**: every step's checkpoint and events go to keel's store from inside the activity, in
  one transaction, exactly as on the embedded engine. A step whose checkpoint exists is never run again, even when
  Temporal replays a workflow task that had not yet recorded the step's completion when its worker died. So the
  event log (and SSE, webhooks), the envelope, budgets and the effect ledger behave the same on both engines.
* **Determinism**: workflow code runs only what ``ctx`` makes deterministic (time, ids, randomness come from the
  context; usage is charged from each step's recorded result), which is what Temporal's replay needs. Workflows
  run outside Temporal's sandbox, because keel's context imports freely; the ``ctx`` API is the contract.

Drivers are imported only in ``backends/``: this module is the only one that imports ``temporalio``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import pydantic_core
from pydantic import TypeAdapter
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy as TemporalRetry
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, WorkflowAlreadyStartedError
from temporalio.exceptions import TimeoutError as TemporalTimeout
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from keel.errors import AwaitingDecision, ConfigError, LeaseLost
from keel.memory.stores import Store
from keel.memory.types import BlobRef, Decision, Lease, StepCheckpoint, StepStatus, Task, TaskStatus
from keel.orchestration.budget import Budget, BudgetMeter
from keel.orchestration.context import (
    EnvelopeError,
    StepCall,
    WorkflowContext,
    _call,
    _Scope,
    _scope,
    classify,
    step_usage,
)
from keel.orchestration.envelope import build_envelope
from keel.orchestration.models import ModelRegistry
from keel.orchestration.retry import DEFAULT_RETRY
from keel.orchestration.runtime import (
    Notifier,
    StoreJournal,
    _outcome,
    _validated,
    finished_status,
    parked_envelope,
    sweep_expired,
)
from keel.orchestration.tools import ToolCatalog
from keel.orchestration.workflow import WorkflowRegistry

log = logging.getLogger("keel.temporal")

__all__ = ["KeelTask", "TemporalEngine"]

_TASK = TypeAdapter(Task)
_CHECKPOINT = TypeAdapter(StepCheckpoint)
_DECISIONS = TypeAdapter(list[Decision])
_LOCAL = timedelta(seconds=60)
_OP_RETRY = TemporalRetry(initial_interval=timedelta(milliseconds=200), maximum_attempts=10)


# -- what a worker process shares with the workflows and activities it runs -----------------------------------------


@dataclass(kw_only=True)
class _Host:
    store: Store
    registry: WorkflowRegistry
    models: ModelRegistry | None
    tools: ToolCatalog
    services: Any
    notifier: Notifier
    lease_s: float
    """How long a renewal holds the store lease: Temporal keeps the workflow alive, so this is only the backstop for
    a workflow Temporal lost altogether."""
    heartbeat_s: float
    """How often a running workflow renews its lease (and reads the store's cancel flag)."""
    journals: dict[tuple[str, int], StoreJournal] = field(default_factory=dict)
    running: set[asyncio.Task[Any]] = field(default_factory=set)
    """The steps running in this process: a stop that outlasts its grace cancels them."""
    stopping: bool = False

    def journal(self, lease: Lease, tenant: str) -> StoreJournal:
        """The store-side journal of a run, one per task and lease in this process."""
        key = (lease.task_id, lease.token)
        found = self.journals.get(key)
        if found is None:
            found = StoreJournal(self.store, lease, time.time, self.notifier.notify, tenant=tenant)
            self.journals[key] = found
        return found


class _WorkerStopping(Exception):
    """A step was interrupted because its worker is stopping. Raised in workflow code, it fails the workflow *task*
    (not the workflow): Temporal hands the workflow to another worker, which replays it and runs the step again,
    as after a crash."""


_HOSTS: dict[str, _Host] = {}
"""Task queue to the engine serving it in this process."""


def _host(queue: str) -> _Host:
    host = _HOSTS.get(queue)
    if host is None:
        raise ApplicationError(f"no keel engine serves task queue {queue!r} in this process", non_retryable=True)
    return host


@dataclass(kw_only=True)
class _Pending:
    ctx: WorkflowContext
    call: StepCall
    key: str
    seq: int
    fn_id: str


_PENDING: dict[str, _Pending] = {}
"""Steps scheduled by workflow code in this process, by ``<run id>/<step key>``, for the activity to run."""


def _lease_dict(lease: Lease) -> dict[str, Any]:
    return dataclasses.asdict(lease)


# -- the journal: keel's store, written from activities ------------------------------------------------------------


class TemporalJournal:
    """The context's journal under Temporal: inside an activity it writes keel's store directly; from workflow
    code it schedules a local activity that does, so every write is recorded in Temporal's history once."""

    def __init__(self, queue: str, lease: Lease, tenant: str) -> None:
        self.queue = queue
        self.lease = lease
        self.task_id = lease.task_id
        self.run_attempt = lease.attempt
        self.tenant = tenant

    def local(self) -> StoreJournal:
        return _host(self.queue).journal(self.lease, self.tenant)

    async def _op(self, op: str, **args: Any) -> Any:
        request = {"queue": self.queue, "lease": _lease_dict(self.lease), "tenant": self.tenant, "op": op, **args}
        return await workflow.execute_local_activity(
            journal_op, request, start_to_close_timeout=_LOCAL, retry_policy=_OP_RETRY
        )

    async def emit(self, type: str, data: dict[str, Any], *, durable: bool = True) -> None:
        if activity.in_activity():
            await self.local().emit(type, data, durable=durable)
        else:
            await self._op("emit", type=type, data=pydantic_core.to_jsonable_python(data))

    async def record_step(self, step: StepCheckpoint, events: Any) -> None:
        await self.local().record_step(step, events)

    async def set_state(self, key: str, value: Any, event: tuple[str, dict[str, Any]] | None) -> None:
        if activity.in_activity():
            await self.local().set_state(key, value, event)
        else:
            await self._op("set_state", key=key, value=value, event=list(event) if event else None)

    async def set_progress(self, fraction: float, step: str | None) -> None:
        if activity.in_activity():
            await self.local().set_progress(fraction, step)
        else:
            await self._op("set_progress", fraction=fraction, step=step)

    async def load_blob(self, ref: BlobRef) -> Any:
        return await _host(self.queue).store.load_blob(ref)

    def record_model_call(self, call: Any) -> None:
        self.local().record_model_call(call)

    async def begin_effect(self, effect: Any) -> Any:
        return await self.local().begin_effect(effect)

    async def settle_effect(self, key: str, status: Any, **kw: Any) -> None:
        await self.local().settle_effect(key, status, **kw)


@activity.defn(name="keel.journal")
async def journal_op(request: dict[str, Any]) -> Any:
    """A journal write made by workflow code (events, partial results, progress), and the run's own book-keeping:
    loading the task, renewing its lease, recording a step Temporal timed out, finishing or parking it."""
    host = _host(request["queue"])
    lease = Lease(**request["lease"])
    journal = host.journal(lease, request.get("tenant", ""))
    op = request["op"]
    try:
        if op == "emit":
            await journal.emit(request["type"], request["data"])
        elif op == "set_state":
            event = request.get("event")
            await journal.set_state(request["key"], request["value"], tuple(event) if event else None)
        elif op == "set_progress":
            await journal.set_progress(request["fraction"], request["step"])
        elif op == "load":
            return await _load(host, lease)
        elif op == "renew":
            state = await host.store.renew_lease(lease, time.time(), host.lease_s)
            return {"held": state.held, "cancel_requested": state.cancel_requested}
        elif op == "record_failed":
            await journal.record_step(_CHECKPOINT.validate_python(request["checkpoint"]), request["events"])
        elif op == "finish":
            await journal.drain()
            usage = await _tenant_usage(host, request["tenant"])
            envelope = request["envelope"]
            envelope["metadata"]["tenant_usage"] = usage
            await host.store.finish(lease, lease.task_id, TaskStatus(request["status"]), envelope, time.time())
            _forget(host, lease)
            host.notifier.notify(lease.task_id)
        elif op == "park":
            await journal.drain()
            requests = _DECISIONS.validate_python(request["requests"])
            await host.store.request_decisions(lease, requests, request["envelope"], time.time())
            _forget(host, lease)
            host.notifier.notify(lease.task_id)
        else:
            raise ApplicationError(f"unknown journal op {op!r}", non_retryable=True)
    except LeaseLost as exc:
        raise ApplicationError(str(exc), type="LeaseLost", non_retryable=True) from exc
    return None


def _forget(host: _Host, lease: Lease) -> None:
    host.journals.pop((lease.task_id, lease.token), None)


async def _load(host: _Host, lease: Lease) -> dict[str, Any]:
    task = await host.store.get_task(lease.task_id)
    if task is None:
        raise ApplicationError(f"no task {lease.task_id}", non_retryable=True)
    return {
        "task": _TASK.dump_python(task, mode="json"),
        "state": pydantic_core.to_jsonable_python(await host.store.load_state(task.id)),
        "decisions": _DECISIONS.dump_python(await host.store.load_decisions(task.id), mode="json"),
    }


async def _tenant_usage(host: _Host, tenant: str) -> dict[str, Any] | None:
    try:
        usage = await host.store.tenant_usage(tenant, time.time())
    except Exception:  # accounting must not fail a finished task
        log.exception("could not read tenant usage")
        return None
    return {"since": usage.since, "model_calls": usage.calls, "cost_usd": round(usage.cost_usd, 10)}


# -- steps as activities -------------------------------------------------------------------------------------------


@activity.defn(name="keel.step")
async def run_step(ref: str) -> dict[str, Any]:
    """Run one step (a try of it: Temporal retries), record its checkpoint and events in keel's store, and return
    the checkpoint. A step already recorded (by a run a crash interrupted) is returned as recorded, not re-run."""
    pending = _PENDING.get(ref)
    if pending is None:
        raise ApplicationError(f"step {ref} is not scheduled in this process", non_retryable=True)
    ctx, call = pending.ctx, pending.call
    journal = ctx._journal
    assert isinstance(journal, TemporalJournal)
    host = _host(journal.queue)
    if host.stopping:
        raise ApplicationError("interrupted: the worker is stopping", type="keel.interrupted", non_retryable=True)
    recorded = await _recorded(host.store, ctx.task_id, pending.key)
    if recorded is not None:
        return {"checkpoint": _CHECKPOINT.dump_python(recorded, mode="json"), "replayed": True}
    local = journal.local()
    attempt = activity.info().attempt
    scope = _Scope(key=pending.key, usage=step_usage(call.kind))
    scope.deferred = True
    if attempt == 1:
        await local.emit(
            "step_started", {"step": pending.key, "kind": call.kind, "attempt": journal.run_attempt}, durable=False
        )
    else:
        await local.emit("step_retrying", {"step": pending.key, "try": attempt})
    started = time.perf_counter()
    token = _scope.set(scope)
    me = asyncio.current_task()
    if me is not None:
        host.running.add(me)
    try:
        value = await _call(call.fn, copy.deepcopy(call.args))
    except asyncio.CancelledError:
        if host.stopping:
            raise ApplicationError(
                "interrupted: the worker is stopping", type="keel.interrupted", non_retryable=True
            ) from None
        raise
    except LeaseLost as exc:  # another run owns the task now: stop, do not retry
        raise ApplicationError(str(exc), type="LeaseLost", non_retryable=True) from exc
    except AwaitingDecision:
        raise
    except Exception as exc:
        await _fail_step(pending, journal, attempt, scope, started, exc)
    finally:
        _scope.reset(token)
        if me is not None:
            host.running.discard(me)
    cp = _checkpoint(pending, journal, attempt, scope, started, result=pydantic_core.to_jsonable_python(value))
    events = [
        ("step_completed", {"step": pending.key, "kind": call.kind, "tries": attempt, "duration_ms": cp.duration_ms}),
        ("budget", _budget(ctx, scope)),
    ]
    await local.record_step(cp, events)
    return {"checkpoint": _CHECKPOINT.dump_python(cp, mode="json"), "replayed": False}


async def _fail_step(
    pending: _Pending, journal: TemporalJournal, attempt: int, scope: _Scope, started: float, exc: Exception
) -> NoReturn:
    """A try failed: retry it through Temporal if the policy allows (honouring ``Retry-After``), else record the
    failed step, as the embedded engine does, and fail the activity for good."""
    call = pending.call
    policy = call.retry or DEFAULT_RETRY
    if attempt < policy.max_attempts and policy.is_retryable(exc):
        delay = timedelta(seconds=policy.wait_after(attempt, exc))
        raise ApplicationError(f"{type(exc).__name__}: {exc}", next_retry_delay=delay) from exc
    type_, message = classify(exc, call.timeout)
    error: dict[str, Any] = {"type": type_, "message": message}
    pointer = getattr(exc, "pointer", None)
    if pointer is not None:
        error["pointer"] = pointer
    cp = _checkpoint(pending, journal, attempt, scope, started, error=error)
    events = [
        ("step_failed", {"step": pending.key, "kind": call.kind, "tries": attempt, "error": cp.error}),
        ("budget", _budget(pending.ctx, scope)),
    ]
    await journal.local().record_step(cp, events)
    raise ApplicationError(
        message, _CHECKPOINT.dump_python(cp, mode="json"), type="keel.step_failed", non_retryable=True
    ) from exc


def _checkpoint(
    pending: _Pending,
    journal: TemporalJournal,
    tries: int,
    scope: _Scope,
    started: float,
    *,
    result: Any = None,
    error: dict[str, Any] | None = None,
) -> StepCheckpoint:
    return StepCheckpoint(
        key=pending.key,
        seq=pending.seq,
        fn=pending.fn_id,
        kind=pending.call.kind,
        status=StepStatus.failed if error is not None else StepStatus.completed,
        run_attempt=journal.run_attempt,
        tries=tries,
        result=result,
        error=error,
        usage=dict(scope.usage),
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        finished_at=time.time(),
    )


async def _recorded(store: Store, task_id: str, key: str) -> StepCheckpoint | None:
    for cp in await store.load_steps(task_id):
        if cp.key == key:
            if isinstance(cp.result, BlobRef):
                cp.result = await store.load_blob(cp.result)
            return cp
    return None


def _budget(ctx: WorkflowContext, scope: _Scope) -> dict[str, Any]:
    """The budget as it stands once this step's usage counts (the workflow adds it when the result arrives)."""
    meter = BudgetMeter(
        budget=ctx.meter.budget, deadline_at=ctx.meter.deadline_at, clock=time.time, used=copy.copy(ctx.meter.used)
    )
    meter.used.add(scope.usage)
    return meter.snapshot()


class TemporalSteps:
    """The context's step runner under Temporal: each step is a local activity of the task's workflow."""

    def __init__(self, workflow_run: KeelTask) -> None:
        self.run = workflow_run

    async def execute(self, ctx: WorkflowContext, call: StepCall, key: str, seq: int, fn_id: str) -> Any:
        ctx.meter.before_step(call.kind)
        ref = f"{workflow.info().run_id}/{key}"
        _PENDING[ref] = _Pending(ctx=ctx, call=call, key=key, seq=seq, fn_id=fn_id)
        policy = call.retry or DEFAULT_RETRY
        retry = TemporalRetry(
            initial_interval=timedelta(seconds=max(policy.initial_interval, 0.001)),
            backoff_coefficient=max(policy.backoff_coefficient, 1.0),
            maximum_interval=timedelta(seconds=max(policy.maximum_interval, policy.initial_interval, 0.001)),
            maximum_attempts=max(policy.max_attempts, 1),
        )
        whole = timedelta(seconds=call.timeout) if call.timeout else None
        try:
            out = await workflow.execute_local_activity(
                run_step,
                ref,
                retry_policy=retry,
                schedule_to_close_timeout=whole,  # the step's timeout covers its retries, as on the embedded engine
                start_to_close_timeout=whole or timedelta(hours=24),
            )
        except (ActivityError, ApplicationError) as exc:
            # A local activity's failure may arrive wrapped (ActivityError) or as the activity raised it.
            cp = await self._failed(ctx, call, key, seq, fn_id, exc)
            return await ctx.settle(cp, fn_id, call, replayed=False)
        finally:
            _PENDING.pop(ref, None)
        cp = _CHECKPOINT.validate_python(out["checkpoint"])
        # Replayed: recorded by keel before a crash, or read back from Temporal's history by a new worker.
        replayed = bool(out["replayed"]) or workflow.unsafe.is_replaying()
        return await ctx.settle(cp, fn_id, call, replayed=replayed)

    async def _failed(
        self, ctx: WorkflowContext, call: StepCall, key: str, seq: int, fn_id: str, exc: Exception
    ) -> StepCheckpoint:
        cause = exc.cause if isinstance(exc, ActivityError) else exc
        if isinstance(cause, CancelledError):
            raise asyncio.CancelledError
        if isinstance(cause, ApplicationError) and cause.type == "LeaseLost":
            raise LeaseLost(cause.message)
        if isinstance(cause, ApplicationError) and cause.type == "keel.interrupted":
            raise _WorkerStopping(cause.message)
        if isinstance(cause, ApplicationError) and cause.type == "keel.step_failed" and cause.details:
            return _CHECKPOINT.validate_python(cause.details[0])
        # Temporal gave up on it (its timeout ran out, or retries did): keel records the failure itself.
        if isinstance(cause, TemporalTimeout):
            type_, message = "timeout", f"timed out after {call.timeout:g} s" if call.timeout else "timed out"
        else:
            type_, message = "step_failed", str(cause or exc)
        journal = ctx._journal
        assert isinstance(journal, TemporalJournal)
        cp = StepCheckpoint(
            key=key,
            seq=seq,
            fn=fn_id,
            kind=call.kind,
            status=StepStatus.failed,
            run_attempt=journal.run_attempt,
            error={"type": type_, "message": message},
            usage=step_usage(call.kind),
            finished_at=workflow.now().timestamp(),
        )
        events = [["step_failed", {"step": key, "kind": call.kind, "tries": 1, "error": cp.error}]]
        await journal._op("record_failed", checkpoint=_CHECKPOINT.dump_python(cp, mode="json"), events=events)
        return cp


# -- the workflow ------------------------------------------------------------------------------------------------------


@workflow.defn(name="keel.task")
class KeelTask:
    """One keel task: load it, run its workflow function on a Temporal-backed context, and finish or park it in
    keel's store. The store lease taken by the dispatcher is renewed while it runs, and replaced (``adopt``) if it
    ran out meanwhile and the task was dispatched again."""

    def __init__(self) -> None:
        self.lease: Lease | None = None

    @workflow.signal(name="adopt")
    def adopt(self, lease: dict[str, Any]) -> None:
        self.lease = Lease(**lease)

    @workflow.run
    async def run(self, start: dict[str, Any]) -> str:
        queue = workflow.info().task_queue
        self.lease = Lease(**start["lease"])
        journal = TemporalJournal(queue, self.lease, "")
        snapshot = await journal._op("load")
        task = _TASK.validate_python(snapshot["task"])
        journal.tenant = task.tenant
        host = _host(queue)
        budget = Budget.from_dict(task.budget)
        ctx = WorkflowContext(
            journal=journal,
            state=snapshot["state"],
            budget=budget,
            started_at=task.started_at or task.created_at,
            deadline_at=task.created_at + budget.deadline_s if budget.deadline_s is not None else None,
            clock=lambda: workflow.now().timestamp(),
            progress=task.progress,
            models=host.models,
            tools=host.tools,
            policy=task.policy,
            decisions=_DECISIONS.validate_python(snapshot["decisions"]),
            services=host.services,
            tenant=task.tenant,
            steps=TemporalSteps(self),
        )
        return await self._execute(task, ctx, journal, host)

    async def _execute(self, task: Task, ctx: WorkflowContext, journal: TemporalJournal, host: _Host) -> str:
        started = time.perf_counter()
        wf = host.registry.get(task.workflow)
        extra: list[EnvelopeError] = []
        result: Any = None
        if wf is None:
            status = TaskStatus.failed
            extra.append(EnvelopeError(type="unknown_workflow", message=f"no workflow named {task.workflow!r}"))
        elif task.cancel_requested:
            status, result = TaskStatus.cancelled, ctx.partial or None
        else:
            from keel.orchestration.runtime import EmbeddedEngine

            run = asyncio.ensure_future(EmbeddedEngine._run(ctx, wf.fn, wf.input_model.model_validate(task.input)))
            cancelled = False
            heartbeat = asyncio.ensure_future(self._heartbeat(journal, run))
            try:
                result = await run
                status = finished_status(ctx)
            except asyncio.CancelledError:
                cancelled = True
            except LeaseLost:
                log.warning("lease on %s lost; its next dispatch resumes it from its checkpoints", task.id)
                return "lease_lost"
            except _WorkerStopping:
                raise  # fail this workflow task: another worker replays the workflow
            except AwaitingDecision as exc:
                heartbeat.cancel()
                return await self._park(task, ctx, journal, exc, started)
            except Exception as exc:
                status, result, error = _outcome(exc, ctx)
                extra.append(error)
            finally:
                heartbeat.cancel()
            if cancelled:
                status, result = TaskStatus.cancelled, ctx.partial or None
                extra.append(EnvelopeError(type="cancelled", message="the task was cancelled", severity="warning"))
        envelope = _validated(build_envelope(status, ctx, result, started, extra))
        await journal._op("finish", status=status.value, envelope=envelope)
        return status.value

    async def _heartbeat(self, journal: TemporalJournal, run: asyncio.Future[Any]) -> None:
        """Renew the store lease while the run goes on; a cancel asked through the store cancels the run."""
        every = _host(journal.queue).heartbeat_s
        while not run.done():
            await asyncio.sleep(every)  # a durable timer in workflow code
            if self.lease is not None and self.lease.token != journal.lease.token:
                journal.lease = self.lease  # dispatched again while away: adopt the new lease
            state = await journal._op("renew")
            if state["cancel_requested"]:
                run.cancel()
                return

    async def _park(
        self, task: Task, ctx: WorkflowContext, journal: TemporalJournal, exc: AwaitingDecision, started: float
    ) -> str:
        requests = [r for r in exc.requests if isinstance(r, Decision)]
        envelope = parked_envelope(task.id, ctx, requests, started)
        await journal._op("park", requests=_DECISIONS.dump_python(requests, mode="json"), envelope=envelope)
        return TaskStatus.waiting_for_approval.value


# -- the engine -------------------------------------------------------------------------------------------------


class TemporalEngine:
    """The :class:`~keel.orchestration.engine.Engine` seam on Temporal.

    With ``run_workers`` (a ``keel worker``, or one ``keel serve``) it runs a Temporal worker for the task queue and
    a dispatcher that starts the workflows of queued tasks; without (``keel serve --role api``) it only holds a
    client, to cancel tasks."""

    def __init__(
        self,
        store: Store,
        registry: WorkflowRegistry,
        *,
        address: str,
        namespace: str = "default",
        task_queue: str = "keel",
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
        run_workers: bool = True,
        graceful_shutdown_s: float = 5.0,
        store_lease_s: float | None = None,
    ) -> None:
        # Temporal decides whether a workflow is alive, and resumes it on another worker when one dies, within its
        # workflow task timeout. keel's store lease is then only a backstop (a workflow Temporal lost altogether):
        # long, so that dead workers do not count as attempts against the task's dead-letter limit.
        self.store_lease_s = store_lease_s or max(lease_s * 20, 300.0)
        self.graceful_shutdown_s = graceful_shutdown_s
        self.approval_ttl_s = approval_ttl_s
        self.sweep_s = sweep_s
        self.store = store
        self.registry = registry
        self.address = address
        self.namespace = namespace
        self.task_queue = task_queue
        self.workers = workers
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.models = models
        self.tools = tools or ToolCatalog()
        self.services = services
        self.run_workers = run_workers
        self.owner = f"temporal:{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}"
        self._client: Client | None = None
        self._worker: Worker | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._pending_cancels: set[asyncio.Task[None]] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        """One per workflow this process started, freeing its dispatch slot when the workflow ends."""

    async def start(self, *, recover: bool = True) -> None:
        """Connect, and with workers: serve the task queue and start dispatching. ``recover`` is accepted for the
        seam's sake: Temporal itself resumes what a dead worker was running."""
        try:
            self._client = await Client.connect(self.address, namespace=self.namespace)
        except Exception as exc:
            raise ConfigError(f"cannot reach Temporal at {self.address}: {exc}") from exc
        if not self.run_workers:
            return
        if self.task_queue in _HOSTS:
            raise ConfigError(f"task queue {self.task_queue!r} already has a keel engine in this process")
        _HOSTS[self.task_queue] = _Host(
            store=self.store,
            registry=self.registry,
            models=self.models,
            tools=self.tools,
            services=self.services,
            notifier=self.notifier,
            lease_s=self.store_lease_s,
            heartbeat_s=self.lease_s / 3,
        )
        self._worker = Worker(
            self._client,
            task_queue=self.task_queue,
            workflows=[KeelTask],
            activities=[run_step, journal_op],
            workflow_runner=UnsandboxedWorkflowRunner(),
            max_concurrent_workflow_tasks=max(self.workers, 2),
            # A workflow whose worker died waits this long on that worker's sticky queue before another takes it.
            sticky_queue_schedule_to_start_timeout=timedelta(seconds=max(self.lease_s / 3, 2)),
            max_concurrent_local_activities=max(self.workers * 8, 16),
            # On stop, running steps get this long to finish; then they are cancelled, and their workflows resume on
            # another worker (a step already recorded in keel's store is not run again).
            graceful_shutdown_timeout=timedelta(seconds=self.graceful_shutdown_s),
        )
        self._loops.append(asyncio.create_task(self._run_worker(self._worker)))
        self._loops.append(asyncio.create_task(self._dispatch()))
        self._loops.append(asyncio.create_task(self._sweeper()))

    async def _run_worker(self, worker: Worker) -> None:
        try:
            await worker.run()
        except Exception:
            log.exception("the Temporal worker stopped")

    async def stop(self) -> None:
        """Stop dispatching, give running steps ``graceful_shutdown_s`` to finish, then cancel them: their
        workflows resume on another worker, and only the interrupted steps run again."""
        for loop in self._loops[1:]:
            loop.cancel()
        if self._worker is not None:
            shutdown = asyncio.create_task(self._worker.shutdown())
            done, _ = await asyncio.wait({shutdown}, timeout=self.graceful_shutdown_s)
            host = _HOSTS.get(self.task_queue)
            if not done and host is not None:
                host.stopping = True
                for step in list(host.running):
                    step.cancel()
            with contextlib.suppress(Exception):
                await shutdown
        for task in [*self._loops, *self._watchers]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._watchers, *self._pending_cancels, return_exceptions=True)
        self._loops.clear()
        _HOSTS.pop(self.task_queue, None)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, task_id: str) -> None:
        """Cancel the task's workflow; the cancellation reaches its running step (the store's cancel flag, which the
        API sets first, is the fallback the workflow's heartbeat reads)."""
        if self._client is None:
            return
        handle = self._client.get_workflow_handle(task_id)
        job = asyncio.create_task(self._cancel(handle))
        self._pending_cancels.add(job)
        job.add_done_callback(self._pending_cancels.discard)

    @staticmethod
    async def _cancel(handle: Any) -> None:
        with contextlib.suppress(Exception):
            await handle.cancel()

    async def _sweeper(self) -> None:
        while True:
            try:
                for task_id in await sweep_expired(self.store, self.clock(), approval_ttl_s=self.approval_ttl_s):
                    self.notifier.notify(task_id)
                    self.wake()
            except Exception:
                log.exception("sweep failed")
            await asyncio.sleep(self.sweep_s)

    async def _dispatch(self) -> None:
        """Start the workflows of queued tasks, as many at a time as this process runs (``workers``): the rest wait
        in keel's queue, so a workflow Temporal hands over from a dead worker never queues behind a backlog."""
        assert self._client is not None
        slots = asyncio.Semaphore(self.workers)
        while True:
            await slots.acquire()
            try:
                lease = await self.store.lease_next(self.owner, self.clock(), self.store_lease_s, self.max_attempts)
            except Exception:
                log.exception("leasing failed; retrying")
                lease = None
            if lease is None:
                slots.release()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                continue
            try:
                handle = await self._client.start_workflow(
                    "keel.task",
                    {"lease": _lease_dict(lease)},
                    id=lease.task_id,
                    task_queue=self.task_queue,
                    task_timeout=timedelta(seconds=max(self.lease_s / 3, 2)),
                )
            except WorkflowAlreadyStartedError:
                # Its lease ran out while its workflow was away (all workers down); hand it the new one.
                slots.release()
                with contextlib.suppress(Exception):
                    await self._client.get_workflow_handle(lease.task_id).signal("adopt", _lease_dict(lease))
            except Exception:
                slots.release()
                log.exception("could not start the workflow of %s; it goes back to the queue", lease.task_id)
                with contextlib.suppress(Exception):
                    await self.store.release(lease)
            else:
                watcher = asyncio.create_task(self._until_done(handle, slots))
                self._watchers.add(watcher)
                watcher.add_done_callback(self._watchers.discard)
            self.notifier.notify(lease.task_id)

    @staticmethod
    async def _until_done(handle: Any, slots: asyncio.Semaphore) -> None:
        try:
            with contextlib.suppress(Exception):
                await handle.result()
        finally:
            slots.release()
