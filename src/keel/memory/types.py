"""Domain values carried across the store seams: plain dataclasses, no I/O."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import os
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from keel.errors import InputError, NotFound, TaskNotFinished


class TaskStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    partial_success = "partial_success"
    failed = "failed"
    cancelled = "cancelled"
    needs_clarification = "needs_clarification"
    waiting_for_approval = "waiting_for_approval"
    """Parked until a person decides on a tool call (an approval, or a write whose outcome is unknown)."""

    @property
    def terminal(self) -> bool:
        return self not in (TaskStatus.queued, TaskStatus.running, TaskStatus.waiting_for_approval)


_last_id = [0, 0]  # (milliseconds, counter) of the last id made by this process
_id_lock = threading.Lock()


def new_id(prefix: str) -> str:
    """A time-sortable id: milliseconds, a per-process counter (ids made in one millisecond still sort in
    creation order), then random bits so that ids from different processes never collide."""
    with _id_lock:
        ms = int(time.time() * 1000)
        if ms <= _last_id[0]:
            _last_id[1] += 1
        else:
            _last_id[:] = [ms, 0]
        ms, counter = _last_id
    return f"{prefix}_{ms:012x}{counter:04x}{os.urandom(6).hex()}"


@dataclass(kw_only=True, slots=True)
class NewTask:
    tenant: str
    workflow: str
    input: dict[str, Any]
    webhook_url: str | None = None
    webhook_secret: str | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    estimated_duration_s: float | None = None
    policy: dict[str, Any] = field(default_factory=dict)
    """What the task may do: ``tools`` (allowlist, None = all), ``scopes`` (of the submitting key) and
    ``approval`` (``auto``: writes need approval once untrusted content was read; ``always``)."""
    cache_key: str | None = None
    """The request's fingerprint for the result cache (None: not cacheable)."""


@dataclass(kw_only=True, slots=True)
class Task:
    id: str
    tenant: str
    workflow: str
    input: dict[str, Any]
    status: TaskStatus
    progress: float
    current_step: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    cancel_requested: bool
    envelope: dict[str, Any] | None
    webhook_url: str | None
    webhook_secret: str | None
    budget: dict[str, Any]
    metadata: dict[str, Any]
    estimated_duration_s: float | None
    dead_lettered: bool = False
    policy: dict[str, Any] = field(default_factory=dict)
    cache_key: str | None = None

    def check_deletable(self) -> None:
        """Only a task that has ended may be deleted: a queued, running or parked one still has a worker, a lease or
        a person's decision pointing at it. Cancel it, and delete it once it has ended."""
        if not self.status.terminal:
            raise TaskNotFinished(f"task {self.id} is {self.status.value}: cancel it, and delete it once it has ended")

    def request_cancel(self) -> bool:
        """Ask the task to stop. A terminal task is final, so it is left as it is; a queued, running or parked
        one is flagged (its worker sees the flag at its next heartbeat). Returns whether the flag changed, which
        is all a store has to write."""
        if self.status.terminal or self.cancel_requested:
            return False
        self.cancel_requested = True
        return True


def park_status(open_decisions: int) -> TaskStatus:
    """Where a task that asked a person goes: it waits for the answers; when every one was already given (a
    person answered while its run was stopping), it is queued again at once."""
    return TaskStatus.waiting_for_approval if open_decisions else TaskStatus.queued


def tenants(task: Task | None, tenant: str | None) -> Task | None:
    """``task`` when ``tenant`` may see it (None: any tenant may); another tenant's task does not exist for it."""
    return task if task is not None and (tenant is None or task.tenant == tenant) else None


class CreateOutcome(StrEnum):
    created = "created"
    replayed = "replayed"
    key_reused = "key_reused"


@dataclass(kw_only=True, slots=True, frozen=True)
class StoredClaim:
    """An idempotency key as a store keeps it: the request it was first used for, and that request's task."""

    request_hash: str
    task_id: str
    expires_at: float


