"""The store seams, and :class:`Stores`: one handle per seam.

Each seam is a small Protocol. One backend object usually implements them all over one database (:class:`Store`),
so that a task's status change, its event and its webhook message commit in one transaction (a transactional
outbox). A seam that needs no transaction with the others can live elsewhere: session memory in Redis, shared by
every API replica. The app holds a :class:`Stores`, whose handles point at whichever backend serves each seam, so a
backend serves the seams it is good at and no forwarding class stands in between.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from keel.memory.limits import RateDecision, TenantLimits
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
    EmailMessage,
    Event,
    IdempotencyClaim,
    KeyRecord,
    Lease,
    LeaseState,
    ModelCallRecord,
    ModelStats,
    ModelWindow,
    NewTask,
    OutboxMessage,
    Session,
    SessionTurn,
    StepCheckpoint,
    Task,
    TaskStatus,
    TenantUsage,
)


class Backend(Protocol):
    """What every seam's backend has: a lifetime. Closing it releases its connections (and flushes what it
    caches); no call may follow."""

    async def aclose(self) -> None: ...


class TaskStore(Backend, Protocol):
    async def create_task(self, new: NewTask, claim: IdempotencyClaim | None, now: float) -> CreateResult:
        """Atomically check-and-set the idempotency key and insert the task with its first event."""
        ...

    async def get_task(self, task_id: str, tenant: str | None = None) -> Task | None: ...

    async def list_tasks(
        self, tenant: str, *, statuses: Sequence[TaskStatus] = (), limit: int = 50, before: str | None = None
    ) -> list[Task]: ...

    async def queued_count(self) -> int:
        """How many tasks wait for a worker, every tenant's (the queue depth ``/metrics`` reports)."""
        ...

    async def lease_next(self, owner: str, now: float, lease_s: float, max_attempts: int) -> Lease | None:
        """Claim the oldest runnable task (queued, or running with an expired lease). One whose worker died
        ``max_attempts`` leases in a row without recording a step
        (:func:`~keel.memory.types.leases_without_progress`) is dead-lettered instead, and the next is tried."""
        ...

    async def renew_lease(self, lease: Lease, now: float, lease_s: float) -> LeaseState: ...

    async def release(self, lease: Lease) -> None:
        """Give a task back to the queue (graceful shutdown) without finishing it."""
        ...

    async def requeue_running(self) -> int:
        """Embedded start-up: every running task belongs to a dead process; queue them again."""
        ...

    async def set_progress(self, lease: Lease, progress: float, current_step: str | None, now: float) -> None: ...

    async def finish(
        self, lease: Lease | None, task_id: str, status: TaskStatus, envelope: dict[str, Any], now: float
    ) -> Event | None:
        """Make the task terminal, append its ``end`` event and enqueue its webhook, in one transaction.

        Fenced by ``lease`` when given; with no lease (cancelling a queued task) only a non-terminal task moves.
        Returns the end event, or None when the task was already terminal.
        """
        ...

    async def request_cancel(self, task_id: str, tenant: str) -> Task | None: ...

    async def delete_task(self, task_id: str, tenant: str) -> bool:
        """Delete an ended task of ``tenant`` and what it recorded, in one transaction: its events, steps, state,
        decisions, effect ledger rows and idempotency keys (a blob no other task refers to goes too). Deliveries it
        already queued (webhook messages, emails) are kept: they are promises made before the deletion. False when
        the tenant has no such task; a task that has not ended raises
        :class:`~keel.errors.TaskNotFinished` (:meth:`Task.check_deletable`)."""
        ...

    async def sweep_idempotency(self, now: float) -> int: ...

    async def sweep_tasks(self, finished_before: float, limit: int) -> int:
        """Delete up to ``limit`` ended tasks that finished before ``finished_before`` (oldest first), each with
        what :meth:`delete_task` takes with it and its settled deliveries (webhook messages delivered, dead or
        disabled; emails sent or failed: one still being tried stays), in one transaction; returns how many
        went. The retention sweeper calls it in bounded batches, so one sweep never holds the writer long. A task
        is deleted whole or not at all, so its events stay readable (and its stream resumable) for exactly as
        long as it is kept, and its idempotency keys never outlive its answer."""
        ...


