"""The scale-out store: PostgreSQL through psycopg 3's async driver and a connection pool, vectors on pgvector.

Semantics are the SQLite store's (``keel.backends.sqlite``, the spec), carried over to a server that several
processes share:

* every write is one transaction; a write under a lease first locks the task row and checks its fencing token, so
  a superseded worker can never commit, and a lease taker cannot slip in between. The writes a run makes at every
  step (a checkpoint, an event, a batch of tokens, its state, its progress) are each **one statement**: the fence is
  the ``UPDATE tasks … WHERE fencing_token = %s AND status = 'running'`` that also takes the event counter, and
  every other write of the statement joins its result, so a lost lease writes nothing. One statement in autocommit
  is one round trip and one fsync'd commit (``_run``); the rarer multi-statement writes take ``BEGIN … COMMIT``
  (``_tx``);
* ``lease_next`` picks with ``FOR UPDATE SKIP LOCKED``, so workers never queue behind each other;
* an idempotency claim is an ``INSERT … ON CONFLICT`` on the key: of concurrent identical creates, one inserts and
  the others wait for its commit, then replay it;
* a task's event ``seq`` comes from ``UPDATE tasks SET last_seq = last_seq + 1 … RETURNING``: the row lock
  serialises appenders until commit, a rollback gives the number back, so seqs are gapless and commit in order;
* writes one process makes for one task start in the order they were issued (``append_nowait`` then
  ``record_step`` cannot swap), as SQLite's single writer queue guarantees; appends queued back to back, before
  the first of them went out, go as one statement;
* schema migrations are numbered in ``keel_schema_migrations`` and applied at open under ``pg_advisory_lock``.

The pool opens on first use (``open_store`` is synchronous), or explicitly with ``await store.open()``.
"""

from __future__ import annotations

import asyncio
import json
import operator
import select
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection, errors
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from keel.backends import rows
from keel.backends.postgres_memory import MEMORY_SCHEMA, Conn, PostgresMemory, Row
from keel.backends.rows import decision_of as _decision
from keel.backends.rows import effect_of as _effect
from keel.backends.rows import email_of as _email
from keel.backends.rows import outbox_of as _outbox
from keel.backends.rows import task_of as _task
from keel.errors import ConfigError, KeelError, LeaseLost, StoreError
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


def _values(columns: str) -> str:
    return rows.values(columns, "%s")


_MIGRATION_LOCK = 0x6B65656C_6D696772  # "keelmigr": one advisory lock for every keel schema migration
_RETRIES = 5  # a deadlock or serialization failure is retried this many times

MIGRATIONS: list[str] = [
    """
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        workflow TEXT NOT NULL,
        input TEXT NOT NULL,
        status TEXT NOT NULL,
        progress DOUBLE PRECISION NOT NULL DEFAULT 0,
        current_step TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        attempts INTEGER NOT NULL DEFAULT 0,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        envelope TEXT,
        webhook_url TEXT,
        webhook_secret TEXT,
        budget TEXT NOT NULL DEFAULT '{}',
        metadata TEXT NOT NULL DEFAULT '{}',
        estimated_duration_s DOUBLE PRECISION,
        lease_owner TEXT,
        lease_expires_at DOUBLE PRECISION,
        fencing_token BIGINT NOT NULL DEFAULT 0,
        dead_lettered BOOLEAN NOT NULL DEFAULT FALSE,
        last_seq BIGINT NOT NULL DEFAULT 0,
        policy TEXT NOT NULL DEFAULT '{}',
        cache_key TEXT
    );
    CREATE INDEX tasks_tenant ON tasks(tenant, id);
    CREATE INDEX tasks_runnable ON tasks(status, lease_expires_at);
    CREATE INDEX tasks_status_id ON tasks(status, id);
    CREATE INDEX tasks_by_cache_key ON tasks(tenant, cache_key, finished_at) WHERE cache_key IS NOT NULL;
    CREATE TABLE events (
        task_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (task_id, seq)
    );
    CREATE TABLE idempotency_keys (
        tenant TEXT NOT NULL,
        key TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        task_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant, key)
    );
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
        next_attempt_at DOUBLE PRECISION NOT NULL,
        last_error TEXT,
        delivered_at DOUBLE PRECISION
    );
    CREATE INDEX outbox_due ON outbox(status, next_attempt_at);
    CREATE INDEX outbox_by_task ON outbox(task_id);
    CREATE TABLE disabled_endpoints (
        tenant TEXT NOT NULL,
        url TEXT NOT NULL,
        disabled_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant, url)
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        scopes TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    );
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
        blob_size BIGINT,
        error TEXT,
        usage TEXT NOT NULL,
        duration_ms DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (task_id, key)
    );
    CREATE TABLE workflow_state (
        task_id TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT,
        blob_id TEXT,
        blob_size BIGINT,
        PRIMARY KEY (task_id, key)
    );
    CREATE TABLE blobs (
        id TEXT PRIMARY KEY,
        size BIGINT NOT NULL,
        data BYTEA NOT NULL
    );
    CREATE INDEX steps_blob ON steps(blob_id) WHERE blob_id IS NOT NULL;
    CREATE INDEX workflow_state_blob ON workflow_state(blob_id) WHERE blob_id IS NOT NULL;
    CREATE TABLE model_stats (
        model_id TEXT NOT NULL,
        bucket BIGINT NOT NULL,
        provider TEXT NOT NULL,
        calls BIGINT NOT NULL DEFAULT 0,
        errors BIGINT NOT NULL DEFAULT 0,
        structured BIGINT NOT NULL DEFAULT 0,
        json_valid BIGINT NOT NULL DEFAULT 0,
        schema_valid BIGINT NOT NULL DEFAULT 0,
        refusals BIGINT NOT NULL DEFAULT 0,
        truncations BIGINT NOT NULL DEFAULT 0,
        latency_ms_sum DOUBLE PRECISION NOT NULL DEFAULT 0,
        latency_ms_max DOUBLE PRECISION NOT NULL DEFAULT 0,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
        PRIMARY KEY (model_id, bucket)
    );
    CREATE TABLE tenant_usage (
        tenant TEXT NOT NULL,
        day BIGINT NOT NULL,
        calls BIGINT NOT NULL DEFAULT 0,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, day)
    );
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
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
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
        requested_at DOUBLE PRECISION NOT NULL,
        decided_at DOUBLE PRECISION,
        PRIMARY KEY (task_id, call_id)
    );
    CREATE INDEX decisions_open ON decisions(requested_at) WHERE verdict IS NULL;
    CREATE TABLE emails (
        key TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        task_id TEXT,
        recipients TEXT NOT NULL,
        subject TEXT NOT NULL,
        body TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'queued',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at DOUBLE PRECISION NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        sent_at DOUBLE PRECISION,
        error TEXT
    );
    CREATE INDEX emails_due ON emails(status, next_at);
    """
    + ";"
    + MEMORY_SCHEMA,
    # v2: keys get an expiry and a last-used time (issue 21); retention finds ended tasks by when they finished.
    """
    ALTER TABLE api_keys ADD COLUMN expires_at DOUBLE PRECISION;
    ALTER TABLE api_keys ADD COLUMN last_used_at DOUBLE PRECISION;
    CREATE INDEX api_keys_by_tenant ON api_keys(tenant, created_at);
    CREATE INDEX tasks_finished ON tasks(finished_at) WHERE finished_at IS NOT NULL;
    """,
    # v3: per-tenant limits and their rate buckets (issue 21).
    rows.LIMITS_SCHEMA
    + """;
    CREATE TABLE rate_buckets (
        name TEXT PRIMARY KEY,
        tokens DOUBLE PRECISION NOT NULL,
        at DOUBLE PRECISION NOT NULL
    )
    """,
    # v4: reliability per (provider, model id): the hour buckets keyed by provider too (two providers serving one
    # id were one row), and per-minute rows, by latency bin, for the rolling SLO window (see ModelStatsStore).
    """
    ALTER TABLE model_stats DROP CONSTRAINT model_stats_pkey, ADD PRIMARY KEY (provider, model_id, bucket);
    CREATE TABLE model_minutes (
        provider TEXT NOT NULL,
        model_id TEXT NOT NULL,
        minute BIGINT NOT NULL,
        lat_bin INTEGER NOT NULL,
        calls BIGINT NOT NULL DEFAULT 0,
        errors BIGINT NOT NULL DEFAULT 0,
        errors_429 BIGINT NOT NULL DEFAULT 0,
        errors_5xx BIGINT NOT NULL DEFAULT 0,
        errors_timeout BIGINT NOT NULL DEFAULT 0,
        errors_cut BIGINT NOT NULL DEFAULT 0,
        structured BIGINT NOT NULL DEFAULT 0,
        json_valid BIGINT NOT NULL DEFAULT 0,
        schema_valid BIGINT NOT NULL DEFAULT 0,
        refusals BIGINT NOT NULL DEFAULT 0,
        truncations BIGINT NOT NULL DEFAULT 0,
        repairs BIGINT NOT NULL DEFAULT 0,
        cancelled BIGINT NOT NULL DEFAULT 0,
        fallbacks BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (provider, model_id, minute, lat_bin)
    );
    CREATE INDEX model_minutes_by_minute ON model_minutes(minute);
    """,
]
"""Version N is ``MIGRATIONS[N - 1]``; append, never edit. (Version 1 is the SQLite schema as of its v6.)"""

