"""Rows to dataclasses and dataclasses to rows, shared by the SQL backends: SQLite and Postgres keep the same
columns (JSON as text), so one reading of a row, and one tuple of a statement's parameters, serves both. No driver
is imported here; a row is anything indexable by column name (``sqlite3.Row``, psycopg's ``dict_row``). Each
``*_params`` function gives its parameters in the order of the column list beside it, which both drivers'
statements use.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from keel.memory.blobs import dumps
from keel.memory.limits import TenantLimits
from keel.memory.types import (
    WINDOW_COUNTERS,
    BlobRef,
    ChunkRecord,
    Decision,
    DecisionKind,
    DocumentRecord,
    DocumentStatus,
    EffectRecord,
    EffectSettlement,
    EffectStatus,
    EmailMessage,
    KeyRecord,
    ModelCallRecord,
    NewTask,
    OutboxMessage,
    Session,
    SessionTurn,
    StepCheckpoint,
    StepStatus,
    StoredClaim,
    Task,
    TaskStatus,
    Verdict,
    day_bucket,
    hour_bucket,
    minute_bucket,
    webhook_payload,
)

TASK_RECORDS = ("events", "steps", "workflow_state", "decisions", "effects", "idempotency_keys")
"""What a deleted task takes with it (``DELETE … WHERE task_id = …``); its outbox and emails stay, to be delivered."""
TASK_DELIVERIES = (("outbox", "status <> 'pending'"), ("emails", "status <> 'queued'"))
"""What the retention sweep also takes from an expired task: its settled deliveries (table, which rows). One still
being tried stays, a promise made before the task expired."""
BLOB_HOLDERS = ("steps", "workflow_state")
"""The tables whose rows refer to a blob (``blob_id``). Blobs are shared by content, so one is deleted only when no
row of these refers to it any more: :func:`blob_unused`."""
TASK_BLOBS = " UNION ".join(
    f"SELECT blob_id FROM {t} WHERE task_id = {{0}} AND blob_id IS NOT NULL" for t in BLOB_HOLDERS
)
"""The blobs a task's steps and state refer to (``.format(placeholder)``): deleted with it unless shared."""


def blob_unused(blob: str, *, besides: tuple[str, str, str] | None = None) -> str:
    """An SQL condition, true when no row of :data:`BLOB_HOLDERS` refers to the blob whose id is the expression
    ``blob``. ``besides`` = (table, task id, key), as SQL expressions, leaves that row out: the row a statement
    replaces, which its own snapshot still shows holding the old blob."""
    tests = []
    for table in BLOB_HOLDERS:
        refers = f"t.blob_id = {blob}"
        if besides is not None and besides[0] == table:
            refers += f" AND (t.task_id, t.key) <> ({besides[1]}, {besides[2]})"
        tests.append(f"NOT EXISTS (SELECT 1 FROM {table} t WHERE {refers})")
    return " AND ".join(tests)


CHUNK_COLS = "id, document_id, tenant, space, page, char_start, char_end, text, content_hash, created_at, expires_at"
"""The chunk columns read back without the vector."""


T = TypeVar("T")


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


def _json(value: Any) -> Any:
    return json.loads(value) if value is not None else None


def _text(value: Any) -> str | None:
    return json.dumps(value) if value is not None else None


def _loads(value: Any) -> Any:
    return json.loads(value) if value else None


