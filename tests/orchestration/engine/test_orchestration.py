"""The orchestration engine end to end: durable steps, deterministic replay, retries, parallel branches, budgets,
cancellation and out-of-line blobs, on the embedded engine over both the in-memory and the SQLite store."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
from pydantic import BaseModel, ConfigDict

from engine_support import engine_for, wait_terminal
from keel.backends.sqlite import SQLiteStore
from keel.errors import LeaseLost, Nondeterminism, UpstreamError
from keel.memory.types import BlobRef, Event, NewTask, StepCheckpoint, Task, TaskStatus
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.replay import load_history, replay
from keel.orchestration.engine.retry import RetryPolicy
from keel.orchestration.engine.runtime import EmbeddedEngine
from keel.orchestration.engine.workflow import Workflow, workflow
from keel.orchestration.llm.planner import Plan
from keel.orchestration.tools import Tool, ToolCatalog
from keel.testing.inmemory import InMemoryStore
from keel.testing.loop import LoopTicks
from keel.testing.models import FunctionModel

TENANT = "t"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=0)


class Empty(BaseModel):
    pass


class Seed(BaseModel):
    seed: int


class Items(BaseModel):
    items: list[int]
    doc: dict[str, Any] = {}


# -- harness ---------------------------------------------------------------------------------------------------


class Stores:
    """Handles on one durable state: the same object for the in-memory store, a fresh connection for SQLite
    (what a restarted process would open)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.path = tmp_path / "k.db"
        self._memory = InMemoryStore()
        self._open: list[SQLiteStore] = []

    def open(self) -> Any:
        if self.kind == "memory":
            return self._memory
        store = SQLiteStore(self.path)
        self._open.append(store)
        return store

    async def close(self, store: Any) -> None:
        if store in self._open:
            self._open.remove(store)
            await store.aclose()

    async def close_all(self) -> None:
        for store in list(self._open):
            await self.close(store)