_TASK_COLS = (
    "id, tenant, workflow, input, status, progress, current_step, created_at, updated_at, started_at, "
    "finished_at, attempts, cancel_requested, envelope, webhook_url, webhook_secret, budget, metadata, "
    "estimated_duration_s, dead_lettered, policy, cache_key"
)


_FENCED = (
    "WITH f AS (UPDATE tasks SET last_seq = last_seq + %s::bigint WHERE id = %s AND fencing_token = %s "
    "AND status = 'running' RETURNING last_seq), "
    "ev AS (INSERT INTO events(task_id, seq, type, data, created_at) "
    "SELECT %s::text, f.last_seq - %s::bigint + x.i, x.type, x.data, x.at FROM f, "
    "unnest(%s::text[], %s::text[], %s::float8[]) WITH ORDINALITY AS x(type, data, at, i))"
)
"""The head of every fenced one-statement write (:meth:`PostgresStore._fenced`)."""


@dataclass(frozen=True, slots=True)
class _Write:
    """One more write of a fenced statement: a CTE named ``name`` whose ``sql`` joins ``f`` (the fence's row)."""

    name: str
    sql: str
    params: Sequence[Any]


@dataclass(slots=True)
class _Appends:
    """Appends for one task, queued and not yet sent: one statement for all (``append_batch_nowait``)."""

    lease: Lease
    events: list[tuple[str, dict[str, Any], float]]
    parts: list[tuple[int, int, asyncio.Future[list[Event]]]]
    """Each caller's (first index, count, future) into ``events``."""
    sent: bool = False
    written_by: asyncio.Future[list[Event]] | None = None


def _relay(done: asyncio.Future[list[Event]], waiting: asyncio.Future[T], pick: Callable[[list[Event]], T]) -> None:
    """Hand a caller (``waiting``) its part (``pick``) of a write's outcome: its events, the write's error, or its
    cancellation. The outcome is retrieved even when the caller was cancelled and the write went on without it."""
    exc = None if done.cancelled() else done.exception()
    if waiting.done():
        return
    if done.cancelled():
        waiting.cancel()
    elif exc is not None:
        waiting.set_exception(exc)
    else:
        waiting.set_result(pick(done.result()))


def _lost(lease: Lease) -> LeaseLost:
    return LeaseLost(f"lease on task {lease.task_id} is no longer held (token {lease.token})")


def _row_writes(table: str, columns: str, types: str, params: Sequence[Any], packed: Packed) -> list[_Write]:
    """Upsert one ``(task_id, key)`` row of ``table`` (``steps`` or ``workflow_state``) holding ``packed``, under
    the fence: its blob stored first, and the blob the row held before deleted when no other row refers to it
    (blobs are shared by content). One statement sees one snapshot, so the replaced row is left out by its key."""
    task_id, key = params[0], params[1]
    casts = ", ".join(f"%s::{t}" for t in types.split(", "))
    writes = [_Write("o", f"SELECT blob_id FROM {table} WHERE task_id = %s AND key = %s", (task_id, key))]
    _, blob_id, _ = _stored(packed)
    if blob_id is not None:
        writes.append(
            _Write(
                "b",
                "INSERT INTO blobs(id, size, data) SELECT %s::text, %s::bigint, %s::bytea FROM f "
                "ON CONFLICT (id) DO NOTHING",
                (packed.blob_id, packed.size, packed.blob),
            )
        )
    writes += [
        _Write(
            "r",
            f"INSERT INTO {table}({columns}) SELECT {casts} FROM f ON CONFLICT (task_id, key) DO UPDATE SET "
            + rows.excluded(columns, keep=("task_id", "key")),
            params,
        ),
        _Write(
            "g",
            "DELETE FROM blobs USING o, f WHERE blobs.id = o.blob_id AND o.blob_id IS DISTINCT FROM %s::text AND "
            + rows.blob_unused("blobs.id", besides=(table, "%s::text", "%s::text")),
            (blob_id, task_id, key),
        ),
    ]
    return writes


def _settle_write(s: EffectSettlement, now: float) -> _Write:
    """An effect's settlement, under the fence: alone (``settle_effect``) or in its step's checkpoint."""
    return _Write(
        "z",
        f"UPDATE effects SET {rows.EFFECT_SETTLE.format('%s')} WHERE key = %s AND EXISTS (SELECT FROM f)",
        rows.settle_params(s, now),
    )


def _stored(packed: Packed) -> tuple[str | None, str | None, int | None]:
    """A row's (inline value, blob id, blob size) for ``packed``."""
    if packed.blob_id is not None and packed.blob is not None:
        return None, packed.blob_id, packed.size
    return packed.inline, None, None


_STEP_TYPES = "text, text, integer, text, text, text, integer, integer, text, text, bigint, text, text, float8, float8"
"""The types of ``rows.STEP_INSERT``'s columns, in order."""


async def _check(conn: Conn) -> None:
    """The pool's check of a connection it hands out, without a round trip on the hot path: an idle connection has
    nothing to read, so a readable socket means the server wrote to it (its FATAL on shutdown or a terminated
    backend) or closed it. Only then is the connection probed (psycopg's own check), and dropped by the pool if
    it fails, so a restarted server never fails the next write."""
    if not conn.closed:
        probe = select.poll()  # not select.select: a busy server's descriptors go past FD_SETSIZE
        probe.register(conn.pgconn.socket, select.POLLIN | select.POLLPRI)
        if not probe.poll(0):
            return
    await AsyncConnectionPool.check_connection(conn)