EventSpec = tuple[str, dict[str, Any]] | tuple[str, dict[str, Any], float]
"""An event to append: ``(type, data)``, or ``(type, data, created_at)``."""


class WorkflowStore(Backend, Protocol):
    """Workflow memory: step checkpoints, named workflow state, and out-of-line blobs for large payloads."""

    async def record_step(
        self,
        lease: Lease,
        step: StepCheckpoint,
        events: Sequence[EventSpec],
        now: float,
        *,
        effect: EffectSettlement | None = None,
    ) -> None:
        """Store a finished step and append ``events`` (and settle ``effect``, a write tool's ledger row), in one
        transaction fenced by the lease. An event given as
        ``(type, data, at)`` keeps its own time (one emitted earlier and held back); others are stamped ``now``.

        A result larger than :data:`keel.memory.blobs.INLINE_LIMIT` bytes of JSON goes to the blob table.
        """
        ...

    async def load_steps(self, task_id: str) -> list[StepCheckpoint]:
        """Every recorded step in call order; large results come back as :class:`BlobRef`."""
        ...

    async def load_blob(self, ref: BlobRef) -> Any: ...

    async def set_state(
        self, lease: Lease, key: str, value: Any, event: tuple[str, dict[str, Any]] | None, now: float
    ) -> None:
        """Set one named piece of workflow state (partial results), fenced, with its event."""
        ...

    async def load_state(self, task_id: str) -> dict[str, Any]: ...


class ModelStatsStore(Backend, Protocol):
    """Rolling per-model counters and per-tenant spend (day buckets). A model is a (provider, model id) pair.

    One call, one write, three tables: hour buckets for ``/v1/models/stats`` (kept long), per-minute rows for the
    rolling SLO window (``/v1/slo``, kept :data:`~keel.memory.types.WINDOW_RETENTION_S`), and the tenant's day.
    The per-minute rows are also keyed by latency bin, so that every column is a plain sum (an upsert adds, never
    reads) and a window's percentiles come from a few dozen rows per model, not one row per call."""

    async def record_model_call(self, tenant: str, call: ModelCallRecord) -> None: ...

    async def model_stats(self, model_id: str | None = None, since: float = 0.0) -> list[ModelStats]: ...

    async def model_window(self, since: float) -> list[ModelWindow]:
        """Each model's counters from the start of ``since``'s minute on, sorted by provider and model id."""
        ...

    async def tenant_usage(self, tenant: str, since: float) -> TenantUsage:
        """Sum of the tenant's model calls from the start of ``since``'s UTC day."""
        ...


class EventLog(Backend, Protocol):
    async def append(self, lease: Lease, type: str, data: dict[str, Any], now: float) -> Event:
        """Append under the lease's fence; raises LeaseLost if another worker owns the task."""
        ...

    def append_nowait(self, lease: Lease, type: str, data: dict[str, Any], now: float) -> Awaitable[Event]:
        """Start an append without waiting for it to be durable. Writes this process makes afterwards commit after
        it (so a step's checkpoint can share its ``step_started`` event's commit); await the result to learn of
        a lost lease."""
        ...

    async def read(self, task_id: str, after: int, limit: int = 500) -> list[Event]: ...


class Outbox(Backend, Protocol):
    async def due(self, now: float, limit: int, *, claim_s: float = 0.0) -> list[OutboxMessage]:
        """Pending messages due at ``now``, oldest first. With ``claim_s``, each one returned is claimed: it is not
        due again for ``claim_s`` seconds unless its delivery settles first, so several dispatchers (one per
        worker) never send the same message at once, and one that dies mid-delivery leaves it due again later."""
        ...

    async def delivered(self, msg_id: str, now: float) -> None: ...

    async def retry_at(self, msg_id: str, when: float, error: str) -> None: ...

    async def dead(self, msg_id: str, error: str) -> None: ...

    async def disable_endpoint(self, tenant: str, url: str, now: float) -> None: ...

    async def messages(self, task_id: str) -> list[OutboxMessage]: ...


