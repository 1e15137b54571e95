"""Benchmark of keel's durable workflow engine against non-durable baselines; writes its figures into
docs/benchmarks.md (between the ``bench_workflow`` markers).

Run: ``.venv/bin/python bench/bench_workflow.py`` (about 30 s on 2 cores; ``--quick`` for fewer repetitions,
``--no-doc`` to print without rewriting the doc).

Every figure is a median over repetitions, next to a baseline measured in the same process in the same
repetition, because the machine (2 cores, shared) is noisy. What it measures:

1. Per-step checkpoint overhead: a 20-step workflow of no-op steps on ``SQLiteStore`` (WAL, synchronous=FULL),
   on ``InMemoryStore`` (same context code, no durability) and as a plain loop of 20 awaited no-op coroutines;
   plus one step longer than ``StoreJournal``'s hold of ``step_started``, watched through ``store.read``.
2. Parallel branches: ``ctx.map`` over 4 branches that each sleep 1 s, on SQLite, against ``asyncio.gather`` of
   4 x ``asyncio.sleep(1)``; plus the same task end to end through ``EmbeddedEngine``.
3. Large payloads (pydantic-ai #7157): 20 steps each returning ~1 MB of distinct, hard-to-compress text; the
   per-step time of the first 5 vs the last 5 steps, the database size, and a resume (new store on the same file,
   lease, load history, replay all 20 steps) against the original run.
4. Resume cost per step of a 200-step no-op workflow.

Workflows are driven directly (``lease_next``, then a ``WorkflowContext`` on a ``StoreJournal``, then the
workflow function), the way ``EmbeddedEngine._execute`` does it, so that no poll interval is measured; the
workflow itself stamps ``time.perf_counter()`` after every step. SQLite writes are counted by wrapping, on the
store instance, ``SQLiteStore._enqueue`` (every write is queued through it) and ``SQLiteStore._commit_batch`` (the
writer thread commits each group of queued writes with one fsync'd COMMIT), plus ``append_nowait`` and
``record_step`` to see which events each write carries: that shows how many commits a step costs and which
writes and events share one.

The doc keeps the figures of the run before the fixes of ``Journal.emit(durable=False)`` (now a held
``step_started``), ``SQLiteStore._pack``, the first try without tenacity and per-key ``partial_result`` rows
(``BEFORE`` below) next to the new ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import inspect
import os
import platform
import random
import sqlite3
import statistics
import string
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _doc import cpu_model, fsync_commit_times, write_section
from pydantic import BaseModel

from keel.backends.sqlite import SQLiteStore
from keel.memory.blobs import INLINE_LIMIT, looks_small, pack, unpack_blob
from keel.memory.stores import Store
from keel.memory.types import BlobRef, Lease, NewTask, StepCheckpoint, Task, TaskStatus
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.envelope import build_envelope
from keel.orchestration.engine.retry import DEFAULT_RETRY
from keel.orchestration.engine.runtime import EmbeddedEngine, StoreJournal
from keel.orchestration.engine.workflow import Workflow, WorkflowRegistry, workflow
from keel.testing.inmemory import InMemoryStore

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
START_MARK, END_MARK = "<!-- bench_workflow:start -->", "<!-- bench_workflow:end -->"

OWNER = "bench-workflow"
LEASE_S = 300.0  # long enough that no lease expires mid-measurement
STEPS = 20
BRANCHES, BRANCH_SECONDS = 4, 1.0
LARGE_BYTES = 1_000_000
VOCABULARY = 4000
SEED = 7157
LONG_STEPS = 200
RAW_COMMITS = 200
RETRY_CALLS = 2000  # first tries timed bare and through tenacity
SLOW_STEP_S = 0.2  # a step longer than StoreJournal's hold
POLL_S = 0.001  # how often the long-step watcher reads the event log
HOLD_S: float = inspect.signature(StoreJournal).parameters["hold_s"].default  # how long step_started is held

TARGET_STEP_MS = 1.0
TARGET_MAP_S = 1.1
TARGET_GROWTH = 1.2  # "last 5 / first 5 steps ~ 1": this script's threshold for "no growth"

# The figures of the run before the fixes (2026-11-23 17:35 UTC, same machine, full run): every table shows them
# in a "before" column. Not measured by this script any more: the code they measured is gone.
BEFORE_DATE = "2026-11-23"
BEFORE_OVERHEAD_S, BEFORE_COMMIT_S = 0.868e-3, 0.227e-3  # per-step overhead and bare fsync'd commit, before
BEFORE_CONTEXT_S, BEFORE_PLAIN_S = 98.65e-6, 0.28e-6  # per step: the context on a null journal; the plain loop
BEFORE_LARGE_TYPICAL_S = 22.8e-3  # the median ~1 MB step
BEFORE = {
    "plain": "0.28 µs",
    "context": "98.65 µs",
    "in-memory": "143.38 µs",
    "sqlite": "0.868 ms",
    "overhead": "0.868 ms",
    "writes": "2.0",
    "commits": "2.0 (one per write)",
    "shared": "never (`step_started` was awaited on its own)",
    "batches": "—",
    "append": "0.310 ms",
    "record": "0.395 ms",
    "pack_small": "— (`pack()` ran in place, in the writer thread)",
    "pair": "0.705 ms (awaited `append`, then `record_step`)",
    "retry": "— (every try ran through tenacity)",
    "held": "— (`step_started` was awaited, so committed, before the step function ran)",
    "commit": "0.227 ms",
    "setup": "1.477 ms",
    "gather": "1.0013 s",
    "map": "1.0046 s",
    "map_target": "1.005 s (1.003× gather)",
    "workflow": "1.0064 s",
    "engine": "1.0075 s",
    "engine_noop": "0.0283 s",
    "large_first": "24.54 ms",
    "large_last": "22.17 ms",
    "large_growth": "0.910×",
    "large_growth_mean": "1.042×",
    "large_spikes": "8,17; 8,17; 8,17; 1,8,17; 8,17 (+13.6 ms each, median)",
    "large_step": "24.51 ms",
    "large_typical": "~22.8 ms",
    "large_original": "492.6 ms",
    "large_resume_setup": "2.44 ms",
    "large_replay": "118.2 ms",
    "large_resume_ratio": "0.244×",
    "large_writer": "≥ 17.8 ms (`pack()` ran inside the writer; not measured)",
    "large_commits": "2.0",
    "pack": "17.77 ms (in the writer thread)",
    "unpack": "5.59 ms",
    "payload": "19.07 MiB",
    "blobs": "9.06 MiB (20)",
    "db": "9.17 MiB",
    "wal": "4.03 MiB",
    "long_step": "0.939 ms",
    "long_window": "0.851 ms vs 0.753 ms",
    "long_setup": "4.23 ms",
    "long_replay": "7.72 µs",
    "long_ratio": "0.030×",
    "partial_first": "108.5 ms",
    "partial_last": "411.2 ms",
    "partial_growth": "3.79×",
    "partial_vs_large": "18.5× (411.2 ms / 22.17 ms)",
    "partial_original": "5.27 s",
    "partial_resume_setup": "—",
    "partial_replay": "—",
    "partial_resume": "8.19 s",
    "partial_resume_writes": "20 (each replayed `partial_result` re-packed the whole dict)",
    "partial_blobs": "103.69 MiB (40)",
    "partial_db": "103.91 MiB",
    "partial_db_ratio": "11.3×",
    "replace_blobs": "3 (nothing deleted from `blobs`)",
}


@dataclass(frozen=True)
class Config:
    step_reps: int = 40
    step_warmup: int = 5
    fan_reps: int = 5
    engine_reps: int = 3
    large_reps: int = 5
    long_reps: int = 5
    slow_reps: int = 5


QUICK = Config(step_reps=10, step_warmup=2, fan_reps=2, engine_reps=1, large_reps=2, long_reps=2, slow_reps=2)


# -- the workflows -------------------------------------------------------------------------------------------

MARKS: dict[str, list[float]] = {}  # task id -> perf_counter stamps: workflow start, then after every step
OUTPUTS: dict[str, list[str]] = {}  # task id -> what the large-payload steps returned (checked, never timed)
TEXTS: list[str] = []  # the large payloads, made once before any timing


class StepsInput(BaseModel):
    steps: int = STEPS


class FanoutInput(BaseModel):
    branches: int = BRANCHES
    seconds: float = BRANCH_SECONDS


class SlowInput(BaseModel):
    seconds: float = SLOW_STEP_S


async def noop(i: int) -> int:
    return i


async def chunk(i: int) -> str:
    return TEXTS[i]


async def nap(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


WALL: dict[str, float] = {}  # task id -> time.time() before the slow step


async def slow(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@workflow(name="bench_noop")
async def noop_steps(ctx: WorkflowContext, inp: StepsInput) -> int:
    marks = MARKS.setdefault(ctx.task_id, [])
    marks.append(time.perf_counter())
    total = 0
    for i in range(inp.steps):
        total += await ctx.step(f"noop-{i}", noop, i)
        marks.append(time.perf_counter())
    return total


@workflow(name="bench_large")
async def large_steps(ctx: WorkflowContext, inp: StepsInput) -> list[int]:
    marks = MARKS.setdefault(ctx.task_id, [])
    outputs = OUTPUTS[ctx.task_id] = []
    marks.append(time.perf_counter())
    for i in range(inp.steps):
        outputs.append(await ctx.step(f"chunk-{i}", chunk, i))
        marks.append(time.perf_counter())
    return [len(text) for text in outputs]


@workflow(name="bench_partial")
async def partial_steps(ctx: WorkflowContext, inp: StepsInput) -> int:
    """The large-payload workflow that also saves each step's output with ``ctx.partial_result``."""
    marks = MARKS.setdefault(ctx.task_id, [])
    marks.append(time.perf_counter())
    for i in range(inp.steps):
        text = await ctx.step(f"chunk-{i}", chunk, i)
        await ctx.partial_result(f"chunk-{i}", text)
        marks.append(time.perf_counter())
    return inp.steps