@dataclass(kw_only=True, slots=True)
class IdempotencyClaim:
    key: str
    request_hash: str
    expires_at: float

    def outcome(self, stored: StoredClaim | None, now: float) -> CreateOutcome:
        """What a create under this claim does, given the key's stored row (IETF Idempotency-Key draft):

        * no row, or an expired one: ``created``, and the key is claimed (again) for the new task;
        * the same request: ``replayed``, the stored task is the answer;
        * another request under a live key: ``key_reused``, refused.
        """
        if stored is None or stored.expires_at <= now:
            return CreateOutcome.created
        if hmac.compare_digest(stored.request_hash, self.request_hash):
            return CreateOutcome.replayed
        return CreateOutcome.key_reused


@dataclass(kw_only=True, slots=True)
class CreateResult:
    outcome: CreateOutcome
    task: Task | None


@dataclass(kw_only=True, slots=True, frozen=True)
class Lease:
    """A worker's claim on a running task. ``token`` fences every write made under it."""

    task_id: str
    owner: str
    token: int
    attempt: int


@dataclass(kw_only=True, slots=True)
class LeaseState:
    held: bool
    cancel_requested: bool


@dataclass(kw_only=True, slots=True)
class Event:
    task_id: str
    seq: int
    type: str
    data: dict[str, Any]
    created_at: float


class StepStatus(StrEnum):
    completed = "completed"
    failed = "failed"


@dataclass(kw_only=True, slots=True, frozen=True)
class BlobRef:
    """A payload stored out of line (content-addressed), fetched only when a replay needs it."""

    id: str
    size: int


@dataclass(kw_only=True, slots=True)
class StepCheckpoint:
    """One durable step's outcome, as the workflow store keeps it.

    Only a finished attempt is ever written, in one transaction with its events and fenced by the run's lease:
    a failed or crashed attempt leaves nothing a retry could read, and a zombie run from an older attempt cannot
    overwrite a newer one.
    """

    key: str
    seq: int
    fn: str
    kind: str = "step"
    status: StepStatus = StepStatus.completed
    run_attempt: int = 1
    tries: int = 1
    result: Any = None
    error: dict[str, Any] | None = None
    usage: dict[str, float] = field(default_factory=dict)
    duration_ms: float = 0.0
    finished_at: float = 0.0


@dataclass(kw_only=True, slots=True)
class ModelCallRecord:
    """One model call as keel accounts for it: what was asked of whom, what answered, what it cost and how it
    went. Kept in the envelope and summed into rolling per-model counters (for statistical SLAs)."""

    provider: str
    requested_model: str
    model_id: str
    adapter_version: str = ""
    at: float = 0.0
    latency_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    finish_reason: str = ""
    json_valid: bool | None = None
    """For a structured call: did the text parse as JSON (None for plain text)."""
    schema_valid: bool | None = None
    refusal: bool = False
    truncated: bool = False
    error: bool = False
    """The call itself failed (HTTP error, cut stream, timeout): no usable response at all."""
    error_class: str = ""
    """For a failed call, one of :data:`ERROR_CLASSES`: what the per-class error rates count."""
    outcome: str = "ok"
    settings: dict[str, Any] = field(default_factory=dict)
    usage_counted: bool = False
    repair: bool = False
    """A re-ask after an unusable answer (not the first try of its step)."""
    cancelled: bool = False
    """The call was abandoned before it ended (the task was cancelled, or its step timed out)."""
    fallback: bool = False
    """Made by a fallback chain after an earlier model of the chain failed or was skipped."""

    def as_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "provider": self.provider,
            "requested_model": self.requested_model,
            "model_id": self.model_id,
            "adapter_version": self.adapter_version,
            "settings": self.settings,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "usage": "counted" if self.usage_counted else "provider",
            "cost_usd": round(self.cost_usd, 10),
            "latency_ms": self.latency_ms,
            "finish_reason": self.finish_reason,
            "outcome": self.outcome,
        }
        # Only where they say something, so the common call's entry stays as it was.
        out.update({k: True for k in ("error", "repair", "cancelled", "fallback") if getattr(self, k)})
        if self.error_class:
            out["error_class"] = self.error_class
        return out

    def window_counts(self) -> tuple[int, ...]:
        """What this call adds to its model's windowed counters, in :data:`WINDOW_COUNTERS` order: the one rule the
        backends (and the in-memory twin) sum. A cancelled call counts as a call and as cancelled, nothing else:
        it says nothing about the model."""
        settled = not self.cancelled
        structured = settled and self.json_valid is not None
        return (
            1,
            int(settled and self.error),
            int(settled and self.error_class == "429"),
            int(settled and self.error_class == "5xx"),
            int(settled and self.error_class == "timeout"),
            int(settled and self.error_class == "cut"),
            int(structured),
            int(structured and bool(self.json_valid)),
            int(structured and bool(self.schema_valid)),
            int(settled and self.refusal),
            int(settled and self.truncated),
            int(self.repair),
            int(self.cancelled),
            int(self.fallback),
        )

    def latency_bin(self) -> int:
        """The latency histogram bin this call falls in; -1 for a call with no answer to time (failed,
        cancelled), which latency percentiles leave out."""
        return -1 if self.error or self.cancelled else latency_bin(self.latency_ms)