def _decoder(
    cls: type[T],
    *,
    columns: Mapping[str, str] | None = None,
    skip: tuple[str, ...] = (),
    **convert: Callable[[Any], Any],
) -> Callable[[Row], T]:
    """``row -> cls``: every init field of the dataclass (but ``skip``) from the column of its name (or
    ``columns[field]``), through ``convert[field]`` when given (JSON text, an enum, a flag stored as an integer)."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = [(f.name, (columns or {}).get(f.name, f.name)) for f in fields if f.init and f.name not in skip]

    def decode(row: Row) -> T:
        return cls(**{name: convert[name](row[col]) if name in convert else row[col] for name, col in names})

    return decode


task_of = _decoder(
    Task,
    input=json.loads,
    status=TaskStatus,
    cancel_requested=bool,
    envelope=_loads,
    budget=json.loads,
    metadata=json.loads,
    dead_lettered=bool,
    policy=json.loads,
)
outbox_of = _decoder(OutboxMessage, payload=json.loads)
effect_of = _decoder(EffectRecord, args=json.loads, status=EffectStatus, result=_json, error=_json)
decision_of = _decoder(
    Decision,
    kind=DecisionKind,
    args=json.loads,
    verdict=lambda v: Verdict(v) if v else None,
    result=_json,
)
email_of = _decoder(EmailMessage, columns={"to": "recipients"}, to=json.loads)
document_of = _decoder(
    DocumentRecord, status=DocumentStatus, warnings=json.loads, errors=json.loads, metadata=json.loads
)
_chunk = _decoder(ChunkRecord, columns={"start": "char_start", "end": "char_end"}, skip=("vector",))


def chunk_of(row: Row, vector: Any = None) -> ChunkRecord:
    chunk = _chunk(row)
    chunk.vector = vector
    return chunk


def scopes_text(scopes: frozenset[str]) -> str:
    return ",".join(sorted(scopes))


key_of = _decoder(KeyRecord, scopes=lambda text: frozenset(filter(None, text.split(","))))

KEY_INSERT = "id, tenant, secret_hash, scopes, created_at, expires_at"


def key_params(key: KeyRecord) -> tuple[Any, ...]:
    """``KEY_INSERT``."""
    return (key.id, key.tenant, key.secret_hash, scopes_text(key.scopes), key.created_at, key.expires_at)


KEY_LIFETIME = "revoked_at = {0}, expires_at = {0}"
"""The SET clause that revokes or retires a key (``{0}`` the driver's placeholder); then ``WHERE id = {0}``."""


def key_lifetime_params(key: KeyRecord) -> tuple[Any, ...]:
    """``KEY_LIFETIME`` and the key's id."""
    return (key.revoked_at, key.expires_at, key.id)


SECRET_COLUMNS = (("tasks", "webhook_secret", "id"), ("outbox", "secret", "id"))
"""Where webhook secrets are kept: (table, column, key column)."""

KEY_USED = "UPDATE api_keys SET last_used_at = {0} WHERE id = {0} AND (last_used_at IS NULL OR last_used_at <= {0})"
"""Record a use (``now``, id, ``now - LAST_USED_EVERY_S``): the compare-and-set of :meth:`KeyRecord.use_due`, so
replicas racing on one key write once."""


def step_of(row: Row) -> StepCheckpoint:
    """A step as recorded; a result stored out of line comes back as its :class:`BlobRef`."""
    return StepCheckpoint(
        key=row["key"],
        seq=row["seq"],
        fn=row["fn"],
        kind=row["kind"],
        status=StepStatus(row["status"]),
        run_attempt=row["run_attempt"],
        tries=row["tries"],
        result=BlobRef(id=row["blob_id"], size=row["blob_size"]) if row["blob_id"] else json.loads(row["result"]),
        error=json.loads(row["error"]) if row["error"] else None,
        usage=json.loads(row["usage"]),
        duration_ms=row["duration_ms"],
        finished_at=row["finished_at"],
    )


def claim_of(row: Row | None) -> StoredClaim | None:
    if row is None:
        return None
    return StoredClaim(request_hash=row["request_hash"], task_id=row["task_id"], expires_at=row["expires_at"])


def session_of(row: Row, turns: Iterable[Row]) -> Session:
    return Session(
        id=row["id"],
        tenant=row["tenant"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        context=json.loads(row["context"]),
        turns=[
            SessionTurn(
                role=r["role"], content=r["content"], at=r["at"], seq=r["seq"], metadata=json.loads(r["metadata"])
            )
            for r in turns
        ],
    )


def excluded(columns: str, *, keep: tuple[str, ...]) -> str:
    """``column = excluded.column, …`` for every column of ``columns`` but ``keep``: what an upsert overwrites."""
    return ", ".join(f"{c} = excluded.{c}" for c in columns.split(", ") if c not in keep)


TASK_INSERT = (
    "id, tenant, workflow, input, status, created_at, updated_at, webhook_url, webhook_secret, budget, metadata, "
    "estimated_duration_s, policy, cache_key"
)


def task_params(task_id: str, new: NewTask, now: float) -> tuple[Any, ...]:
    """A new task, queued (``TASK_INSERT``)."""
    return (
        task_id,
        new.tenant,
        new.workflow,
        json.dumps(new.input),
        TaskStatus.queued.value,
        now,
        now,
        new.webhook_url,
        new.webhook_secret,
        json.dumps(new.budget),
        json.dumps(new.metadata),
        new.estimated_duration_s,
        json.dumps(new.policy),
        new.cache_key,
    )


OUTBOX_INSERT = "id, tenant, task_id, url, secret, event_type, payload, status, next_attempt_at"


def outbox_params(
    msg_id: str, task: Task, status: TaskStatus, envelope: dict[str, Any], now: float, *, disabled: bool
) -> tuple[Any, ...]:
    """The webhook message telling ``task``'s endpoint that it reached ``status`` (``OUTBOX_INSERT``)."""
    return (
        msg_id,
        task.tenant,
        task.id,
        task.webhook_url,
        task.webhook_secret,
        f"task.{status.value}",
        json.dumps(webhook_payload(task.id, status, envelope, now)),
        "disabled" if disabled else "pending",
        now,
    )


STEP_INSERT = (
    "task_id, key, seq, fn, kind, status, run_attempt, tries, result, blob_id, blob_size, error, usage, duration_ms, "
    "finished_at"
)


def step_params(
    task_id: str, step: StepCheckpoint, inline: str | None, blob_id: str | None, blob_size: int | None
) -> tuple[Any, ...]:
    """``step`` with its result inline or in the blob ``blob_id`` (``STEP_INSERT``)."""
    return (
        task_id,
        step.key,
        step.seq,
        step.fn,
        step.kind,
        step.status.value,
        step.run_attempt,
        step.tries,
        inline,
        blob_id,
        blob_size,
        dumps(step.error) if step.error is not None else None,
        dumps(step.usage),
        step.duration_ms,
        step.finished_at,
    )


EFFECT_INSERT = "key, task_id, step, tool, args, status, executions, created_at, updated_at"


def effect_params(effect: EffectRecord, now: float) -> tuple[Any, ...]:
    """``EFFECT_INSERT``."""
    return (
        effect.key,
        effect.task_id,
        effect.step,
        effect.tool,
        json.dumps(effect.args),
        effect.status.value,
        effect.executions,
        now,
        now,
    )


EFFECT_SETTLE = "status = {0}, result = {0}, error = {0}, executions = COALESCE({0}, executions), updated_at = {0}"
"""The SET clause of a settlement, ``{0}`` the driver's placeholder; then ``WHERE key = {0}``."""


def settle_params(s: EffectSettlement, now: float) -> tuple[Any, ...]:
    """``EFFECT_SETTLE`` and the key."""
    return (s.status.value, _text(s.result), _text(s.error), s.executions, now, s.key)


DECISION_INSERT = "task_id, call_id, kind, tool, args, step, reason, effect_key, requested_at"


def decision_params(d: Decision, now: float) -> tuple[Any, ...]:
    """A question asked at ``now`` (``DECISION_INSERT``)."""
    return (d.task_id, d.call_id, d.kind.value, d.tool, json.dumps(d.args), d.step, d.reason, d.effect_key, now)


DECISION_VERDICT = "verdict = {0}, result = {0}, note = {0}, decided_by = {0}, decided_at = {0}"
"""The SET clause of a verdict, ``{0}`` the driver's placeholder; then ``WHERE task_id = {0} AND call_id = {0}``."""


def verdict_params(d: Decision) -> tuple[Any, ...]:
    """``DECISION_VERDICT`` and the question's key."""
    verdict = d.verdict.value if d.verdict else None
    return (verdict, _text(d.result), d.note, d.decided_by, d.decided_at, d.task_id, d.call_id)


EMAIL_INSERT = "key, tenant, task_id, recipients, subject, body, status, next_at, created_at"


def email_params(m: EmailMessage, now: float) -> tuple[Any, ...]:
    """A message queued at ``now`` (``EMAIL_INSERT``)."""
    return (m.key, m.tenant, m.task_id, json.dumps(m.to), m.subject, m.body, "queued", now, now)


MODEL_STATS_INSERT = (
    "model_id, bucket, provider, calls, errors, structured, json_valid, schema_valid, refusals, truncations, "
    "latency_ms_sum, latency_ms_max, input_tokens, output_tokens, cost_usd"
)


def model_stats_params(call: ModelCallRecord) -> tuple[Any, ...]:
    """One call's contribution to its model's hour bucket (``MODEL_STATS_INSERT``)."""
    return (
        call.model_id,
        hour_bucket(call.at),
        call.provider,
        1,
        int(call.error),
        int(call.json_valid is not None),
        int(bool(call.json_valid)),
        int(bool(call.schema_valid)),
        int(call.refusal),
        int(call.truncated),
        call.latency_ms,
        call.latency_ms,
        call.input_tokens,
        call.output_tokens,
        call.cost_usd,
    )


MODEL_MINUTES_INSERT = "provider, model_id, minute, lat_bin, " + ", ".join(WINDOW_COUNTERS)

MODEL_MINUTES_ADD = ", ".join(f"{c} = {{0}}.{c} + excluded.{c}" for c in WINDOW_COUNTERS)
"""The upsert's SET clause, ``{0}`` the table's name or alias: every column is a sum."""

MODEL_WINDOW_SELECT = (
    "SELECT provider, model_id, lat_bin, "
    + ", ".join(f"SUM({c}) AS {c}" for c in WINDOW_COUNTERS)  # named: a dict row keeps every column
    + " FROM model_minutes WHERE minute >= {0} GROUP BY provider, model_id, lat_bin"
)
"""A window's rows for :meth:`ModelWindow.fold`, ``{0}`` the driver's placeholder for the first minute."""


def model_minutes_params(call: ModelCallRecord) -> tuple[Any, ...]:
    """One call's contribution to its model's minute (``MODEL_MINUTES_INSERT``)."""
    return (call.provider, call.model_id, minute_bucket(call.at), call.latency_bin(), *call.window_counts())


USAGE_INSERT = "tenant, day, calls, input_tokens, output_tokens, cost_usd"


def usage_params(tenant: str, call: ModelCallRecord) -> tuple[Any, ...]:
    """One call's contribution to its tenant's day (``USAGE_INSERT``)."""
    return (tenant, day_bucket(call.at), 1, call.input_tokens, call.output_tokens, call.cost_usd)


LIMIT_COLS = ", ".join(f.name for f in dataclasses.fields(TenantLimits))
"""A tenant's limits, one nullable column each, named as :class:`TenantLimits`' fields."""


def limits_of(row: Row) -> TenantLimits:
    return TenantLimits(**{f.name: row[f.name] for f in dataclasses.fields(TenantLimits)})


def limits_params(limits: TenantLimits) -> tuple[Any, ...]:
    """``LIMIT_COLS``' values, in order."""
    return tuple(getattr(limits, f.name) for f in dataclasses.fields(TenantLimits))


LIMITS_SCHEMA = """
    CREATE TABLE tenant_limits (
        tenant TEXT PRIMARY KEY,
        rate_per_s DOUBLE PRECISION,
        burst INTEGER,
        max_tasks INTEGER,
        daily_cost_usd DOUBLE PRECISION,
        monthly_cost_usd DOUBLE PRECISION,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX tasks_active ON tasks(tenant, status) WHERE status IN ('queued', 'running')
"""
"""The per-tenant limits' table, the same DDL on SQLite and Postgres; the partial index serves the concurrency
cap's count of a tenant's queued and running tasks. (Request-rate buckets are Postgres's alone: SQLite keeps them
in the one process that serves it.)"""


DOCUMENT_INSERT = (
    "id, tenant, sha256, source, media_type, size, status, pages, chunks, space, warnings, errors, metadata, "
    "created_at, updated_at, expires_at"
)
DOCUMENT_UPDATE = excluded(DOCUMENT_INSERT, keep=("id", "tenant", "sha256", "created_at"))
"""What saving a document again changes (its id, tenant, hash and creation time stay)."""


def document_params(doc: DocumentRecord, now: float) -> tuple[Any, ...]:
    """``DOCUMENT_INSERT``, stamped ``now``."""
    return (
        doc.id,
        doc.tenant,
        doc.sha256,
        doc.source,
        doc.media_type,
        doc.size,
        doc.status.value,
        doc.pages,
        doc.chunks,
        doc.space,
        json.dumps(doc.warnings),
        json.dumps(doc.errors),
        json.dumps(doc.metadata),
        doc.created_at or now,
        now,
        doc.expires_at,
    )


CHUNK_INSERT = (
    "document_id, tenant, space, page, char_start, char_end, text, content_hash, {vector}, created_at, expires_at"
)
CHUNK_IDENTITY = "document_id = {0} AND space = {0} AND page = {0} AND char_start = {0} AND content_hash = {0}"
"""What makes a chunk the same chunk (``{0}`` the driver's placeholder): stored once, ingested any number of
times."""


def chunk_params(c: ChunkRecord, vector: Any, now: float) -> tuple[Any, ...]:
    """``CHUNK_INSERT``, with the vector as the driver stores it."""
    return (
        c.document_id,
        c.tenant,
        c.space,
        c.page,
        c.start,
        c.end,
        c.text,
        c.content_hash,
        vector,
        c.created_at or now,
        c.expires_at,
    )


def chunk_identity(c: ChunkRecord) -> tuple[Any, ...]:
    """``CHUNK_IDENTITY``."""
    return (c.document_id, c.space, c.page, c.start, c.content_hash)


def values(columns: str, mark: str) -> str:
    """``(columns) VALUES (mark, …)``: one placeholder (``?`` or ``%s``) per column of a column list."""
    return f"({columns}) VALUES ({', '.join([mark] * (columns.count(',') + 1))})"