@workflow(name="bench_replace")
async def replace_partial(ctx: WorkflowContext, inp: StepsInput) -> int:
    """One partial-result key set to ``inp.steps`` different ~1 MB values in turn (no steps): a replaced blob
    that nothing else references should leave the database."""
    for i in range(inp.steps):
        await ctx.partial_result("latest", TEXTS[i])
    return inp.steps


@workflow(name="bench_slow_step")
async def slow_step(ctx: WorkflowContext, inp: SlowInput) -> float:
    """One step longer than the journal's hold: its ``step_started`` must be readable while it runs."""
    marks = MARKS.setdefault(ctx.task_id, [])
    WALL[ctx.task_id] = time.time()
    marks.append(time.perf_counter())
    result = await ctx.step("slow", slow, inp.seconds)
    marks.append(time.perf_counter())
    return result


@workflow(name="bench_fanout")
async def fanout(ctx: WorkflowContext, inp: FanoutInput) -> int:
    marks = MARKS.setdefault(ctx.task_id, [])
    marks.append(time.perf_counter())
    result = await ctx.map(nap, [inp.seconds] * inp.branches, name="nap")
    marks.append(time.perf_counter())
    return result.ok


def make_texts(n: int) -> list[str]:
    """n distinct ~1 MB texts: seeded random words from a fixed vocabulary of made-up words (zlib gets ~2x)."""
    rng = random.Random(SEED)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 12))) for _ in range(VOCABULARY)]
    texts = []
    for i in range(n):
        words = random.Random(SEED + 1 + i).choices(vocab, k=LARGE_BYTES // 6)
        text = " ".join(words)
        if len(text) < LARGE_BYTES:
            raise RuntimeError("the vocabulary's words are shorter than assumed")
        texts.append(text[:LARGE_BYTES])
    return texts


# -- driving a run -------------------------------------------------------------------------------------------


@dataclass
class Run:
    task_id: str
    lease: Lease
    ctx: WorkflowContext
    result: Any
    setup_s: float
    """lease_next + get_task + load_steps + load_state + building the context"""
    body_s: float
    """the workflow function, called to returned"""
    marks: list[float]
    journal: StoreJournal | None = None

    @property
    def steps(self) -> list[float]:
        """Seconds between consecutive stamps: one entry per step (per ``ctx.map`` for the fan-out)."""
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]

    @property
    def loop_s(self) -> float:
        return self.marks[-1] - self.marks[0]


async def submit(store: Store, wf: Workflow[Any], inp: dict[str, Any]) -> str:
    created = await store.create_task(NewTask(tenant="bench", workflow=wf.name, input=inp), None, time.time())
    if created.task is None:
        raise RuntimeError(f"create_task did not create a task: {created}")
    return created.task.id


async def drive(store: Store, wf: Workflow[Any], task_id: str) -> Run:
    """Lease ``task_id`` and run ``wf`` on it as the embedded engine does, without its poll loop or finish."""
    gc.collect()
    MARKS[task_id] = []
    t0 = time.perf_counter()
    lease = await store.lease_next(OWNER, time.time(), LEASE_S, 5)
    if lease is None or lease.task_id != task_id:
        raise RuntimeError(f"expected to lease {task_id}, got {lease}")
    task = await store.get_task(task_id)
    assert task is not None
    journal = StoreJournal(store, lease, time.time, lambda _: None)
    ctx = WorkflowContext(
        journal=journal,
        history=await store.load_steps(task_id),
        state=await store.load_state(task_id),
        started_at=task.started_at or task.created_at,
        clock=time.time,
    )
    t1 = time.perf_counter()
    result = await wf.fn(ctx, wf.input_model.model_validate(task.input))
    t2 = time.perf_counter()
    return Run(task_id, lease, ctx, result, t1 - t0, t2 - t1, MARKS.pop(task_id), journal)


async def finish(store: Store, run: Run) -> None:
    if run.journal is not None:
        await run.journal.drain()  # as the engine does before the run's end: nothing held may land after it
    envelope = build_envelope(TaskStatus.succeeded, run.ctx, run.result, time.perf_counter(), [])
    await store.finish(run.lease, run.task_id, TaskStatus.succeeded, envelope, time.time())


class NullJournal:
    """A journal that keeps nothing: what the context itself costs per step, with no store behind it."""

    run_attempt = 1

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    async def emit(self, type: str, data: dict[str, Any], *, durable: bool = True, live: bool = False) -> None:
        return None

    async def record_step(self, step: StepCheckpoint, events: Sequence[tuple[str, dict[str, Any]]]) -> None:
        return None

    async def set_state(self, key: str, value: Any, event: tuple[str, dict[str, Any]] | None) -> None:
        return None

    async def set_progress(self, fraction: float, step: str | None) -> None:
        return None

    async def load_blob(self, ref: BlobRef) -> Any:
        raise RuntimeError("the null journal stores no blobs")


async def context_only(n: int) -> list[float]:
    gc.collect()
    task_id = f"null-{time.perf_counter_ns()}"
    MARKS[task_id] = []
    ctx = WorkflowContext(journal=NullJournal(task_id), started_at=time.time())
    await noop_steps.fn(ctx, StepsInput(steps=n))
    return MARKS.pop(task_id)