class KeyStore(Backend, Protocol):
    """API keys. The rules of a key's life are :class:`~keel.memory.types.KeyRecord`'s; a store loads the row and
    compares-and-sets."""

    async def create_key(
        self, tenant: str, scopes: frozenset[str], now: float, *, expires_at: float | None = None
    ) -> str:
        """Store a new key's hash and return the plaintext key (shown once)."""
        ...

    async def verify_key(self, key: str, now: float | None = None) -> ApiKey | None:
        """The key, when it exists, matches and is neither revoked nor expired at ``now`` (None: the clock).
        Read from the store on every call, so a revocation holds at once on every replica; records the use, at
        most once every :data:`~keel.memory.types.LAST_USED_EVERY_S` per key."""
        ...

    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        """Every key (of ``tenant``), revoked and expired ones too, oldest first."""
        ...

    async def revoke_key(self, key_id: str, now: float, *, tenant: str | None = None) -> KeyRecord | None:
        """Revoke the key (repeatable: the first revocation time stays); None when there is no such key (of
        ``tenant``)."""
        ...

    async def rotate_key(
        self, key_id: str, now: float, *, grace_s: float = 0.0, tenant: str | None = None
    ) -> tuple[KeyRecord, str] | None:
        """Replace the key by a new one with its tenant, scopes and expiry, retiring the old one
        (:meth:`~keel.memory.types.KeyRecord.retired`) in the same transaction. Returns the new key's record and
        its plaintext (shown once); None when there is no such key (of ``tenant``)."""
        ...


class SecretStore(Backend, Protocol):
    """Webhook secrets at rest. A store keeps them as given (sealed by :class:`keel.secretbox.SecretBox` before
    they reach it); this seam lets start-up seal old plaintext rows and re-encrypt under a new key."""

    async def reseal_secrets(self, reseal: Callable[[str], str | None]) -> int:
        """Pass every stored webhook secret (the tasks' and the outbox messages') through ``reseal``, and store
        what it returns in its place (None: leave it), in one transaction. Returns how many changed. An
        exception from ``reseal`` rolls everything back."""
        ...


class EffectLedger(Backend, Protocol):
    """Write-tool calls keyed by idempotency key: recorded durably before the call and after it."""

    async def begin_effect(self, lease: Lease, effect: EffectRecord, now: float) -> tuple[EffectRecord, bool]:
        """Insert ``effect`` as pending unless its key exists; return the stored row and whether it is new.
        Fenced by the lease, so a superseded worker cannot start an effect."""
        ...

    async def settle_effect(self, lease: Lease, settlement: EffectSettlement, now: float) -> None: ...

    async def get_effect(self, key: str) -> EffectRecord | None: ...

    async def list_effects(self, task_id: str) -> list[EffectRecord]: ...


class DecisionStore(Backend, Protocol):
    """Approvals and unknown outcomes a paused task waits on."""

    async def request_decisions(
        self, lease: Lease, decisions: Sequence[Decision], envelope: dict[str, Any], now: float
    ) -> None:
        """Park the task: store the pending decisions (one ``decision_requested`` event each, existing call ids
        kept as they are), set it ``waiting_for_approval`` with a provisional ``envelope`` and end the lease.
        If every decision is already made (a person answered while the run was stopping), queue it again."""
        ...

    async def decide(self, task_id: str, tenant: str, decision: Decision, now: float) -> Decision:
        """Record a verdict (``decision`` carries call_id, verdict, note, result, decided_by). Queues the task
        again once nothing it waits on is undecided. Raises NotFound for an unknown call, and InputError when
        the call was already decided otherwise; repeating the same verdict returns the stored decision."""
        ...

    async def load_decisions(self, task_id: str) -> list[Decision]: ...

    async def expire_decisions(self, requested_before: float, now: float) -> list[str]:
        """Deny every decision still open that was asked before ``requested_before`` (nobody answered in time:
        the safe answer to "may this write run?" is no), and queue the tasks left with nothing open. Returns
        the ids of the tasks queued again."""
        ...


class EmailOutbox(Backend, Protocol):
    async def enqueue_email(self, message: EmailMessage, now: float) -> tuple[EmailMessage, bool]:
        """Insert unless ``message.key`` exists; return the stored row and whether it is new."""
        ...

    async def get_email(self, key: str) -> EmailMessage | None: ...

    async def due_emails(self, now: float, limit: int, *, claim_s: float = 0.0) -> list[EmailMessage]:
        """Queued emails due at ``now``; ``claim_s`` claims them as :meth:`Outbox.due` does."""
        ...

    async def email_sent(self, key: str, now: float) -> None: ...

    async def email_retry(self, key: str, when: float, error: str, *, give_up: bool = False) -> None: ...


