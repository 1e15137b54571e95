"""A store made of two: the session tier from one backend, everything else from another.

``with_sessions(SQLiteStore(...), RedisSessionStore(url))`` keeps tasks, events and the vector tier in SQLite (or
Postgres) and short-term session memory in Redis, shared by every API replica. Each method is forwarded
explicitly, so the wrapper is checked against the whole :class:`~keel.memory.stores.Store` protocol: a method
added to the protocol and not forwarded here is a type error, never a silent ``AttributeError`` at run time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from keel.memory.stores import EventSpec, SessionStore, Store
from keel.memory.types import (
    ApiKey,
    BlobRef,
    ChunkHit,
    ChunkRecord,
    CreateResult,
    Decision,
    DocumentRecord,
    EffectRecord,
    EffectSettlement,
    EffectStatus,
    EmailMessage,
    Event,
    IdempotencyClaim,
    Lease,
    LeaseState,
    ModelCallRecord,
    ModelStats,
    NewTask,
    OutboxMessage,
    Session,
    SessionTurn,
    StepCheckpoint,
    Task,
    TaskStatus,
    TenantUsage,
)


class ClosableSessionStore(SessionStore, Protocol):
    async def aclose(self) -> None: ...


def with_sessions(store: Store, sessions: ClosableSessionStore) -> Store:
    """``store`` with its session methods served by ``sessions``; closing it closes both."""
    return SplitStore(store, sessions)


class SplitStore:
    """See :func:`with_sessions`."""

    def __init__(self, store: Store, sessions: ClosableSessionStore) -> None:
        self._store = store
        self._sessions = sessions

    async def aclose(self) -> None:
        try:
            await self._sessions.aclose()
        finally:
            await self._store.aclose()

    async def create_task(self, new: NewTask, claim: IdempotencyClaim | None, now: float) -> CreateResult:
        return await self._store.create_task(new, claim, now)

    async def get_task(self, task_id: str, tenant: str | None = None) -> Task | None:
        return await self._store.get_task(task_id, tenant)

    async def list_tasks(
        self, tenant: str, *, statuses: Sequence[TaskStatus] = (), limit: int = 50, before: str | None = None
    ) -> list[Task]:
        return await self._store.list_tasks(tenant, statuses=statuses, limit=limit, before=before)

    async def lease_next(self, owner: str, now: float, lease_s: float, max_attempts: int) -> Lease | None:
        return await self._store.lease_next(owner, now, lease_s, max_attempts)

    async def renew_lease(self, lease: Lease, now: float, lease_s: float) -> LeaseState:
        return await self._store.renew_lease(lease, now, lease_s)

    async def release(self, lease: Lease) -> None:
        await self._store.release(lease)

    async def requeue_running(self) -> int:
        return await self._store.requeue_running()

    async def set_progress(self, lease: Lease, progress: float, current_step: str | None, now: float) -> None:
        await self._store.set_progress(lease, progress, current_step, now)

    async def finish(
        self, lease: Lease | None, task_id: str, status: TaskStatus, envelope: dict[str, Any], now: float
    ) -> Event | None:
        return await self._store.finish(lease, task_id, status, envelope, now)

    async def request_cancel(self, task_id: str, tenant: str) -> Task | None:
        return await self._store.request_cancel(task_id, tenant)

    async def sweep_idempotency(self, now: float) -> int:
        return await self._store.sweep_idempotency(now)

    async def record_step(
        self,
        lease: Lease,
        step: StepCheckpoint,
        events: Sequence[EventSpec],
        now: float,
        *,
        effect: EffectSettlement | None = None,
    ) -> None:
        await self._store.record_step(lease, step, events, now, effect=effect)

    async def load_steps(self, task_id: str) -> list[StepCheckpoint]:
        return await self._store.load_steps(task_id)

    async def load_blob(self, ref: BlobRef) -> Any:
        return await self._store.load_blob(ref)

    async def set_state(
        self, lease: Lease, key: str, value: Any, event: tuple[str, dict[str, Any]] | None, now: float
    ) -> None:
        await self._store.set_state(lease, key, value, event, now)

    async def load_state(self, task_id: str) -> dict[str, Any]:
        return await self._store.load_state(task_id)

    async def record_model_call(self, tenant: str, call: ModelCallRecord) -> None:
        await self._store.record_model_call(tenant, call)

    async def model_stats(self, model_id: str | None = None, since: float = 0.0) -> list[ModelStats]:
        return await self._store.model_stats(model_id, since)

    async def tenant_usage(self, tenant: str, since: float) -> TenantUsage:
        return await self._store.tenant_usage(tenant, since)

    async def append(self, lease: Lease, type: str, data: dict[str, Any], now: float) -> Event:
        return await self._store.append(lease, type, data, now)

    def append_nowait(self, lease: Lease, type: str, data: dict[str, Any], now: float) -> Awaitable[Event]:
        return self._store.append_nowait(lease, type, data, now)

    async def read(self, task_id: str, after: int, limit: int = 500) -> list[Event]:
        return await self._store.read(task_id, after, limit)

    async def due(self, now: float, limit: int, *, claim_s: float = 0.0) -> list[OutboxMessage]:
        return await self._store.due(now, limit, claim_s=claim_s)

    async def delivered(self, msg_id: str, now: float) -> None:
        await self._store.delivered(msg_id, now)

    async def retry_at(self, msg_id: str, when: float, error: str) -> None:
        await self._store.retry_at(msg_id, when, error)

    async def dead(self, msg_id: str, error: str) -> None:
        await self._store.dead(msg_id, error)

    async def disable_endpoint(self, tenant: str, url: str, now: float) -> None:
        await self._store.disable_endpoint(tenant, url, now)

    async def messages(self, task_id: str) -> list[OutboxMessage]:
        return await self._store.messages(task_id)

    async def create_key(self, tenant: str, scopes: frozenset[str], now: float) -> str:
        return await self._store.create_key(tenant, scopes, now)

    async def verify_key(self, key: str) -> ApiKey | None:
        return await self._store.verify_key(key)

    async def begin_effect(self, lease: Lease, effect: EffectRecord, now: float) -> tuple[EffectRecord, bool]:
        return await self._store.begin_effect(lease, effect, now)

    async def settle_effect(
        self,
        lease: Lease,
        key: str,
        status: EffectStatus,
        now: float,
        *,
        result: Any = None,
        error: dict[str, Any] | None = None,
        executions: int | None = None,
    ) -> None:
        await self._store.settle_effect(lease, key, status, now, result=result, error=error, executions=executions)

    async def get_effect(self, key: str) -> EffectRecord | None:
        return await self._store.get_effect(key)

    async def list_effects(self, task_id: str) -> list[EffectRecord]:
        return await self._store.list_effects(task_id)

    async def request_decisions(
        self, lease: Lease, decisions: Sequence[Decision], envelope: dict[str, Any], now: float
    ) -> None:
        return await self._store.request_decisions(lease, decisions, envelope, now)

    async def decide(self, task_id: str, tenant: str, decision: Decision, now: float) -> Decision:
        return await self._store.decide(task_id, tenant, decision, now)

    async def load_decisions(self, task_id: str) -> list[Decision]:
        return await self._store.load_decisions(task_id)

    async def expire_decisions(self, requested_before: float, now: float) -> list[str]:
        return await self._store.expire_decisions(requested_before, now)

    async def enqueue_email(self, message: EmailMessage, now: float) -> tuple[EmailMessage, bool]:
        return await self._store.enqueue_email(message, now)

    async def get_email(self, key: str) -> EmailMessage | None:
        return await self._store.get_email(key)

    async def due_emails(self, now: float, limit: int, *, claim_s: float = 0.0) -> list[EmailMessage]:
        return await self._store.due_emails(now, limit, claim_s=claim_s)

    async def email_sent(self, key: str, now: float) -> None:
        await self._store.email_sent(key, now)

    async def email_retry(self, key: str, when: float, error: str, *, give_up: bool = False) -> None:
        await self._store.email_retry(key, when, error, give_up=give_up)

    async def append_turns(
        self, tenant: str, session_id: str, turns: Sequence[SessionTurn], ttl_s: float, now: float
    ) -> Session:
        return await self._sessions.append_turns(tenant, session_id, turns, ttl_s, now)

    async def set_session_context(
        self, tenant: str, session_id: str, context: dict[str, Any], ttl_s: float, now: float
    ) -> Session:
        return await self._sessions.set_session_context(tenant, session_id, context, ttl_s, now)

    async def get_session(self, tenant: str, session_id: str, now: float, *, last: int | None = None) -> Session | None:
        return await self._sessions.get_session(tenant, session_id, now, last=last)

    async def delete_session(self, tenant: str, session_id: str) -> bool:
        return await self._sessions.delete_session(tenant, session_id)

    async def sweep_sessions(self, now: float) -> int:
        return await self._sessions.sweep_sessions(now)

    async def save_document(self, doc: DocumentRecord, now: float) -> DocumentRecord:
        return await self._store.save_document(doc, now)

    async def get_document(self, tenant: str, document_id: str, now: float | None = None) -> DocumentRecord | None:
        return await self._store.get_document(tenant, document_id, now)

    async def list_documents(self, tenant: str, now: float, *, limit: int = 100) -> list[DocumentRecord]:
        return await self._store.list_documents(tenant, now, limit=limit)

    async def delete_document(self, tenant: str, document_id: str) -> bool:
        return await self._store.delete_document(tenant, document_id)

    async def add_chunks(self, chunks: Sequence[ChunkRecord], now: float) -> list[int]:
        return await self._store.add_chunks(chunks, now)

    async def search_chunks(
        self, space: str, vector: Any, k: int, *, tenant: str, now: float, documents: Sequence[str] | None = None
    ) -> list[ChunkHit]:
        return await self._store.search_chunks(space, vector, k, tenant=tenant, now=now, documents=documents)

    async def chunk_count(self, space: str, *, tenant: str | None = None, now: float | None = None) -> int:
        return await self._store.chunk_count(space, tenant=tenant, now=now)

    async def spaces(self, now: float) -> dict[str, int]:
        return await self._store.spaces(now)

    async def document_chunks(self, tenant: str, document_id: str, space: str, now: float) -> list[ChunkRecord]:
        return await self._store.document_chunks(tenant, document_id, space, now)

    async def chunks_to_reindex(self, source: str, target: str, limit: int, now: float) -> list[ChunkRecord]:
        return await self._store.chunks_to_reindex(source, target, limit, now)

    async def drop_space(self, space: str) -> int:
        return await self._store.drop_space(space)

    async def sweep_chunks(self, now: float) -> int:
        return await self._store.sweep_chunks(now)

    async def cached_result(self, tenant: str, key: str, not_before: float) -> Task | None:
        return await self._store.cached_result(tenant, key, not_before)