async def plain_loop(n: int) -> list[float]:
    marks = [time.perf_counter()]
    for i in range(n):
        await noop(i)
        marks.append(time.perf_counter())
    return marks


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def say(message: str) -> None:
    print(f"[bench_workflow {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- 1. per-step checkpoint overhead -------------------------------------------------------------------------


# The event types the write being queued carries: set around ``append_nowait`` and ``record_step`` by the probe
# (a context variable, so concurrent steps of ``ctx.map`` and ``record_step``'s await of ``_pack`` cannot mix them).
CARRYING: ContextVar[tuple[str, ...]] = ContextVar("carrying", default=())


@dataclass
class Commit:
    """One fsync'd commit of the writer thread: the kind of each write it carried (the method that queued it), the
    event types each write carried, and the writer thread's seconds from BEGIN to COMMIT."""

    kinds: list[str]
    events: list[tuple[str, ...]]
    seconds: float = float("nan")

    def count(self, event: str) -> int:
        return sum(carried.count(event) for carried in self.events)


class WriterProbe:
    """Watches one ``SQLiteStore``'s writes by wrapping some of its methods on the instance: ``_enqueue`` (every
    write is queued through it), ``_commit_batch`` (the writer thread commits each group of queued writes in one
    transaction, one fsync), and ``append_nowait`` (``append`` goes through it) and ``record_step``, to see which
    events each write carries. A write's kind is the method that queued it (``record_step``, ``append_nowait``,
    ...), read from its closure's ``__qualname__``."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.enqueued: list[str] = []
        self.commits: list[Commit] = []
        self._carried: dict[Any, tuple[str, ...]] = {}  # a queued write's function -> the events it carries

    @staticmethod
    def kind(fn: Any) -> str:
        parts = getattr(fn, "__qualname__", repr(fn)).split(".")
        return parts[1] if len(parts) > 2 and parts[0] == "SQLiteStore" else ".".join(parts)

    def __enter__(self) -> WriterProbe:
        store = self.store
        enqueue, append_nowait, record_step = store._enqueue, store.append_nowait, store.record_step
        commit = type(store)._commit_batch

        def counting_enqueue(fn: Any) -> Any:
            self.enqueued.append(self.kind(fn))
            self._carried[fn] = CARRYING.get()  # before the writer thread can see the write
            return enqueue(fn)

        def carrying_append(lease: Lease, type: str, data: dict[str, Any], now: float) -> Any:
            token = CARRYING.set((type,))
            try:
                return append_nowait(lease, type, data, now)
            finally:
                CARRYING.reset(token)

        async def carrying_record(
            lease: Lease, step: StepCheckpoint, events: Sequence[tuple[str, dict[str, Any]]], now: float
        ) -> None:
            token = CARRYING.set(tuple(t for t, _ in events))
            try:
                await record_step(lease, step, events, now)
            finally:
                CARRYING.reset(token)

        def timed_commit(conn: sqlite3.Connection, batch: list[Any]) -> None:
            entry = Commit([self.kind(job.fn) for job in batch], [self._carried.pop(job.fn, ()) for job in batch])
            self.commits.append(entry)  # before the commit settles the futures, so counts are never late
            t0 = time.perf_counter()
            try:
                commit(conn, batch)
            finally:
                entry.seconds = time.perf_counter() - t0

        store._enqueue = counting_enqueue  # type: ignore[method-assign]
        store._commit_batch = timed_commit  # type: ignore[method-assign]
        store.append_nowait = carrying_append  # type: ignore[method-assign]
        store.record_step = carrying_record  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        # back to the class's methods
        del self.store._enqueue, self.store._commit_batch, self.store.append_nowait, self.store.record_step

    def since(self, enqueued: int, commits: int) -> tuple[list[str], list[Commit]]:
        return self.enqueued[enqueued:], self.commits[commits:]


STEP_WRITES = {"append", "append_nowait", "record_step", "set_state"}


@dataclass
class WritePattern:
    """A run's writes, as the probe saw them (the lease and other task-level writes left out)."""

    steps: int
    enqueued: Counter[str]
    commits: list[Commit]

    @property
    def writes_per_step(self) -> float:
        return sum(self.enqueued.values()) / self.steps

    @property
    def commits_per_step(self) -> float:
        return len(self.commits) / self.steps

    @property
    def started(self) -> int:
        """``step_started`` events committed, however they were written."""
        return sum(c.count("step_started") for c in self.commits)

    @property
    def started_in_checkpoint(self) -> int:
        """``step_started`` events that ``record_step`` carried: written in a step checkpoint's transaction."""
        return sum(
            carried.count("step_started")
            for c in self.commits
            for kind, carried in zip(c.kinds, c.events, strict=True)
            if kind == "record_step"
        )

    @property
    def started_grouped(self) -> int:
        """``step_started`` events written on their own (``append_nowait``) that group commit joined to a
        checkpoint's commit."""
        return sum(
            carried.count("step_started")
            for c in self.commits
            if "record_step" in c.kinds
            for kind, carried in zip(c.kinds, c.events, strict=True)
            if kind != "record_step"
        )

    @property
    def started_with_checkpoint(self) -> int:
        return self.started_in_checkpoint + self.started_grouped

    def sizes(self) -> str:
        counts = Counter(len(c.kinds) for c in self.commits)
        return ", ".join(f"{size} write{'s' if size > 1 else ''}: {n}" for size, n in sorted(counts.items()))

    def writer_s(self, kind: str = "record_step") -> list[float]:
        """The writer thread's seconds per commit that carried a ``kind`` write."""
        return [c.seconds for c in self.commits if kind in c.kinds]


def write_pattern(probe: WriterProbe, mark: tuple[int, int], steps: int) -> WritePattern:
    enqueued, commits = probe.since(*mark)
    step_commits = [c for c in commits if STEP_WRITES & set(c.kinds)]
    return WritePattern(steps, Counter(k for k in enqueued if k in STEP_WRITES), step_commits)


@dataclass
class SlowBench:
    """Runs of one step longer than the journal's hold, each watched through ``store.read``."""

    visible: list[float] = field(default_factory=list)  # s from before ctx.step to step_started seen by a read
    created: list[float] = field(default_factory=list)  # the event's created_at - time.time() before ctx.step
    step: list[float] = field(default_factory=list)  # ctx.step's span, s
    reads: list[float] = field(default_factory=list)  # s per store.read of the watcher
    writes: list[WritePattern] = field(default_factory=list)


@dataclass
class StepBench:
    per_step: dict[str, list[float]] = field(default_factory=dict)  # kind -> per-repetition mean s/step
    singles: dict[str, list[float]] = field(default_factory=dict)  # kind -> every single step's seconds
    overhead: list[float] = field(default_factory=list)  # per repetition: sqlite - plain, s/step
    setup: list[float] = field(default_factory=list)  # sqlite lease + load + context, s
    writes: WritePattern | None = None  # over one extra, untimed run
    raw_commit: list[float] = field(default_factory=list)  # s per bare fsync'd WAL commit
    append: list[float] = field(default_factory=list)  # s per awaited SQLiteStore.append (one event)
    record: list[float] = field(default_factory=list)  # s per SQLiteStore.record_step (+ 2 events)
    pair: list[float] = field(default_factory=list)  # s per held emit(step_started) + record_step, via StoreJournal
    pair_writes: WritePattern | None = None
    pack_call: list[float] = field(default_factory=list)  # s per ``await store._pack(small int)``
    pack_inline: list[float] = field(default_factory=list)  # s per ``pack(small int)`` called in place
    walk: list[float] = field(default_factory=list)  # s per ``looks_small(small int, ...)``
    small_in_place: bool = False  # whether _pack's walk lets that small result pack in place
    bare_try: list[float] = field(default_factory=list)  # s per ``await noop(i)``
    tenacity_try: list[float] = field(default_factory=list)  # s per the same through ``DEFAULT_RETRY.retrying()``
    slow: SlowBench | None = None

    def add(self, kind: str, marks: list[float]) -> None:
        self.per_step.setdefault(kind, []).append((marks[-1] - marks[0]) / (len(marks) - 1))
        self.singles.setdefault(kind, []).extend(b - a for a, b in zip(marks, marks[1:], strict=False))


async def count_writes(store: SQLiteStore, n: int) -> WritePattern:
    """Writes and commits of one extra (untimed) ``n``-step no-op run."""
    task_id = await submit(store, noop_steps, {"steps": n})
    with WriterProbe(store) as probe:
        run = await drive(store, noop_steps, task_id)
        found = write_pattern(probe, (0, 0), n)
    await finish(store, run)
    return found


async def store_calls(store: SQLiteStore, n: int, out: StepBench) -> None:
    """A step's writes called directly under one lease, ``n`` times each way: an awaited ``append`` of a
    ``step_started`` event; ``record_step`` with its ``step_completed`` and ``budget`` events; and the two as a
    no-op step issues them through ``StoreJournal`` (``emit(..., durable=False)``, held, then ``record_step``)."""
    task_id = await submit(store, noop_steps, {"steps": n})
    lease = await store.lease_next(OWNER, time.time(), LEASE_S, 5)
    assert lease is not None and lease.task_id == task_id
    budget = {"limits": dict.fromkeys(("steps", "tool_calls", "tokens", "cost_usd", "deadline_s")), "used": {}}
    seq = 0

    def checkpoint(key: str) -> tuple[StepCheckpoint, list[tuple[str, dict[str, Any]]]]:
        nonlocal seq
        seq += 1
        cp = StepCheckpoint(key=key, seq=seq, fn="bench.noop", result=seq, usage={"steps": 1}, finished_at=time.time())
        done = {"step": key, "kind": "step", "tries": 1, "duration_ms": 0.01}
        return cp, [("step_completed", done), ("budget", budget)]

    for i in range(n):
        started = {"step": f"s-{i}", "kind": "step", "attempt": 1}
        t0 = time.perf_counter()
        await store.append(lease, "step_started", started, time.time())
        t1 = time.perf_counter()
        await store.record_step(lease, *checkpoint(f"s-{i}"), time.time())
        t2 = time.perf_counter()
        out.append.append(t1 - t0)
        out.record.append(t2 - t1)
    limit = INLINE_LIMIT // 4  # the walk budget SQLiteStore._pack gives looks_small
    out.small_in_place = looks_small(n, limit)
    for i in range(n):
        t0 = time.perf_counter()
        await store._pack(i)
        t1 = time.perf_counter()
        pack(i)
        t2 = time.perf_counter()
        looks_small(i, limit)
        out.pack_call.append(t1 - t0)
        out.pack_inline.append(t2 - t1)
        out.walk.append(time.perf_counter() - t2)
    journal = StoreJournal(store, lease, time.time, lambda _: None)
    with WriterProbe(store) as probe:
        for i in range(n):
            started = {"step": f"p-{i}", "kind": "step", "attempt": 1}
            t0 = time.perf_counter()
            await journal.emit("step_started", started, durable=False)
            await journal.record_step(*checkpoint(f"p-{i}"))
            out.pair.append(time.perf_counter() - t0)
        await journal.drain()
        out.pair_writes = write_pattern(probe, (0, 0), n)
    await store.finish(lease, task_id, TaskStatus.succeeded, {"status": "success"}, time.time())


async def first_tries(n: int, out: StepBench) -> None:
    """What a successful first try costs bare (as ``WorkflowContext._execute`` now runs it) and through a tenacity
    ``AsyncRetrying`` from ``RetryPolicy.retrying()`` (as every try ran before)."""
    gc.collect()
    for i in range(n):
        t0 = time.perf_counter()
        await noop(i)
        t1 = time.perf_counter()
        async for attempt in DEFAULT_RETRY.retrying():
            with attempt:
                await noop(i)
        out.bare_try.append(t1 - t0)
        out.tenacity_try.append(time.perf_counter() - t1)


async def watch_started(store: SQLiteStore, task_id: str, reads: list[float]) -> tuple[float, float]:
    """Read the task's event log every ``POLL_S`` until a ``step_started`` shows: (perf_counter when the read that
    found it returned, the event's created_at)."""
    deadline = time.perf_counter() + 10.0
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        events = await store.read(task_id, 0)
        t1 = time.perf_counter()
        reads.append(t1 - t0)
        for event in events:
            if event.type == "step_started":
                return t1, event.created_at
        await asyncio.sleep(POLL_S)
    raise RuntimeError("step_started never became readable")


async def bench_slow(store: SQLiteStore, reps: int) -> SlowBench:
    """A step that sleeps ``SLOW_STEP_S`` (longer than the hold): when does its ``step_started`` become readable?"""
    out = SlowBench()
    for _ in range(reps):
        task_id = await submit(store, slow_step, {})
        watcher = asyncio.create_task(watch_started(store, task_id, out.reads))
        with WriterProbe(store) as probe:
            run = await drive(store, slow_step, task_id)
            out.writes.append(write_pattern(probe, (0, 0), 1))
        seen, created = await watcher
        await finish(store, run)
        out.visible.append(seen - run.marks[0])
        out.created.append(created - WALL.pop(task_id))
        out.step.append(run.loop_s)
    return out


async def bench_steps(cfg: Config, workdir: Path) -> StepBench:
    out = StepBench(raw_commit=fsync_commit_times(workdir / "raw.db", RAW_COMMITS))
    store = SQLiteStore(workdir / "steps" / "keel.db")
    try:
        for rep in range(-cfg.step_warmup, cfg.step_reps):
            plain = await plain_loop(STEPS)
            bare_ctx = await context_only(STEPS)
            mem_store = InMemoryStore()
            mem = await drive(mem_store, noop_steps, await submit(mem_store, noop_steps, {"steps": STEPS}))
            durable = await drive(store, noop_steps, await submit(store, noop_steps, {"steps": STEPS}))
            await finish(store, durable)
            if rep < 0:
                continue
            if mem.result != durable.result or durable.ctx.executed != [f"noop-{i}" for i in range(STEPS)]:
                raise RuntimeError("the no-op workflow did not run its 20 steps")
            out.add("plain", plain)
            out.add("context", bare_ctx)
            out.add("in-memory", mem.marks)
            out.add("sqlite", durable.marks)
            out.overhead.append(out.per_step["sqlite"][-1] - out.per_step["plain"][-1])
            out.setup.append(durable.setup_s)
        out.writes = await count_writes(store, STEPS)
        await store_calls(store, RAW_COMMITS, out)
        await first_tries(RETRY_CALLS, out)
        out.slow = await bench_slow(store, cfg.slow_reps)
    finally:
        await store.aclose()
    return out


# -- 2. parallel branches ------------------------------------------------------------------------------------


@dataclass
class FanBench:
    gather: list[float] = field(default_factory=list)
    map: list[float] = field(default_factory=list)  # ctx.map call to return
    workflow: list[float] = field(default_factory=list)  # lease .. workflow returned
    engine: list[float] = field(default_factory=list)  # create_task .. terminal, through EmbeddedEngine
    engine_noop: list[float] = field(default_factory=list)  # the same for the 20-step no-op workflow
    engine_noop_inside: list[float] = field(default_factory=list)  # its envelope's metadata.duration_ms, in s


async def bench_fanout(cfg: Config, workdir: Path) -> FanBench:
    out = FanBench()
    store = SQLiteStore(workdir / "fanout" / "keel.db")
    try:
        warm = await drive(store, fanout, await submit(store, fanout, {"seconds": 0.01}))
        await finish(store, warm)
        for _ in range(cfg.fan_reps):
            gc.collect()
            t0 = time.perf_counter()
            await asyncio.gather(*(asyncio.sleep(BRANCH_SECONDS) for _ in range(BRANCHES)))
            out.gather.append(time.perf_counter() - t0)
            run = await drive(store, fanout, await submit(store, fanout, {}))
            await finish(store, run)
            if run.result != BRANCHES:
                raise RuntimeError(f"ctx.map finished {run.result} of {BRANCHES} branches")
            out.map.append(run.loop_s)
            out.workflow.append(run.setup_s + run.body_s)
    finally:
        await store.aclose()
    return out


async def wait_terminal(store: Store, task_id: str, timeout: float = 60.0) -> Task:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = await store.get_task(task_id)
        if task is not None and task.status.terminal:
            return task
        await asyncio.sleep(0.002)
    raise RuntimeError(f"task {task_id} did not finish in {timeout} s")


async def engine_once(store: Store, engine: EmbeddedEngine, wf: Workflow[Any], inp: dict[str, Any]) -> Task:
    gc.collect()
    t0 = time.perf_counter()
    task_id = await submit(store, wf, inp)
    engine.wake()
    task = await wait_terminal(store, task_id)
    task.metadata["bench_e2e_s"] = time.perf_counter() - t0
    if task.status is not TaskStatus.succeeded:
        raise RuntimeError(f"{wf.name} ended {task.status}: {task.envelope}")
    return task


async def bench_engine(cfg: Config, workdir: Path, out: FanBench) -> None:
    store = SQLiteStore(workdir / "engine" / "keel.db")
    registry = WorkflowRegistry()
    registry.register(noop_steps)
    registry.register(fanout)
    engine = EmbeddedEngine(store, registry, workers=1, lease_s=30, poll_s=0.05)
    await engine.start()
    try:
        await engine_once(store, engine, noop_steps, {"steps": 2})  # warm-up
        for _ in range(cfg.engine_reps):
            task = await engine_once(store, engine, noop_steps, {"steps": STEPS})
            out.engine_noop.append(task.metadata["bench_e2e_s"])
            assert task.envelope is not None
            out.engine_noop_inside.append(task.envelope["metadata"]["duration_ms"] / 1000)
            task = await engine_once(store, engine, fanout, {})
            out.engine.append(task.metadata["bench_e2e_s"])
    finally:
        await engine.stop()
        await store.aclose()


# -- 3 and 4. a run, a "crash", and a resume in a new store --------------------------------------------------


@dataclass
class Resumed:
    original: Run
    resumed: Run
    db_bytes: int  # the database file after the writer closed (WAL checkpointed into it)
    wal_peak_bytes: int  # the -wal file just before closing
    blobs: int
    blob_bytes: int  # compressed, as stored
    payload_bytes: int  # uncompressed JSON
    writes: WritePattern  # the original run's
    resume_writes: WritePattern  # the resumed run's (a replay should write nothing per step)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def blob_stats(path: Path) -> tuple[int, int, int]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT count(*), coalesce(sum(length(data)), 0), coalesce(sum(size), 0) FROM blobs")
        count, stored, raw = row.fetchone()
    return int(count), int(stored), int(raw)


async def run_and_resume(path: Path, wf: Workflow[Any], inp: dict[str, Any]) -> Resumed:
    """Run ``wf`` to its end without finishing the task, close the store (the process is gone; every step was
    committed), then open a new store on the same file, take the task back as ``EmbeddedEngine.start`` does
    (``requeue_running``), lease it and run the workflow again: every step must come back from its checkpoint."""
    steps = int(inp.get("steps", 1))
    store = SQLiteStore(path)
    try:
        task_id = await submit(store, wf, inp)
        with WriterProbe(store) as probe:
            original = await drive(store, wf, task_id)
        wal = _size(path.with_name(path.name + "-wal"))
    finally:
        await store.aclose()  # the writer thread is joined: every probe entry is complete
    writes = write_pattern(probe, (0, 0), steps)
    first_outputs = OUTPUTS.pop(task_id, None)
    db_bytes = _size(path) + _size(path.with_name(path.name + "-wal"))
    store = SQLiteStore(path)
    try:
        await store.requeue_running()
        with WriterProbe(store) as probe:
            resumed = await drive(store, wf, task_id)
        await finish(store, resumed)
    finally:
        await store.aclose()
    resume_writes = write_pattern(probe, (0, 0), steps)
    if resumed.ctx.executed or not all(s.replayed for s in resumed.ctx.steps) or resumed.result != original.result:
        raise RuntimeError(f"the resume executed {resumed.ctx.executed} instead of replaying every step")
    if first_outputs is not None and not (first_outputs == OUTPUTS.pop(task_id) == TEXTS[: len(first_outputs)]):
        raise RuntimeError("the resumed run returned different payloads than the original run")
    return Resumed(original, resumed, db_bytes, wal, *blob_stats(path), writes, resume_writes)


@dataclass
class ResumeBench:
    large: list[Resumed] = field(default_factory=list)
    long: list[Resumed] = field(default_factory=list)
    partial: Resumed | None = None
    replace_blobs: int = -1  # blobs left after one partial key got 3 different ~1 MB values in turn
    replace_rows: int = -1  # workflow_state rows left
    pack: list[float] = field(default_factory=list)  # s per keel.memory.blobs.pack of one ~1 MB text
    unpack: list[float] = field(default_factory=list)  # s per unpack_blob of it


def codec_times(out: ResumeBench) -> None:
    """What the store does to a large result besides I/O: pack (JSON, sha256, zlib) and unpack_blob."""
    for text in TEXTS:
        t0 = time.perf_counter()
        packed = pack(text)
        t1 = time.perf_counter()
        assert packed.blob is not None
        unpack_blob(packed.blob)
        out.pack.append(t1 - t0)
        out.unpack.append(time.perf_counter() - t1)


async def bench_resumes(cfg: Config, workdir: Path) -> ResumeBench:
    if not TEXTS:
        TEXTS.extend(make_texts(STEPS))
    out = ResumeBench()
    codec_times(out)
    for rep in range(cfg.large_reps):
        say(f"large payloads, repetition {rep + 1}/{cfg.large_reps}")
        out.large.append(await run_and_resume(workdir / f"large-{rep}" / "keel.db", large_steps, {"steps": STEPS}))
    for rep in range(cfg.long_reps):
        say(f"{LONG_STEPS}-step resume, repetition {rep + 1}/{cfg.long_reps}")
        path = workdir / f"long-{rep}" / "keel.db"
        out.long.append(await run_and_resume(path, noop_steps, {"steps": LONG_STEPS}))
    say("large payloads with ctx.partial_result after every step (one run)")
    out.partial = await run_and_resume(workdir / "partial" / "keel.db", partial_steps, {"steps": STEPS})
    out.replace_blobs, out.replace_rows = await replaced_blobs(workdir / "replace" / "keel.db", 3)
    return out


async def replaced_blobs(path: Path, values: int) -> tuple[int, int]:
    """Run ``replace_partial`` (one partial key set to ``values`` different ~1 MB texts) and count what is left."""
    store = SQLiteStore(path)
    try:
        run = await drive(store, replace_partial, await submit(store, replace_partial, {"steps": values}))
        await finish(store, run)
    finally:
        await store.aclose()
    if run.ctx.partial != {"latest": TEXTS[values - 1]}:
        raise RuntimeError("the partial result is not the last value set")
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM workflow_state").fetchone()
    return blob_stats(path)[0], int(rows)


def growth(run: Run, window: int, stat: Callable[[Sequence[float]], float] = statistics.median) -> tuple[float, ...]:
    """Seconds per step over the first and the last ``window`` steps (median by default: a step that happens to
    run SQLite's WAL auto-checkpoint is a one-off spike, not growth), and last / first."""
    steps = run.steps
    first, last = stat(steps[:window]), stat(steps[-window:])
    return first, last, last / first


def spikes(run: Run, factor: float = 1.5) -> list[int]:
    """1-based numbers of the steps slower than ``factor`` x the run's median step."""
    typical = med(run.steps)
    return [i + 1 for i, x in enumerate(run.steps) if x > factor * typical]


# -- the run -------------------------------------------------------------------------------------------------


@dataclass
class Report:
    steps: StepBench
    fan: FanBench
    resumes: ResumeBench
    cfg: Config
    quick: bool


def run_loop(coro: Any) -> Any:
    """uvloop when installed, as under ``keel serve`` (uvicorn picks it)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def bench_all(cfg: Config, workdir: Path, quick: bool) -> Report:
    say("per-step checkpoint overhead")
    steps = await bench_steps(cfg, workdir)
    say("parallel branches (ctx.map vs asyncio.gather)")
    fan = await bench_fanout(cfg, workdir)
    say("parallel branches and 20 no-op steps through EmbeddedEngine")
    await bench_engine(cfg, workdir, fan)
    resumes = await bench_resumes(cfg, workdir)
    return Report(steps, fan, resumes, cfg, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a rough look, ~10 s)")
    parser.add_argument("--no-doc", action="store_true", help=f"print the section, do not rewrite {DOC.name}")
    args = parser.parse_args()
    cfg = QUICK if args.quick else Config()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="keel-bench-wf-") as tmp:
        workdir = Path(tmp)
        fs = filesystem(workdir)
        report = run_loop(bench_all(cfg, workdir, args.quick))
    elapsed = time.monotonic() - started
    say(f"done in {elapsed:.0f} s")
    section = render(report, elapsed, fs)
    print(section)
    if not args.no_doc:
        write_doc(section)
        print(f"wrote {DOC.relative_to(ROOT)}")


# -- the report ----------------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def filesystem(path: Path) -> str:
    """The file system type the temp dir (so the SQLite files) lives on, from /proc/mounts."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return f"{kind} ({best or '?'})"


def machine(fs: str) -> str:
    cpu = cpu_model()
    versions = []
    for module in ("pydantic", "uvloop"):
        with contextlib.suppress(Exception):
            versions.append(f"{module} {__import__(module).__version__}")
    return (
        f"nproc={os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), {cpu}; Python {platform.python_version()} "
        f"on {platform.system()} {platform.release()}; SQLite {sqlite3.sqlite_version}; {', '.join(versions)}; "
        f"temp dir on {fs}"
    )


def ms(seconds: float, digits: int = 3) -> str:
    return f"{seconds * 1000:.{digits}f} ms"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f} µs"


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def iqr(values: Sequence[float]) -> str:
    if len(values) < 2:
        return "—"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1 * 1000:.3f}–{q3 * 1000:.3f} ms"


