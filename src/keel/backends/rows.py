"""Rows to dataclasses and dataclasses to rows, shared by the SQL backends: SQLite and Postgres keep the same
columns (JSON as text), so one reading of a row, and one tuple of a statement's parameters, serves both. No driver
is imported here; a row is anything indexable by column name (``sqlite3.Row``, psycopg's ``dict_row``). Each
``*_params`` function gives its parameters in the order of the column list beside it, which both drivers'
statements use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol

from keel.memory.blobs import dumps
from keel.memory.types import (
    ApiKey,
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
    webhook_payload,
)

CHUNK_COLS = "id, document_id, tenant, space, page, char_start, char_end, text, content_hash, created_at, expires_at"
"""The chunk columns read back without the vector."""


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


def _json(value: Any) -> Any:
    return json.loads(value) if value is not None else None


def _text(value: Any) -> str | None:
    return json.dumps(value) if value is not None else None


def task_of(row: Row) -> Task:
    return Task(
        id=row["id"],
        tenant=row["tenant"],
        workflow=row["workflow"],
        input=json.loads(row["input"]),
        status=TaskStatus(row["status"]),
        progress=row["progress"],
        current_step=row["current_step"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        envelope=json.loads(row["envelope"]) if row["envelope"] else None,
        webhook_url=row["webhook_url"],
        webhook_secret=row["webhook_secret"],
        budget=json.loads(row["budget"]),
        metadata=json.loads(row["metadata"]),
        estimated_duration_s=row["estimated_duration_s"],
        dead_lettered=bool(row["dead_lettered"]),
        policy=json.loads(row["policy"]),
        cache_key=row["cache_key"],
    )


def outbox_of(row: Row) -> OutboxMessage:
    return OutboxMessage(
        id=row["id"],
        tenant=row["tenant"],
        task_id=row["task_id"],
        url=row["url"],
        secret=row["secret"],
        event_type=row["event_type"],
        payload=json.loads(row["payload"]),
        attempts=row["attempts"],
        status=row["status"],
        last_error=row["last_error"],
    )


def effect_of(row: Row) -> EffectRecord:
    return EffectRecord(
        key=row["key"],
        task_id=row["task_id"],
        step=row["step"],
        tool=row["tool"],
        args=json.loads(row["args"]),
        status=EffectStatus(row["status"]),
        result=_json(row["result"]),
        error=_json(row["error"]),
        executions=row["executions"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def decision_of(row: Row) -> Decision:
    return Decision(
        task_id=row["task_id"],
        call_id=row["call_id"],
        kind=DecisionKind(row["kind"]),
        tool=row["tool"],
        args=json.loads(row["args"]),
        step=row["step"],
        reason=row["reason"],
        effect_key=row["effect_key"],
        verdict=Verdict(row["verdict"]) if row["verdict"] else None,
        result=_json(row["result"]),
        note=row["note"],
        decided_by=row["decided_by"],
        requested_at=row["requested_at"],
        decided_at=row["decided_at"],
    )


def email_of(row: Row) -> EmailMessage:
    return EmailMessage(
        key=row["key"],
        tenant=row["tenant"],
        task_id=row["task_id"],
        to=json.loads(row["recipients"]),
        subject=row["subject"],
        body=row["body"],
        status=row["status"],
        attempts=row["attempts"],
        next_at=row["next_at"],
        created_at=row["created_at"],
        sent_at=row["sent_at"],
        error=row["error"],
    )


def chunk_of(row: Row, vector: Any = None) -> ChunkRecord:
    return ChunkRecord(
        id=row["id"],
        document_id=row["document_id"],
        tenant=row["tenant"],
        space=row["space"],
        page=row["page"],
        start=row["char_start"],
        end=row["char_end"],
        text=row["text"],
        content_hash=row["content_hash"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        vector=vector,
    )


def document_of(row: Row) -> DocumentRecord:
    return DocumentRecord(
        id=row["id"],
        tenant=row["tenant"],
        sha256=row["sha256"],
        source=row["source"],
        media_type=row["media_type"],
        size=row["size"],
        status=DocumentStatus(row["status"]),
        pages=row["pages"],
        chunks=row["chunks"],
        space=row["space"],
        warnings=json.loads(row["warnings"]),
        errors=json.loads(row["errors"]),
        metadata=json.loads(row["metadata"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
    )


def scopes_text(scopes: frozenset[str]) -> str:
    return ",".join(sorted(scopes))


def api_key_of(key_id: str, row: Row) -> ApiKey:
    return ApiKey(id=key_id, tenant=row["tenant"], scopes=frozenset(filter(None, row["scopes"].split(","))))


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


USAGE_INSERT = "tenant, day, calls, input_tokens, output_tokens, cost_usd"


def usage_params(tenant: str, call: ModelCallRecord) -> tuple[Any, ...]:
    """One call's contribution to its tenant's day (``USAGE_INSERT``)."""
    return (tenant, day_bucket(call.at), 1, call.input_tokens, call.output_tokens, call.cost_usd)


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
