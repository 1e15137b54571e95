"""Rows to dataclasses, shared by the SQL backends: SQLite and Postgres keep the same columns (JSON as text), so
one reading of a row serves both. No driver is imported here; a row is anything indexable by column name
(``sqlite3.Row``, psycopg's ``dict_row``)."""

from __future__ import annotations

import json
from typing import Any, Protocol

from keel.memory.types import (
    ChunkRecord,
    Decision,
    DecisionKind,
    DocumentRecord,
    DocumentStatus,
    EffectRecord,
    EffectStatus,
    EmailMessage,
    OutboxMessage,
    Task,
    TaskStatus,
    Verdict,
)

CHUNK_COLS = "id, document_id, tenant, space, page, char_start, char_end, text, content_hash, created_at, expires_at"
"""The chunk columns read back without the vector."""


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


def _json(value: Any) -> Any:
    return json.loads(value) if value is not None else None


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