class SessionStore(Backend, Protocol):
    """Short-term memory: per-session turns and context with a sliding TTL, scoped to a tenant."""

    async def append_turns(
        self, tenant: str, session_id: str, turns: Sequence[SessionTurn], ttl_s: float, now: float
    ) -> Session:
        """Append ``turns`` (numbered on from the last) and push ``expires_at`` to ``now + ttl_s``. A session that
        has expired is started afresh: its old turns and context are never seen again."""
        ...

    async def set_session_context(
        self, tenant: str, session_id: str, context: dict[str, Any], ttl_s: float, now: float
    ) -> Session: ...

    async def get_session(self, tenant: str, session_id: str, now: float, *, last: int | None = None) -> Session | None:
        """The session with its last ``last`` turns (all when None); None when missing, expired or another
        tenant's."""
        ...

    async def delete_session(self, tenant: str, session_id: str) -> bool: ...

    async def sweep_sessions(self, now: float) -> int:
        """Delete expired sessions and their turns; return how many."""
        ...


class DocumentStore(Backend, Protocol):
    async def save_document(self, doc: DocumentRecord, now: float) -> DocumentRecord:
        """Insert or update ``doc`` by id (``updated_at`` stamped ``now``)."""
        ...

    async def get_document(self, tenant: str, document_id: str, now: float | None = None) -> DocumentRecord | None:
        """None when missing, another tenant's, or (given ``now``) expired."""
        ...

    async def list_documents(self, tenant: str, now: float, *, limit: int = 100) -> list[DocumentRecord]: ...

    async def delete_document(self, tenant: str, document_id: str) -> bool:
        """Delete the document and all its chunks, in every space."""
        ...


class VectorStore(Backend, Protocol):
    """Long-term memory: embedded chunks. Each chunk belongs to one embedding space (``model@version``); a search
    names its space and can only ever see chunks of that space, so vectors of two model versions are never
    compared."""

    async def add_chunks(self, chunks: Sequence[ChunkRecord], now: float) -> list[int]:
        """Store chunks with their vectors; return their ids in order. A chunk already stored (same document,
        space, page, offsets and content hash) keeps its row and id, so ingesting again adds nothing."""
        ...

    async def search_chunks(
        self,
        space: str,
        vector: Any,
        k: int,
        *,
        tenant: str,
        now: float,
        documents: Sequence[str] | None = None,
    ) -> list[ChunkHit]:
        """The ``k`` chunks of ``space`` closest to ``vector`` (cosine), best first, among the tenant's unexpired
        chunks (of ``documents`` only, when given)."""
        ...

    async def chunk_count(self, space: str, *, tenant: str | None = None, now: float | None = None) -> int: ...

    async def spaces(self, now: float) -> dict[str, int]:
        """Every space that has unexpired chunks, with its chunk count."""
        ...

    async def document_chunks(self, tenant: str, document_id: str, space: str, now: float) -> list[ChunkRecord]:
        """A document's unexpired chunks in ``space`` (without vectors), in reading order: page, then offset."""
        ...

    async def chunks_to_reindex(self, source: str, target: str, limit: int, now: float) -> list[ChunkRecord]:
        """Unexpired chunks of ``source`` (without vectors) that have no twin in ``target`` yet, oldest first."""
        ...

    async def drop_space(self, space: str) -> int:
        """Delete every chunk of ``space``; return how many."""
        ...

    async def sweep_chunks(self, now: float) -> int:
        """Delete expired chunks and expired documents (with their chunks); return how many chunks went."""
        ...


class ResultCache(Backend, Protocol):
    """Finished results by request fingerprint (seed 000, step 12): an identical request need not be paid twice."""

    async def cached_result(self, tenant: str, key: str, not_before: float) -> Task | None:
        """The newest succeeded task with this fingerprint that finished at or after ``not_before``."""
        ...