def p90(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else float("nan")


def step_rows(s: StepBench) -> list[list[str]]:
    plain = med(s.per_step["plain"])
    rows = []
    labels = {
        "plain": "plain loop of awaited no-op coroutines",
        "context": "`WorkflowContext` on a journal that stores nothing",
        "in-memory": "`InMemoryStore`",
    }
    for kind, label in labels.items():
        per = med(s.per_step[kind])
        ratio = f"{per / plain:,.0f}×" if kind != "plain" else "1×"
        rows.append([label, us(per), us(p90(s.singles[kind])), ratio, BEFORE[kind]])
    per = med(s.per_step["sqlite"])
    rows.append(
        [
            "`SQLiteStore` (WAL, synchronous=FULL)",
            ms(per),
            ms(p90(s.singles["sqlite"])),
            f"{per / plain:,.0f}×",
            BEFORE["sqlite"],
        ]
    )
    return rows


def started_cell(w: WritePattern) -> str:
    """How many ``step_started`` events shared a commit with a step checkpoint, and how."""
    with_cp, inside, grouped = w.started_with_checkpoint, w.started_in_checkpoint, w.started_grouped
    if with_cp == 0:
        return f"0 of {w.started}"
    if grouped == 0:
        return f"{with_cp} of {w.started}, inside `record_step`'s transaction"
    if inside == 0:
        return f"{with_cp} of {w.started}, queued on their own and joined by group commit"
    return f"{with_cp} of {w.started} ({inside} inside `record_step`, {grouped} joined by group commit)"


def where_rows(s: StepBench) -> list[list[str]]:
    w = s.writes
    assert w is not None
    pair = s.pair_writes
    pack_label = (
        "`await SQLiteStore._pack(small result)`: packed in place (of which the `looks_small` walk; `pack()` alone)"
        if s.small_in_place
        else "`await SQLiteStore._pack(small result)`: sent to the reader pool (the `looks_small` walk; `pack()` alone)"
    )
    return [
        ["writes queued per step (counted)", f"{w.writes_per_step:.1f}", BEFORE["writes"]],
        ["fsync'd commits per step (counted)", f"{w.commits_per_step:.1f}", BEFORE["commits"]],
        [
            "`step_started` committed together with its step's checkpoint",
            started_cell(w)
            + (f" (direct `StoreJournal` calls: {pair.started_with_checkpoint} of {pair.started})" if pair else ""),
            BEFORE["shared"],
        ],
        ["writes per commit (commit size: how many)", w.sizes(), BEFORE["batches"]],
        [f"`SQLiteStore.append`, awaited (one event; median of {len(s.append)})", ms(med(s.append)), BEFORE["append"]],
        ["`SQLiteStore.record_step` (+ 2 events)", ms(med(s.record)), BEFORE["record"]],
        [
            pack_label,
            f"{us(med(s.pack_call))} ({us(med(s.walk))}; {us(med(s.pack_inline))})",
            BEFORE["pack_small"],
        ],
        [
            f"a successful first try: bare `await` (as now) vs through tenacity's `AsyncRetrying` from "
            f"`RetryPolicy.retrying()` (median of {len(s.bare_try)})",
            f"{us(med(s.bare_try))} vs {us(med(s.tenacity_try))}",
            BEFORE["retry"],
        ],
        [
            'a step\'s writes through `StoreJournal`: `emit("step_started", durable=False)` (held), then '
            "`record_step` (+ 2 events)",
            ms(med(s.pair)),
            BEFORE["pair"],
        ],
        [f"bare fsync'd WAL commit of one row (median of {RAW_COMMITS})", ms(med(s.raw_commit)), BEFORE["commit"]],
        ["lease + load history + context before the first step", ms(med(s.setup)), BEFORE["setup"]],
    ]


def slow_header(slow: SlowBench) -> str:
    return (
        f"a step longer than the {HOLD_S * 1000:g} ms hold (one step sleeping {SLOW_STEP_S:g} s, SQLite; median of "
        f"{len(slow.visible)} runs)"
    )


def slow_rows(slow: SlowBench) -> list[list[str]]:
    alone = [w.started - w.started_with_checkpoint for w in slow.writes]
    commits = [len(w.commits) for w in slow.writes]
    return [
        [
            f"`step_started` readable through `store.read`, from the step's start (read every {POLL_S * 1000:g} ms; "
            "min–max)",
            f"{ms(med(slow.visible), 1)} ({ms(min(slow.visible), 1)}–{ms(max(slow.visible), 1)})",
            BEFORE["held"],
        ],
        ["the event's `created_at` − the step's start (wall clock)", ms(med(slow.created), 1), "—"],
        ["the step: `ctx.step` call to return", ms(med(slow.step), 1), "—"],
        ["one `store.read` of the watcher", ms(med(slow.reads), 3), "—"],
        [
            "fsync'd commits for the step (counted); of them, `step_started` on its own",
            f"{commits[0]}; {alone[0]} in every run"
            if len(set(commits)) == len(set(alone)) == 1
            else f"{med(commits):.0f}; {med(alone):.0f} (per run: "
            + ", ".join(f"{c}; {a}" for c, a in zip(commits, alone, strict=True))
            + ")",
            "—",
        ],
    ]


def step_notes(s: StepBench) -> list[str]:
    sqlite, mem, bare, plain = (med(s.per_step[k]) for k in ("sqlite", "in-memory", "context", "plain"))
    commit, append, record, pair = med(s.raw_commit), med(s.append), med(s.record), med(s.pair)
    w = s.writes
    assert w is not None
    q1, _, q3 = statistics.quantiles(s.overhead, n=4) if len(s.overhead) > 1 else (nan := float("nan"), nan, nan)
    before_ctx = BEFORE_CONTEXT_S - BEFORE_PLAIN_S
    retry_saved = med(s.tenacity_try) - med(s.bare_try)
    lines = [
        f"**Overhead per step** (median over repetitions of sqlite − plain, each pair measured back to back): "
        f"{ms(med(s.overhead))}, before {BEFORE['overhead']} (interquartile range over the repetitions "
        f"{iqr(s.overhead)}); sqlite/plain = {sqlite / plain:,.0f}×, sqlite/in-memory = {sqlite / mem:.1f}×. "
        f"The in-memory test store adds {us(mem - bare)} over the bare context (it deep-copies every event); SQLite "
        f"adds {ms(sqlite - bare)}."
        + (
            f" The interquartile range crosses the {TARGET_STEP_MS:g} ms target, so on this shared 2-core machine "
            f"the verdict can flip from one run to the next."
            if q1 * 1000 <= TARGET_STEP_MS < q3 * 1000
            else ""
        ),
        f"**The context alone** (on the journal that stores nothing, minus the plain loop) costs {us(bare - plain)} "
        f"a step, against {us(before_ctx)} before ({(bare - plain) / before_ctx:.2f}×). A step's first try now runs "
        f"without tenacity, which takes over only after a retryable failure: a successful try through "
        f"`RetryPolicy.retrying()`'s `AsyncRetrying`, as every try ran before, costs {us(med(s.tenacity_try))} here "
        f"against {us(med(s.bare_try))} bare, so {us(retry_saved)} a step less. What is left is the arguments' "
        f"deep copy, the result through `to_jsonable_python` and back through a `TypeAdapter`, the budget snapshot "
        f"and the journal calls.",
    ]
    hold = f"{HOLD_S * 1000:g} ms"
    slow = s.slow
    if w.started > 0 and w.started_in_checkpoint == w.started:
        text = (
            f"**Where it goes: one fsync'd commit per step** ({w.commits_per_step:.1f} counted, before 2). "
            f"`StoreJournal` no longer queues `step_started` when the step begins: it holds it for up to {hold} "
            f"(`hold_s`), and a step that finishes sooner hands it to `record_step`, which writes it in the "
            f"checkpoint's transaction ({w.started_in_checkpoint} of {w.started} here, every no-op step). A step "
            f"that runs longer has it queued on its own when the hold expires, so stream readers still see the step "
            f"start while it runs (below). A durable write (`emit`, `set_state`, `set_progress`) releases held "
            f"events first, so the log keeps their order, and `drain()` releases them before the run's end is "
            f"written."
        )
    elif w.started == 0:
        text = (
            f"**Where it goes.** No `step_started` event was seen in the counted run's commits; "
            f"{w.commits_per_step:.1f} fsync'd commits per step (before 2)."
        )
    else:
        alone = w.started - w.started_with_checkpoint
        text = (
            f"**Where it goes.** Of {w.started} `step_started` events, {w.started_in_checkpoint} were written "
            f"inside their step's `record_step` transaction, {w.started_grouped} shared the checkpoint's commit "
            f"through group commit and {alone} got a commit of their own; {w.commits_per_step:.1f} fsync'd commits "
            f"per step (before 2). `StoreJournal` holds `step_started` for up to {hold} (`hold_s`) and hands it to "
            f"`record_step` if the step finishes sooner."
        )
    lines.append(
        text + f" Through the journal, a no-op step's writes (the held `emit`, then `record_step`) take {ms(pair)}, "
        f"against {BEFORE['pair']} before and {ms(append + record)} for an awaited `append` then `record_step` "
        f"today; a bare fsync'd commit takes {ms(commit)}."
    )
    if slow is not None and slow.visible:
        visible, step = med(slow.visible), med(slow.step)
        alone = med([w.started - w.started_with_checkpoint for w in slow.writes])
        commits = med([len(w.commits) for w in slow.writes])
        created = med(slow.created)
        when = (
            f"{ms(step - visible, 0)} before the step returned"
            if visible < step
            else "only after the step returned (the hold did not release it)"
        )
        stamp = (
            f"Its `created_at` is {ms(created, 1)} after the step's start: the journal stamps a held event when it "
            f"releases it, not when the step began."
            if created > HOLD_S / 2
            else f"Its `created_at` is {ms(created, 1)} after the step's start."
        )
        lines.append(
            f"**A step longer than the hold** (one step sleeping {SLOW_STEP_S:g} s, {len(slow.visible)} runs): its "
            f"`step_started` is readable through `store.read` {ms(visible, 1)} after the step began (the {hold} "
            f"hold, then its own commit, then up to a {POLL_S * 1000:g} ms poll and a {ms(med(slow.reads), 2)} "
            f"read), {when}. "
            + (
                f"Such a step costs {commits:.0f} fsync'd commits, `step_started` on its own and then the "
                f"checkpoint, as every step did before. "
                if alone >= 1
                else f"Such a step costs {commits:.0f} fsync'd commit(s), {alone:.0f} of them for `step_started` "
                f"alone. "
            )
            + stamp
        )
    small = (
        f"`_pack` packs a small result in place ({us(med(s.pack_call))} awaited, of which the `looks_small` "
        f"walk {us(med(s.walk))} and `pack()` {us(med(s.pack_inline))}); only a large one goes to the reader pool"
        if s.small_in_place
        else f"`_pack` sends even a small result to the reader pool ({us(med(s.pack_call))} against "
        f"{us(med(s.pack_inline))} for `pack()` in place)"
    )
    lines.append(
        f"**Against before.** `record_step` (+ 2 events) takes {ms(record)} against {BEFORE['record']} before; "
        f"{small}. This machine's bare fsync'd commit is {ms(commit)} in this run against {BEFORE['commit']} "
        f"before: taking the bare commits out (overhead − {w.commits_per_step:.0f} × bare commit) leaves "
        f"{ms(med(s.overhead) - w.commits_per_step * commit)} now against "
        f"{ms(BEFORE_OVERHEAD_S - 2 * BEFORE_COMMIT_S)} before."
    )
    return lines


def fan_rows(f: FanBench) -> list[list[str]]:
    base = med(f.gather)

    def row(label: str, values: list[float], before: str) -> list[str]:
        if not values:
            return [label, "—", "—", "—", "—", before]
        return [
            label,
            f"{med(values):.4f} s",
            f"{min(values):.4f} s",
            f"{max(values):.4f} s",
            f"{med(values) / base:.3f}×",
            before,
        ]

    return [
        row(
            f"`asyncio.gather` of {BRANCHES} × `asyncio.sleep({BRANCH_SECONDS:g})` (baseline)",
            f.gather,
            BEFORE["gather"],
        ),
        row("`ctx.map` on SQLite: the call", f.map, BEFORE["map"]),
        row("`ctx.map` workflow on SQLite: lease + load + run", f.workflow, BEFORE["workflow"]),
        row("the same task through `EmbeddedEngine`: create_task → terminal status", f.engine, BEFORE["engine"]),
        row(
            f"for scale: {STEPS} no-op steps through `EmbeddedEngine`, create_task → terminal",
            f.engine_noop,
            BEFORE["engine_noop"],
        ),
    ]


def large_rows(res: ResumeBench) -> list[list[str]]:
    large = res.large
    g = [growth(r.original, 5) for r in large]
    g_mean = [growth(r.original, 5, statistics.fmean) for r in large]
    resume = [r.resumed.setup_s + r.resumed.body_s for r in large]
    original = [r.original.setup_s + r.original.body_s for r in large]
    last = large[-1]
    slow = [spikes(r.original) for r in large]
    extra = [x - med(r.original.steps) for r in large for x in r.original.steps if x > 1.5 * med(r.original.steps)]
    writer = [s for r in large for s in r.writes.writer_s()]
    return [
        ["per step, steps 1–5 (median of 5)", ms(med([x[0] for x in g]), 2), BEFORE["large_first"]],
        ["per step, steps 16–20 (median of 5)", ms(med([x[1] for x in g]), 2), BEFORE["large_last"]],
        [
            "growth: steps 16–20 / steps 1–5 (median of the per-run ratios)",
            f"{med([x[2] for x in g]):.3f}×",
            BEFORE["large_growth"],
        ],
        [
            "the same with each window's mean (spikes included)",
            f"{med([x[2] for x in g_mean]):.3f}×",
            BEFORE["large_growth_mean"],
        ],
        [
            "steps slower than 1.5× their run's median, per run",
            "; ".join(",".join(map(str, x)) or "none" for x in slow)
            + (f" (+{ms(med(extra), 1)} each, median)" if extra else ""),
            BEFORE["large_spikes"],
        ],
        [
            "per step, all 20 (median of per-run means)",
            ms(med([r.original.loop_s / STEPS for r in large]), 2),
            BEFORE["large_step"],
        ],
        ["fsync'd commits per step (counted)", f"{med([r.writes.commits_per_step for r in large]):.1f}", "2.0"],
        [
            "writer thread per checkpoint commit (median over all steps; WAL auto-checkpoints included)",
            ms(med(writer), 2),
            BEFORE["large_writer"],
        ],
        ["original run: lease + load + 20 steps", ms(med(original), 1), BEFORE["large_original"]],
        [
            "resume: lease + load history/state + context (new store)",
            ms(med([r.resumed.setup_s for r in large]), 2),
            BEFORE["large_resume_setup"],
        ],
        [
            "resume: replay of the 20 steps (blobs read back)",
            ms(med([r.resumed.body_s for r in large]), 1),
            BEFORE["large_replay"],
        ],
        ["resume total / original run", f"{med(resume) / med(original):.3f}×", BEFORE["large_resume_ratio"]],
        [
            "of a step: `pack()` of its ~1 MB result (JSON + sha256 + zlib 1; "
            + ("now in the reader pool)" if not looks_small(TEXTS[0], INLINE_LIMIT // 4) else "now in place)"),
            ms(med(res.pack), 2),
            BEFORE["pack"],
        ],
        ["of a replayed step: `unpack_blob()` (zlib + JSON)", ms(med(res.unpack), 2), BEFORE["unpack"]],
        ["payload (JSON, all steps)", mib(last.payload_bytes), BEFORE["payload"]],
        [f"blobs stored (zlib level 1; count: {last.blobs})", mib(last.blob_bytes), BEFORE["blobs"]],
        ["database file after close (WAL checkpointed)", mib(last.db_bytes), BEFORE["db"]],
        ["WAL file at its peak", mib(last.wal_peak_bytes), BEFORE["wal"]],
    ]


def large_notes(res: ResumeBench) -> list[str]:
    last = res.large[-1]
    per_blob = last.blob_bytes / max(last.blobs, 1)
    typical = med([med(r.original.steps) for r in res.large])
    ratio = med([growth(r.original, 5)[2] for r in res.large])
    writer = med([s for r in res.large for s in r.writes.writer_s()])
    pooled = not looks_small(TEXTS[0], INLINE_LIMIT // 4)  # what SQLiteStore._pack decides for a ~1 MB result
    any_spikes = any(spikes(r.original) for r in res.large)
    verdict_line = (
        f"**No growth** ({ratio:.2f}×)." if ratio <= TARGET_GROWTH else f"**Growth: {ratio:.2f}×, look into it.**"
    )
    where = (
        "It runs in the store's reader pool before the write is queued (a ~1 MB result fails `_pack`'s "
        "`looks_small` walk; only small results pack in place)"
        if pooled
        else "A ~1 MB result passes `_pack`'s `looks_small` walk, so `pack()` runs in place on the event loop, "
        "not in the reader pool; it still runs before the write is queued"
    )
    return [
        f"{verdict_line} A step writes only its own checkpoint row and its own blob (~{mib(per_blob)} compressed); "
        f"nothing earlier is re-read or re-written.",
        f"**`pack()` is out of the writer thread.** {where}, so the single writer thread holds a large step's "
        f"commit for {ms(writer, 1)} (insert of the "
        f"~{mib(per_blob)} blob, the rows, the fsync; median) instead of that plus the {ms(med(res.pack), 1)} "
        f"`pack()`: other tasks' writes (their steps, `POST /v1/tasks`) no longer queue behind the serialisation "
        f"and compression. The step itself still waits for `pack()` (it must, to checkpoint), so a single "
        f"workflow's large step "
        + (
            "is about as long as before"
            if abs(typical / BEFORE_LARGE_TYPICAL_S - 1) <= 0.1
            else f"takes {typical / BEFORE_LARGE_TYPICAL_S:.2f}× its time before"
        )
        + f" (~{ms(typical, 1)} median, before {BEFORE['large_typical']}): the gain is for concurrent work, which "
        f"this section does not load.",
        (
            f"**The periodic slow steps are WAL auto-checkpoints**, not growth: SQLite copies the WAL into the "
            f"database (and fsyncs) once it passes 1000 pages (4 MiB), i.e. every ~{4 * 2**20 / per_blob:.0f} steps "
            f"here, inside the commit of the step that crosses it. With `PRAGMA wal_autocheckpoint=0` (tried by hand "
            f"on a subclass when this script was first written) those spikes disappeared. A window mean picks them "
            f"up or not depending on where they fall, hence the median windows."
            if any_spikes
            else "**No step was slower than 1.5× its run's median** (SQLite's WAL auto-checkpoint, due every "
            f"~{4 * 2**20 / per_blob:.0f} steps here, did not show as a spike)."
        )
        + f" A resume reads each blob back and unpacks it "
        f"({ms(med(res.unpack), 1)} a step).",
    ]


def partial_rows(res: ResumeBench) -> list[list[str]]:
    p = res.partial
    assert p is not None
    first, last, ratio = growth(p.original, 5)
    plain_last = med([growth(r.original, 5)[1] for r in res.large])
    plain_db = med([r.db_bytes for r in res.large])
    w = p.writes
    return [
        ["per step (step + partial_result), steps 1–5 (median of 5)", ms(first, 1), BEFORE["partial_first"]],
        ["per step (step + partial_result), steps 16–20 (median of 5)", ms(last, 1), BEFORE["partial_last"]],
        ["growth: steps 16–20 / steps 1–5", f"{ratio:.2f}×", BEFORE["partial_growth"]],
        [
            "steps 16–20 against the same steps without `partial_result` (section 3)",
            f"{last / plain_last:.2f}× ({ms(last, 1)} / {ms(plain_last, 1)})",
            BEFORE["partial_vs_large"],
        ],
        [
            "writes per step (counted): queued; fsync'd commits",
            f"{w.writes_per_step:.1f}; {w.commits_per_step:.1f}",
            "—",
        ],
        [
            "original run: lease + load + 20 steps",
            f"{p.original.setup_s + p.original.body_s:.2f} s",
            BEFORE["partial_original"],
        ],
        [
            "resume: lease + load history/state + context (`load_state` unpacks every stored partial)",
            ms(p.resumed.setup_s, 1),
            BEFORE["partial_resume_setup"],
        ],
        [
            "resume: replay of the 20 steps and 20 `partial_result` calls",
            ms(p.resumed.body_s, 1),
            BEFORE["partial_replay"],
        ],
        ["resume total", f"{p.resumed.setup_s + p.resumed.body_s:.2f} s", BEFORE["partial_resume"]],
        [
            "state writes during the resume (counted)",
            str(p.resume_writes.enqueued["set_state"]),
            BEFORE["partial_resume_writes"],
        ],
        [f"blobs stored (zlib level 1; count: {p.blobs})", mib(p.blob_bytes), BEFORE["partial_blobs"]],
        ["database file after the run", mib(p.db_bytes), BEFORE["partial_db"]],
        ["database file / the section 3 run's", f"{p.db_bytes / plain_db:.2f}×", BEFORE["partial_db_ratio"]],
        [
            "one key set to 3 different ~1 MB values in turn: blobs left; state rows left",
            f"{res.replace_blobs}; {res.replace_rows}",
            "— (not measured; the old code never deleted a blob)",
        ],
    ]


def partial_notes(res: ResumeBench) -> list[str]:
    p = res.partial
    assert p is not None
    first, last, ratio = growth(p.original, 5)
    plain_last = med([growth(r.original, 5)[1] for r in res.large])
    plain_db = med([r.db_bytes for r in res.large])
    plain_setup = med([r.resumed.setup_s for r in res.large])
    grows = ratio > TARGET_GROWTH
    big = p.db_bytes / plain_db > 1.5
    lines = [
        '**The fix.** `partial_result(key, value)` now writes only that key\'s row (`set_state(f"partial:{key}", '
        'value)`) instead of re-packing the whole accumulated `ctx.partial` dict into one `"partial"` row and '
        "adding a new blob for it each time; an unchanged value (a resumed run re-deriving it) writes nothing; a "
        "replaced blob is deleted once no step or state row refers to it. `execute_plan` saves one key per node "
        '(`"{name}:{node_id}"`), so `ctx.run_plan` gets the same shape.',
        (
            f"**Measured:** {'per-step time still grows' if grows else 'per-step time no longer grows'} "
            f"({ratio:.2f}×, before {BEFORE['partial_growth']}; steps 16–20 take {ms(last, 1)}, before "
            f"{BEFORE['partial_last']}), and the database is {p.db_bytes / plain_db:.2f}× the run without partial "
            f"results (before {BEFORE['partial_db_ratio']})"
            + (", more than expected." if big else ".")
            + f" It holds {p.blobs} blobs, not {2 * STEPS}: each partial value here is the step's own result, so "
            f"it packs to the same content-addressed blob and `INSERT OR IGNORE` stores it once. A step with its "
            f"`partial_result` costs {last / plain_last:.1f}× a step without ({ms(last, 1)} against "
            f"{ms(plain_last, 1)}): the same ~1 MB is serialised, hashed and compressed a second time "
            f"({ms(med(res.pack), 1)}) for the state row before `INSERT OR IGNORE` finds the blob already there, "
            f"plus one more fsync'd commit ({p.writes.commits_per_step:.0f} per step against "
            f"{med([r.writes.commits_per_step for r in res.large]):.0f})."
        ),
        f"**Resume:** {p.resumed.setup_s + p.resumed.body_s:.2f} s (before {BEFORE['partial_resume']}), with "
        f"{p.resume_writes.enqueued['set_state']} state writes (every replayed `partial_result` finds its value "
        f"already stored). The setup takes {ms(p.resumed.setup_s, 1)} against {ms(plain_setup, 2)} in section 3 "
        f"because `load_state` reads and unpacks every stored partial value up front (here {mib(p.payload_bytes)} "
        f"of JSON), "
        f"before the first step; the replay then reads the same blobs again through the step rows.",
        f"**Blob deletion checked:** a key set to 3 different ~1 MB values in turn leaves {res.replace_blobs} "
        f"blob{'s' if res.replace_blobs != 1 else ''} and {res.replace_rows} state row"
        f"{'s' if res.replace_rows != 1 else ''}"
        + (" (the replaced ones are gone)." if res.replace_blobs == 1 else " — replaced blobs are not deleted."),
    ]
    return lines


def long_rows(long: list[Resumed]) -> list[list[str]]:
    g = [growth(r.original, 20) for r in long]
    resume = [r.resumed.setup_s + r.resumed.body_s for r in long]
    original = [r.original.setup_s + r.original.body_s for r in long]
    return [
        ["original run, per step", ms(med([r.original.loop_s / LONG_STEPS for r in long])), BEFORE["long_step"]],
        [
            "original, steps 1–20 vs 181–200 per step",
            f"{ms(med([x[0] for x in g]))} vs {ms(med([x[1] for x in g]))}",
            BEFORE["long_window"],
        ],
        ["resume: lease + load history + context", ms(med([r.resumed.setup_s for r in long]), 2), BEFORE["long_setup"]],
        ["resume: replay, per step", us(med([r.resumed.body_s / LONG_STEPS for r in long])), BEFORE["long_replay"]],
        [
            "resume total / original run (each: lease + load + all steps)",
            f"{med(resume) / med(original):.3f}×",
            BEFORE["long_ratio"],
        ],
    ]


def target_rows(r: Report) -> list[list[str]]:
    overhead = med(r.steps.overhead)
    map_s = med(r.fan.map)
    growth_ratio = med([growth(x.original, 5)[2] for x in r.resumes.large])
    return [
        [
            f"checkpoint overhead per step, SQLite ({STEPS}-step no-op workflow)",
            f"≤ {TARGET_STEP_MS:g} ms",
            BEFORE["overhead"],
            ms(overhead),
            verdict(overhead * 1000 <= TARGET_STEP_MS),
        ],
        [
            f"`ctx.map`, {BRANCHES} branches × {BRANCH_SECONDS:g} s sleep, SQLite: wall",
            f"≤ {TARGET_MAP_S:g} s",
            BEFORE["map_target"],
            f"{map_s:.3f} s ({map_s / med(r.fan.gather):.3f}× gather)",
            verdict(map_s <= TARGET_MAP_S),
        ],
        [
            f"~1 MB per step: median of the last 5 / first 5 steps (no growth; the {TARGET_GROWTH:g}× threshold is "
            "this script's)",
            "~1×",
            BEFORE["large_growth"],
            f"{growth_ratio:.3f}×",
            verdict(growth_ratio <= TARGET_GROWTH),
        ],
    ]


def method(r: Report) -> str:
    c = r.cfg
    return textwrap.dedent(
        f"""\
        - One process, asyncio on uvloop (as under `keel serve`); SQLite files in a fresh temp dir. Workflows are
          driven directly as `EmbeddedEngine._execute` does (`lease_next`, `get_task`, `load_steps`, `load_state`,
          a `WorkflowContext` on a `StoreJournal`, then the workflow function) so no poll interval is timed; the
          workflow stamps `time.perf_counter()` before its first step and after each one. `gc.collect()` runs
          before each timed run. All figures are medians over repetitions.
        - Per-step overhead: {c.step_reps} repetitions after {c.step_warmup} warm-ups; each repetition runs, back to
          back, a plain loop of {STEPS} awaited `async def noop(i) -> int` calls, then the {STEPS}-step workflow of
          `ctx.step(f"noop-{{i}}", noop, i)` on a journal that stores nothing, on a fresh `InMemoryStore`, and on
          one long-lived `SQLiteStore` (a new task each time, finished after the timing). Per step = ({STEPS}
          steps' span) / {STEPS}; p90 is over every single step of every repetition. Writes and commits per step
          are counted over one extra, untimed run by wrapping, on that store instance, `_enqueue` (every queued
          write, named by the method that queued it), `_commit_batch` (every fsync'd commit and the writes it
          carried) and `append_nowait` and `record_step` (the event types each write carried). The direct store
          calls are {RAW_COMMITS} of each kind under one lease, one after the other; the first tries
          {RETRY_CALLS} of each.
        - Long step: {c.slow_reps} runs of a workflow with one step that sleeps {SLOW_STEP_S:g} s, on the same
          `SQLiteStore`; an asyncio task reads the event log (`store.read`) every {POLL_S * 1000:g} ms from before
          the lease until a `step_started` shows, and its delay is taken from the workflow's stamp before
          `ctx.step` to the return of the read that found it. `StoreJournal`'s hold is its default `hold_s`
          ({HOLD_S * 1000:g} ms).
        - Parallel branches: {c.fan_reps} repetitions of `asyncio.gather` of {BRANCHES} × `asyncio.sleep(1)`, then
          a workflow doing `ctx.map(nap, [1.0] * {BRANCHES})` on SQLite; {c.engine_reps} more through
          `EmbeddedEngine(workers=1, poll_s=0.05)` with `engine.wake()` after `create_task`, the terminal status
          polled every 2 ms.
        - Large payloads: {c.large_reps} runs, each on a fresh database, of {STEPS} steps each returning a
          distinct {LARGE_BYTES:,}-character text of seeded random words from a {VOCABULARY}-word made-up
          vocabulary (texts built before timing; results over {INLINE_LIMIT // 1024} KiB go to the compressed,
          content-addressed blob table). The store is then closed without finishing the task, a new `SQLiteStore`
          is opened on the file, `requeue_running()` (as `EmbeddedEngine.start` does) and the task is leased and
          run again: every step must replay (none executed) and return the same text. The same wrapping counts
          commits and times the writer thread's share of each (`_commit_batch`, from BEGIN to COMMIT).
        - {LONG_STEPS}-step resume: the same run → close → resume cycle, {c.long_reps} runs of the no-op
          workflow with {LONG_STEPS} steps.
        - Section 5: one run → close → resume cycle of the large-payload workflow with
          `await ctx.partial_result(f"chunk-{{i}}", text)` after each step; then, on a fresh database, a workflow
          that sets one partial key to 3 different ~1 MB texts in turn, and the `blobs` and `workflow_state` rows
          left are counted.
        - "Before" is the run of {BEFORE_DATE} on the same machine with the same script, before `step_started`
          stopped being awaited on its own (`Journal.emit(durable=False)`, now held to share its step's commit),
          before `pack()` moved out of the writer thread, before a step's first try ran without tenacity and
          before `partial_result` got a row per key."""
    )


def slow_table(s: StepBench) -> list[str]:
    if s.slow is None or not s.slow.visible:
        return []
    return [table([slow_header(s.slow), "now", "before"], slow_rows(s.slow)), ""]


def partial_section(res: ResumeBench) -> list[str]:
    if res.partial is None or not res.large:
        return []
    return [
        "### 5. Not a target: the same ~1 MB steps, each followed by `ctx.partial_result` (one run)",
        "",
        table(["measure", "now", "before"], partial_rows(res)),
        "",
        *[f"- {line}" for line in partial_notes(res)],
        "",
    ]


def render(r: Report, elapsed: float, fs: str) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    quick = " --quick" if r.quick else ""
    parts = [
        START_MARK,
        "## Workflow engine benchmark (`bench/bench_workflow.py`)",
        "",
        f"Generated by `.venv/bin/python bench/bench_workflow.py{quick}` on {now} in {elapsed:.0f} s. The "
        f'"before" figures are from the run of {BEFORE_DATE}, before the fixes to the step-start commit, to '
        f"`pack()` in the writer thread, to the per-step retry machinery and to `partial_result` (see Method).",
        "",
        f"**Machine:** {machine(fs)}.",
        "",
        "### Targets",
        "",
        table(["target", "wanted", "before", "now", "verdict"], target_rows(r)),
        "",
        f"### 1. Per-step checkpoint overhead ({STEPS}-step no-op workflow)",
        "",
        table(
            ["run", "median per step", "p90 single step", "vs plain", "before (median per step)"], step_rows(r.steps)
        ),
        "",
        table(["where a SQLite step's time goes", "now", "before"], where_rows(r.steps)),
        "",
        *slow_table(r.steps),
        *[f"- {line}" for line in step_notes(r.steps)],
        "",
        f"### 2. Parallel branches ({BRANCHES} × {BRANCH_SECONDS:g} s)",
        "",
        table(["run", "median", "min", "max", "vs gather", "before (median)"], fan_rows(r.fan)),
        "",
        f"### 3. Large payloads ({STEPS} steps × ~1 MB of text, SQLite)",
        "",
        table(["measure", "now", "before"], large_rows(r.resumes)),
        "",
        *[f"- {line}" for line in large_notes(r.resumes)],
        "",
        f"### 4. Resume of a {LONG_STEPS}-step no-op workflow (SQLite)",
        "",
        table(["measure", "now", "before"], long_rows(r.resumes.long)),
        "",
        *partial_section(r.resumes),
        "### Method",
        "",
        method(r),
        END_MARK,
    ]
    return "\n".join(parts)


def write_doc(section: str) -> None:
    write_section(section, START_MARK, END_MARK, DOC)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
