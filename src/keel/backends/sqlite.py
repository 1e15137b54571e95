"""The embedded default: SQLite in WAL mode with synchronous=FULL.

All writes go through one writer thread (SQLite has one writer anyway) that group-commits: it drains every
write waiting in its queue into one transaction, each write in its own SAVEPOINT so that one failing write
rolls back alone, and answers the callers only after the COMMIT's fsync. Under load, 32 concurrent submits
cost one fsync instead of 32. Reads use a small pool of threads with their own connections, so the event
loop never blocks on the database.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from keel.backends import rows
from keel.backends.rows import decision_of as _decision
from keel.backends.rows import effect_of as _effect
from keel.backends.rows import email_of as _email
from keel.backends.rows import outbox_of as _outbox
from keel.backends.rows import task_of as _task
from keel.backends.sqlite_memory import MEMORY_MIGRATION, SQLiteMemory
from keel.errors import LeaseLost, StoreError
from keel.files import private_dir, private_file
from keel.memory.blobs import INLINE_LIMIT, Packed, looks_small, pack, unpack_blob
from keel.memory.limits import Bucket, RateDecision, TenantLimits, take_token
from keel.memory.stores import EventSpec, at_of
from keel.memory.types import (
    LAST_USED_EVERY_S,
    ApiKey,
    BlobRef,
    CreateOutcome,
    CreateResult,
    Decision,
    EffectRecord,
    EffectSettlement,
    EmailMessage,
    Event,
    IdempotencyClaim,
    KeyRecord,
    KeySecret,
    Lease,
    LeaseState,
    ModelCallRecord,
    ModelStats,
    ModelWindow,
    NewTask,
    OutboxMessage,
    StepCheckpoint,
    Task,
    TaskStatus,
    TenantUsage,
    day_bucket,
    dead_letter_envelope,
    decide,
    hour_bucket,
    leases_without_progress,
    minute_bucket,
    new_id,
    park_status,
    tenants,
    window_horizon,
)

T = TypeVar("T")
MAX_BATCH = 128


def _values(columns: str) -> str:
    return rows.values(columns, "?")


@dataclass(slots=True)
class _Write:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


Settlement = tuple[asyncio.Future[Any], Any, BaseException | None]


def _settle(settlements: list[Settlement]) -> None:
    for future, result, error in settlements:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


MIGRATIONS: list[str] = [
    """
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        workflow TEXT NOT NULL,
        input TEXT NOT NULL,
        status TEXT NOT NULL,
        progress REAL NOT NULL DEFAULT 0,
        current_step TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        envelope TEXT,
        webhook_url TEXT,
        webhook_secret TEXT,
        budget TEXT NOT NULL DEFAULT '{}',
        metadata TEXT NOT NULL DEFAULT '{}',
        estimated_duration_s REAL,
        lease_owner TEXT,
        lease_expires_at REAL,
        fencing_token INTEGER NOT NULL DEFAULT 0,
        dead_lettered INTEGER NOT NULL DEFAULT 0,
        last_seq INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX tasks_tenant ON tasks(tenant, id);
    CREATE INDEX tasks_runnable ON tasks(status, lease_expires_at);
    CREATE TABLE events (
        task_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (task_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE idempotency_keys (
        tenant TEXT NOT NULL,
        key TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        task_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (tenant, key)
    ) WITHOUT ROWID;
    CREATE TABLE checkpoints (
        task_id TEXT NOT NULL,
        name TEXT NOT NULL,
        result TEXT NOT NULL,
        PRIMARY KEY (task_id, name)
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        task_id TEXT NOT NULL,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        event_type TEXT NOT NULL,
        payload TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL DEFAULT 'pending',
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        delivered_at REAL
    );
    CREATE INDEX outbox_due ON outbox(status, next_attempt_at);
    CREATE TABLE disabled_endpoints (
        tenant TEXT NOT NULL,
        url TEXT NOT NULL,
        disabled_at REAL NOT NULL,
        PRIMARY KEY (tenant, url)
    ) WITHOUT ROWID;
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        scopes TEXT NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    """,
    """
    CREATE INDEX tasks_status_id ON tasks(status, id);
    """,
    # v3: workflow memory. Steps get one row each (call order, attempt, tries, usage, error), large payloads
    # move to a content-addressed blob table, and partial results become named workflow state.
    """
    CREATE TABLE steps (
        task_id TEXT NOT NULL,
        key TEXT NOT NULL,
        seq INTEGER NOT NULL,
        fn TEXT NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        run_attempt INTEGER NOT NULL,
        tries INTEGER NOT NULL,
        result TEXT,
        blob_id TEXT,
        blob_size INTEGER,
        error TEXT,
        usage TEXT NOT NULL,
        duration_ms REAL NOT NULL,
        finished_at REAL NOT NULL,
        PRIMARY KEY (task_id, key)
    ) WITHOUT ROWID;
    CREATE TABLE workflow_state (
        task_id TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT,
        blob_id TEXT,
        blob_size INTEGER,
        PRIMARY KEY (task_id, key)
    ) WITHOUT ROWID;
    CREATE TABLE blobs (
        id TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        data BLOB NOT NULL
    );
    CREATE INDEX steps_blob ON steps(blob_id) WHERE blob_id IS NOT NULL;
    CREATE INDEX workflow_state_blob ON workflow_state(blob_id) WHERE blob_id IS NOT NULL;
    INSERT INTO workflow_state(task_id, key, value)
        SELECT task_id, 'partial', result FROM checkpoints WHERE name = '__partial__';
    INSERT INTO steps(task_id, key, seq, fn, kind, status, run_attempt, tries, result, usage, duration_ms,
                      finished_at)
        SELECT task_id, name, 0, '', 'step', 'completed', 1, 1, result, '{}', 0, 0
        FROM checkpoints WHERE name != '__partial__';
    DROP TABLE checkpoints;
    """,
    # v4: model accounting. Rolling per-model counters in hour buckets (for statistical SLAs) and per-tenant
    # spend in day buckets.
    """
    CREATE TABLE model_stats (
        model_id TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        provider TEXT NOT NULL,
        calls INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        structured INTEGER NOT NULL DEFAULT 0,
        json_valid INTEGER NOT NULL DEFAULT 0,
        schema_valid INTEGER NOT NULL DEFAULT 0,
        refusals INTEGER NOT NULL DEFAULT 0,
        truncations INTEGER NOT NULL DEFAULT 0,
        latency_ms_sum REAL NOT NULL DEFAULT 0,
        latency_ms_max REAL NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (model_id, bucket)
    ) WITHOUT ROWID;
    CREATE TABLE tenant_usage (
        tenant TEXT NOT NULL,
        day INTEGER NOT NULL,
        calls INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, day)
    ) WITHOUT ROWID;
    """,
    # v5: tools. A task's policy (tool allowlist, the submitter's scopes, approval mode); the effect ledger of
    # write-tool calls; the decisions a paused task waits on; the email outbox of the send_email tool.
    """
    ALTER TABLE tasks ADD COLUMN policy TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE effects (
        key TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        step TEXT NOT NULL,
        tool TEXT NOT NULL,
        args TEXT NOT NULL,
        status TEXT NOT NULL,
        result TEXT,
        error TEXT,
        executions INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX effects_by_task ON effects(task_id, created_at);
    CREATE TABLE decisions (
        task_id TEXT NOT NULL,
        call_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        tool TEXT NOT NULL,
        args TEXT NOT NULL,
        step TEXT NOT NULL,
        reason TEXT NOT NULL,
        effect_key TEXT,
        verdict TEXT,
        result TEXT,
        note TEXT,
        decided_by TEXT,
        requested_at REAL NOT NULL,
        decided_at REAL,
        PRIMARY KEY (task_id, call_id)
    ) WITHOUT ROWID;
    CREATE TABLE emails (
        key TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        task_id TEXT,
        recipients TEXT NOT NULL,
        subject TEXT NOT NULL,
        body TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'queued',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        created_at REAL NOT NULL,
        sent_at REAL,
        error TEXT
    );
    CREATE INDEX emails_due ON emails(status, next_at);
    """,
    MEMORY_MIGRATION,
    # v7: keys get an expiry and a last-used time (issue 21); retention finds ended tasks by when they finished.
    """
    ALTER TABLE api_keys ADD COLUMN expires_at REAL;
    ALTER TABLE api_keys ADD COLUMN last_used_at REAL;
    CREATE INDEX api_keys_by_tenant ON api_keys(tenant, created_at);
    CREATE INDEX tasks_finished ON tasks(finished_at) WHERE finished_at IS NOT NULL;
    """,
    # v8: per-tenant limits and their rate buckets (issue 21).
    rows.LIMITS_SCHEMA,
    # v9: reliability per (provider, model id). The hour buckets were keyed by model id alone, so two providers
    # serving one id (a fallback chain's backup, a self-hosted copy) shared a row under the first one's name;
    # and per-minute rows, by latency bin, for the rolling SLO window (see ModelStatsStore).
    """
    CREATE TABLE model_stats_v8 (
        provider TEXT NOT NULL,
        model_id TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        calls INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        structured INTEGER NOT NULL DEFAULT 0,
        json_valid INTEGER NOT NULL DEFAULT 0,
        schema_valid INTEGER NOT NULL DEFAULT 0,
        refusals INTEGER NOT NULL DEFAULT 0,
        truncations INTEGER NOT NULL DEFAULT 0,
        latency_ms_sum REAL NOT NULL DEFAULT 0,
        latency_ms_max REAL NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (provider, model_id, bucket)
    ) WITHOUT ROWID;
    INSERT INTO model_stats_v8 (provider, model_id, bucket, calls, errors, structured, json_valid, schema_valid,
        refusals, truncations, latency_ms_sum, latency_ms_max, input_tokens, output_tokens, cost_usd)
        SELECT provider, model_id, bucket, calls, errors, structured, json_valid, schema_valid, refusals,
        truncations, latency_ms_sum, latency_ms_max, input_tokens, output_tokens, cost_usd FROM model_stats;
    DROP TABLE model_stats;
    ALTER TABLE model_stats_v8 RENAME TO model_stats;
    CREATE TABLE model_minutes (
        provider TEXT NOT NULL,
        model_id TEXT NOT NULL,
        minute INTEGER NOT NULL,
        lat_bin INTEGER NOT NULL,
        calls INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        errors_429 INTEGER NOT NULL DEFAULT 0,
        errors_5xx INTEGER NOT NULL DEFAULT 0,
        errors_timeout INTEGER NOT NULL DEFAULT 0,
        errors_cut INTEGER NOT NULL DEFAULT 0,
        structured INTEGER NOT NULL DEFAULT 0,
        json_valid INTEGER NOT NULL DEFAULT 0,
        schema_valid INTEGER NOT NULL DEFAULT 0,
        refusals INTEGER NOT NULL DEFAULT 0,
        truncations INTEGER NOT NULL DEFAULT 0,
        repairs INTEGER NOT NULL DEFAULT 0,
        cancelled INTEGER NOT NULL DEFAULT 0,
        fallbacks INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (provider, model_id, minute, lat_bin)
    ) WITHOUT ROWID;
    CREATE INDEX model_minutes_by_minute ON model_minutes(minute);
    """,
]

_TASK_COLS = (
    "id, tenant, workflow, input, status, progress, current_step, created_at, updated_at, started_at, "
    "finished_at, attempts, cancel_requested, envelope, webhook_url, webhook_secret, budget, metadata, "
    "estimated_duration_s, dead_lettered, policy, cache_key"
)


class SQLiteStore(SQLiteMemory):
    """Implements every store seam over one SQLite file (the memory tiers through :class:`SQLiteMemory`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        private_dir(self.path.parent)
        # SQLite gives the -wal and -shm files the database file's mode, so a 0600 database keeps them 0600 too;
        # ones an older keel left behind are narrowed here.
        for file in (self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm"))):
            if file == self.path or file.exists():
                private_file(file)
        self._local = threading.local()
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._writer_loop, name="keel-sqlite-writer", daemon=True)
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="keel-sqlite-r")
        self._conns: list[sqlite3.Connection] = []
        self._buckets: dict[str, Bucket] = {}
        self._lock = threading.Lock()
        self._window_swept = 0
        self._memory_init()
        conn = self._conn()
        self._migrate(conn)
        self._writer.start()

    # -- plumbing ---------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def pragma(self, name: str) -> Any:
        return self._conn().execute(f"PRAGMA {name}").fetchone()[0]

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version in done:
                    continue
                for statement in sql.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations(version) VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _enqueue(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue a write now (writes commit in queue order); the future resolves after its COMMIT."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Write(fn=fn, loop=loop, future=future))
        return future

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._enqueue(fn)

    async def _pack(self, value: Any) -> Packed:
        # Serialising, hashing and compressing a large result is CPU work: keep it off the event loop and out of
        # the writer thread, where it would stall every other task's writes. A small one packs in microseconds,
        # less than the thread hop would cost.
        if looks_small(value, INLINE_LIMIT // 4):
            return pack(value)
        return await asyncio.get_running_loop().run_in_executor(self._readers, pack, value)

    def _writer_loop(self) -> None:
        conn = self._conn()
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._commit_batch(conn, batch)

    @staticmethod
    def _commit_batch(conn: sqlite3.Connection, batch: list[_Write]) -> None:
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    outcomes.append((job.fn(conn), None))
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    outcomes.append((None, exc))
                conn.execute("RELEASE job")
            conn.execute("COMMIT")
        except Exception as exc:  # BEGIN or COMMIT failed: nothing in the batch is durable
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(None, exc)] * len(batch)
        # One wake-up of each waiting loop per commit, not one per write: a burst of writes (a stream's tokens,
        # 32 POSTs) is settled in one callback, in queue order.
        by_loop: dict[asyncio.AbstractEventLoop, list[Settlement]] = {}
        for job, (result, error) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(job.loop, []).append((job.future, result, error))
        for loop, settlements in by_loop.items():
            loop.call_soon_threadsafe(_settle, settlements)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, lambda: fn(self._conn()))

    async def aclose(self) -> None:
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        await asyncio.get_running_loop().run_in_executor(self._readers, self._save_indexes)
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    # -- internal helpers (run inside the writer thread) -------------------------------------------

    @staticmethod
    def _fence(conn: sqlite3.Connection, lease: Lease) -> None:
        row = conn.execute("SELECT fencing_token, status FROM tasks WHERE id = ?", (lease.task_id,)).fetchone()
        if row is None or row["fencing_token"] != lease.token or row["status"] != TaskStatus.running.value:
            raise LeaseLost(f"lease on task {lease.task_id} is no longer held (token {lease.token})")

    @staticmethod
    def _append(conn: sqlite3.Connection, task_id: str, type: str, data: dict[str, Any], now: float) -> Event:
        seq = conn.execute(
            "UPDATE tasks SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq", (task_id,)
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO events(task_id, seq, type, data, created_at) VALUES (?, ?, ?, ?, ?)",
            (task_id, seq, type, json.dumps(data, separators=(",", ":")), now),
        )
        return Event(task_id=task_id, seq=seq, type=type, data=data, created_at=now)

    @staticmethod
    def _append_batch(conn: sqlite3.Connection, task_id: str, events: Sequence[EventSpec], now: float) -> list[Event]:
        """Several events in one UPDATE of the task's counter and one multi-row INSERT, not two statements each."""
        if not events:
            return []
        last = conn.execute(
            "UPDATE tasks SET last_seq = last_seq + ? WHERE id = ? RETURNING last_seq", (len(events), task_id)
        ).fetchone()[0]
        out = [
            Event(task_id=task_id, seq=last - len(events) + 1 + i, type=ev[0], data=ev[1], created_at=at_of(ev, now))
            for i, ev in enumerate(events)
        ]
        conn.executemany(
            "INSERT INTO events(task_id, seq, type, data, created_at) VALUES (?, ?, ?, ?, ?)",
            [(task_id, e.seq, e.type, json.dumps(e.data, separators=(",", ":")), e.created_at) for e in out],
        )
        return out

    @staticmethod
    def _get(conn: sqlite3.Connection, task_id: str) -> Task | None:
        row = conn.execute(f"SELECT {_TASK_COLS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return _task(row) if row else None

    def _finish_in(
        self, conn: sqlite3.Connection, task_id: str, status: TaskStatus, envelope: dict[str, Any], now: float
    ) -> Event | None:
        task = self._get(conn, task_id)
        if task is None or task.status.terminal:
            return None
        conn.execute(
            "UPDATE tasks SET status = ?, envelope = ?, finished_at = ?, updated_at = ?, lease_owner = NULL, "
            "lease_expires_at = NULL, progress = CASE WHEN ? = 'succeeded' THEN 1.0 ELSE progress END "
            "WHERE id = ?",
            (status.value, json.dumps(envelope), now, now, status.value, task_id),
        )
        event = self._append(conn, task_id, "end", {"status": status.value, "envelope": envelope}, now)
        self._webhook(conn, task, status, envelope, now)
        return event

    @staticmethod
    def _webhook(
        conn: sqlite3.Connection, task: Task, status: TaskStatus, envelope: dict[str, Any], now: float
    ) -> None:
        """Queue the task's webhook (if it has one) in the caller's transaction: the transactional outbox."""
        if task.webhook_url and task.webhook_secret:
            disabled = conn.execute(
                "SELECT 1 FROM disabled_endpoints WHERE tenant = ? AND url = ?",
                (task.tenant, task.webhook_url),
            ).fetchone()
            conn.execute(
                f"INSERT INTO outbox{_values(rows.OUTBOX_INSERT)}",
                rows.outbox_params(new_id("msg"), task, status, envelope, now, disabled=disabled is not None),
            )

    # -- TaskStore ---------------------------------------------------------------------------------

    async def create_task(self, new: NewTask, claim: IdempotencyClaim | None, now: float) -> CreateResult:
        def op(conn: sqlite3.Connection) -> CreateResult:
            if claim is not None:
                stored = rows.claim_of(
                    conn.execute(
                        "SELECT request_hash, task_id, expires_at FROM idempotency_keys WHERE tenant = ? AND key = ?",
                        (new.tenant, claim.key),
                    ).fetchone()
                )
                outcome = claim.outcome(stored, now)
                if outcome is not CreateOutcome.created:
                    assert stored is not None
                    replayed = self._get(conn, stored.task_id) if outcome is CreateOutcome.replayed else None
                    return CreateResult(outcome=outcome, task=replayed)
            task_id = new_id("tsk")
            conn.execute(f"INSERT INTO tasks{_values(rows.TASK_INSERT)}", rows.task_params(task_id, new, now))
            self._append(conn, task_id, "status", {"status": "queued"}, now)
            if claim is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency_keys(tenant, key, request_hash, task_id, created_at, "
                    "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (new.tenant, claim.key, claim.request_hash, task_id, now, claim.expires_at),
                )
            return CreateResult(outcome=CreateOutcome.created, task=self._get(conn, task_id))

        return await self._write(op)

    async def get_task(self, task_id: str, tenant: str | None = None) -> Task | None:
        return await self._read(lambda conn: tenants(self._get(conn, task_id), tenant))

    async def list_tasks(
        self, tenant: str, *, statuses: Sequence[TaskStatus] = (), limit: int = 50, before: str | None = None
    ) -> list[Task]:
        def op(conn: sqlite3.Connection) -> list[Task]:
            sql = f"SELECT {_TASK_COLS} FROM tasks WHERE tenant = ?"
            args: list[Any] = [tenant]
            if statuses:
                sql += f" AND status IN ({','.join('?' * len(statuses))})"
                args += [s.value for s in statuses]
            if before:
                sql += " AND id < ?"
                args.append(before)
            sql += " ORDER BY id DESC LIMIT ?"
            args.append(limit)
            return [_task(r) for r in conn.execute(sql, args)]

        return await self._read(op)

    async def queued_count(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            count: int = conn.execute("SELECT COUNT(*) FROM tasks WHERE status = 'queued'").fetchone()[0]
            return count

        return await self._read(op)

    async def lease_next(self, owner: str, now: float, lease_s: float, max_attempts: int) -> Lease | None:
        def op(conn: sqlite3.Connection) -> Lease | None:
            while True:
                # Two index lookups instead of one OR, which made SQLite sort the whole backlog per lease.
                # Orphans (expired leases) first, so that a busy queue cannot starve recovery.
                row = (
                    conn.execute(
                        "SELECT id, attempts FROM tasks WHERE status = 'running' AND lease_expires_at < ? "
                        "ORDER BY id LIMIT 1",
                        (now,),
                    ).fetchone()
                    or conn.execute(
                        "SELECT id, attempts FROM tasks WHERE status = 'queued' ORDER BY id LIMIT 1"
                    ).fetchone()
                )
                if row is None:
                    return None
                if row["attempts"] >= max_attempts:
                    last = conn.execute("SELECT MAX(run_attempt) FROM steps WHERE task_id = ?", (row["id"],))
                    streak = leases_without_progress(row["attempts"], last.fetchone()[0])
                    if streak >= max_attempts:
                        # A poison task: it took down its worker at the same place too often. Dead-letter it.
                        conn.execute("UPDATE tasks SET dead_lettered = 1 WHERE id = ?", (row["id"],))
                        self._finish_in(conn, row["id"], TaskStatus.failed, dead_letter_envelope(streak), now)
                        continue
                new = conn.execute(
                    "UPDATE tasks SET status = 'running', lease_owner = ?, lease_expires_at = ?, "
                    "fencing_token = fencing_token + 1, attempts = attempts + 1, updated_at = ?, "
                    "started_at = COALESCE(started_at, ?) WHERE id = ? RETURNING fencing_token, attempts",
                    (owner, now + lease_s, now, now, row["id"]),
                ).fetchone()
                self._append(conn, row["id"], "status", {"status": "running", "attempt": new["attempts"]}, now)
                return Lease(task_id=row["id"], owner=owner, token=new["fencing_token"], attempt=new["attempts"])

        return await self._write(op)

    async def renew_lease(self, lease: Lease, now: float, lease_s: float) -> LeaseState:
        def op(conn: sqlite3.Connection) -> LeaseState:
            row = conn.execute(
                "UPDATE tasks SET lease_expires_at = ? WHERE id = ? AND fencing_token = ? AND status = 'running' "
                "RETURNING cancel_requested",
                (now + lease_s, lease.task_id, lease.token),
            ).fetchone()
            if row is None:
                return LeaseState(held=False, cancel_requested=False)
            return LeaseState(held=True, cancel_requested=bool(row[0]))

        return await self._write(op)

    async def release(self, lease: Lease) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE tasks SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
                "attempts = MAX(attempts - 1, 0) WHERE id = ? AND fencing_token = ? AND status = 'running'",
                (lease.task_id, lease.token),
            )

        await self._write(op)

    async def requeue_running(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE tasks SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL "
                "WHERE status = 'running'"
            )
            return cur.rowcount

        return await self._write(op)

    async def set_progress(self, lease: Lease, progress: float, current_step: str | None, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            self._fence(conn, lease)
            conn.execute(
                "UPDATE tasks SET progress = ?, current_step = ?, updated_at = ? WHERE id = ?",
                (progress, current_step, now, lease.task_id),
            )

        await self._write(op)

    async def finish(
        self, lease: Lease | None, task_id: str, status: TaskStatus, envelope: dict[str, Any], now: float
    ) -> Event | None:
        def op(conn: sqlite3.Connection) -> Event | None:
            if lease is not None:
                self._fence(conn, lease)
            return self._finish_in(conn, task_id, status, envelope, now)

        return await self._write(op)

    async def request_cancel(self, task_id: str, tenant: str) -> Task | None:
        def op(conn: sqlite3.Connection) -> Task | None:
            task = tenants(self._get(conn, task_id), tenant)
            if task is not None and task.request_cancel():
                conn.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = ?", (task_id,))
            return task

        return await self._write(op)

    async def delete_task(self, task_id: str, tenant: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            task = tenants(self._get(conn, task_id), tenant)
            if task is None:
                return False
            task.check_deletable()
            self._delete_in(conn, task_id)
            return True

        return await self._write(op)

    def _delete_in(self, conn: sqlite3.Connection, task_id: str) -> None:
        blobs = [r[0] for r in conn.execute(rows.TASK_BLOBS.format("?"), (task_id, task_id))]
        for table in rows.TASK_RECORDS:
            conn.execute(f"DELETE FROM {table} WHERE task_id = ?", (task_id,))
        conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
        for blob in blobs:
            self._drop_blob_if_unused(conn, blob, None)

    async def sweep_tasks(self, finished_before: float, limit: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            found = conn.execute(
                f"SELECT {_TASK_COLS} FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ? "
                "ORDER BY finished_at LIMIT ?",
                (finished_before, limit),
            ).fetchall()
            ended = [t for t in map(_task, found) if t.status.terminal]
            for task in ended:
                self._delete_in(conn, task.id)
                for table, settled in rows.TASK_DELIVERIES:
                    conn.execute(f"DELETE FROM {table} WHERE task_id = ? AND {settled}", (task.id,))
            return len(ended)

        return await self._write(op)

    async def sweep_idempotency(self, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,)).rowcount

        return await self._write(op)

    # -- WorkflowStore -----------------------------------------------------------------------------

    @staticmethod
    def _put(conn: sqlite3.Connection, packed: Packed) -> tuple[str | None, str | None, int | None]:
        if packed.blob_id is not None and packed.blob is not None:
            conn.execute(
                "INSERT OR IGNORE INTO blobs(id, size, data) VALUES (?, ?, ?)",
                (packed.blob_id, packed.size, packed.blob),
            )
            return None, packed.blob_id, packed.size
        return packed.inline, None, None

    @staticmethod
    def _drop_blob_if_unused(conn: sqlite3.Connection, old: str | None, new: str | None) -> None:
        if old is not None and old != new:
            conn.execute(f"DELETE FROM blobs WHERE id = ? AND {rows.blob_unused('blobs.id')}", (old,))

    async def record_step(
        self,
        lease: Lease,
        step: StepCheckpoint,
        events: Sequence[EventSpec],
        now: float,
        *,
        effect: EffectSettlement | None = None,
    ) -> None:
        packed = await self._pack(step.result)

        def op(conn: sqlite3.Connection) -> None:
            self._fence(conn, lease)
            old = conn.execute(
                "SELECT blob_id FROM steps WHERE task_id = ? AND key = ?", (lease.task_id, step.key)
            ).fetchone()
            inline, blob_id, blob_size = self._put(conn, packed)
            conn.execute(
                f"INSERT OR REPLACE INTO steps{_values(rows.STEP_INSERT)}",
                rows.step_params(lease.task_id, step, inline, blob_id, blob_size),
            )
            if old is not None:
                self._drop_blob_if_unused(conn, old[0], blob_id)
            if effect is not None:
                self._settle(conn, effect, now)
            self._append_batch(conn, lease.task_id, events, now)

        await self._write(op)

    async def load_steps(self, task_id: str) -> list[StepCheckpoint]:
        def op(conn: sqlite3.Connection) -> list[StepCheckpoint]:
            found = conn.execute("SELECT * FROM steps WHERE task_id = ? ORDER BY seq, key", (task_id,))
            return [rows.step_of(r) for r in found]

        return await self._read(op)

    async def load_blob(self, ref: BlobRef) -> Any:
        def op(conn: sqlite3.Connection) -> bytes:
            row = conn.execute("SELECT data FROM blobs WHERE id = ?", (ref.id,)).fetchone()
            if row is None:
                raise StoreError(f"blob {ref.id} is missing")
            return bytes(row[0])

        return unpack_blob(await self._read(op))

    async def set_state(
        self, lease: Lease, key: str, value: Any, event: tuple[str, dict[str, Any]] | None, now: float
    ) -> None:
        packed = await self._pack(value)

        def op(conn: sqlite3.Connection) -> None:
            self._fence(conn, lease)
            old = conn.execute(
                "SELECT blob_id FROM workflow_state WHERE task_id = ? AND key = ?", (lease.task_id, key)
            ).fetchone()
            inline, blob_id, blob_size = self._put(conn, packed)
            conn.execute(
                "INSERT OR REPLACE INTO workflow_state(task_id, key, value, blob_id, blob_size) VALUES (?, ?, ?, ?, ?)",
                (lease.task_id, key, inline, blob_id, blob_size),
            )
            if old is not None:  # after the row moved on, so it no longer counts as a reference
                self._drop_blob_if_unused(conn, old[0], blob_id)
            if event is not None:
                self._append(conn, lease.task_id, event[0], event[1], now)

        await self._write(op)

    async def load_state(self, task_id: str) -> dict[str, Any]:
        def op(conn: sqlite3.Connection) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for r in conn.execute("SELECT key, value, blob_id FROM workflow_state WHERE task_id = ?", (task_id,)):
                if r["blob_id"]:
                    data = conn.execute("SELECT data FROM blobs WHERE id = ?", (r["blob_id"],)).fetchone()[0]
                    out[r["key"]] = unpack_blob(bytes(data))
                else:
                    out[r["key"]] = json.loads(r["value"])
            return out

        return await self._read(op)

    # -- ModelStatsStore ---------------------------------------------------------------------------

    async def record_model_call(self, tenant: str, call: ModelCallRecord) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO model_stats{_values(rows.MODEL_STATS_INSERT)} "
                "ON CONFLICT(provider, model_id, bucket) DO UPDATE SET calls = calls + 1, "
                "errors = errors + excluded.errors, "
                "structured = structured + excluded.structured, json_valid = json_valid + excluded.json_valid, "
                "schema_valid = schema_valid + excluded.schema_valid, refusals = refusals + excluded.refusals, "
                "truncations = truncations + excluded.truncations, "
                "latency_ms_sum = latency_ms_sum + excluded.latency_ms_sum, "
                "latency_ms_max = MAX(latency_ms_max, excluded.latency_ms_max), "
                "input_tokens = input_tokens + excluded.input_tokens, "
                "output_tokens = output_tokens + excluded.output_tokens, cost_usd = cost_usd + excluded.cost_usd",
                rows.model_stats_params(call),
            )
            conn.execute(
                f"INSERT INTO model_minutes{_values(rows.MODEL_MINUTES_INSERT)} "
                "ON CONFLICT(provider, model_id, minute, lat_bin) DO UPDATE SET "
                + rows.MODEL_MINUTES_ADD.format("model_minutes"),
                rows.model_minutes_params(call),
            )
            horizon = window_horizon(call.at)
            if horizon > self._window_swept:  # once a minute: rows past the longest window go
                conn.execute("DELETE FROM model_minutes WHERE minute < ?", (horizon,))
                self._window_swept = horizon
            conn.execute(
                f"INSERT INTO tenant_usage{_values(rows.USAGE_INSERT)} ON CONFLICT(tenant, day) DO UPDATE SET "
                "calls = calls + 1, input_tokens = input_tokens + excluded.input_tokens, "
                "output_tokens = output_tokens + excluded.output_tokens, cost_usd = cost_usd + excluded.cost_usd",
                rows.usage_params(tenant, call),
            )

        await self._write(op)

    async def model_stats(self, model_id: str | None = None, since: float = 0.0) -> list[ModelStats]:
        def op(conn: sqlite3.Connection) -> list[ModelStats]:
            sql, args = "SELECT * FROM model_stats WHERE bucket >= ?", [str(hour_bucket(since))]
            if model_id is not None:
                sql += " AND model_id = ?"
                args.append(model_id)
            found = conn.execute(sql + " ORDER BY model_id, bucket, provider", args)
            return [ModelStats(**{k: r[k] for k in r.keys()}) for r in found]

        return await self._read(op)

    async def model_window(self, since: float) -> list[ModelWindow]:
        def op(conn: sqlite3.Connection) -> list[ModelWindow]:
            return ModelWindow.fold(conn.execute(rows.MODEL_WINDOW_SELECT.format("?"), (minute_bucket(since),)))

        return await self._read(op)

    async def tenant_usage(self, tenant: str, since: float) -> TenantUsage:
        def op(conn: sqlite3.Connection) -> TenantUsage:
            row = conn.execute(
                "SELECT COALESCE(SUM(calls), 0), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
                "COALESCE(SUM(cost_usd), 0) FROM tenant_usage WHERE tenant = ? AND day >= ?",
                (tenant, day_bucket(since)),
            ).fetchone()
            return TenantUsage(
                tenant=tenant,
                since=day_bucket(since),
                calls=row[0],
                input_tokens=row[1],
                output_tokens=row[2],
                cost_usd=row[3],
            )

        return await self._read(op)

    # -- per-tenant limits ------------------------------------------------------------------------

    async def get_limits(self, tenant: str) -> TenantLimits | None:
        def op(conn: sqlite3.Connection) -> TenantLimits | None:
            row = conn.execute(f"SELECT {rows.LIMIT_COLS} FROM tenant_limits WHERE tenant = ?", (tenant,)).fetchone()
            return rows.limits_of(row) if row else None

        return await self._read(op)

    async def set_limits(self, tenant: str, limits: TenantLimits, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM tenant_limits WHERE tenant = ?", (tenant,))
            if limits != TenantLimits():
                conn.execute(
                    f"INSERT INTO tenant_limits{_values('tenant, updated_at, ' + rows.LIMIT_COLS)}",
                    (tenant, now, *rows.limits_params(limits)),
                )

        await self._write(op)

    async def take_token(self, bucket: str, rate_per_s: float, size: int, now: float) -> RateDecision:
        # In this process's memory, not the file: one process serves a SQLite store (the data dir's lock; an API
        # replica needs a shared store), so the bucket is exact here, and a request pays no fsync for it (a
        # write per request cost 2-4 ms). A restart refills the buckets, which only forgives a burst.
        # No await between the read and the write: atomic on the event loop.
        self._buckets[bucket], decision = take_token(self._buckets.get(bucket), rate_per_s, size, now)
        return decision

    async def active_tasks(self, tenant: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            count: int = conn.execute(
                "SELECT COUNT(*) FROM tasks WHERE tenant = ? AND status IN ('queued', 'running')", (tenant,)
            ).fetchone()[0]
            return count

        return await self._read(op)

    # -- EventLog ----------------------------------------------------------------------------------

    async def append(self, lease: Lease, type: str, data: dict[str, Any], now: float) -> Event:
        return await self.append_nowait(lease, type, data, now)

    def append_nowait(self, lease: Lease, type: str, data: dict[str, Any], now: float) -> asyncio.Future[Event]:
        def op(conn: sqlite3.Connection) -> Event:
            self._fence(conn, lease)
            return self._append(conn, lease.task_id, type, data, now)

        return self._enqueue(op)

    def append_batch_nowait(self, lease: Lease, events: Sequence[EventSpec], now: float) -> asyncio.Future[list[Event]]:
        def op(conn: sqlite3.Connection) -> list[Event]:
            self._fence(conn, lease)
            return self._append_batch(conn, lease.task_id, events, now)

        return self._enqueue(op)

    async def read(self, task_id: str, after: int, limit: int = 500) -> list[Event]:
        def op(conn: sqlite3.Connection) -> list[Event]:
            found = conn.execute(
                "SELECT seq, type, data, created_at FROM events WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (task_id, after, limit),
            )
            return [Event(task_id=task_id, seq=r[0], type=r[1], data=json.loads(r[2]), created_at=r[3]) for r in found]

        return await self._read(op)

    # -- Outbox ------------------------------------------------------------------------------------

    async def due(self, now: float, limit: int, *, claim_s: float = 0.0) -> list[OutboxMessage]:
        def op(conn: sqlite3.Connection) -> list[OutboxMessage]:
            pending = conn.execute(
                "SELECT * FROM outbox WHERE status = 'pending' AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at LIMIT ?",
                (now, limit),
            ).fetchall()
            found = [_outbox(r) for r in pending]
            if claim_s:
                conn.executemany(
                    "UPDATE outbox SET next_attempt_at = ? WHERE id = ?", [(now + claim_s, m.id) for m in found]
                )
            return found

        return await (self._write(op) if claim_s else self._read(op))

    async def delivered(self, msg_id: str, now: float) -> None:
        await self._write(
            lambda c: c.execute(
                "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, delivered_at = ?, "
                "last_error = NULL WHERE id = ?",
                (now, msg_id),
            )
        )

    async def retry_at(self, msg_id: str, when: float, error: str) -> None:
        await self._write(
            lambda c: c.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE id = ?",
                (when, error, msg_id),
            )
        )

    async def dead(self, msg_id: str, error: str) -> None:
        await self._write(
            lambda c: c.execute(
                "UPDATE outbox SET status = 'dead', attempts = attempts + 1, last_error = ? WHERE id = ?",
                (error, msg_id),
            )
        )

    async def disable_endpoint(self, tenant: str, url: str, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO disabled_endpoints(tenant, url, disabled_at) VALUES (?, ?, ?)",
                (tenant, url, now),
            )
            conn.execute(
                "UPDATE outbox SET status = 'disabled', last_error = 'endpoint disabled (410 Gone)' "
                "WHERE tenant = ? AND url = ? AND status = 'pending'",
                (tenant, url),
            )

        await self._write(op)

    async def messages(self, task_id: str) -> list[OutboxMessage]:
        return await self._read(
            lambda c: [_outbox(r) for r in c.execute("SELECT * FROM outbox WHERE task_id = ? ORDER BY id", (task_id,))]
        )

    # -- KeyStore ----------------------------------------------------------------------------------

    async def create_key(
        self, tenant: str, scopes: frozenset[str], now: float, *, expires_at: float | None = None
    ) -> str:
        new = KeySecret.mint()
        record = new.record(tenant, scopes, now, expires_at)
        await self._write(
            lambda c: c.execute(f"INSERT INTO api_keys{_values(rows.KEY_INSERT)}", rows.key_params(record))
        )
        return new.plaintext

    @staticmethod
    def _key(conn: sqlite3.Connection, key_id: str, tenant: str | None) -> KeyRecord | None:
        row = conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        key = rows.key_of(row) if row else None
        return key if key is not None and tenant in (None, key.tenant) else None

    async def verify_key(self, key: str, now: float | None = None) -> ApiKey | None:
        presented = KeySecret.parse(key)
        if presented is None:
            return None
        at = time.time() if now is None else now
        record = await self._read(lambda conn: self._key(conn, presented.id, None))
        if record is None or not record.accepts(presented, at):
            return None
        if record.use_due(at):
            await self._write(lambda c: c.execute(rows.KEY_USED.format("?"), (at, record.id, at - LAST_USED_EVERY_S)))
        return record.api_key()

    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        def op(conn: sqlite3.Connection) -> list[KeyRecord]:
            if tenant is None:
                found = conn.execute("SELECT * FROM api_keys ORDER BY created_at, id")
            else:
                found = conn.execute("SELECT * FROM api_keys WHERE tenant = ? ORDER BY created_at, id", (tenant,))
            return [rows.key_of(r) for r in found]

        return await self._read(op)

    async def revoke_key(self, key_id: str, now: float, *, tenant: str | None = None) -> KeyRecord | None:
        def op(conn: sqlite3.Connection) -> KeyRecord | None:
            key = self._key(conn, key_id, tenant)
            if key is None:
                return None
            revoked = key.revoked(now)
            conn.execute(
                f"UPDATE api_keys SET {rows.KEY_LIFETIME.format('?')} WHERE id = ?", rows.key_lifetime_params(revoked)
            )
            return revoked

        return await self._write(op)

    async def rotate_key(
        self, key_id: str, now: float, *, grace_s: float = 0.0, tenant: str | None = None
    ) -> tuple[KeyRecord, str] | None:
        minted = KeySecret.mint()

        def op(conn: sqlite3.Connection) -> KeyRecord | None:
            key = self._key(conn, key_id, tenant)
            if key is None:
                return None
            old, new = key.retired(now, grace_s), key.successor(minted, now)
            conn.execute(
                f"UPDATE api_keys SET {rows.KEY_LIFETIME.format('?')} WHERE id = ?", rows.key_lifetime_params(old)
            )
            conn.execute(f"INSERT INTO api_keys{_values(rows.KEY_INSERT)}", rows.key_params(new))
            return new

        new = await self._write(op)
        return None if new is None else (new, minted.plaintext)

    # -- SecretStore -------------------------------------------------------------------------------

    async def reseal_secrets(self, reseal: Callable[[str], str | None]) -> int:
        def op(conn: sqlite3.Connection) -> int:
            changed = 0
            for table, column, key in rows.SECRET_COLUMNS:
                found = conn.execute(f"SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL").fetchall()
                updates = [(new, r[0]) for r in found if (new := reseal(r[1])) is not None]
                conn.executemany(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", updates)
                changed += len(updates)
            return changed

        return await self._write(op)

    # -- EffectLedger ------------------------------------------------------------------------------

    @staticmethod
    def _effect_row(conn: sqlite3.Connection, key: str) -> EffectRecord | None:
        row = conn.execute("SELECT * FROM effects WHERE key = ?", (key,)).fetchone()
        return _effect(row) if row else None

    async def begin_effect(self, lease: Lease, effect: EffectRecord, now: float) -> tuple[EffectRecord, bool]:
        def op(conn: sqlite3.Connection) -> tuple[EffectRecord, bool]:
            self._fence(conn, lease)
            existing = self._effect_row(conn, effect.key)
            if existing is not None:
                return existing, False
            conn.execute(f"INSERT INTO effects{_values(rows.EFFECT_INSERT)}", rows.effect_params(effect, now))
            stored = self._effect_row(conn, effect.key)
            assert stored is not None
            return stored, True

        return await self._write(op)

    async def settle_effect(self, lease: Lease, settlement: EffectSettlement, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            self._fence(conn, lease)
            self._settle(conn, settlement, now)

        await self._write(op)

    @staticmethod
    def _settle(conn: sqlite3.Connection, s: EffectSettlement, now: float) -> None:
        conn.execute(f"UPDATE effects SET {rows.EFFECT_SETTLE.format('?')} WHERE key = ?", rows.settle_params(s, now))

    async def get_effect(self, key: str) -> EffectRecord | None:
        return await self._read(lambda conn: self._effect_row(conn, key))

    async def list_effects(self, task_id: str) -> list[EffectRecord]:
        def op(conn: sqlite3.Connection) -> list[EffectRecord]:
            found = conn.execute("SELECT * FROM effects WHERE task_id = ? ORDER BY created_at, key", (task_id,))
            return [_effect(r) for r in found]

        return await self._read(op)

    # -- DecisionStore -----------------------------------------------------------------------------

    async def request_decisions(
        self, lease: Lease, decisions: Sequence[Decision], envelope: dict[str, Any], now: float
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            self._fence(conn, lease)
            for d in decisions:
                cur = conn.execute(
                    f"INSERT OR IGNORE INTO decisions{_values(rows.DECISION_INSERT)}", rows.decision_params(d, now)
                )
                if cur.rowcount:
                    self._append(conn, d.task_id, "decision_requested", {**d.public(), "requested_at": now}, now)
            pending = conn.execute(
                "SELECT count(*) FROM decisions WHERE task_id = ? AND verdict IS NULL", (lease.task_id,)
            ).fetchone()[0]
            status = park_status(pending)
            # Parking is not a crash: the attempt is given back, as on a graceful release.
            conn.execute(
                "UPDATE tasks SET status = ?, envelope = ?, lease_owner = NULL, lease_expires_at = NULL, "
                "attempts = MAX(attempts - 1, 0), updated_at = ? WHERE id = ?",
                (status.value, json.dumps(envelope) if pending else None, now, lease.task_id),
            )
            self._append(conn, lease.task_id, "status", {"status": status.value, "pending_decisions": pending}, now)
            task = self._get(conn, lease.task_id)
            if pending and task is not None:
                self._webhook(conn, task, status, envelope, now)  # tell whoever decides

        await self._write(op)

    async def decide(self, task_id: str, tenant: str, decision: Decision, now: float) -> Decision:
        def op(conn: sqlite3.Connection) -> Decision:
            row = conn.execute(
                "SELECT * FROM decisions WHERE task_id = ? AND call_id = ?", (task_id, decision.call_id)
            ).fetchone()
            current = _decision(row) if row else None
            decided, changed = decide(task_id, tenant, self._get(conn, task_id), current, decision, now)
            if changed:
                self._record_verdict(conn, decided, now)
            return decided

        return await self._write(op)

    def _record_verdict(self, conn: sqlite3.Connection, d: Decision, now: float) -> bool:
        """Store ``d``'s verdict and its event; queue the task once nothing it waits on is open (True if so)."""
        conn.execute(
            f"UPDATE decisions SET {rows.DECISION_VERDICT.format('?')} WHERE task_id = ? AND call_id = ?",
            rows.verdict_params(d),
        )
        self._append(conn, d.task_id, "decision_made", d.public(), now)
        if conn.execute(
            "SELECT 1 FROM decisions WHERE task_id = ? AND verdict IS NULL LIMIT 1", (d.task_id,)
        ).fetchone():
            return False
        moved = conn.execute(
            "UPDATE tasks SET status = 'queued', envelope = NULL, updated_at = ? "
            "WHERE id = ? AND status = 'waiting_for_approval'",
            (now, d.task_id),
        ).rowcount
        if moved:
            self._append(conn, d.task_id, "status", {"status": "queued"}, now)
        return bool(moved)

    async def load_decisions(self, task_id: str) -> list[Decision]:
        def op(conn: sqlite3.Connection) -> list[Decision]:
            found = conn.execute("SELECT * FROM decisions WHERE task_id = ? ORDER BY requested_at, call_id", (task_id,))
            return [_decision(r) for r in found]

        return await self._read(op)

    async def expire_decisions(self, requested_before: float, now: float) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            found = conn.execute(
                "SELECT * FROM decisions WHERE verdict IS NULL AND requested_at < ? ORDER BY task_id",
                (requested_before,),
            ).fetchall()
            queued = []
            for row in found:
                d = _decision(row).expire(now)
                if self._record_verdict(conn, d, now):
                    queued.append(d.task_id)
            return queued

        return await self._write(op)

    # -- EmailOutbox -------------------------------------------------------------------------------

    async def enqueue_email(self, message: EmailMessage, now: float) -> tuple[EmailMessage, bool]:
        def op(conn: sqlite3.Connection) -> tuple[EmailMessage, bool]:
            cur = conn.execute(
                f"INSERT OR IGNORE INTO emails{_values(rows.EMAIL_INSERT)}", rows.email_params(message, now)
            )
            row = conn.execute("SELECT * FROM emails WHERE key = ?", (message.key,)).fetchone()
            return _email(row), bool(cur.rowcount)

        return await self._write(op)

    async def get_email(self, key: str) -> EmailMessage | None:
        def op(conn: sqlite3.Connection) -> EmailMessage | None:
            row = conn.execute("SELECT * FROM emails WHERE key = ?", (key,)).fetchone()
            return _email(row) if row else None

        return await self._read(op)

    async def due_emails(self, now: float, limit: int, *, claim_s: float = 0.0) -> list[EmailMessage]:
        def op(conn: sqlite3.Connection) -> list[EmailMessage]:
            pending = conn.execute(
                "SELECT * FROM emails WHERE status = 'queued' AND next_at <= ? ORDER BY next_at LIMIT ?", (now, limit)
            ).fetchall()
            found = [_email(r) for r in pending]
            if claim_s:
                conn.executemany("UPDATE emails SET next_at = ? WHERE key = ?", [(now + claim_s, m.key) for m in found])
            return found

        return await (self._write(op) if claim_s else self._read(op))

    async def email_sent(self, key: str, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE emails SET status = 'sent', sent_at = ?, attempts = attempts + 1, error = NULL WHERE key = ?",
                (now, key),
            )

        await self._write(op)

    async def email_retry(self, key: str, when: float, error: str, *, give_up: bool = False) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE emails SET status = ?, next_at = ?, attempts = attempts + 1, error = ? WHERE key = ?",
                ("failed" if give_up else "queued", when, error[:2000], key),
            )

        await self._write(op)