@pytest.fixture(params=["memory", "sqlite"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    s = Stores(request.param, tmp_path)
    try:
        yield s
    finally:
        await s.close_all()


@pytest.fixture
async def store(stores: Stores) -> Any:
    return stores.open()


@pytest.fixture
def mem() -> InMemoryStore:
    return InMemoryStore()


async def submit(store: Any, name: str, inp: dict[str, Any] | None = None, budget: dict[str, Any] | None = None) -> str:
    res = await store.create_task(
        NewTask(tenant=TENANT, workflow=name, input=inp or {}, budget=budget or {}), None, time.time()
    )
    return str(res.task.id)


async def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def wait_event(store: Any, task_id: str, type: str, step: str | None = None, timeout: float = 10.0) -> Event:
    deadline = time.monotonic() + timeout
    while True:
        for ev in await store.read(task_id, 0, limit=10000):
            if ev.type == type and (step is None or ev.data.get("step") == step):
                return ev
        if time.monotonic() > deadline:
            raise AssertionError(f"no {type} event for step {step} after {timeout}s")
        await asyncio.sleep(0.005)


async def run_workflow(
    store: Any,
    wf: Workflow[Any],
    inp: dict[str, Any] | None = None,
    budget: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> tuple[Task, list[Event]]:
    engine = engine_for(store, wf)
    task_id = await submit(store, wf.name, inp, budget)
    await engine.start()
    try:
        task = await wait_terminal(store, task_id, timeout)
    finally:
        await engine.stop()
    return task, await store.read(task_id, 0, limit=10000)


async def hard_crash(engine: EmbeddedEngine) -> None:
    """Kill an engine the way a dead process stops: its runs and loops stop, nothing is released or finished."""
    tasks = [*engine._runs.values(), *engine._loops]
    for _ in range(500):
        live = [t for t in tasks if not t.done()]
        if not live:
            return
        for t in live:
            t.cancel()
        await asyncio.sleep(0.01)
    raise AssertionError("engine tasks would not stop")


def live_code() -> set[str]:
    """Qualified names of every coroutine some asyncio task is currently running (whole await chains)."""
    names: set[str] = set()
    for task in asyncio.all_tasks():
        coro: Any = task.get_coro()
        while coro is not None:
            code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
            if code is not None:
                names.add(code.co_qualname)
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return names


def types_of(task: Task) -> list[str]:
    assert task.envelope is not None
    return [e["type"] for e in task.envelope["errors"]]


def steps_of(task: Task) -> list[dict[str, Any]]:
    assert task.envelope is not None
    return list(task.envelope["metadata"]["steps"])


def step_named(task: Task, name: str) -> dict[str, Any]:
    matches = [s for s in steps_of(task) if s["name"] == name]
    assert len(matches) == 1, (name, steps_of(task))
    return matches[0]


def of_type(events: list[Event], type: str) -> list[Event]:
    return [e for e in events if e.type == type]


# -- 1. durable steps: a completed step is not executed again on resume -------------------------------------------


@pytest.mark.parametrize("how", ["crash", "graceful"])
async def test_completed_steps_are_not_reexecuted_on_resume(stores: Stores, how: str) -> None:
    calls: Counter[str] = Counter()
    never = asyncio.Event()
    observed: list[list[Any]] = []

    async def one(x: int) -> int:
        calls["one"] += 1
        return x + 1

    async def two(x: int) -> int:
        calls["two"] += 1
        return x * 10

    async def three(x: int) -> int:
        calls["three"] += 1
        if calls["three"] == 1:
            await never.wait()  # the first run dies here
        return x + 7

    @workflow(name="three-steps")
    async def wf(ctx: WorkflowContext, inp: Empty) -> dict[str, Any]:
        seen = [ctx.now(), str(ctx.uuid()), ctx.random()]
        a = await ctx.step("one", one, 1)
        b = await ctx.step("two", two, a)
        seen += [ctx.now(), str(ctx.uuid()), ctx.random()]
        observed.append(seen)
        c = await ctx.step("three", three, b)
        return {"a": a, "b": b, "c": c}

    store1 = stores.open()
    engine1 = engine_for(store1, wf)
    task_id = await submit(store1, "three-steps")
    await engine1.start()
    await wait_event(store1, task_id, "step_completed", "two")
    await wait_until(lambda: calls["three"] == 1, what="step three to start")
    if how == "crash":
        await hard_crash(engine1)
        left = await store1.get_task(task_id)
        assert left is not None and left.status is TaskStatus.running  # nothing was released: a dead owner
    else:
        await engine1.stop()
        left = await store1.get_task(task_id)
        assert left is not None and left.status is TaskStatus.queued  # graceful stop hands it back
    await stores.close(store1)

    store2 = stores.open()
    engine2 = engine_for(store2, wf)
    await engine2.start(recover=True)
    try:
        task = await wait_terminal(store2, task_id)
    finally:
        await engine2.stop()

    assert task.status is TaskStatus.succeeded
    assert task.envelope is not None and task.envelope["result"] == {"a": 2, "b": 20, "c": 27}
    assert calls == Counter({"one": 1, "two": 1, "three": 2})
    assert [(s["name"], s["status"], s["replayed"]) for s in steps_of(task)] == [
        ("one", "completed", True),
        ("two", "completed", True),
        ("three", "completed", False),
    ]
    if how == "crash":  # the crashed run counts as an attempt; the checkpoints say which attempt ran each step
        checkpoints = {cp.key: cp.run_attempt for cp in await store2.load_steps(task_id)}
        assert checkpoints == {"one": 1, "two": 1, "three": 2}
        assert step_named(task, "one")["run_attempt"] == 1
    # the resumed run saw the same clock, ids and random numbers up to the step it re-ran
    assert len(observed) == 2 and observed[0] == observed[1]
    events = await store2.read(task_id, 0, limit=10000)
    started = [e.data["step"] for e in of_type(events, "step_started")]
    assert started.count("one") == 1 and started.count("two") == 1 and started.count("three") == 2
    assert of_type(events, "step_completed")[-1].data["step"] == "three"
    assert events[-1].type == "end"


async def test_envelope_reports_the_attempt_that_ran_a_step(mem: InMemoryStore) -> None:
    calls: Counter[str] = Counter()
    never = asyncio.Event()

    async def stall() -> str:
        calls["stall"] += 1
        if calls["stall"] == 1:
            await never.wait()
        return "done"

    @workflow(name="stall")
    async def wf(ctx: WorkflowContext, inp: Empty) -> str:
        return str(await ctx.step("stall", stall))

    engine1 = engine_for(mem, wf)
    task_id = await submit(mem, "stall")
    await engine1.start()
    await wait_until(lambda: calls["stall"] == 1, what="the first attempt")
    await hard_crash(engine1)
    engine2 = engine_for(mem, wf)
    await engine2.start(recover=True)
    try:
        task = await wait_terminal(mem, task_id)
    finally:
        await engine2.stop()
    assert [cp.run_attempt for cp in await mem.load_steps(task_id)] == [2]
    assert step_named(task, "stall")["run_attempt"] == 2


async def test_resumed_map_replays_finished_branches_and_their_failures(stores: Stores) -> None:
    calls: Counter[str] = Counter()
    never = asyncio.Event()

    async def item(i: int) -> int:
        calls[f"item{i}"] += 1
        await asyncio.sleep(5 if i == 2 else 0.01)
        return i * 100

    async def after(total: int) -> int:
        calls["after"] += 1
        if calls["after"] == 1:
            await never.wait()
        return total

    @workflow(name="map-resume")
    async def wf(ctx: WorkflowContext, inp: Empty) -> dict[str, Any]:
        out = await ctx.map(item, [0, 1, 2, 3], timeout_per_item=0.3, min_success=3)
        total = await ctx.step("after", after, sum(out.succeeded))
        return {"results": out.results, "total": total}

    store1 = stores.open()
    engine1 = engine_for(store1, wf)
    task_id = await submit(store1, "map-resume")
    await engine1.start()
    await wait_until(lambda: calls["after"] == 1, what="the step after the map")
    await hard_crash(engine1)
    await stores.close(store1)
    store2 = stores.open()
    engine2 = engine_for(store2, wf)
    await engine2.start(recover=True)
    try:
        task = await wait_terminal(store2, task_id)
    finally:
        await engine2.stop()

    assert calls == Counter({"item0": 1, "item1": 1, "item2": 1, "item3": 1, "after": 2})
    assert task.status is TaskStatus.partial_success and task.envelope is not None
    assert task.envelope["result"] == {"results": [0, 100, None, 300], "total": 400}
    [error] = task.envelope["errors"]
    assert (error["type"], error["step"]) == ("timeout", "item[2]")  # the recorded failure, not a new try
    replayed = {s["name"]: (s["status"], s["replayed"]) for s in steps_of(task)}
    assert replayed == {
        "item[0]": ("completed", True),
        "item[1]": ("completed", True),
        "item[2]": ("failed", True),
        "item[3]": ("completed", True),
        "after": ("completed", False),
    }


async def test_deadline_survives_a_restart(mem: InMemoryStore) -> None:
    calls: Counter[str] = Counter()
    never = asyncio.Event()

    async def quick() -> str:
        calls["quick"] += 1
        return "kept"

    async def stall() -> str:
        calls["stall"] += 1
        await never.wait()
        return "never"

    @workflow(name="deadline-resume")
    async def wf(ctx: WorkflowContext, inp: Empty) -> str:
        await ctx.partial_result("quick", await ctx.step("quick", quick))
        return str(await ctx.step("stall", stall))

    engine1 = engine_for(mem, wf)
    task_id = await submit(mem, "deadline-resume", budget={"deadline_s": 0.6})
    await engine1.start()
    await wait_until(lambda: calls["stall"] == 1, what="the stalling step")
    await hard_crash(engine1)
    created = (await mem.get_task(task_id)).created_at  # type: ignore[union-attr]
    await asyncio.sleep(max(0.0, created + 0.7 - time.time()))  # the process is "down" past the deadline
    engine2 = engine_for(mem, wf)
    await engine2.start(recover=True)
    try:
        task = await wait_terminal(mem, task_id)
    finally:
        await engine2.stop()
    assert calls == Counter({"quick": 1, "stall": 1})  # the restart did not grant a fresh deadline
    assert task.status is TaskStatus.partial_success and task.envelope is not None
    assert task.envelope["result"] == {"quick": "kept"}
    [error] = task.envelope["errors"]
    assert error["type"] == "budget_exceeded" and error["message"].startswith("deadline budget exceeded")


# -- 2. deterministic context and replay ----------------------------------------------------------------------


async def roll(seed: int) -> int:
    return (seed * 7919) % 100


async def roll_v2(seed: int) -> int:
    return (seed * 7919) % 100


async def big_branch(n: int) -> str:
    return f"big-{n}"


async def small_branch(n: int) -> str:
    return f"small-{n}"


async def heads(i: int) -> str:
    return f"H{i}"


async def tails(i: int) -> str:
    return f"T{i}"


async def _branching(
    ctx: WorkflowContext, seed: int, *, flip: bool = False, threshold: int = 50, roller: Any = roll, coins: int = 4
) -> dict[str, Any]:
    marks: dict[str, Any] = {"t0": ctx.now(), "id0": str(ctx.uuid()), "r0": ctx.random()}
    n = await ctx.step("roll", roller, seed)
    if n >= threshold:
        size = await ctx.step("big", big_branch, n)
    else:
        size = await ctx.step("small", small_branch, n)
    flips = []
    for i in range(coins):
        up = (ctx.random() < 0.5) != flip
        flips.append(await ctx.step(f"coin-{i}", heads if up else tails, i))
    marks.update(t1=ctx.now(), id1=str(ctx.uuid()), r1=ctx.random())
    return {"n": n, "size": size, "flips": flips, "marks": marks}


@workflow(name="branching")
async def branching(ctx: WorkflowContext, inp: Seed) -> dict[str, Any]:
    return await _branching(ctx, inp.seed)


@workflow(name="branching")
async def branching_flipped_coins(ctx: WorkflowContext, inp: Seed) -> dict[str, Any]:
    return await _branching(ctx, inp.seed, flip=True)


@workflow(name="branching")
async def branching_other_branch(ctx: WorkflowContext, inp: Seed) -> dict[str, Any]:
    return await _branching(ctx, inp.seed, threshold=-1 if (inp.seed * 7919) % 100 < 50 else 101)


@workflow(name="branching")
async def branching_new_function(ctx: WorkflowContext, inp: Seed) -> dict[str, Any]:
    return await _branching(ctx, inp.seed, roller=roll_v2)


@workflow(name="branching")
async def branching_fewer_steps(ctx: WorkflowContext, inp: Seed) -> dict[str, Any]:
    return await _branching(ctx, inp.seed, coins=3)


@pytest.mark.parametrize("seed", [3, 11])  # roll(3) = 57 takes the big branch, roll(11) = 9 the small one
async def test_replay_reaches_same_result_and_steps(store: Any, seed: int) -> None:
    task, _ = await run_workflow(store, branching, {"seed": seed})
    assert task.status is TaskStatus.succeeded and task.envelope is not None
    result = task.envelope["result"]
    assert result["size"] == ("big-57" if seed == 3 else "small-9")
    assert result["marks"]["t1"] >= result["marks"]["t0"] == task.started_at

    history = await load_history(store, task.id)
    replayed = await replay(branching, history, store=store)
    assert replayed.result == result  # same clock readings, ids, random numbers and step results
    assert replayed.steps == [s["name"] for s in steps_of(task)]
    assert replayed.steps[:2] == ["roll", "big" if seed == 3 else "small"]
    # a second replay is as deterministic as the first
    assert (await replay(branching, history, store=store)).result == result


@pytest.mark.parametrize(
    ("changed", "match"),
    [
        (branching_flipped_coins, "was recorded as"),
        (branching_other_branch, "big|small"),
        (branching_new_function, "was recorded as"),
        (branching_fewer_steps, "no longer takes recorded step"),
    ],
    ids=["flipped-decision", "other-branch", "changed-step-function", "dropped-step"],
)
async def test_replay_of_changed_workflow_raises_nondeterminism(
    mem: InMemoryStore, changed: Workflow[Any], match: str
) -> None:
    task, _ = await run_workflow(mem, branching, {"seed": 3})
    assert task.status is TaskStatus.succeeded
    history = await load_history(mem, task.id)
    with pytest.raises(Nondeterminism, match=match):
        await replay(changed, history, store=mem)


async def test_context_randomness_is_seeded_by_task() -> None:
    class Journal:
        run_attempt = 1

        def __init__(self, task_id: str) -> None:
            self.task_id = task_id

    def draws(task_id: str) -> list[Any]:
        ctx = WorkflowContext(journal=Journal(task_id), started_at=123.0)  # type: ignore[arg-type]
        return [ctx.now(), ctx.random(), str(ctx.uuid()), ctx.rng.randint(0, 10**9)]

    assert draws("tsk_a") == draws("tsk_a")
    assert draws("tsk_a")[1:] != draws("tsk_b")[1:]
    assert draws("tsk_a")[0] == 123.0


# -- 3. attempt versioning: a retry sees the arguments as they were, a zombie attempt cannot record ---------------


async def test_retry_sees_unmutated_arguments(mem: InMemoryStore) -> None:
    seen: list[tuple[list[int], dict[str, Any]]] = []

    async def mutate(items: list[int], doc: dict[str, Any]) -> dict[str, Any]:
        seen.append((list(items), json.loads(json.dumps(doc))))
        items.append(99)
        doc["nested"]["tags"].append("dirty")
        doc["added"] = True
        if len(seen) == 1:
            raise TimeoutError("first try times out after mutating its arguments")
        if len(seen) == 2:
            raise UpstreamError("unavailable", status_code=503)
        return {"items": items, "doc": doc}

    after: list[Any] = []

    @workflow(name="mutate")
    async def wf(ctx: WorkflowContext, inp: Items) -> dict[str, Any]:
        items, doc = list(inp.items), dict(inp.doc)
        out = await ctx.step("mutate", mutate, items, doc, retry=FAST_RETRY)
        after.append((items, doc))
        return out

    doc = {"nested": {"tags": ["a"]}}
    task, events = await run_workflow(mem, wf, {"items": [1, 2, 3], "doc": doc})
    assert task.status is TaskStatus.succeeded and task.envelope is not None
    assert seen == [([1, 2, 3], doc), ([1, 2, 3], doc), ([1, 2, 3], doc)]
    assert task.envelope["result"] == {
        "items": [1, 2, 3, 99],
        "doc": {"nested": {"tags": ["a", "dirty"]}, "added": True},
    }
    assert after == [([1, 2, 3], doc)]  # the workflow's own objects are never touched by the step
    assert step_named(task, "mutate")["attempts"] == 3
    assert [e.data["try"] for e in of_type(events, "step_retrying")] == [2, 3]


class SpyStore:
    """Delegates to a store and records which step writes were refused for a lost lease."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.lost: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def record_step(self, lease: Any, step: StepCheckpoint, events: Any, now: float, **kw: Any) -> None:
        try:
            await self._inner.record_step(lease, step, events, now, **kw)
        except LeaseLost:
            self.lost.append(step.key)
            raise


async def test_zombie_attempt_cannot_record_after_takeover(stores: Stores) -> None:
    gates = {1: asyncio.Event(), 2: asyncio.Event()}
    calls: list[int] = []
    firsts = Counter[str]()

    async def first() -> str:
        firsts["first"] += 1
        return "ok"

    async def slow() -> str:
        calls.append(len(calls) + 1)
        n = len(calls)
        await gates[n].wait()
        return f"from-call-{n}"

    @workflow(name="zombie")
    async def wf(ctx: WorkflowContext, inp: Empty) -> dict[str, str]:
        a = await ctx.step("first", first)
        b = await ctx.step("slow", slow)
        return {"first": a, "slow": b}

    spy = SpyStore(stores.open())
    # a long lease: the old owner's heartbeat will not notice the takeover during the test, like a paused process
    engine1 = engine_for(spy, wf, workers=1, lease_s=60)
    task_id = await submit(spy, "zombie")
    await engine1.start()
    store2 = stores.open()
    engine2 = engine_for(store2, wf, workers=1)
    try:
        await wait_until(lambda: calls == [1], what="the first attempt to reach the slow step")
        await engine2.start(recover=True)  # a new process: re-queues the task the "dead" one left running
        await wait_until(lambda: calls == [1, 2], what="the second attempt to reach the slow step")
        gates[1].set()  # the zombie finishes its step and tries to record it under its stale lease
        await wait_until(lambda: spy.lost == ["slow"], what="the zombie's write to be refused")
        gates[2].set()
        task = await wait_terminal(store2, task_id)
    finally:
        gates[1].set()
        gates[2].set()
        await engine2.stop()
        await engine1.stop()

    assert task.status is TaskStatus.succeeded and task.envelope is not None
    assert task.envelope["result"] == {"first": "ok", "slow": "from-call-2"}
    assert firsts["first"] == 1
    steps = {cp.key: cp for cp in await store2.load_steps(task_id)}
    assert steps["slow"].result == "from-call-2" and steps["slow"].run_attempt == 2
    assert steps["first"].run_attempt == 1
    events = await store2.read(task_id, 0, limit=10000)
    assert [e.data["step"] for e in of_type(events, "step_completed")] == ["first", "slow"]
    assert events[-1].type == "end"


async def test_store_fences_writes_of_a_superseded_lease(store: Any) -> None:
    task_id = await submit(store, "x")
    now = time.time()
    old = await store.lease_next("old-owner", now, 30, 5)
    assert old is not None and old.task_id == task_id
    assert await store.requeue_running() == 1
    new = await store.lease_next("new-owner", now, 30, 5)
    assert new is not None and new.token > old.token and new.attempt == 2
    cp = StepCheckpoint(key="s", seq=1, fn="f", result={"v": 1})
    with pytest.raises(LeaseLost):
        await store.record_step(old, cp, [("step_completed", {"step": "s"})], now)
    with pytest.raises(LeaseLost):
        await store.append(old, "token", {"text": "x"}, now)
    with pytest.raises(LeaseLost):
        await store.set_state(old, "partial", {"a": 1}, None, now)
    assert await store.load_steps(task_id) == []
    await store.record_step(new, StepCheckpoint(key="s", seq=1, fn="f", result={"v": 2}), [], now)
    assert [(s.key, s.result) for s in await store.load_steps(task_id)] == [("s", {"v": 2})]
    assert not any(e.type in ("step_completed", "token") for e in await store.read(task_id, 0))


# -- 4. retries -------------------------------------------------------------------------------------------------


def one_step(fn: Any, retry: RetryPolicy | None = FAST_RETRY) -> Workflow[Any]:
    @workflow(name="one-step")
    async def wf(ctx: WorkflowContext, inp: Empty) -> Any:
        return await ctx.step("call", fn, retry=retry)

    return wf


async def test_rate_limit_waits_for_retry_after(mem: InMemoryStore) -> None:
    stamps: list[float] = []

    async def limited() -> str:
        stamps.append(time.monotonic())
        if len(stamps) == 1:
            raise UpstreamError("slow down", status_code=429, retry_after=0.2)
        return "done"

    task, events = await run_workflow(mem, one_step(limited))
    assert task.status is TaskStatus.succeeded and task.envelope is not None
    assert task.envelope["result"] == "done"
    assert len(stamps) == 2 and stamps[1] - stamps[0] >= 0.199  # Retry-After beats the 0.01 s backoff
    assert step_named(task, "call")["attempts"] == 2
    assert [e.data for e in of_type(events, "step_retrying")] == [{"step": "call", "try": 2}]


async def test_retry_backoff_goes_through_the_injected_sleep(mem: InMemoryStore) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    tries = Counter[str]()

    async def flaky() -> int:
        tries["n"] += 1
        if tries["n"] < 3:
            raise UpstreamError("bad gateway", status_code=503)
        return 42

    patient = RetryPolicy(max_attempts=3, initial_interval=30, backoff_coefficient=2, maximum_interval=100, jitter=0)
    engine = engine_for(mem, one_step(flaky, patient), sleep=sleep)
    task_id = await submit(mem, "one-step")
    await engine.start()
    try:
        task = await wait_terminal(mem, task_id, timeout=5)  # far less than the 90 s of backoff asked for
    finally:
        await engine.stop()
    assert task.status is TaskStatus.succeeded and task.envelope is not None and task.envelope["result"] == 42
    assert waits == [30.0, 60.0]


async def test_server_error_is_retried(mem: InMemoryStore) -> None:
    tries = Counter[str]()

    async def flaky() -> int:
        tries["n"] += 1
        if tries["n"] < 3:
            raise UpstreamError("bad gateway", status_code=503)
        return 42

    task, events = await run_workflow(mem, one_step(flaky))
    assert task.status is TaskStatus.succeeded and task.envelope is not None
    assert task.envelope["result"] == 42 and task.envelope["errors"] == []
    assert tries["n"] == 3 and step_named(task, "call")["attempts"] == 3
    assert len(of_type(events, "step_retrying")) == 2


def throw(exc: BaseException) -> Any:
    raise exc


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int


@pytest.mark.parametrize(
    ("exc", "type_"),
    [
        (lambda: Strict.model_validate({"count": "many"}), "schema_violation"),
        (lambda: throw(UpstreamError("bad request", status_code=400)), "upstream_error"),
        (lambda: throw(ValueError("bad value")), "step_failed"),
    ],
    ids=["validation-error", "http-400", "value-error"],
)
async def test_deterministic_failures_are_not_retried(mem: InMemoryStore, exc: Callable[[], Any], type_: str) -> None:
    tries = Counter[str]()

    async def broken() -> Any:
        tries["n"] += 1
        return exc()

    task, events = await run_workflow(mem, one_step(broken))
    assert tries["n"] == 1
    assert task.status is TaskStatus.failed
    assert step_named(task, "call")["attempts"] == 1 and step_named(task, "call")["status"] == "failed"
    assert types_of(task) == [type_]
    assert task.envelope is not None and task.envelope["errors"][0]["step"] == "call"
    assert of_type(events, "step_retrying") == []
    failed = of_type(events, "step_failed")
    assert len(failed) == 1 and failed[0].data["tries"] == 1 and failed[0].data["error"]["type"] == type_


def test_validation_error_message_points_at_the_field() -> None:
    from keel.orchestration.engine.context import classify

    with pytest.raises(pydantic.ValidationError) as info:
        Strict.model_validate({"count": "many"})
    assert classify(info.value) == ("schema_violation", "/count: " + info.value.errors()[0]["msg"])


@pytest.mark.parametrize(
    ("status_code", "retry_after", "type_"), [(429, 0.05, "rate_limited"), (503, None, "upstream_error")]
)
async def test_exhausted_retries_fail_the_step(
    mem: InMemoryStore, status_code: int, retry_after: float | None, type_: str
) -> None:
    tries = Counter[str]()

    async def down() -> str:
        tries["n"] += 1
        raise UpstreamError(f"HTTP {status_code} number {tries['n']}", status_code=status_code, retry_after=retry_after)

    task, events = await run_workflow(mem, one_step(down))
    assert tries["n"] == 3
    assert task.status is TaskStatus.failed and task.envelope is not None
    assert task.envelope["status"] == "failed"
    [error] = task.envelope["errors"]
    assert error["type"] == type_ and error["step"] == "call" and error["recovery_suggested"] is True
    assert error["message"] == f"HTTP {status_code} number 3"
    assert step_named(task, "call")["attempts"] == 3
    assert [e.data["try"] for e in of_type(events, "step_retrying")] == [2, 3]


async def test_failed_step_is_recorded_and_replays_as_failure(mem: InMemoryStore) -> None:
    tries = Counter[str]()

    async def down() -> str:
        tries["n"] += 1
        raise UpstreamError("gone", status_code=400)

    @workflow(name="tolerant")
    async def wf(ctx: WorkflowContext, inp: Empty) -> dict[str, str]:
        try:
            await ctx.step("call", down)
        except Exception as exc:  # a StepFailed: the workflow decides what a failure means
            ctx.error("degraded", str(exc), step="call")  # part of the work failed: partial_success
            return {"fallback": type(exc).__name__}
        return {"fallback": "none"}

    task, _ = await run_workflow(mem, wf)
    assert task.status is TaskStatus.partial_success and task.envelope is not None
    assert task.envelope["result"] == {"fallback": "StepFailed"}
    assert types_of(task) == ["degraded"]
    [cp] = await mem.load_steps(task.id)
    assert cp.status.value == "failed" and cp.error == {"type": "upstream_error", "message": "gone"}
    replayed = await replay(wf, await load_history(mem, task.id), store=mem)
    assert replayed.result == {"fallback": "StepFailed"} and tries["n"] == 1


async def test_write_tools_are_not_retried_read_tools_are(mem: InMemoryStore) -> None:
    tries = Counter[str]()

    async def flaky(args: Query) -> str:
        tries[args.q] += 1
        if tries[args.q] == 1:
            raise UpstreamError("unavailable", status_code=503)
        return args.q

    read = Tool(name="read", description="Reads.", input_model=Query, fn=flaky)
    write = Tool(name="write", description="Writes.", input_model=Query, fn=flaky, effect="write")

    @workflow(name="tools")
    async def wf(ctx: WorkflowContext, inp: Empty) -> dict[str, Any]:
        got = await ctx.tool(read, Query(q="r"), retry=FAST_RETRY)
        try:
            await ctx.tool(write, {"q": "w"})
        except Exception as exc:
            return {"read": got, "write": type(exc).__name__}
        return {"read": got, "write": "ok"}

    task, _ = await run_workflow(mem, wf)
    # A 503 from a write may or may not have been applied: no blind retry, and with no reconcile hook the task
    # waits for a person (the pause is not an Exception, so the workflow's except cannot swallow it).
    assert task.status is TaskStatus.waiting_for_approval
    assert tries == Counter({"r": 2, "w": 1})  # a write must not be applied twice by a blind retry
    [decision] = await mem.load_decisions(task.id)
    assert decision.kind.value == "outcome_unknown" and decision.tool == "write"
    [effect] = await mem.list_effects(task.id)
    assert effect.status.value == "outcome_unknown" and effect.executions == 1
    assert task.envelope["metadata"]["tools_called"] == [
        {"tool": "read", "step": "tool:read"},
        {"tool": "write", "step": "tool:write"},
    ]


class Point(BaseModel):
    x: int
    y: int


async def make_point(x: int) -> Point:
    return Point(x=x, y=x * 2)


@workflow(name="typed")
async def typed(ctx: WorkflowContext, inp: Seed) -> dict[str, Any]:
    p = await ctx.step("point", make_point, inp.seed)
    assert isinstance(p, Point)  # a fresh run and a replay both hand back the declared type
    return {"sum": p.x + p.y}


async def test_step_results_come_back_as_their_declared_type(store: Any) -> None:
    task, _ = await run_workflow(store, typed, {"seed": 4})
    assert task.status is TaskStatus.succeeded and task.envelope is not None
    assert task.envelope["result"] == {"sum": 12}
    [cp] = await store.load_steps(task.id)
    assert cp.result == {"x": 4, "y": 8}  # stored as JSON
    assert (await replay(typed, await load_history(store, task.id), store=store)).result == {"sum": 12}


# -- 5. blobs ---------------------------------------------------------------------------------------------------


async def test_large_result_goes_out_of_line_and_comes_back_whole(stores: Stores) -> None:
    calls: Counter[str] = Counter()
    never = asyncio.Event()
    seen: list[str] = []
    big = "".join(f"line {i}: {hashlib.sha256(str(i).encode()).hexdigest()}\n" for i in range(28_000))
    assert len(big) > 2_000_000

    async def produce() -> str:
        calls["produce"] += 1
        return big

    async def consume(n: int) -> int:
        calls["consume"] += 1
        if calls["consume"] == 1:
            await never.wait()
        return n

    @workflow(name="blob")
    async def wf(ctx: WorkflowContext, inp: Empty) -> dict[str, Any]:
        text = await ctx.step("produce", produce)
        seen.append(text)
        n = await ctx.step("consume", consume, len(text))
        return {"len": n, "sha": hashlib.sha256(text.encode()).hexdigest()}

    store1 = stores.open()
    engine1 = engine_for(store1, wf)
    task_id = await submit(store1, "blob")
    await engine1.start()
    await wait_until(lambda: calls["consume"] == 1, what="the consumer step to start")
    await hard_crash(engine1)
    await stores.close(store1)

    store2 = stores.open()
    [produced] = [cp for cp in await store2.load_steps(task_id) if cp.key == "produce"]
    assert isinstance(produced.result, BlobRef)
    assert produced.result.size >= len(big)
    engine2 = engine_for(store2, wf)
    await engine2.start(recover=True)
    try:
        task = await wait_terminal(store2, task_id)
    finally:
        await engine2.stop()

    assert task.status is TaskStatus.succeeded and task.envelope is not None
    assert calls == Counter({"produce": 1, "consume": 2})
    assert len(seen) == 2 and seen[1] == big  # the resumed run got the full value back from the blob
    expected = {"len": len(big), "sha": hashlib.sha256(big.encode()).hexdigest()}
    assert task.envelope["result"] == expected
    assert step_named(task, "produce")["replayed"] is True
    history = await load_history(store2, task_id)
    assert (await replay(wf, history, store=store2)).result == expected
    with pytest.raises(Nondeterminism, match="needs the store"):
        await replay(wf, history)


# -- 6. parallel branches and partial failure ---------------------------------------------------------------------


async def branch(i: int) -> dict[str, int]:
    await asyncio.sleep(5 if i == 2 else 0.02)
    return {"item": i, "square": i * i}


def mapper(min_success: int) -> Workflow[Any]:
    @workflow(name="mapper")
    async def wf(ctx: WorkflowContext, inp: Empty) -> dict[str, Any]:
        out = await ctx.map(branch, [0, 1, 2, 3], timeout_per_item=0.5, min_success=min_success)
        return {"results": out.results, "succeeded": out.succeeded, "ok": out.ok}

    return wf


async def test_map_partial_success_keeps_three_results(store: Any) -> None:
    started = time.monotonic()
    task, events = await run_workflow(store, mapper(3))
    assert time.monotonic() - started < 4  # the 5 s branch was cut at its 0.5 s timeout
    assert task.status is TaskStatus.partial_success and task.envelope is not None
    assert task.envelope["status"] == "partial_success"
    squares = [{"item": i, "square": i * i} for i in (0, 1, 3)]
    assert task.envelope["result"] == {
        "results": [squares[0], squares[1], None, squares[2]],
        "succeeded": squares,
        "ok": 3,
    }
    [error] = task.envelope["errors"]
    assert error["type"] == "timeout" and error["step"] == "branch[2]" and error["recovery_suggested"] is True
    assert "0.5" in error["message"]
    statuses = {s["name"]: s["status"] for s in steps_of(task)}
    assert statuses == {
        "branch[0]": "completed",
        "branch[1]": "completed",
        "branch[2]": "failed",
        "branch[3]": "completed",
    }
    assert [e.data["step"] for e in of_type(events, "step_failed")] == ["branch[2]"]


async def test_map_below_min_success_fails_and_keeps_partial_results(store: Any) -> None:
    task, events = await run_workflow(store, mapper(4))
    assert task.status is TaskStatus.failed and task.envelope is not None
    assert task.envelope["status"] == "failed"
    assert task.envelope["result"] == {"branch": [{"item": i, "square": i * i} for i in (0, 1, 3)]}
    assert sorted(types_of(task)) == ["min_success_not_met", "timeout"]
    [unmet] = [e for e in task.envelope["errors"] if e["type"] == "min_success_not_met"]
    assert unmet["step"] == "branch" and "3 of 4" in unmet["message"]
    partial = [e.data for e in of_type(events, "partial_result")]
    assert partial[-1] == {"key": "branch", "value": [{"item": i, "square": i * i} for i in (0, 1, 3)]}


async def test_map_branches_run_concurrently(mem: InMemoryStore) -> None:
    spans: dict[int, tuple[float, float]] = {}

    async def nap(i: int) -> int:
        t0 = time.monotonic()
        await asyncio.sleep(0.3)
        spans[i] = (t0, time.monotonic())
        return i

    @workflow(name="naps")
    async def wf(ctx: WorkflowContext, inp: Empty) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = await ctx.map(nap, [0, 1, 2, 3])
        return {"results": out.results, "wall": time.perf_counter() - t0}

    task, _ = await run_workflow(mem, wf)
    assert task.status is TaskStatus.succeeded and task.envelope is not None
    assert task.envelope["result"]["results"] == [0, 1, 2, 3]
    assert task.envelope["result"]["wall"] < 1.5  # 4 x 0.3 s in sequence would take 1.2 s or more
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values())  # all four overlapped


async def test_map_concurrency_limit(mem: InMemoryStore) -> None:
    running = Counter[str]()

    async def nap(i: int) -> int:
        running["now"] += 1
        running["peak"] = max(running["peak"], running["now"])
        await asyncio.sleep(0.05)
        running["now"] -= 1
        return i

    @workflow(name="limited")
    async def wf(ctx: WorkflowContext, inp: Empty) -> list[Any]:
        return (await ctx.map(nap, list(range(6)), concurrency=2)).results

    task, _ = await run_workflow(mem, wf)
    assert task.envelope is not None and task.envelope["result"] == list(range(6))
    assert running["peak"] == 2


async def test_gather_of_calls(store: Any) -> None:
    spans: list[tuple[float, float]] = []

    async def nap(x: str) -> str:
        t0 = time.monotonic()
        await asyncio.sleep(0.3)
        spans.append((t0, time.monotonic()))
        return x.upper()

    async def stuck(x: str) -> str:
        await asyncio.sleep(10)
        return x

    @workflow(name="gatherer")
    async def wf(ctx: WorkflowContext, inp: Empty) -> dict[str, Any]:
        out = await ctx.gather(
            ctx.call("a", nap, "a"),
            ctx.call("b", stuck, "b", timeout=0.4),
            ctx.call("c", nap, "c"),
            name="trio",
            min_success=2,
        )
        return {"results": out.results, "errors": [(e.index, e.step, e.type) for e in out.errors]}

    task, _ = await run_workflow(store, wf)
    assert task.status is TaskStatus.partial_success and task.envelope is not None
    assert task.envelope["result"]["results"] == ["A", None, "C"]
    assert task.envelope["result"]["errors"] == [[1, "b", "timeout"]]
    assert types_of(task) == ["timeout"]
    assert len(spans) == 2 and max(s for s, _ in spans) < min(e for _, e in spans)
    assert task.envelope["metadata"]["duration_ms"] < 1500


# -- 7. budgets ---------------------------------------------------------------------------------------------------


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
    q: str


PLAN_JSON = json.dumps(
    {
        "goal": "keep looking",
        "confidence": 0.9,
        "nodes": [{"id": "look", "kind": "tool", "tool": "lookup", "args": {"q": "more"}}],
        "output": "look",
    }
)


async def test_looping_planner_is_stopped_by_tool_call_budget(mem: InMemoryStore) -> None:
    Plan.model_validate_json(PLAN_JSON)  # the model's answer really is a valid plan
    runs = Counter[str]()

    async def lookup(args: Query) -> dict[str, Any]:
        runs["lookup"] += 1
        return {"q": args.q, "hit": runs["lookup"]}

    catalog = ToolCatalog([Tool(name="lookup", description="Look something up.", input_model=Query, fn=lookup)])
    model = FunctionModel(lambda messages, info: PLAN_JSON)

    @workflow(name="forever")
    async def wf(ctx: WorkflowContext, inp: Empty) -> None:
        observations: list[Any] = []
        while True:
            plan = await ctx.plan("find everything", catalog, model=model)
            run = await ctx.run_plan(plan, catalog, model=model)
            observations.append(run.output)
            await ctx.partial_result("observations", observations)

    task, events = await run_workflow(mem, wf, budget={"max_tool_calls": 5})
    assert runs["lookup"] == 5
    assert task.status is TaskStatus.partial_success and task.envelope is not None
    assert task.envelope["status"] == "partial_success"
    assert task.envelope["result"]["observations"] == [{"q": "more", "hit": i} for i in range(1, 6)]
    [error] = task.envelope["errors"]
    assert error["type"] == "budget_exceeded" and "tool_calls" in error["message"]
    assert error["message"] == "tool_calls budget exceeded: used 6 of 5"
    assert task.envelope["metadata"]["budget"]["used"]["tool_calls"] == 5
    assert task.envelope["metadata"]["budget"]["limits"]["tool_calls"] == 5
    tool_steps = [s for s in steps_of(task) if s["kind"] == "tool"]
    assert [s["status"] for s in tool_steps] == ["completed"] * 5
    assert len(of_type(events, "plan")) == 6 and len(model.calls) == 6


async def test_tools_called_lists_only_tools_that_ran(mem: InMemoryStore) -> None:
    runs = Counter[str]()

    async def lookup(args: Query) -> str:
        runs["lookup"] += 1
        return args.q

    tool = Tool(name="lookup", description="Look something up.", input_model=Query, fn=lookup)

    @workflow(name="greedy")
    async def wf(ctx: WorkflowContext, inp: Empty) -> None:
        for i in range(10):
            await ctx.tool(tool, {"q": str(i)})

    task, _ = await run_workflow(mem, wf, budget={"max_tool_calls": 2})
    assert runs["lookup"] == 2 and types_of(task) == ["budget_exceeded"]
    assert task.envelope is not None
    assert len(task.envelope["metadata"]["tools_called"]) == 2


async def test_step_budget(mem: InMemoryStore) -> None:
    ticks = Counter[str]()

    async def tick(i: int) -> int:
        ticks["n"] += 1
        return i

    @workflow(name="ticker")
    async def wf(ctx: WorkflowContext, inp: Empty) -> None:
        done: list[int] = []
        while True:
            done.append(await ctx.step("tick", tick, len(done)))
            await ctx.partial_result("ticks", done)

    task, events = await run_workflow(mem, wf, budget={"max_steps": 3})
    assert ticks["n"] == 3
    assert task.status is TaskStatus.partial_success and task.envelope is not None
    assert task.envelope["result"] == {"ticks": [0, 1, 2]}
    assert [(e["type"], e["message"]) for e in task.envelope["errors"]] == [
        ("budget_exceeded", "steps budget exceeded: used 4 of 3")
    ]
    assert [s["name"] for s in steps_of(task)] == ["tick", "tick#2", "tick#3"]
    budgets = [e.data for e in of_type(events, "budget")]
    assert [b["used"]["steps"] for b in budgets] == [1, 2, 3]
    assert all(b["limits"] == {"steps": 3, "tool_calls": 20} for b in budgets)


async def test_budget_without_partial_result_fails(mem: InMemoryStore) -> None:
    async def tick() -> int:
        return 1

    @workflow(name="silent")
    async def wf(ctx: WorkflowContext, inp: Empty) -> None:
        while True:
            await ctx.step("tick", tick)

    task, _ = await run_workflow(mem, wf, budget={"max_steps": 2})
    assert task.status is TaskStatus.failed and task.envelope is not None
    assert task.envelope["status"] == "failed" and task.envelope["result"] is None
    assert types_of(task) == ["budget_exceeded"]


def chatty(cost: float = 0.0) -> FunctionModel:
    # 10-word prompts and 10-word answers: every call costs exactly 20 tokens
    return FunctionModel(lambda m, info: " ".join(["answer"] * 10), cost_per_token_usd=cost)


def generator(model: FunctionModel) -> Workflow[Any]:
    @workflow(name="generator")
    async def wf(ctx: WorkflowContext, inp: Empty) -> None:
        answers: list[str] = []
        while True:
            answers.append(await ctx.generate("ask", model, " ".join(["word"] * 10)))
            await ctx.partial_result("answers", answers)

    return wf


async def test_token_budget(mem: InMemoryStore) -> None:
    model = chatty()
    task, events = await run_workflow(mem, generator(model), budget={"max_tokens": 50})
    assert len(model.calls) == 3  # the third call crossed 50 tokens: it is kept, then the run stops
    assert task.status is TaskStatus.partial_success and task.envelope is not None
    assert task.envelope["result"] == {"answers": [" ".join(["answer"] * 10)] * 2}
    assert [(e["type"], e["message"]) for e in task.envelope["errors"]] == [
        ("budget_exceeded", "tokens budget exceeded: used 60 of 50")
    ]
    assert task.envelope["metadata"]["tokens"] == {"input": 30, "output": 30, "total": 60}
    assert [s["status"] for s in steps_of(task)] == ["completed"] * 3
    assert task.envelope["metadata"]["model_ids"] == ["test:function"]
    assert of_type(events, "budget")[-1].data["used"]["tokens"] == 60


async def test_cost_budget(mem: InMemoryStore) -> None:
    model = chatty(cost=0.001)
    task, _ = await run_workflow(mem, generator(model), budget={"max_cost_usd": 0.05})
    assert len(model.calls) == 3
    assert task.status is TaskStatus.partial_success and task.envelope is not None
    [error] = task.envelope["errors"]
    assert error["type"] == "budget_exceeded" and error["message"].startswith("cost_usd budget exceeded: used 0.06")
    assert task.envelope["metadata"]["cost_usd"] == pytest.approx(0.06)
    assert task.envelope["metadata"]["budget"]["limits"]["cost_usd"] == 0.05


async def test_deadline_budget_stops_a_long_step_promptly(store: Any) -> None:
    flags: list[str] = []

    async def quick() -> str:
        return "kept"

    async def long() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            flags.append("cancelled")
            raise
        return "never"

    @workflow(name="late")
    async def wf(ctx: WorkflowContext, inp: Empty) -> str:
        await ctx.partial_result("quick", await ctx.step("quick", quick))
        return await ctx.step("long", long)

    task, events = await run_workflow(store, wf, budget={"deadline_s": 0.5})
    assert task.finished_at is not None and task.finished_at - task.created_at < 2.0
    assert flags == ["cancelled"]
    assert task.status is TaskStatus.partial_success and task.envelope is not None
    assert task.envelope["result"] == {"quick": "kept"}
    [error] = task.envelope["errors"]
    assert error["type"] == "budget_exceeded" and error["message"].startswith("deadline budget exceeded")
    assert step_named(task, "long")["status"] == "cancelled"
    assert [e.data["step"] for e in of_type(events, "step_cancelled")] == ["long"]
    assert task.envelope["metadata"]["budget"]["limits"] == {"tool_calls": 20, "deadline_s": 0.5}


async def test_budget_events_carry_used_and_limits(mem: InMemoryStore) -> None:
    model = chatty(cost=0.001)

    async def noop() -> None:
        return None

    @workflow(name="mixed")
    async def wf(ctx: WorkflowContext, inp: Empty) -> str:
        await ctx.step("noop", noop)
        return str(await ctx.generate("ask", model, " ".join(["word"] * 10)))

    budget = {"max_steps": 10, "max_tokens": 1000, "max_cost_usd": 1.0, "deadline_s": 30}
    task, events = await run_workflow(mem, wf, budget=budget)
    assert task.status is TaskStatus.succeeded
    first, second = (e.data for e in of_type(events, "budget"))
    limits = {"steps": 10, "tool_calls": 20, "tokens": 1000, "cost_usd": 1.0, "deadline_s": 30}
    assert first["limits"] == limits and second["limits"] == limits
    assert {k: v for k, v in first["used"].items() if k != "remaining_s"} == {
        "steps": 1,
        "tool_calls": 0,
        "model_calls": 0,
        "tokens": 0,
        "cost_usd": 0,
    }
    assert {k: v for k, v in second["used"].items() if k != "remaining_s"} == {
        "steps": 2,
        "tool_calls": 0,
        "model_calls": 1,
        "tokens": 20,
        "cost_usd": pytest.approx(0.02),
    }
    assert 0 < second["used"]["remaining_s"] <= first["used"]["remaining_s"] <= 30


# -- 8. cancellation ----------------------------------------------------------------------------------------------


async def test_cancel_mid_step(store: Any) -> None:
    flags: list[str] = []

    async def first() -> dict[str, int]:
        return {"rows": 12}

    async def sleepy_step() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            flags.append("saw-cancel")
            raise
        finally:
            flags.append("finally")
        return "never"

    @workflow(name="cancellable")
    async def wf(ctx: WorkflowContext, inp: Empty) -> str:
        await ctx.partial_result("first", await ctx.step("first", first))
        return await ctx.step("sleepy", sleepy_step)

    engine = engine_for(store, wf)
    task_id = await submit(store, "cancellable")
    await engine.start()
    try:
        await wait_event(store, task_id, "step_started", "sleepy")
        await asyncio.sleep(0.05)
        assert sleepy_step.__qualname__ in live_code()  # the probe does see a running step body
        t0 = time.monotonic()
        await store.request_cancel(task_id, TENANT)
        engine.cancel(task_id)
        task = await wait_terminal(store, task_id, timeout=5)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(0.05)
        assert sleepy_step.__qualname__ not in live_code()  # no orphan keeps sleeping
    finally:
        await engine.stop()

    assert elapsed < 2.0
    assert task.status is TaskStatus.cancelled and task.envelope is not None
    assert flags == ["saw-cancel", "finally"]
    assert task.envelope["status"] == "partial_success"  # a cancelled task keeps what it finished
    assert task.envelope["result"] == {"first": {"rows": 12}}
    assert [(e["type"], e["severity"]) for e in task.envelope["errors"]] == [("cancelled", "warning")]
    assert [(s["name"], s["status"]) for s in steps_of(task)] == [("first", "completed"), ("sleepy", "cancelled")]
    events = await store.read(task_id, 0, limit=10000)
    assert [e.data["step"] for e in of_type(events, "step_cancelled")] == ["sleepy"]
    assert events[-1].type == "end" and events[-1].data["status"] == "cancelled"


async def test_cancel_requested_in_store_reaches_the_run(mem: InMemoryStore) -> None:
    """A cancel written by another process (the API) is picked up by the heartbeat."""
    flags: list[str] = []

    async def sleepy() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            flags.append("finally")

    @workflow(name="remote-cancel")
    async def wf(ctx: WorkflowContext, inp: Empty) -> None:
        await ctx.step("sleepy", sleepy)

    engine = engine_for(mem, wf, lease_s=0.9)  # heartbeat every 0.3 s
    task_id = await submit(mem, "remote-cancel")
    await engine.start()
    try:
        await wait_event(mem, task_id, "step_started", "sleepy")
        t0 = time.monotonic()
        await mem.request_cancel(task_id, TENANT)
        task = await wait_terminal(mem, task_id, timeout=5)
    finally:
        await engine.stop()
    assert time.monotonic() - t0 < 2.0
    assert task.status is TaskStatus.cancelled and flags == ["finally"]
    assert task.envelope is not None and task.envelope["status"] == "failed" and task.envelope["result"] is None


async def test_cancel_during_map_cancels_every_branch(store: Any) -> None:
    started: list[int] = []
    ended: list[int] = []

    async def dawdle(i: int) -> int:
        started.append(i)
        try:
            await asyncio.sleep(30)
        finally:
            ended.append(i)
        return i

    @workflow(name="fan-out")
    async def wf(ctx: WorkflowContext, inp: Empty) -> Any:
        return (await ctx.map(dawdle, [0, 1, 2, 3])).results

    engine = engine_for(store, wf)
    task_id = await submit(store, "fan-out")
    await engine.start()
    try:
        await wait_until(lambda: len(started) == 4, what="all branches to start")
        assert dawdle.__qualname__ in live_code()
        await store.request_cancel(task_id, TENANT)
        engine.cancel(task_id)
        task = await wait_terminal(store, task_id, timeout=5)
        await asyncio.sleep(0.05)
        assert dawdle.__qualname__ not in live_code()
    finally:
        await engine.stop()

    assert task.status is TaskStatus.cancelled
    assert sorted(started) == [0, 1, 2, 3] and sorted(ended) == [0, 1, 2, 3]
    events = await store.read(task_id, 0, limit=10000)
    assert sorted(e.data["step"] for e in of_type(events, "step_cancelled")) == [f"dawdle[{i}]" for i in range(4)]
    assert of_type(events, "step_completed") == []
    assert events[-1].type == "end"


# -- plain (sync) step functions run in a worker thread -----------------------------------------------------------


def _parse_blocking(text: str) -> dict[str, Any]:
    import threading

    time.sleep(0.2)  # CPU-bound or blocking work: must not stall the event loop
    return {"words": len(text.split()), "thread": threading.current_thread().name}


@workflow(name="sync_steps")
async def sync_steps(ctx: WorkflowContext, inp: Empty) -> dict[str, Any]:
    out = await ctx.map(_parse_blocking, ["a b", "c d e", "f"], name="parse")
    return {"words": [r["words"] for r in out.succeeded], "threads": sorted({r["thread"] for r in out.succeeded})}


async def test_plain_step_functions_run_off_the_event_loop(mem: InMemoryStore) -> None:
    started = time.monotonic()
    async with LoopTicks(every=0.01) as loop:
        task, _ = await run_workflow(mem, sync_steps)
    assert task.status is TaskStatus.succeeded and task.envelope is not None
    assert task.envelope["result"]["words"] == [2, 3, 1]
    assert all(name != "MainThread" for name in task.envelope["result"]["threads"])
    # Three 0.2 s blocking calls ran in threads, side by side, while the loop kept ticking.
    assert time.monotonic() - started < 0.55
    assert loop.ticks >= 10


# -- step_started shares its checkpoint's commit, but keeps its own time and shows up during a long step ---------


@workflow(name="short_and_long")
async def short_and_long(ctx: WorkflowContext, inp: Empty) -> str:
    async def quick() -> str:
        return "q"

    async def slow() -> str:
        await asyncio.sleep(0.3)
        return "s"

    await ctx.step("quick", quick)
    return await ctx.step("slow", slow)


@pytest.mark.parametrize("stores", ["sqlite"], indirect=True)
async def test_step_started_is_timely_and_keeps_its_time(store: Any) -> None:
    engine = engine_for(store, short_and_long)
    task_id = await submit(store, "short_and_long")
    await engine.start()
    try:
        started = await wait_event(store, task_id, "step_started", step="slow")
        # Readable while the step still runs (it is held at most ~50 ms before being written on its own)...
        assert not [
            e for e in await store.read(task_id, 0, 1000) if e.type == "step_completed" and e.data["step"] == "slow"
        ]
        task = await wait_terminal(store, task_id)
    finally:
        await engine.stop()
    assert task.status is TaskStatus.succeeded
    events = await store.read(task_id, 0, 1000)
    by = {(e.type, e.data.get("step")): e for e in events}
    # ...and stamped when the step started, not when it was written.
    slow_done = by[("step_completed", "slow")]
    assert slow_done.created_at - started.created_at >= 0.28
    quick_started, quick_done = by[("step_started", "quick")], by[("step_completed", "quick")]
    assert quick_started.seq < quick_done.seq and quick_started.created_at <= quick_done.created_at


async def test_warnings_alone_leave_the_task_a_success(mem: InMemoryStore) -> None:
    @workflow(name="noted")
    async def wf(ctx: WorkflowContext, inp: Empty) -> str:
        ctx.warn("floating_model_alias", "informational", step="x")
        return "ok"

    task, _ = await run_workflow(mem, wf)
    assert task.status is TaskStatus.succeeded and task.envelope is not None
    assert task.envelope["status"] == "success"
    assert [(e["type"], e["severity"]) for e in task.envelope["errors"]] == [("floating_model_alias", "warning")]
