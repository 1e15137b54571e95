"""The embedded engine: an in-process worker pool that leases tasks from the durable queue.

Each run holds its lease with heartbeats; every write it makes is fenced by the lease's token, so a worker
whose lease expired cannot commit. A cancel request reaches the running coroutine as asyncio cancellation.
How a run goes, from its context to its end, is the task runner's (:mod:`keel.orchestration.engine.runner`), which
Temporal shares; this module adds what is the embedded engine's own: workers in this process, and heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.errors import LeaseLost
from keel.memory.retrieval import Memory
from keel.memory.stores import Store
from keel.memory.types import Decision, Event, Lease, TaskStatus
from keel.orchestration.engine.runner import Interruption, StoreJournal, TaskQueue, TaskRunner, sweep_expired
from keel.orchestration.engine.workflow import WorkflowRegistry
from keel.orchestration.llm.models import ModelRegistry
from keel.orchestration.tools import ToolCatalog
from keel.orchestration.tools.services import Services

__all__ = ["EmbeddedEngine", "Notifier", "StoreJournal", "Watch", "sweep_expired"]

log = logging.getLogger("keel.runtime")


@dataclass(eq=False, slots=True)
class Watch:
    """What a reader watching a task hears: ``woken`` is set by every notify, and ``committed`` collects the events
    this process committed for the task meanwhile (tokens: :meth:`Notifier.committed`), so the reader can pass them
    on without reading them back from the log."""

    woken: asyncio.Event = field(default_factory=asyncio.Event)
    committed: list[Event] = field(default_factory=list)

    def take(self, cursor: int) -> list[Event]:
        """The committed events that follow ``cursor`` without a gap (a write that only notified leaves one: then
        nothing, and the reader reads the log)."""
        pending = [e for e in self.committed if e.seq > cursor]
        run = [e for i, e in enumerate(pending) if e.seq == cursor + 1 + i]
        self.committed = pending[len(run) :]
        return run


class Notifier:
    """In-process wake-ups for SSE readers; the durable log stays the source of truth."""

    MAX_HELD = 2000
    """Committed events held for one slow reader; past that it reads them from the log instead."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[Watch]] = {}

    def notify(self, task_id: str) -> None:
        for w in self._waiters.get(task_id, ()):
            w.woken.set()

    def committed(self, task_id: str, events: Sequence[Event]) -> None:
        """``events`` are committed (consecutive seqs): hand them to this process's readers, then wake them all
        (:meth:`notify`, which a fan-out subclass also publishes)."""
        for w in self._waiters.get(task_id, ()):
            if len(w.committed) < self.MAX_HELD:
                w.committed.extend(events)
            else:
                w.committed.clear()
        self.notify(task_id)

    async def wait(self, task_id: str, timeout: float) -> None:
        with self.watch(task_id) as w:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(w.woken.wait(), timeout)

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[Watch]:
        """A :class:`Watch` of the task while the block runs. A reader clears ``woken``, takes what was committed
        or reads the log, then waits on ``woken``: a commit that lands during the read still wakes it (with
        :meth:`wait` alone, a notify between the read and the wait is lost, and the reader sleeps a whole poll
        interval)."""
        w = Watch()
        self._waiters.setdefault(task_id, set()).add(w)
        try:
            yield w
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(w)
                if not waiters:
                    del self._waiters[task_id]


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
        services: Services | None = None,
        memory: Memory | None = None,
        approval_ttl_s: float | None = 72 * 3600,
        sweep_s: float = 60.0,
        task_retention_s: float | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``sleep`` is how step retries wait out their backoff: tests pass a fast one. ``memory``: the memory
        layer whose expired sessions and chunks the sweeper deletes through its own handles (None: the store's)."""
        self.store = store
        self.runner = TaskRunner(
            registry=registry, models=models, tools=tools or ToolCatalog(), services=services, sleep=sleep
        )
        self.workers = workers
        self.lease_s = lease_s
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.queue = TaskQueue(
            store=store,
            owner=f"{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}",
            clock=clock,
            notify=self.notifier.notify,
            lease_s=lease_s,
            max_attempts=max_attempts,
            poll_s=poll_s,
            approval_ttl_s=approval_ttl_s,
            sweep_s=sweep_s,
            memory=memory,
            task_retention_s=task_retention_s,
        )
        self._loops: list[asyncio.Task[None]] = []
        self._runs: dict[str, asyncio.Future[Any]] = {}
        self._cancel_requested: set[str] = set()
        self._stopping = False

    @property
    def models(self) -> ModelRegistry | None:
        return self.runner.models

    @property
    def services(self) -> Services | None:
        return self.runner.services

    async def start(self, *, recover: bool = True) -> None:
        if recover:
            n = await self.store.requeue_running()
            if n:
                log.info("re-queued %d task(s) left running by a dead process", n)
        self._loops = [asyncio.create_task(self._worker(i), name=f"keel-worker-{i}") for i in range(self.workers)]
        self._loops.append(asyncio.create_task(self.queue.sweep_forever(), name="keel-sweeper"))

    async def stop(self) -> None:
        self._stopping = True
        for run in list(self._runs.values()):
            run.cancel()
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    def wake(self) -> None:
        self.queue.wake()

    def cancel(self, task_id: str) -> None:
        run = self._runs.get(task_id)
        if run is not None:
            self._cancel_requested.add(task_id)
            run.cancel()

    async def sweep_once(self) -> None:
        """See :func:`~keel.orchestration.engine.runner.sweep_expired`; tasks whose approvals expired are woken."""
        await self.queue.sweep_once()

    async def _worker(self, index: int) -> None:
        while not self._stopping:
            lease = await self.queue.next_lease()
            if lease is None:
                continue
            self.notifier.notify(lease.task_id)
            await self._execute(lease)

    async def _execute(self, lease: Lease) -> None:
        # Four independent reads at once: a run starts after the slowest, not after the four in turn (each is a
        # hop to a reader thread on SQLite, a round trip on Postgres).
        store, task_id = self.store, lease.task_id
        task, history, state, decisions = await asyncio.gather(
            store.get_task(task_id), store.load_steps(task_id), store.load_state(task_id), store.load_decisions(task_id)
        )
        if task is None:
            return
        journal = StoreJournal(
            self.store, lease, self.clock, self.notifier.notify, tenant=task.tenant, deliver=self.notifier.committed
        )
        ctx = self.runner.context(task, journal, clock=self.clock, history=history, state=state, decisions=decisions)
        try:
            await self.runner.run(task, ctx, _EmbeddedRun(self, journal))
        finally:
            journal.close()


class _EmbeddedRun:
    """The embedded engine's side of one run (:class:`~keel.orchestration.engine.runner.RunHost`): heartbeats from this
    process, and the run's end written straight to the store."""

    def __init__(self, engine: EmbeddedEngine, journal: StoreJournal) -> None:
        self.engine = engine
        self.journal = journal
        self.lease = journal.lease
        self.task_id = journal.task_id

    @contextlib.contextmanager
    def watch(self, run: asyncio.Future[Any]) -> Iterator[None]:
        engine = self.engine
        engine._runs[self.task_id] = run
        heartbeat = asyncio.create_task(self._heartbeat(run))
        try:
            yield
        finally:
            heartbeat.cancel()
            engine._runs.pop(self.task_id, None)
            engine._cancel_requested.discard(self.task_id)

    async def _heartbeat(self, run: asyncio.Future[Any]) -> None:
        engine = self.engine
        while True:
            await asyncio.sleep(engine.lease_s / 3)
            state = await engine.store.renew_lease(self.lease, engine.clock(), engine.lease_s)
            if not state.held:
                log.warning("lost lease on %s; abandoning the run", self.task_id)
                run.cancel()
                return
            if state.cancel_requested:
                engine._cancel_requested.add(self.task_id)
                run.cancel()
                return

    async def interrupted(self) -> Interruption:
        """By its user (cancelled), by a graceful stop or a lost lease (handed back: the next owner resumes it),
        or with this worker itself (engine stopped)."""
        engine = self.engine
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            if engine._stopping:
                with contextlib.suppress(Exception):
                    await asyncio.shield(engine.store.release(self.lease))
            return Interruption.engine_stopped
        if self.task_id in engine._cancel_requested:
            return Interruption.cancelled
        if engine._stopping:
            with contextlib.suppress(Exception):
                await engine.store.release(self.lease)
        return Interruption.handed_back

    async def finish(self, status: TaskStatus, envelope: dict[str, Any]) -> None:
        await self._end("finishing", self.journal.finish(status, envelope))

    async def park(self, requests: list[Decision], envelope: dict[str, Any]) -> None:
        await self._end("parking it", self.journal.park(requests, envelope))

    async def _end(self, what: str, write: Awaitable[None]) -> None:
        """Write the run's end; a lease lost by then means another worker owns the task, and it writes the end."""
        try:
            await write
        except LeaseLost:
            log.warning("lease on %s lost before %s; another worker owns it", self.task_id, what)
            return
        self.engine.notifier.notify(self.task_id)
