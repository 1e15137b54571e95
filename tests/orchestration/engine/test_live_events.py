"""Live events (tokens): they go to the store at once, ride one batch while the previous one commits, and wake
readers only once committed; a reader's wake-up is not lost while it reads, and an idle stream backs off its poll.
The crash side (a reader never sees a token the log could lose) is held by
``test_crash_resume.py::test_kill9_mid_stream_every_token_a_reader_saw_is_in_the_log``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

from keel.memory.stores import EventSpec, Store, Stores
from keel.memory.types import Event, Lease, NewTask
from keel.orchestration.engine.runner import StoreJournal
from keel.orchestration.engine.runtime import Notifier
from keel.service import Keel
from keel.settings import Settings
from keel.testing.inmemory import InMemoryStore

LEASE = Lease(task_id="tsk_1", owner="w", token=1, attempt=1)


class CommitByHand:
    """Just the event log, with each write's commit landing only when the test says so."""

    def __init__(self) -> None:
        self.appended: list[tuple[str, dict[str, Any]]] = []
        self.writes = 0
        self.pending: list[tuple[asyncio.Future[list[Event]], list[Event]]] = []

    def append_batch_nowait(self, lease: Lease, events: Sequence[EventSpec], now: float) -> asyncio.Future[list[Event]]:
        self.writes += 1
        future: asyncio.Future[list[Event]] = asyncio.get_running_loop().create_future()
        out = []
        for spec in events:
            self.appended.append((spec[0], spec[1]))
            out.append(Event(task_id=lease.task_id, seq=len(self.appended), type=spec[0], data=spec[1], created_at=now))
        self.pending.append((future, out))
        return future

    async def commit(self) -> None:
        """Land every write made so far, in order, and let their callbacks run."""
        pending, self.pending = self.pending, []
        for future, events in pending:
            future.set_result(events)
        await asyncio.sleep(0)


def journal(store: CommitByHand, notified: list[str]) -> StoreJournal:
    # An hour's hold: anything that reaches the store before the step ends got there without the timer.
    return StoreJournal(cast(Store, store), LEASE, lambda: 1.0, notified.append, hold_s=3600)


async def test_a_live_event_goes_to_the_store_at_once_and_wakes_readers_only_once_committed() -> None:
    store, notified = CommitByHand(), []
    j = journal(store, notified)
    await j.emit("token", {"i": 0}, durable=False, live=True)
    assert store.appended == [("token", {"i": 0})]
    await asyncio.sleep(0)
    assert notified == [], "a reader was woken before the commit"
    await store.commit()
    assert notified == ["tsk_1"]


async def test_live_events_emitted_while_a_commit_is_in_flight_ride_the_next_batch_together() -> None:
    store, notified = CommitByHand(), []
    j = journal(store, notified)
    await j.emit("token", {"i": 0}, durable=False, live=True)
    for i in range(1, 6):
        await j.emit("token", {"i": i}, durable=False, live=True)
    assert [d["i"] for _, d in store.appended] == [0], "one commit in flight per stream"
    await store.commit()
    assert [d["i"] for _, d in store.appended] == [0, 1, 2, 3, 4, 5]
    assert store.writes == 2, "the five that waited went as one write"
    assert notified == ["tsk_1"]
    await store.commit()
    assert notified == ["tsk_1", "tsk_1"], "one wake-up per batch, once its last event is committed"
    await j.emit("token", {"i": 6}, durable=False, live=True)
    assert [d["i"] for _, d in store.appended][-1] == 6, "nothing in flight: at once again"


async def test_a_held_step_start_goes_out_first_with_the_next_live_event() -> None:
    store, notified = CommitByHand(), []
    j = journal(store, notified)
    await j.emit("step_started", {"step": "s"}, durable=False)
    assert store.appended == [], "a step start still waits for its step's checkpoint (or the hold)"
    await j.emit("token", {"i": 0}, durable=False, live=True)
    assert [t for t, _ in store.appended] == ["step_started", "token"]


async def test_a_notify_during_the_read_still_wakes_the_watcher() -> None:
    """The reader clears, reads, then waits: a commit that lands while it reads is not lost (it would cost the
    reader a whole poll interval, up to the idle back-off's eight)."""
    notifier = Notifier()
    with notifier.watch("tsk_1") as watch:
        watch.woken.clear()
        notifier.notify("tsk_1")  # lands "during the read"
        await asyncio.wait_for(watch.woken.wait(), timeout=5)
    assert notifier._waiters == {}, "the watch is gone with its block"


def _events(*seqs: int) -> list[Event]:
    return [Event(task_id="tsk_1", seq=s, type="token", data={"i": s}, created_at=1.0) for s in seqs]


async def test_a_reader_takes_committed_events_that_follow_its_cursor_and_reads_the_log_across_a_gap() -> None:
    notifier = Notifier()
    with notifier.watch("tsk_1") as watch:
        notifier.committed("tsk_1", _events(3, 4))
        assert watch.woken.is_set()
        assert [e.seq for e in watch.take(2)] == [3, 4]
        assert watch.take(4) == []
        notifier.committed("tsk_1", _events(7, 8))  # 5 and 6 were written by a write that only notified
        assert watch.take(4) == [], "a gap: the reader must read the log"
        assert [e.seq for e in watch.take(6)] == [7, 8], "after reading 5 and 6 from the log"
        notifier.committed("tsk_1", _events(9))
        assert watch.take(12) == [] and watch.committed == [], "what the reader already has is dropped"


async def test_the_journal_hands_committed_tokens_to_readers_and_nothing_before_the_commit() -> None:
    store, notified = CommitByHand(), []
    notifier = Notifier()
    j = StoreJournal(cast(Store, store), LEASE, lambda: 1.0, notified.append, hold_s=3600, deliver=notifier.committed)
    with notifier.watch("tsk_1") as watch:
        await j.emit("token", {"i": 0}, durable=False, live=True)
        await asyncio.sleep(0)
        assert watch.committed == [] and not watch.woken.is_set()
        await store.commit()
        assert [(e.seq, e.data) for e in watch.take(0)] == [(1, {"i": 0})] and watch.woken.is_set()


async def test_an_idle_stream_polls_less_and_less_and_a_wakeup_still_reaches_it_at_once() -> None:
    store = InMemoryStore()
    unused = cast(Any, None)  # the seams a stream does not touch
    keel = Keel(
        settings=Settings(poll_interval_s=0.05),
        stores=Stores.over(store),
        notifier=Notifier(),
        registry=unused,
        runtime=unused,
        tools=unused,
        memory=unused,
        webhook_allow=unused,
        secrets=unused,
    )
    created = await store.create_task(NewTask(tenant="t", workflow="w", input={}), None, 1.0)
    assert created.task is not None
    task_id = created.task.id
    reads = 0
    read = store.read

    async def counted(task_id: str, after: int, limit: int = 500) -> list[Event]:
        nonlocal reads
        reads += 1
        return await read(task_id, after, limit)

    store.read = counted  # type: ignore[method-assign]
    stream = keel.events(task_id)
    assert (await anext(stream)).type == "status"
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(1.0)  # 20 poll intervals of idleness: 0.05, 0.1, 0.2, then 0.4 s apart
    assert 2 <= reads < 12, f"{reads} reads in 20 idle poll intervals: no back-off"
    lease = await store.lease_next("w", 2.0, 30, 5)
    assert lease is not None
    keel.notifier.notify(task_id)
    assert (await asyncio.wait_for(pending, timeout=5)).data["status"] == "running"
    await stream.aclose()