ERROR_CLASSES = ("429", "5xx", "timeout", "cut", "other")
"""How a failed model call is classed: rate-limited, a server error, a timeout, a cut stream, anything else."""

WINDOW_COUNTERS = (
    "calls",
    "errors",
    "errors_429",
    "errors_5xx",
    "errors_timeout",
    "errors_cut",
    "structured",
    "json_valid",
    "schema_valid",
    "refusals",
    "truncations",
    "repairs",
    "cancelled",
    "fallbacks",
)
"""The per-minute counters of a model's rolling window (the columns of the ``model_minutes`` tables)."""

WINDOW_RETENTION_S = 7 * 86400
"""How long per-minute rows are kept: the longest ``KEEL_SLO_WINDOW_H`` allowed. The hour buckets of
``/v1/models/stats`` are kept apart, for longer."""

_BINS_PER_DOUBLING = 8


def latency_bin(ms: float) -> int:
    """A log-scale histogram bin: 8 per doubling, so a percentile read from the bins is within ~4.5% of the true
    one, and a model's latencies over a day take a few dozen rows however many calls it made."""
    return max(0, math.ceil(math.log2(max(ms, 1.0)) * _BINS_PER_DOUBLING))


def bin_latency(b: int) -> float:
    """The latency a bin stands for: the geometric middle of its edges (its upper edge for bin 0, <= 1 ms)."""
    return 1.0 if b <= 0 else 2 ** ((b - 0.5) / _BINS_PER_DOUBLING)


@dataclass(kw_only=True, slots=True)
class ModelWindow:
    """One pinned model's counters over a rolling window, summed from its per-minute rows: the raw material of
    ``GET /v1/slo``."""

    provider: str
    model_id: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WINDOW_COUNTERS, 0))
    """By :data:`WINDOW_COUNTERS` name."""
    latency_bins: dict[int, int] = field(default_factory=dict)
    """Answered calls per latency bin (:func:`latency_bin`)."""

    def add(self, counts: Sequence[int], bin: int) -> None:
        """Add one row's sums (``counts`` in :data:`WINDOW_COUNTERS` order) whose calls fell in ``bin``."""
        for name, n in zip(WINDOW_COUNTERS, counts, strict=True):
            self.counts[name] += int(n)
        if bin >= 0:
            self.latency_bins[bin] = self.latency_bins.get(bin, 0) + int(counts[0])

    def latency_ms(self, q: float) -> float | None:
        """The ``q``-quantile of the answered calls' latency (nearest rank over the bins); None without any."""
        total = sum(self.latency_bins.values())
        if not total:
            return None
        rank, seen = max(1, math.ceil(q * total)), 0
        for b in sorted(self.latency_bins):
            seen += self.latency_bins[b]
            if seen >= rank:
                return bin_latency(b)
        raise AssertionError("unreachable: the ranks add up to the total")

    @staticmethod
    def fold(rows: Iterable[Sequence[Any]]) -> list[ModelWindow]:
        """Windows from rows of ``(provider, model_id, latency bin, *counts)``, sorted by provider and model."""
        out: dict[tuple[str, str], ModelWindow] = {}
        for provider, model_id, bin, *counts in rows:
            key = (str(provider), str(model_id))
            window = out.get(key) or out.setdefault(key, ModelWindow(provider=key[0], model_id=key[1]))
            window.add(counts, int(bin))
        return [out[k] for k in sorted(out)]