class LimitStore(Backend, Protocol):
    """Per-tenant limits: what an operator set, and the count a concurrency cap reads. Served by the task store's
    backend (the active count reads its tasks table), so every replica on the same store shares them."""

    async def get_limits(self, tenant: str) -> TenantLimits | None:
        """The limits set for ``tenant``, or None when none were (the defaults apply)."""
        ...

    async def set_limits(self, tenant: str, limits: TenantLimits, now: float) -> None:
        """Replace ``tenant``'s limits; all None forgets them (the defaults apply again)."""
        ...

    async def active_tasks(self, tenant: str) -> int:
        """How many of ``tenant``'s tasks are queued or running."""
        ...


class RateBuckets(Backend, Protocol):
    """Request-rate token buckets, shared by every replica that shares the backend: Postgres's table, or Redis
    with ``KEEL_REDIS_URL`` (a Lua script: no row lock for a busy tenant). A SQLite store, which one process
    serves, keeps them in that process."""

    async def take_token(self, bucket: str, rate_per_s: float, size: int, now: float) -> RateDecision:
        """Take one token from the named bucket as :func:`keel.memory.limits.take_token` says, atomically (load,
        refill, take and save as one), so concurrent requests on any replica never spend the same token."""
        ...


class Store(
    TaskStore,
    WorkflowStore,
    ModelStatsStore,
    EventLog,
    Outbox,
    KeyStore,
    SecretStore,
    EffectLedger,
    DecisionStore,
    EmailOutbox,
    SessionStore,
    DocumentStore,
    VectorStore,
    ResultCache,
    LimitStore,
    RateBuckets,
    Protocol,
):
    """Every seam over one database: what the SQL backends (and the in-memory twin) implement."""


@dataclass(kw_only=True, frozen=True, slots=True)
class Stores:
    """One handle per seam, each pointing at the backend that serves it (on a SQL store, all one object; with
    Redis, ``sessions`` is Redis's). A component takes the handles of the seams it uses, never the whole set.

    Seams that commit together must share a backend: a task's status, events, webhook message, steps, effects and
    decisions change in one transaction, so ``tasks``, ``events``, ``outbox``, ``workflows``, ``effects`` and
    ``decisions`` (and ``cache``, which reads the tasks table) are one object. :meth:`over` builds them so.
    """

    tasks: TaskStore
    events: EventLog
    outbox: Outbox
    workflows: WorkflowStore
    """Step checkpoints, named workflow state and blobs."""
    effects: EffectLedger
    decisions: DecisionStore
    cache: ResultCache
    keys: KeyStore
    secrets: SecretStore
    """Webhook secrets at rest: served with ``tasks`` and ``outbox``, whose rows hold them."""
    emails: EmailOutbox
    stats: ModelStatsStore
    sessions: SessionStore
    documents: DocumentStore
    vectors: VectorStore
    limits: LimitStore
    """Per-tenant limits and the active-task count."""
    buckets: RateBuckets
    """Request-rate buckets: the store's, or Redis's."""
    backend: Store
    """The backend serving every seam not given to another. For components still written against the whole
    :class:`Store`; a new component takes the handles it uses instead."""

    @classmethod
    def over(
        cls, backend: Store, *, sessions: SessionStore | None = None, buckets: RateBuckets | None = None
    ) -> Stores:
        """Every seam served by ``backend``, but session memory by ``sessions`` and the request-rate buckets by
        ``buckets`` when given."""
        return cls(
            tasks=backend,
            events=backend,
            outbox=backend,
            workflows=backend,
            effects=backend,
            decisions=backend,
            cache=backend,
            keys=backend,
            secrets=backend,
            emails=backend,
            stats=backend,
            sessions=sessions or backend,
            documents=backend,
            vectors=backend,
            limits=backend,
            buckets=buckets or backend,
            backend=backend,
        )

    async def aclose(self) -> None:
        """Close each distinct backend once, the first handle's last (it is the one the others were built
        around); an error closing one does not keep the others open."""
        handles: list[Backend] = [getattr(self, f.name) for f in dataclasses.fields(self)]
        distinct = list({id(h): h for h in handles}.values())
        failure: BaseException | None = None
        for backend in reversed(distinct):
            try:
                await backend.aclose()
            except BaseException as exc:  # the rest are still closed; the first failure is raised after
                failure = failure or exc
        if failure is not None:
            raise failure