async def _one(conn: Conn, query: Any, args: Any = None) -> Row | None:
    cur = await conn.execute(query, args)
    return await cur.fetchone()


async def migrate(url: str) -> list[int]:
    """Apply the migrations ``url``'s database lacks, each in its own transaction, under an advisory lock that
    serialises every process opening the store at once. Returns the versions applied (none when up to date)."""
    try:
        conn = await AsyncConnection.connect(url, autocommit=True)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to Postgres: {exc}") from exc
    applied: list[int] = []
    async with conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            try:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error as exc:
                raise ConfigError(
                    f"the pgvector extension is missing and could not be created ({exc}): install pgvector on the "
                    "server and run CREATE EXTENSION vector as a superuser"
                ) from exc
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS keel_schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT version FROM keel_schema_migrations")
            done = {r[0] for r in await cur.fetchall()}
            for version, ddl in enumerate(MIGRATIONS, start=1):
                if version in done:
                    continue
                async with conn.transaction():
                    for statement in ddl.split(";"):
                        if statement.strip():
                            await conn.execute(statement.encode())
                    await conn.execute("INSERT INTO keel_schema_migrations(version) VALUES (%s)", (version,))
                applied.append(version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied


class PostgresStore(PostgresMemory):
    """Implements every store seam over one Postgres database (the memory tiers through :class:`PostgresMemory`)."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10) -> None:
        self.url = url
        self._pool: AsyncConnectionPool[AsyncConnection[Row]] = AsyncConnectionPool(
            url,
            connection_class=AsyncConnection[Row],
            # Autocommit: a one-statement write or read is one round trip (psycopg would send BEGIN first, and
            # COMMIT after); the writes of several statements open their transaction themselves (``_tx``).
            kwargs={"row_factory": dict_row, "autocommit": True},
            configure=register_vector_async,
            check=_check,  # a server restart must not fail the next write
            min_size=min_size,
            max_size=max_size,
            open=False,
        )
        self._opened = False
        self._window_swept = 0
        self._closed = False
        self._opening: asyncio.Lock | None = None
        self._tails: dict[str, asyncio.Future[Any]] = {}
        self._appends: dict[str, _Appends] = {}
        self._space_dims = {}
        self._space_stats = {}
        self._analyzed = set()

    # -- plumbing ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Migrate the schema and open the pool (done on first use otherwise)."""
        if self._opened:
            return
        if self._closed:
            raise StoreError("the Postgres store is closed")
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._opened:
                return
            await migrate(self.url)
            await self._pool.open(wait=True, timeout=30)
            self._opened = True

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        tails = list(self._tails.values())
        if tails:
            await asyncio.wait(tails)
        self._closed = True
        await self._pool.close()

    async def _tx(self, fn: Callable[[Conn], Awaitable[T]], *, transaction: bool = True) -> T:
        """Run ``fn`` in one transaction, retried on a deadlock or serialization failure; driver errors become
        :class:`StoreError`. ``transaction=False`` is :meth:`_run`."""
        await self.open()
        for attempt in range(_RETRIES):
            try:
                async with self._pool.connection() as conn:
                    if not transaction:
                        return await fn(conn)
                    async with conn.transaction():
                        return await fn(conn)
            except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
                if attempt == _RETRIES - 1:
                    raise StoreError(f"Postgres: {exc} (after {_RETRIES} attempts)") from exc
                await asyncio.sleep(0.01 * (attempt + 1))
            except KeelError:
                raise
            except psycopg.Error as exc:
                raise StoreError(f"Postgres: {exc}") from exc
        raise AssertionError("unreachable")

    async def _run(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``fn`` on a pooled connection in autocommit: each statement it runs is a transaction of its own, so
        ``fn`` runs one write statement at most (or reads). One round trip a statement, no ``BEGIN``/``COMMIT``."""
        return await self._tx(fn, transaction=False)

    _read = _run  # in READ COMMITTED each statement takes its own snapshot, in a transaction block or not

    def _after(self, task_id: str, fn: Callable[[Conn], Awaitable[T]], *, one: bool = False) -> asyncio.Future[T]:
        """Start the write now, but only after this process's earlier writes for ``task_id`` (so a step's
        ``step_started`` event never commits after its checkpoint's events). ``one``: ``fn`` is one statement
        (:meth:`_run`)."""
        prev = self._tails.get(task_id)

        async def run() -> T:
            if prev is not None:
                await asyncio.wait([prev])
            return await self._tx(fn, transaction=not one)

        coro: Coroutine[Any, Any, T] = run()
        future = asyncio.ensure_future(coro)
        self._tails[task_id] = future

        def forget(f: asyncio.Future[T]) -> None:
            if self._tails.get(task_id) is f:
                del self._tails[task_id]

        future.add_done_callback(forget)
        return future

    async def _pack(self, value: Any) -> Packed:
        # Serialising, hashing and compressing a large result is CPU work: keep it off the event loop.
        if looks_small(value, INLINE_LIMIT // 4):
            return pack(value)
        return await asyncio.to_thread(pack, value)

    # -- internal helpers (inside a transaction) ---------------------------------------------------

    @staticmethod
    async def _fence(conn: Conn, lease: Lease) -> None:
        row = await _one(conn, "SELECT fencing_token, status FROM tasks WHERE id = %s FOR UPDATE", (lease.task_id,))
        if row is None or row["fencing_token"] != lease.token or row["status"] != TaskStatus.running.value:
            raise _lost(lease)

    @staticmethod
    async def _append(conn: Conn, task_id: str, type: str, data: dict[str, Any], now: float) -> Event:
        row = await _one(conn, "UPDATE tasks SET last_seq = last_seq + 1 WHERE id = %s RETURNING last_seq", (task_id,))
        if row is None:
            raise StoreError(f"no task {task_id}")
        seq = int(row["last_seq"])
        await conn.execute(
            "INSERT INTO events(task_id, seq, type, data, created_at) VALUES (%s, %s, %s, %s, %s)",
            (task_id, seq, type, json.dumps(data, separators=(",", ":")), now),
        )
        return Event(task_id=task_id, seq=seq, type=type, data=data, created_at=now)

    @staticmethod
    async def _fenced(
        conn: Conn, lease: Lease, events: Sequence[EventSpec], now: float, writes: Sequence[_Write] = ()
    ) -> list[Event]:
        """One statement, so one round trip and one commit: the fence, ``events`` appended to the task's log, and
        ``writes`` (more CTEs, each of which joins ``f``, the fence's row, so that a lost lease writes nothing).
        The fence is the counter's ``UPDATE``: it locks the task row and takes the events' seqs only while
        ``lease`` holds the task. Raises LeaseLost (and writes nothing) when it does not."""
        specs = [(ev[0], json.dumps(ev[1], separators=(",", ":")), at_of(ev, now)) for ev in events]
        n = len(specs)
        params: list[Any] = [n, lease.task_id, lease.token, lease.task_id, n]
        # float(): psycopg types a list by its first element, and a time may come in as an int
        params += [[x[0] for x in specs], [x[1] for x in specs], [float(x[2]) for x in specs]]
        query = _FENCED
        for write in writes:
            query += f", {write.name} AS ({write.sql})"
            params += write.params
        row = await _one(conn, query + " SELECT last_seq FROM f", params)
        if row is None:
            raise _lost(lease)
        first = int(row["last_seq"]) - n + 1
        return [
            Event(task_id=lease.task_id, seq=first + i, type=ev[0], data=ev[1], created_at=spec[2])
            for i, (ev, spec) in enumerate(zip(events, specs, strict=True))
        ]

    @staticmethod
    async def _get(conn: Conn, task_id: str, *, tenant: str | None = None, lock: bool = False) -> Task | None:
        """The task, when ``tenant`` may see it (any tenant when None); ``lock`` locks its row."""
        query = f"SELECT {_TASK_COLS} FROM tasks WHERE id = %s" + (" FOR UPDATE" if lock else "")
        row = await _one(conn, query, (task_id,))
        return tenants(_task(row), tenant) if row else None

    async def _finish_in(
        self, conn: Conn, task_id: str, status: TaskStatus, envelope: dict[str, Any], now: float
    ) -> Event | None:
        task = await self._get(conn, task_id, lock=True)
        if task is None or task.status.terminal:
            return None
        await conn.execute(
            "UPDATE tasks SET status = %s, envelope = %s, finished_at = %s, updated_at = %s, lease_owner = NULL, "
            "lease_expires_at = NULL, progress = CASE WHEN %s = 'succeeded' THEN 1.0 ELSE progress END "
            "WHERE id = %s",
            (status.value, json.dumps(envelope), now, now, status.value, task_id),
        )
        event = await self._append(conn, task_id, "end", {"status": status.value, "envelope": envelope}, now)
        await self._webhook(conn, task, status, envelope, now)
        return event

    @staticmethod
    async def _webhook(conn: Conn, task: Task, status: TaskStatus, envelope: dict[str, Any], now: float) -> None:
        """Queue the task's webhook (if it has one) in the caller's transaction: the transactional outbox."""
        if task.webhook_url and task.webhook_secret:
            disabled = await _one(
                conn,
                "SELECT 1 AS x FROM disabled_endpoints WHERE tenant = %s AND url = %s",
                (task.tenant, task.webhook_url),
            )
            await conn.execute(
                f"INSERT INTO outbox{_values(rows.OUTBOX_INSERT)}",
                rows.outbox_params(new_id("msg"), task, status, envelope, now, disabled=disabled is not None),
            )

    # -- TaskStore ---------------------------------------------------------------------------------

    async def create_task(self, new: NewTask, claim: IdempotencyClaim | None, now: float) -> CreateResult:
        async def op(conn: Conn) -> CreateResult:
            task_id = new_id("tsk")
            if claim is not None:
                # Claim the key, or take over an expired one. A concurrent claimer of the same key waits here for
                # the first one's commit, and then finds its row.
                won = await _one(
                    conn,
                    "INSERT INTO idempotency_keys(tenant, key, request_hash, task_id, created_at, expires_at) "
                    "VALUES (%(tenant)s, %(key)s, %(hash)s, %(task)s, %(now)s, %(exp)s) "
                    "ON CONFLICT (tenant, key) DO UPDATE SET request_hash = excluded.request_hash, "
                    "task_id = excluded.task_id, created_at = excluded.created_at, expires_at = excluded.expires_at "
                    "WHERE idempotency_keys.expires_at <= %(now)s RETURNING task_id",
                    {
                        "tenant": new.tenant,
                        "key": claim.key,
                        "hash": claim.request_hash,
                        "task": task_id,
                        "now": now,
                        "exp": claim.expires_at,
                    },
                )
                if won is None:  # a live key: the rule says whether this request replays it
                    stored = rows.claim_of(
                        await _one(
                            conn,
                            "SELECT request_hash, task_id, expires_at FROM idempotency_keys "
                            "WHERE tenant = %s AND key = %s",
                            (new.tenant, claim.key),
                        )
                    )
                    assert stored is not None
                    outcome = claim.outcome(stored, now)
                    if outcome is not CreateOutcome.created:
                        replayed = await self._get(conn, stored.task_id) if outcome is CreateOutcome.replayed else None
                        return CreateResult(outcome=outcome, task=replayed)
            await conn.execute(f"INSERT INTO tasks{_values(rows.TASK_INSERT)}", rows.task_params(task_id, new, now))
            await self._append(conn, task_id, "status", {"status": "queued"}, now)
            return CreateResult(outcome=CreateOutcome.created, task=await self._get(conn, task_id))

        return await self._tx(op)

    async def get_task(self, task_id: str, tenant: str | None = None) -> Task | None:
        return await self._read(lambda conn: self._get(conn, task_id, tenant=tenant))

    async def list_tasks(
        self, tenant: str, *, statuses: Sequence[TaskStatus] = (), limit: int = 50, before: str | None = None
    ) -> list[Task]:
        async def op(conn: Conn) -> list[Task]:
            query = f"SELECT {_TASK_COLS} FROM tasks WHERE tenant = %(tenant)s"
            if statuses:
                query += " AND status = ANY(%(statuses)s)"
            if before:
                query += " AND id < %(before)s"
            query += " ORDER BY id DESC LIMIT %(limit)s"
            args = {"tenant": tenant, "statuses": [s.value for s in statuses], "before": before, "limit": limit}
            cur = await conn.execute(query, args)
            return [_task(r) for r in await cur.fetchall()]

        return await self._read(op)

    async def queued_count(self) -> int:
        async def op(conn: Conn) -> int:
            row = await _one(conn, "SELECT count(*) AS n FROM tasks WHERE status = 'queued'")
            return int(row["n"]) if row else 0

        return await self._read(op)

    async def lease_next(self, owner: str, now: float, lease_s: float, max_attempts: int) -> Lease | None:
        # An idle worker polls: one read says whether there is anything to lease at all, in one round trip
        # instead of a transaction's four. Only a hint: a task queued just after it is found at the next poll
        # (or at once, by a wake-up), exactly as one queued just after the locking SELECT below would be.
        probe = await self._run(
            lambda conn: _one(
                conn,
                "SELECT EXISTS (SELECT 1 FROM tasks WHERE status = 'queued') OR EXISTS (SELECT 1 FROM tasks "
                "WHERE status = 'running' AND lease_expires_at < %s) AS due",
                (now,),
            )
        )
        if probe is None or not probe["due"]:
            return None

        async def op(conn: Conn) -> Lease | None:
            while True:
                # Orphans (expired leases) first, so that a busy queue cannot starve recovery. SKIP LOCKED: a
                # row another worker is taking (or writing under its lease) is not waited for.
                row = await _one(
                    conn,
                    "SELECT id, attempts FROM tasks WHERE status = 'running' AND lease_expires_at < %s "
                    "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                    (now,),
                ) or await _one(
                    conn,
                    "SELECT id, attempts FROM tasks WHERE status = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                )
                if row is None:
                    return None
                if row["attempts"] >= max_attempts:
                    last = await _one(
                        conn, "SELECT MAX(run_attempt) AS run FROM steps WHERE task_id = %s", (row["id"],)
                    )
                    streak = leases_without_progress(row["attempts"], last["run"] if last else None)
                    if streak >= max_attempts:
                        # A poison task: it took down its worker at the same place too often. Dead-letter it.
                        await conn.execute("UPDATE tasks SET dead_lettered = TRUE WHERE id = %s", (row["id"],))
                        await self._finish_in(conn, row["id"], TaskStatus.failed, dead_letter_envelope(streak), now)
                        continue
                new = await _one(
                    conn,
                    "UPDATE tasks SET status = 'running', lease_owner = %s, lease_expires_at = %s, "
                    "fencing_token = fencing_token + 1, attempts = attempts + 1, updated_at = %s, "
                    "started_at = COALESCE(started_at, %s) WHERE id = %s RETURNING fencing_token, attempts",
                    (owner, now + lease_s, now, now, row["id"]),
                )
                assert new is not None
                await self._append(conn, row["id"], "status", {"status": "running", "attempt": new["attempts"]}, now)
                return Lease(task_id=row["id"], owner=owner, token=new["fencing_token"], attempt=new["attempts"])

        return await self._tx(op)

    async def renew_lease(self, lease: Lease, now: float, lease_s: float) -> LeaseState:
        async def op(conn: Conn) -> LeaseState:
            row = await _one(
                conn,
                "UPDATE tasks SET lease_expires_at = %s WHERE id = %s AND fencing_token = %s AND status = 'running' "
                "RETURNING cancel_requested",
                (now + lease_s, lease.task_id, lease.token),
            )
            if row is None:
                return LeaseState(held=False, cancel_requested=False)
            return LeaseState(held=True, cancel_requested=bool(row["cancel_requested"]))

        return await self._run(op)

    async def release(self, lease: Lease) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(
                "UPDATE tasks SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
                "attempts = GREATEST(attempts - 1, 0) WHERE id = %s AND fencing_token = %s AND status = 'running'",
                (lease.task_id, lease.token),
            )

        await self._after(lease.task_id, op, one=True)

    async def requeue_running(self) -> int:
        async def op(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE tasks SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL "
                "WHERE status = 'running'"
            )
            return cur.rowcount

        return await self._tx(op)

    async def set_progress(self, lease: Lease, progress: float, current_step: str | None, now: float) -> None:
        async def op(conn: Conn) -> None:
            cur = await conn.execute(  # fenced by its own WHERE: one statement
                "UPDATE tasks SET progress = %s, current_step = %s, updated_at = %s "
                "WHERE id = %s AND fencing_token = %s AND status = 'running'",
                (progress, current_step, now, lease.task_id, lease.token),
            )
            if not cur.rowcount:
                raise _lost(lease)

        await self._after(lease.task_id, op, one=True)

    async def finish(
        self, lease: Lease | None, task_id: str, status: TaskStatus, envelope: dict[str, Any], now: float
    ) -> Event | None:
        async def op(conn: Conn) -> Event | None:
            if lease is not None:
                await self._fence(conn, lease)
            return await self._finish_in(conn, task_id, status, envelope, now)

        return await self._after(task_id, op)

    async def request_cancel(self, task_id: str, tenant: str) -> Task | None:
        async def op(conn: Conn) -> Task | None:
            task = await self._get(conn, task_id, tenant=tenant, lock=True)
            if task is not None and task.request_cancel():
                await conn.execute("UPDATE tasks SET cancel_requested = TRUE WHERE id = %s", (task_id,))
            return task

        return await self._tx(op)

    async def delete_task(self, task_id: str, tenant: str) -> bool:
        async def op(conn: Conn) -> bool:
            task = await self._get(conn, task_id, tenant=tenant, lock=True)
            if task is None:
                return False
            task.check_deletable()
            await self._delete_in(conn, task_id)
            return True

        return await self._tx(op)

    async def _delete_in(self, conn: Conn, task_id: str) -> None:
        cur = await conn.execute(rows.TASK_BLOBS.format("%(id)s"), {"id": task_id})
        blobs = [r["blob_id"] for r in await cur.fetchall()]
        for table in rows.TASK_RECORDS:
            await conn.execute(f"DELETE FROM {table} WHERE task_id = %s", (task_id,))
        await conn.execute("DELETE FROM tasks WHERE id = %s", (task_id,))
        if blobs:  # shared by content: each goes only if no other task's row refers to it
            await conn.execute(f"DELETE FROM blobs WHERE id = ANY(%s) AND {rows.blob_unused('blobs.id')}", (blobs,))

    async def sweep_tasks(self, finished_before: float, limit: int) -> int:
        async def op(conn: Conn) -> int:
            cur = await conn.execute(
                f"SELECT {_TASK_COLS} FROM tasks WHERE finished_at IS NOT NULL AND finished_at < %s "
                "ORDER BY finished_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (finished_before, limit),
            )
            ended = [t for t in map(_task, await cur.fetchall()) if t.status.terminal]
            for task in ended:
                await self._delete_in(conn, task.id)
                for table, settled in rows.TASK_DELIVERIES:
                    await conn.execute(f"DELETE FROM {table} WHERE task_id = %s AND {settled}", (task.id,))
            return len(ended)

        return await self._tx(op)

    async def sweep_idempotency(self, now: float) -> int:
        async def op(conn: Conn) -> int:
            cur = await conn.execute("DELETE FROM idempotency_keys WHERE expires_at <= %s", (now,))
            return cur.rowcount

        return await self._tx(op)

    # -- WorkflowStore -----------------------------------------------------------------------------

    async def record_step(
        self,
        lease: Lease,
        step: StepCheckpoint,
        events: Sequence[EventSpec],
        now: float,
        *,
        effect: EffectSettlement | None = None,
    ) -> None:
        # The checkpoint, its events, its effect's settlement and the fence: one statement, one round trip.
        packed = await self._pack(step.result)
        params = rows.step_params(lease.task_id, step, *_stored(packed))
        writes = _row_writes("steps", rows.STEP_INSERT, _STEP_TYPES, params, packed)
        if effect is not None:
            writes.append(_settle_write(effect, now))
        await self._after(lease.task_id, lambda conn: self._fenced(conn, lease, events, now, writes), one=True)

    async def load_steps(self, task_id: str) -> list[StepCheckpoint]:
        async def op(conn: Conn) -> list[StepCheckpoint]:
            cur = await conn.execute("SELECT * FROM steps WHERE task_id = %s ORDER BY seq, key", (task_id,))
            return [rows.step_of(r) for r in await cur.fetchall()]

        return await self._read(op)

    async def load_blob(self, ref: BlobRef) -> Any:
        async def op(conn: Conn) -> bytes:
            row = await _one(conn, "SELECT data FROM blobs WHERE id = %s", (ref.id,))
            if row is None:
                raise StoreError(f"blob {ref.id} is missing")
            return bytes(row["data"])

        data = await self._read(op)
        return await asyncio.to_thread(unpack_blob, data)

    async def set_state(
        self, lease: Lease, key: str, value: Any, event: tuple[str, dict[str, Any]] | None, now: float
    ) -> None:
        packed = await self._pack(value)
        writes = _row_writes(
            "workflow_state",
            "task_id, key, value, blob_id, blob_size",
            "text, text, text, text, bigint",
            (lease.task_id, key, *_stored(packed)),
            packed,
        )
        events = [] if event is None else [event]
        await self._after(lease.task_id, lambda conn: self._fenced(conn, lease, events, now, writes), one=True)

    async def load_state(self, task_id: str) -> dict[str, Any]:
        async def op(conn: Conn) -> list[Row]:
            cur = await conn.execute(
                "SELECT s.key, s.value, b.data FROM workflow_state s LEFT JOIN blobs b ON b.id = s.blob_id "
                "WHERE s.task_id = %s",
                (task_id,),
            )
            return await cur.fetchall()

        rows = await self._read(op)

        def decode() -> dict[str, Any]:
            return {
                r["key"]: unpack_blob(bytes(r["data"])) if r["data"] is not None else json.loads(r["value"])
                for r in rows
            }

        if any(r["data"] is not None for r in rows):
            return await asyncio.to_thread(decode)
        return decode()

    # -- ModelStatsStore ---------------------------------------------------------------------------

    async def record_model_call(self, tenant: str, call: ModelCallRecord) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(
                f"INSERT INTO model_stats AS m{_values(rows.MODEL_STATS_INSERT)} "
                "ON CONFLICT (provider, model_id, bucket) DO UPDATE SET calls = m.calls + 1, "
                "errors = m.errors + excluded.errors, "
                "structured = m.structured + excluded.structured, json_valid = m.json_valid + excluded.json_valid, "
                "schema_valid = m.schema_valid + excluded.schema_valid, refusals = m.refusals + excluded.refusals, "
                "truncations = m.truncations + excluded.truncations, "
                "latency_ms_sum = m.latency_ms_sum + excluded.latency_ms_sum, "
                "latency_ms_max = GREATEST(m.latency_ms_max, excluded.latency_ms_max), "
                "input_tokens = m.input_tokens + excluded.input_tokens, "
                "output_tokens = m.output_tokens + excluded.output_tokens, cost_usd = m.cost_usd + excluded.cost_usd",
                rows.model_stats_params(call),
            )
            await conn.execute(
                f"INSERT INTO model_minutes AS w{_values(rows.MODEL_MINUTES_INSERT)} "
                "ON CONFLICT (provider, model_id, minute, lat_bin) DO UPDATE SET " + rows.MODEL_MINUTES_ADD.format("w"),
                rows.model_minutes_params(call),
            )
            horizon = window_horizon(call.at)
            if horizon > self._window_swept:  # once a minute per process: rows past the longest window go
                self._window_swept = horizon
                await conn.execute("DELETE FROM model_minutes WHERE minute < %s", (horizon,))
            await conn.execute(
                f"INSERT INTO tenant_usage AS u{_values(rows.USAGE_INSERT)} ON CONFLICT (tenant, day) DO UPDATE SET "
                "calls = u.calls + 1, input_tokens = u.input_tokens + excluded.input_tokens, "
                "output_tokens = u.output_tokens + excluded.output_tokens, cost_usd = u.cost_usd + excluded.cost_usd",
                rows.usage_params(tenant, call),
            )

        await self._tx(op)

    async def model_stats(self, model_id: str | None = None, since: float = 0.0) -> list[ModelStats]:
        async def op(conn: Conn) -> list[ModelStats]:
            query = "SELECT * FROM model_stats WHERE bucket >= %(bucket)s"
            if model_id is not None:
                query += " AND model_id = %(model)s"
            cur = await conn.execute(
                query + " ORDER BY model_id, bucket, provider", {"bucket": hour_bucket(since), "model": model_id}
            )
            return [ModelStats(**r) for r in await cur.fetchall()]

        return await self._read(op)

    async def model_window(self, since: float) -> list[ModelWindow]:
        async def op(conn: Conn) -> list[ModelWindow]:
            cur = await conn.execute(rows.MODEL_WINDOW_SELECT.format("%s"), (minute_bucket(since),))
            return ModelWindow.fold([tuple(r.values()) for r in await cur.fetchall()])

        return await self._read(op)

    async def tenant_usage(self, tenant: str, since: float) -> TenantUsage:
        async def op(conn: Conn) -> TenantUsage:
            row = await _one(
                conn,
                "SELECT COALESCE(SUM(calls), 0)::bigint AS calls, COALESCE(SUM(input_tokens), 0)::bigint AS i, "
                "COALESCE(SUM(output_tokens), 0)::bigint AS o, COALESCE(SUM(cost_usd), 0)::float8 AS c "
                "FROM tenant_usage WHERE tenant = %s AND day >= %s",
                (tenant, day_bucket(since)),
            )
            assert row is not None
            return TenantUsage(
                tenant=tenant,
                since=day_bucket(since),
                calls=row["calls"],
                input_tokens=row["i"],
                output_tokens=row["o"],
                cost_usd=row["c"],
            )

        return await self._read(op)

    # -- per-tenant limits ------------------------------------------------------------------------

    async def get_limits(self, tenant: str) -> TenantLimits | None:
        async def op(conn: Conn) -> TenantLimits | None:
            row = await _one(conn, f"SELECT {rows.LIMIT_COLS} FROM tenant_limits WHERE tenant = %s", (tenant,))
            return rows.limits_of(row) if row else None

        return await self._read(op)

    async def set_limits(self, tenant: str, limits: TenantLimits, now: float) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute("DELETE FROM tenant_limits WHERE tenant = %s", (tenant,))
            if limits != TenantLimits():
                await conn.execute(
                    f"INSERT INTO tenant_limits{_values('tenant, updated_at, ' + rows.LIMIT_COLS)}",
                    (tenant, now, *rows.limits_params(limits)),
                )

        await self._tx(op)

    async def take_token(self, bucket: str, rate_per_s: float, size: int, now: float) -> RateDecision:
        # The row is locked (FOR UPDATE) from the read to the save; a bucket's first request inserts it, and a
        # racing first request's insert does nothing, then locks and reads the row the other one made.
        async def op(conn: Conn) -> RateDecision:
            await conn.execute(
                "INSERT INTO rate_buckets(name, tokens, at) VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING",
                (bucket, float(size), now),
            )
            row = await _one(conn, "SELECT tokens, at FROM rate_buckets WHERE name = %s FOR UPDATE", (bucket,))
            assert row is not None
            stored, decision = take_token(Bucket(tokens=row["tokens"], at=row["at"]), rate_per_s, size, now)
            await conn.execute(
                "UPDATE rate_buckets SET tokens = %s, at = %s WHERE name = %s", (stored.tokens, stored.at, bucket)
            )
            return decision

        return await self._tx(op)

    async def active_tasks(self, tenant: str) -> int:
        async def op(conn: Conn) -> int:
            row = await _one(
                conn,
                "SELECT COUNT(*) AS n FROM tasks WHERE tenant = %s AND status IN ('queued', 'running')",
                (tenant,),
            )
            assert row is not None
            return int(row["n"])

        return await self._read(op)

    # -- EventLog ----------------------------------------------------------------------------------

    async def append(self, lease: Lease, type: str, data: dict[str, Any], now: float) -> Event:
        return await self.append_nowait(lease, type, data, now)

    def append_nowait(self, lease: Lease, type: str, data: dict[str, Any], now: float) -> asyncio.Future[Event]:
        batch = self.append_batch_nowait(lease, [(type, data)], now)
        single: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        batch.add_done_callback(lambda f: _relay(f, single, lambda events: events[0]))
        return single

    def append_batch_nowait(self, lease: Lease, events: Sequence[EventSpec], now: float) -> asyncio.Future[list[Event]]:
        """Appended after this process's earlier writes for the task. Appends queued behind each other that have
        not gone out yet go as one statement: one commit (a step's ``step_started`` and the first event it awaits,
        say), each caller told its own events. Under one lease only, and only while nothing else was queued after
        them, so the log's order is the order of the calls; a lost lease fails them all, as it would each."""
        specs = [(ev[0], ev[1], at_of(ev, now)) for ev in events]
        part: asyncio.Future[list[Event]] = asyncio.get_running_loop().create_future()
        open_ = self._appends.get(lease.task_id)
        if (
            open_ is not None
            and not open_.sent
            and open_.lease == lease
            and self._tails.get(lease.task_id) is open_.written_by
        ):
            open_.parts.append((len(open_.events), len(specs), part))
            open_.events += specs
            return part
        batch = _Appends(lease=lease, events=specs, parts=[(0, len(specs), part)])

        async def op(conn: Conn) -> list[Event]:
            batch.sent = True  # from here on, a new append starts a statement of its own
            return await self._fenced(conn, lease, batch.events, now)

        written = self._after(lease.task_id, op, one=True)
        batch.written_by = written
        self._appends[lease.task_id] = batch

        def settle(f: asyncio.Future[list[Event]]) -> None:
            if self._appends.get(lease.task_id) is batch:
                del self._appends[lease.task_id]
            for start, count, waiting in batch.parts:
                _relay(f, waiting, operator.itemgetter(slice(start, start + count)))

        written.add_done_callback(settle)
        return part

    async def read(self, task_id: str, after: int, limit: int = 500) -> list[Event]:
        async def op(conn: Conn) -> list[Event]:
            cur = await conn.execute(
                "SELECT seq, type, data, created_at FROM events WHERE task_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                (task_id, after, limit),
            )
            return [
                Event(
                    task_id=task_id,
                    seq=r["seq"],
                    type=r["type"],
                    data=json.loads(r["data"]),
                    created_at=r["created_at"],
                )
                for r in await cur.fetchall()
            ]

        return await self._read(op)

    # -- Outbox ------------------------------------------------------------------------------------

    async def due(self, now: float, limit: int, *, claim_s: float = 0.0) -> list[OutboxMessage]:
        if not claim_s:

            async def read(conn: Conn) -> list[OutboxMessage]:
                cur = await conn.execute(
                    "SELECT * FROM outbox WHERE status = 'pending' AND next_attempt_at <= %s "
                    "ORDER BY next_attempt_at LIMIT %s",
                    (now, limit),
                )
                return [_outbox(r) for r in await cur.fetchall()]

            return await self._read(read)

        async def claim(conn: Conn) -> list[OutboxMessage]:
            # SKIP LOCKED: two dispatchers claiming at once take different messages.
            cur = await conn.execute(
                "SELECT * FROM outbox WHERE status = 'pending' AND next_attempt_at <= %s "
                "ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (now, limit),
            )
            found = [_outbox(r) for r in await cur.fetchall()]
            if found:
                await conn.execute(
                    "UPDATE outbox SET next_attempt_at = %s WHERE id = ANY(%s)", (now + claim_s, [m.id for m in found])
                )
            return found

        return await self._tx(claim)

    async def _exec(self, query: Any, args: Any) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(query, args)

        await self._tx(op)

    async def delivered(self, msg_id: str, now: float) -> None:
        await self._exec(
            "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, delivered_at = %s, "
            "last_error = NULL WHERE id = %s",
            (now, msg_id),
        )

    async def retry_at(self, msg_id: str, when: float, error: str) -> None:
        await self._exec(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = %s, last_error = %s WHERE id = %s",
            (when, error, msg_id),
        )

    async def dead(self, msg_id: str, error: str) -> None:
        await self._exec(
            "UPDATE outbox SET status = 'dead', attempts = attempts + 1, last_error = %s WHERE id = %s",
            (error, msg_id),
        )

    async def disable_endpoint(self, tenant: str, url: str, now: float) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO disabled_endpoints(tenant, url, disabled_at) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (tenant, url, now),
            )
            await conn.execute(
                "UPDATE outbox SET status = 'disabled', last_error = 'endpoint disabled (410 Gone)' "
                "WHERE tenant = %s AND url = %s AND status = 'pending'",
                (tenant, url),
            )

        await self._tx(op)

    async def messages(self, task_id: str) -> list[OutboxMessage]:
        async def op(conn: Conn) -> list[OutboxMessage]:
            cur = await conn.execute("SELECT * FROM outbox WHERE task_id = %s ORDER BY id", (task_id,))
            return [_outbox(r) for r in await cur.fetchall()]

        return await self._read(op)

    # -- KeyStore ----------------------------------------------------------------------------------

    async def create_key(
        self, tenant: str, scopes: frozenset[str], now: float, *, expires_at: float | None = None
    ) -> str:
        new = KeySecret.mint()
        await self._exec(
            f"INSERT INTO api_keys{_values(rows.KEY_INSERT)}",
            rows.key_params(new.record(tenant, scopes, now, expires_at)),
        )
        return new.plaintext

    @staticmethod
    async def _key(conn: Conn, key_id: str, tenant: str | None, *, lock: bool = False) -> KeyRecord | None:
        row = await _one(conn, "SELECT * FROM api_keys WHERE id = %s" + (" FOR UPDATE" if lock else ""), (key_id,))
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
            await self._exec(rows.KEY_USED.format("%s"), (at, record.id, at - LAST_USED_EVERY_S))
        return record.api_key()

    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        async def op(conn: Conn) -> list[KeyRecord]:
            if tenant is None:
                cur = await conn.execute("SELECT * FROM api_keys ORDER BY created_at, id")
            else:
                cur = await conn.execute("SELECT * FROM api_keys WHERE tenant = %s ORDER BY created_at, id", (tenant,))
            return [rows.key_of(r) for r in await cur.fetchall()]

        return await self._read(op)

    async def revoke_key(self, key_id: str, now: float, *, tenant: str | None = None) -> KeyRecord | None:
        async def op(conn: Conn) -> KeyRecord | None:
            key = await self._key(conn, key_id, tenant, lock=True)
            if key is None:
                return None
            revoked = key.revoked(now)
            await conn.execute(
                f"UPDATE api_keys SET {rows.KEY_LIFETIME.format('%s')} WHERE id = %s", rows.key_lifetime_params(revoked)
            )
            return revoked

        return await self._tx(op)

    async def rotate_key(
        self, key_id: str, now: float, *, grace_s: float = 0.0, tenant: str | None = None
    ) -> tuple[KeyRecord, str] | None:
        minted = KeySecret.mint()

        async def op(conn: Conn) -> KeyRecord | None:
            key = await self._key(conn, key_id, tenant, lock=True)
            if key is None:
                return None
            old, new = key.retired(now, grace_s), key.successor(minted, now)
            await conn.execute(
                f"UPDATE api_keys SET {rows.KEY_LIFETIME.format('%s')} WHERE id = %s", rows.key_lifetime_params(old)
            )
            await conn.execute(f"INSERT INTO api_keys{_values(rows.KEY_INSERT)}", rows.key_params(new))
            return new

        new = await self._tx(op)
        return None if new is None else (new, minted.plaintext)

    # -- SecretStore -------------------------------------------------------------------------------

    async def reseal_secrets(self, reseal: Callable[[str], str | None]) -> int:
        async def op(conn: Conn) -> int:
            changed = 0
            for table, column, key in rows.SECRET_COLUMNS:
                cur = await conn.execute(f"SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL FOR UPDATE")
                found = await cur.fetchall()
                updates = [(new, r[key]) for r in found if (new := reseal(r[column])) is not None]
                if updates:
                    async with conn.cursor() as many:
                        await many.executemany(f"UPDATE {table} SET {column} = %s WHERE {key} = %s", updates)
                changed += len(updates)
            return changed

        return await self._tx(op)

    # -- EffectLedger ------------------------------------------------------------------------------

    @staticmethod
    async def _effect_row(conn: Conn, key: str) -> EffectRecord | None:
        row = await _one(conn, "SELECT * FROM effects WHERE key = %s", (key,))
        return _effect(row) if row else None

    async def begin_effect(self, lease: Lease, effect: EffectRecord, now: float) -> tuple[EffectRecord, bool]:
        async def op(conn: Conn) -> tuple[EffectRecord, bool]:
            await self._fence(conn, lease)
            cur = await conn.execute(
                f"INSERT INTO effects{_values(rows.EFFECT_INSERT)} ON CONFLICT (key) DO NOTHING",
                rows.effect_params(effect, now),
            )
            stored = await self._effect_row(conn, effect.key)
            assert stored is not None
            return stored, cur.rowcount > 0

        return await self._after(lease.task_id, op)

    async def settle_effect(self, lease: Lease, settlement: EffectSettlement, now: float) -> None:
        writes = [_settle_write(settlement, now)]
        await self._after(lease.task_id, lambda conn: self._fenced(conn, lease, [], now, writes), one=True)

    async def get_effect(self, key: str) -> EffectRecord | None:
        return await self._read(lambda conn: self._effect_row(conn, key))

    async def list_effects(self, task_id: str) -> list[EffectRecord]:
        async def op(conn: Conn) -> list[EffectRecord]:
            cur = await conn.execute("SELECT * FROM effects WHERE task_id = %s ORDER BY created_at, key", (task_id,))
            return [_effect(r) for r in await cur.fetchall()]

        return await self._read(op)

    # -- DecisionStore -----------------------------------------------------------------------------

    async def request_decisions(
        self, lease: Lease, decisions: Sequence[Decision], envelope: dict[str, Any], now: float
    ) -> None:
        async def op(conn: Conn) -> None:
            await self._fence(conn, lease)
            for d in decisions:
                cur = await conn.execute(
                    f"INSERT INTO decisions{_values(rows.DECISION_INSERT)} ON CONFLICT DO NOTHING",
                    rows.decision_params(d, now),
                )
                if cur.rowcount:
                    await self._append(conn, d.task_id, "decision_requested", {**d.public(), "requested_at": now}, now)
            row = await _one(
                conn,
                "SELECT count(*) AS n FROM decisions WHERE task_id = %s AND verdict IS NULL",
                (lease.task_id,),
            )
            pending = int(row["n"]) if row else 0
            status = park_status(pending)
            # Parking is not a crash: the attempt is given back, as on a graceful release.
            await conn.execute(
                "UPDATE tasks SET status = %s, envelope = %s, lease_owner = NULL, lease_expires_at = NULL, "
                "attempts = GREATEST(attempts - 1, 0), updated_at = %s WHERE id = %s",
                (status.value, json.dumps(envelope) if pending else None, now, lease.task_id),
            )
            await self._append(
                conn, lease.task_id, "status", {"status": status.value, "pending_decisions": pending}, now
            )
            task = await self._get(conn, lease.task_id)
            if pending and task is not None:
                await self._webhook(conn, task, status, envelope, now)  # tell whoever decides

        await self._after(lease.task_id, op)

    async def decide(self, task_id: str, tenant: str, decision: Decision, now: float) -> Decision:
        async def op(conn: Conn) -> Decision:
            task = await self._get(conn, task_id, lock=True)
            row = await _one(
                conn, "SELECT * FROM decisions WHERE task_id = %s AND call_id = %s", (task_id, decision.call_id)
            )
            decided, changed = decide(task_id, tenant, task, _decision(row) if row else None, decision, now)
            if changed:
                await self._record_verdict(conn, decided, now)
            return decided

        return await self._tx(op)

    async def _record_verdict(self, conn: Conn, d: Decision, now: float) -> bool:
        """Store ``d``'s verdict and its event; queue the task once nothing it waits on is open (True if so)."""
        await conn.execute(
            f"UPDATE decisions SET {rows.DECISION_VERDICT.format('%s')} WHERE task_id = %s AND call_id = %s",
            rows.verdict_params(d),
        )
        await self._append(conn, d.task_id, "decision_made", d.public(), now)
        if await _one(
            conn, "SELECT 1 AS x FROM decisions WHERE task_id = %s AND verdict IS NULL LIMIT 1", (d.task_id,)
        ):
            return False
        cur = await conn.execute(
            "UPDATE tasks SET status = 'queued', envelope = NULL, updated_at = %s "
            "WHERE id = %s AND status = 'waiting_for_approval'",
            (now, d.task_id),
        )
        if cur.rowcount:
            await self._append(conn, d.task_id, "status", {"status": "queued"}, now)
        return bool(cur.rowcount)

    async def load_decisions(self, task_id: str) -> list[Decision]:
        async def op(conn: Conn) -> list[Decision]:
            cur = await conn.execute(
                "SELECT * FROM decisions WHERE task_id = %s ORDER BY requested_at, call_id", (task_id,)
            )
            return [_decision(r) for r in await cur.fetchall()]

        return await self._read(op)

    async def expire_decisions(self, requested_before: float, now: float) -> list[str]:
        async def op(conn: Conn) -> list[str]:
            # Task rows first, in id order (as every multi-task writer here), then their open decisions.
            await conn.execute(
                "SELECT 1 FROM tasks WHERE id IN (SELECT task_id FROM decisions WHERE verdict IS NULL "
                "AND requested_at < %s) ORDER BY id FOR UPDATE",
                (requested_before,),
            )
            cur = await conn.execute(
                "SELECT * FROM decisions WHERE verdict IS NULL AND requested_at < %s ORDER BY task_id, call_id",
                (requested_before,),
            )
            queued = []
            for row in await cur.fetchall():
                d = _decision(row).expire(now)
                if await self._record_verdict(conn, d, now):
                    queued.append(d.task_id)
            return queued

        return await self._tx(op)

    # -- EmailOutbox -------------------------------------------------------------------------------

    async def enqueue_email(self, message: EmailMessage, now: float) -> tuple[EmailMessage, bool]:
        async def op(conn: Conn) -> tuple[EmailMessage, bool]:
            cur = await conn.execute(
                f"INSERT INTO emails{_values(rows.EMAIL_INSERT)} ON CONFLICT (key) DO NOTHING",
                rows.email_params(message, now),
            )
            row = await _one(conn, "SELECT * FROM emails WHERE key = %s", (message.key,))
            assert row is not None
            return _email(row), cur.rowcount > 0

        return await self._tx(op)

    async def get_email(self, key: str) -> EmailMessage | None:
        async def op(conn: Conn) -> EmailMessage | None:
            row = await _one(conn, "SELECT * FROM emails WHERE key = %s", (key,))
            return _email(row) if row else None

        return await self._read(op)

    async def due_emails(self, now: float, limit: int, *, claim_s: float = 0.0) -> list[EmailMessage]:
        lock = " FOR UPDATE SKIP LOCKED" if claim_s else ""

        async def op(conn: Conn) -> list[EmailMessage]:
            cur = await conn.execute(
                f"SELECT * FROM emails WHERE status = 'queued' AND next_at <= %s ORDER BY next_at LIMIT %s{lock}",
                (now, limit),
            )
            found = [_email(r) for r in await cur.fetchall()]
            if claim_s and found:
                await conn.execute(
                    "UPDATE emails SET next_at = %s WHERE key = ANY(%s)", (now + claim_s, [m.key for m in found])
                )
            return found

        return await (self._tx(op) if claim_s else self._read(op))

    async def email_sent(self, key: str, now: float) -> None:
        await self._exec(
            "UPDATE emails SET status = 'sent', sent_at = %s, attempts = attempts + 1, error = NULL WHERE key = %s",
            (now, key),
        )

    async def email_retry(self, key: str, when: float, error: str, *, give_up: bool = False) -> None:
        await self._exec(
            "UPDATE emails SET status = %s, next_at = %s, attempts = attempts + 1, error = %s WHERE key = %s",
            ("failed" if give_up else "queued", when, error[:2000], key),
        )
