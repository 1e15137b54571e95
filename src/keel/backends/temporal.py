"""Temporal as keel's distributed workflow engine (``KEEL_ENGINE=temporal``), behind the same seam as the
embedded one.

The mapping:

* **A keel task is a Temporal workflow** (``keel.task``, workflow id = task id). A dispatcher in each worker
  process leases queued tasks from keel's store and starts their workflows; the workflow renews that lease while
  it runs (as the embedded engine's heartbeat does), so keel's own queue, fencing and dead-lettering keep working.
* **Each ``ctx.step``, model call and tool call is a Temporal activity** (``keel.step``), scheduled by the
  workflow with the step's timeout (``schedule_to_close``) and its :class:`~keel.orchestration.engine.retry.RetryPolicy`
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pydantic_core
from pydantic import TypeAdapter
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy as TemporalRetry
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, WorkflowAlreadyStartedError
from temporalio.exceptions import TimeoutError as TemporalTimeout
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from keel.errors import AwaitingDecision, ConfigError, LeaseLost
from keel.memory.retrieval import Memory
from keel.memory.stores import Store
from keel.memory.types import BlobRef, Decision, EffectSettlement, Lease, StepCheckpoint, Task, TaskStatus
from keel.orchestration.engine.budget import BudgetMeter
from keel.orchestration.engine.context import (
    PendingStep,
    StepCall,
    StepScope,
    WorkflowContext,
    step_error,
    step_events,
    step_scope,
    step_usage,
)
from keel.orchestration.engine.retry import DEFAULT_RETRY
from keel.orchestration.engine.runner import HandedBack, Interruption, StoreJournal, TaskQueue, TaskRunner
from keel.orchestration.engine.runtime import Notifier
from keel.orchestration.engine.workflow import WorkflowRegistry
from keel.orchestration.llm.models import ModelRegistry
from keel.orchestration.tools import ToolCatalog
from keel.orchestration.tools.services import Services

log = logging.getLogger("keel.temporal")

__all__ = ["KeelTask", "TemporalEngine"]

_TASK = TypeAdapter(Task)
_CHECKPOINT = TypeAdapter(StepCheckpoint)
_DECISIONS = TypeAdapter(list[Decision])
_LOCAL = timedelta(seconds=60)
_WFT_POLLS = 2
"""Workflow-task pollers per worker (sticky and normal queue): a process's own workflows start eagerly, so the
pollers only take workflows handed over from other workers, and the rare workflow task that is not eager."""
_OP_RETRY = TemporalRetry(initial_interval=timedelta(milliseconds=200), maximum_attempts=10)


# -- what a worker process shares with the workflows and activities it runs -----------------------------------------


@dataclass(kw_only=True)
class _Host:
    store: Store
    runner: TaskRunner
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

    @contextlib.contextmanager
    def running_step(self) -> Iterator[None]:
        """Count the step this asyncio task runs among :attr:`running` while it runs."""
        me = asyncio.current_task()
        if me is not None:
            self.running.add(me)
        try:
            yield
        finally:
            if me is not None:
                self.running.discard(me)

    def journal(self, lease: Lease, tenant: str) -> StoreJournal:
        """The store-side journal of a run, one per task and lease in this process."""
        key = (lease.task_id, lease.token)
        found = self.journals.get(key)
        if found is None:
            found = StoreJournal(self.store, lease, time.time, self.notifier.notify, tenant=tenant)
            self.journals[key] = found
        return found


class _WorkerStopping(HandedBack):
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
    step: PendingStep
    journal: TemporalJournal


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

    async def emit(self, type: str, data: dict[str, Any], *, durable: bool = True, live: bool = False) -> None:
        if activity.in_activity():
            await self.local().emit(type, data, durable=durable, live=live)
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

    async def settle_effect(self, settlement: EffectSettlement) -> None:
        await self.local().settle_effect(settlement)


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
            return await _load(host.store, lease)
        elif op == "renew":
            state = await host.store.renew_lease(lease, time.time(), host.lease_s)
            return {"held": state.held, "cancel_requested": state.cancel_requested}
        elif op == "record_failed":
            await journal.record_step(_CHECKPOINT.validate_python(request["checkpoint"]), request["events"])
        elif op == "finish":
            await journal.finish(TaskStatus(request["status"]), request["envelope"])
            _forget(host, lease)
            host.notifier.notify(lease.task_id)
        elif op == "park":
            await journal.park(_DECISIONS.validate_python(request["requests"]), request["envelope"])
            _forget(host, lease)
            host.notifier.notify(lease.task_id)
        else:
            raise ApplicationError(f"unknown journal op {op!r}", non_retryable=True)
    except LeaseLost as exc:
        raise ApplicationError(str(exc), type="LeaseLost", non_retryable=True) from exc
    return None


def _forget(host: _Host, lease: Lease) -> None:
    host.journals.pop((lease.task_id, lease.token), None)


async def _load(store: Store, lease: Lease) -> dict[str, Any]:
    """What a run starts from: the task, its state and the decisions people made (read under the run's lease)."""
    task = await store.get_task(lease.task_id)
    if task is None:
        raise ApplicationError(f"no task {lease.task_id}", non_retryable=True)
    return {
        "task": _TASK.dump_python(task, mode="json"),
        "state": pydantic_core.to_jsonable_python(await store.load_state(task.id)),
        "decisions": _DECISIONS.dump_python(await store.load_decisions(task.id), mode="json"),
    }


# -- steps as activities -------------------------------------------------------------------------------------------


@activity.defn(name="keel.step")
async def run_step(ref: str) -> dict[str, Any]:
    """Run one step (a try of it: Temporal retries), record its checkpoint and events in keel's store, and return
    the checkpoint. A step already recorded (by a run a crash interrupted) is returned as recorded, not re-run."""
    pending = _PENDING.get(ref)
    if pending is None:
        raise ApplicationError(f"step {ref} is not scheduled in this process", non_retryable=True)
    ctx, step, journal = pending.ctx, pending.step, pending.journal
    call = step.call
    host = _host(journal.queue)
    if host.stopping:
        raise ApplicationError("interrupted: the worker is stopping", type="keel.interrupted", non_retryable=True)
    recorded = await _recorded(host.store, ctx.task_id, step.key)
    if recorded is not None:
        return {"checkpoint": _CHECKPOINT.dump_python(recorded, mode="json"), "replayed": True}
    local = journal.local()
    attempt = activity.info().attempt
    if attempt == 1:
        await local.emit(
            "step_started", {"step": step.key, "kind": call.kind, "attempt": journal.run_attempt}, durable=False
        )
    else:
        await local.emit("step_retrying", {"step": step.key, "try": attempt})
    started = time.perf_counter()
    error: dict[str, Any] | None = None
    with step_scope(step.key, call.kind, deferred=True) as scope, host.running_step():
        try:
            value = await call.attempt()
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
            _retry_if_allowed(call, attempt, exc)
            error, cause = step_error(exc, call.timeout), exc
    result = pydantic_core.to_jsonable_python(value) if error is None else None
    cp = step.checkpoint(
        tries=attempt, usage=scope.usage, started=started, finished_at=time.time(), result=result, error=error
    )
    await local.record_step(cp, step_events(cp, _budget(ctx, scope)))
    recorded_cp = _CHECKPOINT.dump_python(cp, mode="json")
    if error is not None:
        # Failed for good, as the embedded engine records it: the activity fails without another try.
        raise ApplicationError(error["message"], recorded_cp, type="keel.step_failed", non_retryable=True) from cause
    return {"checkpoint": recorded_cp, "replayed": False}


def _retry_if_allowed(call: StepCall, attempt: int, exc: Exception) -> None:
    """A try failed: have Temporal try again if the policy allows, after the policy's wait (honouring
    ``Retry-After``: Temporal's own backoff is not used)."""
    policy = call.retry or DEFAULT_RETRY
    if attempt < policy.max_attempts and policy.is_retryable(exc):
        delay = timedelta(seconds=policy.wait_after(attempt, exc))
        raise ApplicationError(f"{type(exc).__name__}: {exc}", next_retry_delay=delay) from exc


async def _recorded(store: Store, task_id: str, key: str) -> StepCheckpoint | None:
    for cp in await store.load_steps(task_id):
        if cp.key == key:
            if isinstance(cp.result, BlobRef):
                cp.result = await store.load_blob(cp.result)
            return cp
    return None


def _budget(ctx: WorkflowContext, scope: StepScope) -> dict[str, Any]:
    """The budget as it stands once this step's usage counts (the workflow adds it when the result arrives)."""
    meter = BudgetMeter(
        budget=ctx.meter.budget, deadline_at=ctx.meter.deadline_at, clock=time.time, used=copy.copy(ctx.meter.used)
    )
    meter.used.add(scope.usage)
    return meter.snapshot()


class TemporalSteps:
    """The context's step runner under Temporal: each step is a local activity of the task's workflow."""

    def __init__(self, journal: TemporalJournal) -> None:
        self.journal = journal

    async def execute(self, ctx: WorkflowContext, step: PendingStep) -> Any:
        call = step.call
        ctx.meter.before_step(call.kind)
        ref = f"{workflow.info().run_id}/{step.key}"
        _PENDING[ref] = _Pending(ctx=ctx, step=step, journal=self.journal)
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
            cp = await self._failed(step, exc)
            return await ctx.settle(cp, step.fn_id, call, replayed=False)
        finally:
            _PENDING.pop(ref, None)
        cp = _CHECKPOINT.validate_python(out["checkpoint"])
        # Replayed: recorded by keel before a crash, or read back from Temporal's history by a new worker.
        replayed = bool(out["replayed"]) or workflow.unsafe.is_replaying()
        return await ctx.settle(cp, step.fn_id, call, replayed=replayed)

    async def _failed(self, step: PendingStep, exc: Exception) -> StepCheckpoint:
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
        timeout = step.call.timeout
        if isinstance(cause, TemporalTimeout):
            type_, message = "timeout", f"timed out after {timeout:g} s" if timeout else "timed out"
        else:
            type_, message = "step_failed", str(cause or exc)
        cp = step.checkpoint(
            tries=1,
            usage=step_usage(step.call.kind),
            started=None,
            finished_at=workflow.now().timestamp(),
            error={"type": type_, "message": message},
        )
        events = [["step_failed", {"step": step.key, "kind": step.call.kind, "tries": 1, "error": cp.error}]]
        await self.journal._op("record_failed", checkpoint=_CHECKPOINT.dump_python(cp, mode="json"), events=events)
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
        runner = _host(queue).runner
        ctx = runner.context(
            task,
            journal,
            clock=lambda: workflow.now().timestamp(),
            state=snapshot["state"],
            decisions=_DECISIONS.validate_python(snapshot["decisions"]),
            steps=TemporalSteps(journal),
        )
        status = await runner.run(task, ctx, _TemporalRun(self, journal))
        return status.value if status is not None else "lease_lost"


class _TemporalRun:
    """Temporal's side of one run (:class:`~keel.orchestration.engine.runner.RunHost`), in workflow code: the heartbeat
    is a durable timer, and the run's end is written to keel's store by an activity, so Temporal records it once."""

    def __init__(self, task: KeelTask, journal: TemporalJournal) -> None:
        self.task = task
        self.journal = journal

    @contextlib.contextmanager
    def watch(self, run: asyncio.Future[Any]) -> Iterator[None]:
        heartbeat = asyncio.ensure_future(self._heartbeat(run))
        try:
            yield
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, run: asyncio.Future[Any]) -> None:
        """Renew the store lease while the run goes on; a cancel asked through the store cancels the run."""
        journal = self.journal
        every = _host(journal.queue).heartbeat_s
        while not run.done():
            await asyncio.sleep(every)  # a durable timer in workflow code
            adopted = self.task.lease
            if adopted is not None and adopted.token != journal.lease.token:
                journal.lease = adopted  # dispatched again while away: adopt the new lease
            state = await journal._op("renew")
            if state["cancel_requested"]:
                run.cancel()
                return

    async def interrupted(self) -> Interruption:
        """Only a cancel reaches workflow code: a stopping worker fails the workflow task instead (HandedBack)."""
        return Interruption.cancelled

    async def finish(self, status: TaskStatus, envelope: dict[str, Any]) -> None:
        await self.journal._op("finish", status=status.value, envelope=envelope)

    async def park(self, requests: list[Decision], envelope: dict[str, Any]) -> None:
        await self.journal._op("park", requests=_DECISIONS.dump_python(requests, mode="json"), envelope=envelope)


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
        services: Services | None = None,
        memory: Memory | None = None,
        approval_ttl_s: float | None = 72 * 3600,
        sweep_s: float = 60.0,
        task_retention_s: float | None = None,
        run_workers: bool = True,
        graceful_shutdown_s: float = 5.0,
        store_lease_s: float | None = None,
    ) -> None:
        # Temporal decides whether a workflow is alive, and resumes it on another worker when one dies, within its
        # workflow task timeout. keel's store lease is then only a backstop (a workflow Temporal lost altogether):
        # long, so that dead workers do not count as attempts against the task's dead-letter limit.
        self.store_lease_s = store_lease_s or max(lease_s * 20, 300.0)
        self.graceful_shutdown_s = graceful_shutdown_s
        self.store = store
        self.runner = TaskRunner(registry=registry, models=models, tools=tools or ToolCatalog(), services=services)
        self.address = address
        self.namespace = namespace
        self.task_queue = task_queue
        self.workers = workers
        self.lease_s = lease_s
        self.notifier = notifier or Notifier()
        self.queue = TaskQueue(
            store=store,
            owner=f"temporal:{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}",
            clock=clock,
            notify=self.notifier.notify,
            lease_s=self.store_lease_s,
            max_attempts=max_attempts,
            poll_s=poll_s,
            approval_ttl_s=approval_ttl_s,
            sweep_s=sweep_s,
            memory=memory,
            task_retention_s=task_retention_s,
        )
        self.run_workers = run_workers
        self._client: Client | None = None
        self._worker: Worker | None = None
        self._loops: list[asyncio.Task[None]] = []
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
            runner=self.runner,
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
            # Room for this process's own workflows (started eagerly: their first workflow task takes a slot here,
            # and is refused eager execution when none is free), as many handed over from other workers, and the
            # pollers, which hold a slot each while they wait.
            max_concurrent_workflow_tasks=self.workers * 2 + _WFT_POLLS,
            max_concurrent_workflow_task_polls=_WFT_POLLS,
            # A workflow whose worker died waits this long on that worker's sticky queue before another takes it.
            sticky_queue_schedule_to_start_timeout=timedelta(seconds=max(self.lease_s / 3, 2)),
            max_concurrent_local_activities=max(self.workers * 8, 16),
            # Every step and journal write is a local activity: polling for remote ones would only cost this process
            # and the server a long poll each, all the time.
            no_remote_activities=True,
            # On stop, running steps get this long to finish; then they are cancelled, and their workflows resume on
            # another worker (a step already recorded in keel's store is not run again).
            graceful_shutdown_timeout=timedelta(seconds=self.graceful_shutdown_s),
        )
        self._loops.append(asyncio.create_task(self._run_worker(self._worker)))
        self._loops.append(asyncio.create_task(self._dispatch()))
        self._loops.append(asyncio.create_task(self.queue.sweep_forever()))

    async def ping(self) -> None:
        """Fails when the Temporal frontend does not answer a health check (``/readyz``)."""
        if self._client is None:
            raise ConfigError("not connected to Temporal")
        await self._client.service_client.check_health()

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
        self.queue.wake()

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

    async def _dispatch(self) -> None:
        """Start the workflows of queued tasks, as many at a time as this process runs (``workers``): the rest wait
        in keel's queue, so a workflow Temporal hands over from a dead worker never queues behind a backlog.

        The start asks for eager execution: when this process's worker has a free workflow-task slot, Temporal
        returns the first workflow task with the start's reply and this worker runs it at once, without a trip
        through the task queue (a server that does not offer it queues the task, as before). Either way the
        workflow task is Temporal's: if this process dies, it times out and another worker takes it.

        One start at a time, and nothing else between the lease and the start: a task leased but not yet started
        is held by the store's long lease until it runs out (``store_lease_s``), so a process killed in that window
        strands it that long. The scale-out crash test stranded tasks when starts ran concurrently."""
        assert self._client is not None
        slots = asyncio.Semaphore(self.workers)
        while True:
            await slots.acquire()
            lease = await self.queue.next_lease()
            if lease is None:
                slots.release()
                continue
            try:
                handle = await self._client.start_workflow(
                    "keel.task",
                    {"lease": _lease_dict(lease)},
                    id=lease.task_id,
                    task_queue=self.task_queue,
                    task_timeout=timedelta(seconds=max(self.lease_s / 3, 2)),
                    request_eager_start=True,
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
