"""The embedded runtime: an in-process worker pool that leases tasks from the durable queue.

Each run holds its lease with heartbeats; every write it makes is fenced by the lease's token, so a worker
whose lease expired cannot commit. A cancel request reaches the running coroutine as asyncio cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from keel.errors import LeaseLost, WorkflowError
from keel.memory.stores import Store
from keel.memory.types import Lease, TaskStatus
from keel.orchestration.envelope import Envelope, build_envelope
from keel.orchestration.workflow import EnvelopeError, WorkflowContext, WorkflowRegistry

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


class _Cancelled(Exception):
    pass


class Runtime:
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
    ) -> None:
        self.store = store
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

    async def _sweeper(self, every_s: float = 300.0) -> None:
        """Expired idempotency keys are removed; they are never honoured past their expiry anyway."""
        while True:
            try:
                removed = await self.store.sweep_idempotency(self.clock())
                if removed:
                    log.info("swept %d expired idempotency key(s)", removed)
            except Exception:
                log.exception("idempotency sweep failed")
            await asyncio.sleep(every_s)

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

    async def _execute(self, lease: Lease) -> None:
        task = await self.store.get_task(lease.task_id)
        if task is None:
            return
        started = time.perf_counter()
        ctx = WorkflowContext(
            lease=lease,
            store=self.store,
            events=self.store,
            checkpoints=await self.store.load_checkpoints(task.id),
            clock=self.clock,
            on_event=self.notifier.notify,
            progress=task.progress,
        )
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
            run: asyncio.Task[Any] = asyncio.create_task(wf.fn(ctx, wf.input_model.model_validate(task.input)))
            self._runs[task.id] = run
            hb = asyncio.create_task(self._heartbeat(lease, run))
            try:
                result = await run
                status = TaskStatus.partial_success if ctx.errors else TaskStatus.succeeded
            except asyncio.CancelledError:
                if task.id not in self._cancel_requested:
                    # Shutdown or a lost lease: leave the task for the next owner, write nothing terminal.
                    if self._stopping:
                        with contextlib.suppress(Exception):
                            await self.store.release(lease)
                    return
                status, result = TaskStatus.cancelled, ctx.partial or None
                extra.append(EnvelopeError(type="cancelled", message="the task was cancelled", severity="warning"))
            except LeaseLost:
                return
            except WorkflowError as exc:
                status, result = TaskStatus.failed, ctx.partial or None
                extra.append(EnvelopeError(type=exc.type, message=exc.message, step=exc.step))
            except Exception as exc:
                log.exception("workflow %s crashed on task %s", task.workflow, task.id)
                status, result = TaskStatus.failed, ctx.partial or None
                extra.append(EnvelopeError(type="internal_error", message=f"{type(exc).__name__}: {exc}"))
            finally:
                hb.cancel()
                self._runs.pop(task.id, None)
        self._cancel_requested.discard(task.id)
        envelope = build_envelope(status, ctx, result, started, extra)
        try:
            await self.store.finish(lease, task.id, status, _validated(envelope), self.clock())
        except LeaseLost:
            log.warning("lease on %s lost before finishing; another worker owns it", task.id)
            return
        self.notifier.notify(task.id)


def _validated(envelope: dict[str, Any]) -> dict[str, Any]:
    # The envelope is checked against its public schema before anything can deliver it.
    return Envelope.model_validate(envelope).model_dump(mode="json")