def minute_bucket(at: float) -> int:
    """Start of ``at``'s minute, epoch seconds."""
    return int(at // 60 * 60)


def window_horizon(at: float) -> int:
    """The first minute still kept once a call made at ``at`` is written: older per-minute rows go."""
    return minute_bucket(at - WINDOW_RETENTION_S)


@dataclass(kw_only=True, slots=True)
class ModelStats:
    """Rolling counters of one pinned model (a provider and a model id: two providers serving the same id are two
    rows) over one hour bucket."""

    model_id: str
    provider: str
    bucket: int
    """Start of the hour, epoch seconds."""
    calls: int = 0
    errors: int = 0
    structured: int = 0
    json_valid: int = 0
    schema_valid: int = 0
    refusals: int = 0
    truncations: int = 0
    latency_ms_sum: float = 0.0
    latency_ms_max: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


@dataclass(kw_only=True, slots=True)
class TenantUsage:
    tenant: str
    since: float
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


@dataclass(kw_only=True, slots=True)
class OutboxMessage:
    id: str
    tenant: str
    task_id: str
    url: str
    secret: str
    event_type: str
    payload: dict[str, Any]
    attempts: int
    status: str
    last_error: str | None = None


@dataclass(kw_only=True, slots=True)
class ApiKey:
    """A verified key: who asks (``tenant``) and what it may do."""

    id: str
    tenant: str
    scopes: frozenset[str]
    expires_at: float | None = None
    """When the key stops working (None: never). A cache of verified keys must not keep one past this time, and
    must not outlive a revocation either (see :meth:`KeyStore.verify_key <keel.memory.stores.KeyStore>`)."""


LAST_USED_EVERY_S = 60.0
"""A key's ``last_used_at`` is written at most this often: a verification writes only when the stored time is
older (a conditional update, so even several replicas write about once a minute per key, never once a request)."""


class KeyState(StrEnum):
    active = "active"
    revoked = "revoked"
    expired = "expired"


@dataclass(kw_only=True, slots=True)
class KeyRecord:
    """An API key as a store keeps it: its id, owner, scopes and lifetime, and the hash of its secret (never the
    secret). The rules of a key's life (may it be used, is its use worth recording, how is it retired) are here;
    a store only loads the row and compares-and-sets."""

    id: str
    tenant: str
    scopes: frozenset[str]
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    """Accurate to :data:`LAST_USED_EVERY_S`."""
    secret_hash: str = field(default="", repr=False)

    def state(self, now: float) -> KeyState:
        if self.revoked_at is not None:
            return KeyState.revoked
        return KeyState.active if alive(self.expires_at, now) else KeyState.expired

    def accepts(self, presented: KeySecret, now: float) -> bool:
        """Whether ``presented`` is this key, and it may be used at ``now``: not revoked, not expired."""
        return self.state(now) is KeyState.active and presented.matches(self.secret_hash)

    def use_due(self, now: float) -> bool:
        """Whether a use at ``now`` is worth writing down (see :data:`LAST_USED_EVERY_S`)."""
        return self.last_used_at is None or now - self.last_used_at >= LAST_USED_EVERY_S

    def api_key(self) -> ApiKey:
        return ApiKey(id=self.id, tenant=self.tenant, scopes=self.scopes, expires_at=self.expires_at)

    def revoked(self, now: float) -> KeyRecord:
        """Revoked at ``now``; revoking again keeps the first time (so revoking is repeatable)."""
        return self if self.revoked_at is not None else dataclasses.replace(self, revoked_at=now)

    def retired(self, now: float, grace_s: float) -> KeyRecord:
        """This key once a successor replaces it: revoked at once, or (``grace_s`` > 0) expiring ``grace_s`` from
        now, so clients can switch over (never later than it would have expired anyway). A key that no longer
        works cannot be rotated: its holder is not who should get a new one."""
        if self.state(now) is not KeyState.active:
            raise InputError(f"key {self.id} is {self.state(now).value}: create a new key instead")
        if grace_s <= 0:
            return self.revoked(now)
        until = now + grace_s if self.expires_at is None else min(self.expires_at, now + grace_s)
        return dataclasses.replace(self, expires_at=until)

    def successor(self, minted: KeySecret, now: float) -> KeyRecord:
        """A new key with this one's tenant, scopes and expiry."""
        return KeyRecord(
            id=minted.id,
            tenant=self.tenant,
            scopes=self.scopes,
            created_at=now,
            expires_at=self.expires_at,
            secret_hash=minted.hash,
        )

    def public(self, now: float) -> dict[str, Any]:
        """What listing a key shows: everything but its hash."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "scopes": sorted(self.scopes),
            "state": self.state(now).value,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "last_used_at": self.last_used_at,
        }


def hour_bucket(at: float) -> int:
    return int(at // 3600 * 3600)


def day_bucket(at: float) -> int:
    """Start of ``at``'s UTC day, epoch seconds."""
    return int(at // 86400 * 86400)


def hash_secret(secret: str) -> str:
    # API keys carry 256 bits of entropy, so a fast hash is safe; no password-hashing work factor is needed.
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(kw_only=True, slots=True, frozen=True)
class KeySecret:
    """A bearer key, ``keel_<id>_<secret>``, taken apart. A store keeps the id and the secret's hash, never the
    secret; it finds a presented key by its id and checks the secret against that hash."""

    id: str
    secret: str

    @classmethod
    def mint(cls) -> KeySecret:
        return cls(id=secrets.token_hex(6), secret=secrets.token_urlsafe(32))

    @classmethod
    def parse(cls, key: str) -> KeySecret | None:
        """None for anything not shaped like a keel key."""
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != "keel":
            return None
        return cls(id=parts[1], secret=parts[2])

    @property
    def plaintext(self) -> str:
        return f"keel_{self.id}_{self.secret}"

    @property
    def hash(self) -> str:
        return hash_secret(self.secret)

    def matches(self, stored_hash: str) -> bool:
        return hmac.compare_digest(stored_hash, self.hash)

    def record(self, tenant: str, scopes: frozenset[str], now: float, expires_at: float | None) -> KeyRecord:
        """The row a store keeps for this new key."""
        return KeyRecord(
            id=self.id, tenant=tenant, scopes=scopes, created_at=now, expires_at=expires_at, secret_hash=self.hash
        )


def leases_without_progress(attempts: int, last_step_run: int | None) -> int:
    """How many of a task's leases in a row ended without recording a step: the crash count that dead-letters it.

    ``attempts`` counts every lease (it numbers the runs, and each checkpoint records the run that made it), so it
    is no measure of poison on its own: a long task whose worker is killed from outside five times, making progress
    each time, is healthy. What marks a poison task is that it crashes its worker again and again *at the same
    place*: its newest checkpoint (``last_step_run``, the highest run any step was recorded in; None when none was)
    stops moving while the leases go on. A backend loads that number when ``attempts`` alone already reaches the
    limit (the streak is never longer than the leases) and dead-letters the task when this reaches it too."""
    return attempts - (last_step_run or 0)


def dead_letter_envelope(attempts: int) -> dict[str, Any]:
    """The envelope of a task dead-lettered after ``attempts`` leases in a row that recorded no step."""
    return {
        "status": "failed",
        "result": None,
        "errors": [
            {
                "type": "dead_letter",
                "message": f"the task crashed its worker {attempts} times in a row without recording a step and was "
                "moved to the dead-letter list",
                "severity": "error",
                "recovery_suggested": False,
                "step": None,
            }
        ],
        "metadata": {
            "steps": [],
            "tools_called": [],
            "duration_ms": 0,
            "model_ids": [],
            "tokens": {},
            "cost_usd": 0,
        },
    }


def webhook_payload(task_id: str, status: TaskStatus, envelope: dict[str, Any], now: float) -> dict[str, Any]:
    """The body of a task's webhook (Standard Webhooks shape: type, timestamp, data): sent when it ends, and
    when it parks to wait for approval (``task.waiting_for_approval``, with the provisional envelope)."""
    return {
        "type": f"task.{status.value}",
        "timestamp": now,
        "data": {"task_id": task_id, "status": status.value, "envelope": envelope},
    }


# -- tool effects and decisions --------------------------------------------------------------------------------


class EffectStatus(StrEnum):
    pending = "pending"
    """Recorded before the call: if this is all a restart finds, the call may or may not have happened."""
    applied = "applied"
    failed = "failed"
    """The tool said no, or its arguments were refused: nothing happened."""
    outcome_unknown = "outcome_unknown"
    """The call was interrupted (crash, timeout, lost connection): ``reconcile`` or a person settles it."""


@dataclass(kw_only=True, slots=True)
class EffectRecord:
    """One write-tool call in the effect ledger, keyed by its idempotency key."""

    key: str
    task_id: str
    step: str
    tool: str
    args: dict[str, Any]
    status: EffectStatus = EffectStatus.pending
    result: Any = None
    error: dict[str, Any] | None = None
    executions: int = 0
    """How many times keel started the tool's body for this key (1 unless a person asked for a retry)."""
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(kw_only=True, slots=True, frozen=True)
class EffectSettlement:
    """A ledger row's new state, written with a step's checkpoint (one commit for both)."""

    key: str
    status: EffectStatus
    result: Any = None
    error: dict[str, Any] | None = None
    executions: int | None = None


EXPIRED_NOTE = "expired: nobody decided in time, so the call was not run"


class DecisionKind(StrEnum):
    approval = "approval"
    outcome_unknown = "outcome_unknown"


class Verdict(StrEnum):
    approve = "approve"
    """An approval: run the call. An unknown outcome: run it again with the same idempotency key."""
    deny = "deny"
    """Do not run it; the call fails as ``approval_denied`` (for an unknown outcome: treated as not applied)."""
    applied = "applied"
    """Only for an unknown outcome: it did happen; go on (with ``result`` as the call's result)."""


@dataclass(kw_only=True, slots=True)
class Decision:
    """A question a paused task puts to a person, and (once decided) the answer."""

    task_id: str
    call_id: str
    kind: DecisionKind
    tool: str
    args: dict[str, Any]
    step: str
    reason: str
    effect_key: str | None = None
    verdict: Verdict | None = None
    result: Any = None
    note: str | None = None
    decided_by: str | None = None
    requested_at: float = 0.0
    decided_at: float | None = None

    def check(self, verdict: Verdict) -> None:
        """Refuse a verdict that does not fit this kind of question."""
        if verdict is Verdict.applied and self.kind is not DecisionKind.outcome_unknown:
            raise InputError("'applied' only settles a call whose outcome is unknown; approve or deny an approval")

    def expire(self, now: float) -> Decision:
        """Nobody answered in time: the safe answer to "may this write run?" is no."""
        return dataclasses.replace(self, verdict=Verdict.deny, note=EXPIRED_NOTE, decided_by="keel", decided_at=now)

    def public(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "kind": self.kind.value,
            "tool": self.tool,
            "args": self.args,
            "step": self.step,
            "reason": self.reason,
            "effect_key": self.effect_key,
            "verdict": self.verdict.value if self.verdict else None,
            "note": self.note,
            "decided_by": self.decided_by,
            "requested_at": self.requested_at,
            "decided_at": self.decided_at,
        }


def decide(
    task_id: str, tenant: str, task: Task | None, current: Decision | None, answer: Decision, now: float
) -> tuple[Decision, bool]:
    """The rule for answering a paused task's question, given what a store loaded: the task and the stored
    question (``answer`` carries the verdict, note, result and author). Returns the decision as it then stands and
    whether the store must write it (False: the same verdict again, which changes nothing, so deciding is
    repeatable). Raises NotFound for another tenant's or an unknown task or call, and InputError for a verdict
    that does not fit the question, another verdict on a decided call, or any verdict on a task that has ended."""
    task = tenants(task, tenant)
    if task is None:
        raise NotFound(f"no task {task_id}")
    if current is None:
        raise NotFound(f"task {task_id} has no call {answer.call_id} awaiting a decision")
    assert answer.verdict is not None
    current.check(answer.verdict)
    if current.verdict is not None:
        if current.verdict is answer.verdict:
            return current, False
        raise InputError(
            f"call {answer.call_id} was already decided ({current.verdict.value})",
            detail={"decision": current.public()},
        )
    if task.status.terminal:
        raise InputError(f"task {task_id} is already {task.status.value}")
    decided = dataclasses.replace(
        current,
        verdict=answer.verdict,
        result=answer.result,
        note=answer.note,
        decided_by=answer.decided_by,
        decided_at=now,
    )
    return decided, True


@dataclass(kw_only=True, slots=True)
class EmailMessage:
    """One message in the email outbox; ``key`` is the sending call's idempotency key (one row per key)."""

    key: str
    tenant: str
    task_id: str | None
    to: list[str]
    subject: str
    body: str
    status: str = "queued"  # queued | sent | failed
    attempts: int = 0
    next_at: float = 0.0
    created_at: float = 0.0
    sent_at: float | None = None
    error: str | None = None

    @property
    def message_id(self) -> str:
        """Derived from the idempotency key (128 bits of it: the header stays on one line)."""
        return f"<{self.key[:32]}@keel>"


# -- memory: sessions, documents, chunks --------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class SessionTurn:
    """One turn of a conversation kept in session memory."""

    role: str
    """``user``, ``assistant``, ``system`` or ``tool``."""
    content: str
    at: float = 0.0
    seq: int = 0
    """Position in the session, from 1; given by the store."""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class Session:
    """Short-term memory: a conversation's turns and context, gone once ``expires_at`` passes."""

    id: str
    tenant: str
    created_at: float
    updated_at: float
    expires_at: float
    """Each write pushes it to ``now + ttl`` (a sliding TTL); a read at or after it finds nothing."""
    context: dict[str, Any] = field(default_factory=dict)
    turns: list[SessionTurn] = field(default_factory=list)


class DocumentStatus(StrEnum):
    ingesting = "ingesting"
    """Accepted, not finished (a crash mid-ingestion leaves this; ingesting the same bytes again resumes)."""
    ingested = "ingested"
    skipped = "skipped"
    """Rejected for a reason of its own (encrypted, corrupt, a bomb, unreachable); ``errors`` or ``warnings`` say
    which. The other documents of a batch go on."""
    failed = "failed"
    """keel could not finish it (the embedder or the store failed); ingesting it again retries."""


@dataclass(kw_only=True, slots=True)
class DocumentRecord:
    """A document in vector memory. ``id`` is derived from the tenant and the content hash, so ingesting the same
    bytes twice gives the same document (idempotent)."""

    id: str
    tenant: str
    sha256: str
    """Of the bytes as received."""
    source: str
    """``upload:<filename>`` or the URL it was fetched from."""
    media_type: str = ""
    size: int = 0
    status: DocumentStatus = DocumentStatus.ingesting
    pages: int = 0
    chunks: int = 0
    space: str | None = None
    """The embedding space (model@version) its chunks were embedded in."""
    warnings: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    expires_at: float | None = None
    """None: kept until deleted. Its chunks expire with it."""

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status.value,
            "pages": self.pages,
            "chunks": self.chunks,
            "source": self.source,
            "media_type": self.media_type,
            "size": self.size,
            "sha256": self.sha256,
            "space": self.space,
            "warnings": self.warnings,
            "errors": self.errors,
            "metadata": self.metadata,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }


def alive(expires_at: float | None, now: float) -> bool:
    """The one expiry rule of memory: a row lives until its ``expires_at`` (None: until deleted). Reads apply it
    whether or not the sweeper has run yet; the sweeper only reclaims the space."""
    return expires_at is None or expires_at > now


def live(doc: DocumentRecord, now: float | None) -> DocumentRecord | None:
    """``doc``, or None when it has expired at ``now`` (None: expiry not asked about)."""
    return doc if now is None or alive(doc.expires_at, now) else None


def document_id(tenant: str, sha256: str) -> str:
    return "doc_" + hashlib.sha256(f"{tenant}\x00{sha256}".encode()).hexdigest()[:24]


@dataclass(kw_only=True, slots=True)
class ChunkRecord:
    """One embedded piece of a document page. ``start``/``end`` are character offsets into the page's text."""

    document_id: str
    tenant: str
    page: int
    start: int
    end: int
    text: str
    content_hash: str
    space: str
    """``model@version`` of the embedding: a query is only ever compared with chunks of its own space."""
    vector: Any = None
    """float32 array of the space's dimension, L2-normalised (None when read back without vectors)."""
    id: int = 0
    """Given by the store."""
    created_at: float = 0.0
    expires_at: float | None = None


@dataclass(kw_only=True, slots=True)
class ChunkHit:
    chunk: ChunkRecord
    score: float
    """Cosine similarity to the query, in [-1, 1]."""
