"""The embedded engine's queue: a wake-up goes to one idle worker, and none is lost while a worker looks."""

from __future__ import annotations

import asyncio
from typing import cast

from keel.memory.stores import Store
from keel.memory.types import Lease, NewTask
from keel.orchestration.engine.runner import TaskQueue
from keel.testing.inmemory import InMemoryStore


class CountingStore(InMemoryStore):
    """The in-memory store, counting lease attempts; ``gate`` (when set) holds an attempt's answer, already
    decided, until the test opens it."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0
        self.gate: asyncio.Event | None = None

    async def lease_next(self, owner: str, now: float, lease_s: float, max_attempts: int) -> Lease | None:
        self.attempts += 1
        lease = await super().lease_next(owner, now, lease_s, max_attempts)
        if self.gate is not None:
            await self.gate.wait()
        return lease


def queue_on(store: CountingStore, poll_s: float = 30.0) -> TaskQueue:
    return TaskQueue(
        store=cast(Store, store),
        owner="w",
        clock=lambda: 1.0,
        notify=lambda _: None,
        lease_s=30,
        max_attempts=3,
        poll_s=poll_s,
        approval_ttl_s=None,
        sweep_s=60,
    )


async def submit(store: CountingStore, queue: TaskQueue) -> None:
    await store.create_task(NewTask(tenant="t", workflow="w", input={}), None, 1.0)
    queue.wake()


async def test_a_queued_task_wakes_one_idle_worker_not_all() -> None:
    store = CountingStore()
    queue = queue_on(store)
    leases: list[Lease] = []

    async def worker() -> None:
        while True:
            lease = await queue.next_lease()
            if lease is not None:
                leases.append(lease)

    workers = [asyncio.create_task(worker()) for _ in range(4)]
    await asyncio.sleep(0.05)
    assert store.attempts == 4  # each looked once, found nothing, and waits (a 30 s poll: no timer fires here)
    await submit(store, queue)
    await asyncio.sleep(0.05)
    # One worker was woken and leased the task, then looked once more: 2 attempts, not one for each idle worker.
    assert len(leases) == 1 and store.attempts == 6
    for _ in range(3):
        await submit(store, queue)
    await asyncio.sleep(0.05)
    assert len(leases) == 4 and len({lease.task_id for lease in leases}) == 4
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


async def test_a_task_queued_while_a_worker_looks_is_not_left_for_the_next_poll() -> None:
    store = CountingStore()
    queue = queue_on(store)
    store.gate = asyncio.Event()
    looking = asyncio.create_task(queue.next_lease())
    await asyncio.sleep(0.01)  # the worker's lease attempt found nothing, and has not said so yet...
    await submit(store, queue)  # ...when a task is queued, and its wake-up finds no idle worker
    store.gate.set()
    first = await asyncio.wait_for(looking, 1)  # it does not wait out the 30 s poll: it returns to look again
    assert first is None
    second = await asyncio.wait_for(queue.next_lease(), 1)
    assert second is not None
