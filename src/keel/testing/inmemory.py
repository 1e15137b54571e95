"""An in-memory twin of the SQLite store, for unit tests only: same semantics, no durability."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from keel.errors import LeaseLost, StoreError
from keel.memory.blobs import pack, unpack_blob
from keel.memory.limits import Bucket, RateDecision, TenantLimits, take_token
from keel.memory.stores import EventSpec
from keel.memory.types import (
    WINDOW_COUNTERS,
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
    StoredClaim,
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
    webhook_payload,
    window_horizon,
)
from keel.testing.inmemory_memory import InMemoryMemory


@dataclass
class _Row:
    task: Task
    token: int = 0
    lease_expires_at: float | None = None
    events: list[Event] = field(default_factory=list)


class InMemoryStore(InMemoryMemory):
    def __init__(self) -> None:
        self._memory_init()
        self._tasks: dict[str, _Row] = {}
        self._keys: dict[tuple[str, str], StoredClaim] = {}
        self._steps: dict[str, dict[str, StepCheckpoint]] = {}
        self._state: dict[str, dict[str, Any]] = {}
        self._blobs: dict[str, bytes] = {}
        self._model_stats: dict[tuple[str, int, str], ModelStats] = {}
        self._model_minutes: dict[tuple[str, str, int, int], list[int]] = {}
        self._tenant_usage: dict[tuple[str, int], list[float]] = {}
        self._outbox: dict[str, OutboxMessage] = {}
        self._next_at: dict[str, float] = {}
        self._disabled: set[tuple[str, str]] = set()
        self._api_keys: dict[str, KeyRecord] = {}
        self._effects: dict[str, EffectRecord] = {}
        self._decisions: dict[tuple[str, str], Decision] = {}
        self._emails: dict[str, EmailMessage] = {}
        self._limits: dict[str, TenantLimits] = {}
        self._buckets: dict[str, Bucket] = {}

    async def aclose(self) -> None:
        return None

    def _task(self, task_id: str) -> Task | None:
        row = self._tasks.get(task_id)
        return None if row is None else row.task

    def _all_tasks(self) -> list[Task]:
        return [row.task for row in self._tasks.values()]

    def _fence(self, lease: Lease) -> _Row:
        row = self._tasks.get(lease.task_id)
        if row is None or row.token != lease.token or row.task.status is not TaskStatus.running:
            raise LeaseLost(f"lease on task {lease.task_id} is no longer held (token {lease.token})")
        return row

    def _append(self, row: _Row, type: str, data: dict[str, Any], now: float) -> Event:
        ev = Event(task_id=row.task.id, seq=len(row.events) + 1, type=type, data=copy.deepcopy(data), created_at=now)
        row.events.append(ev)
        return ev

    async def create_task(self, new: NewTask, claim: IdempotencyClaim | None, now: float) -> CreateResult:
        if claim is not None:
            stored = self._keys.get((new.tenant, claim.key))
            outcome = claim.outcome(stored, now)
            if outcome is not CreateOutcome.created:
                assert stored is not None
                replayed = self._tasks[stored.task_id].task if outcome is CreateOutcome.replayed else None
                return CreateResult(outcome=outcome, task=copy.deepcopy(replayed))
        task = Task(
            id=new_id("tsk"),
            tenant=new.tenant,
            workflow=new.workflow,
            input=copy.deepcopy(new.input),
            status=TaskStatus.queued,
            progress=0.0,
            current_step=None,
            created_at=now,
            updated_at=now,
            started_at=None,
            finished_at=None,
            attempts=0,
            cancel_requested=False,
            envelope=None,
            webhook_url=new.webhook_url,
            webhook_secret=new.webhook_secret,
            budget=dict(new.budget),
            metadata=dict(new.metadata),
            estimated_duration_s=new.estimated_duration_s,
            policy=copy.deepcopy(new.policy),
            cache_key=new.cache_key,
        )
        row = _Row(task=task)
        self._tasks[task.id] = row
        self._append(row, "status", {"status": "queued"}, now)
        if claim is not None:
            self._keys[(new.tenant, claim.key)] = StoredClaim(
                request_hash=claim.request_hash, task_id=task.id, expires_at=claim.expires_at
            )
        return CreateResult(outcome=CreateOutcome.created, task=copy.deepcopy(task))

    async def get_task(self, task_id: str, tenant: str | None = None) -> Task | None:
        return copy.deepcopy(tenants(self._task(task_id), tenant))

    async def list_tasks(
        self, tenant: str, *, statuses: Sequence[TaskStatus] = (), limit: int = 50, before: str | None = None
    ) -> list[Task]:
        rows = sorted((r.task for r in self._tasks.values() if r.task.tenant == tenant), key=lambda t: t.id)
        rows = [t for t in reversed(rows) if (not statuses or t.status in statuses) and (not before or t.id < before)]
        return [copy.deepcopy(t) for t in rows[:limit]]

    async def queued_count(self) -> int:
        return sum(r.task.status is TaskStatus.queued for r in self._tasks.values())

    async def lease_next(self, owner: str, now: float, lease_s: float, max_attempts: int) -> Lease | None:
        for task_id in sorted(self._tasks):
            row = self._tasks[task_id]
            t = row.task
            runnable = t.status is TaskStatus.queued or (
                t.status is TaskStatus.running and (row.lease_expires_at or 0) < now
            )
            if not runnable:
                continue
            if t.attempts >= max_attempts:
                runs = [s.run_attempt for s in self._steps.get(task_id, {}).values()]
                streak = leases_without_progress(t.attempts, max(runs, default=None))
                if streak >= max_attempts:
                    t.dead_lettered = True
                    self._finish_in(row, TaskStatus.failed, dead_letter_envelope(streak), now)
                    continue
            row.token += 1
            t.attempts += 1
            t.status = TaskStatus.running
            t.updated_at = now
            t.started_at = t.started_at or now
            row.lease_expires_at = now + lease_s
            self._append(row, "status", {"status": "running", "attempt": t.attempts}, now)
            return Lease(task_id=task_id, owner=owner, token=row.token, attempt=t.attempts)
        return None

    async def renew_lease(self, lease: Lease, now: float, lease_s: float) -> LeaseState:
        row = self._tasks.get(lease.task_id)
        if row is None or row.token != lease.token or row.task.status is not TaskStatus.running:
            return LeaseState(held=False, cancel_requested=False)
        row.lease_expires_at = now + lease_s
        return LeaseState(held=True, cancel_requested=row.task.cancel_requested)

    async def release(self, lease: Lease) -> None:
        row = self._tasks.get(lease.task_id)
        if row is not None and row.token == lease.token and row.task.status is TaskStatus.running:
            row.task.status = TaskStatus.queued
            row.task.attempts = max(row.task.attempts - 1, 0)
            row.lease_expires_at = None

    async def requeue_running(self) -> int:
        n = 0
        for row in self._tasks.values():
            if row.task.status is TaskStatus.running:
                row.task.status = TaskStatus.queued
                row.lease_expires_at = None
                n += 1
        return n

    async def set_progress(self, lease: Lease, progress: float, current_step: str | None, now: float) -> None:
        row = self._fence(lease)
        row.task.progress, row.task.current_step, row.task.updated_at = progress, current_step, now

    def _webhook(self, t: Task, status: TaskStatus, envelope: dict[str, Any], now: float) -> None:
        if t.webhook_url and t.webhook_secret:
            msg = OutboxMessage(
                id=new_id("msg"),
                tenant=t.tenant,
                task_id=t.id,
                url=t.webhook_url,
                secret=t.webhook_secret,
                event_type=f"task.{status.value}",
                payload=webhook_payload(t.id, status, envelope, now),
                attempts=0,
                status="disabled" if (t.tenant, t.webhook_url) in self._disabled else "pending",
            )
            self._outbox[msg.id] = msg
            self._next_at[msg.id] = now

    def _finish_in(self, row: _Row, status: TaskStatus, envelope: dict[str, Any], now: float) -> Event | None:
        t = row.task
        if t.status.terminal:
            return None
        t.status, t.envelope, t.finished_at, t.updated_at = status, copy.deepcopy(envelope), now, now
        row.lease_expires_at = None
        if status is TaskStatus.succeeded:
            t.progress = 1.0
        event = self._append(row, "end", {"status": status.value, "envelope": envelope}, now)
        self._webhook(t, status, envelope, now)
        return event

    async def finish(
        self, lease: Lease | None, task_id: str, status: TaskStatus, envelope: dict[str, Any], now: float
    ) -> Event | None:
        row = self._fence(lease) if lease is not None else self._tasks.get(task_id)
        return None if row is None else self._finish_in(row, status, envelope, now)

    async def request_cancel(self, task_id: str, tenant: str) -> Task | None:
        task = tenants(self._task(task_id), tenant)
        if task is not None:
            task.request_cancel()
        return copy.deepcopy(task)

    async def delete_task(self, task_id: str, tenant: str) -> bool:
        task = tenants(self._task(task_id), tenant)
        if task is None:
            return False
        task.check_deletable()
        self._delete(task_id)
        return True

    def _delete(self, task_id: str) -> None:
        del self._tasks[task_id]
        self._steps.pop(task_id, None)
        self._state.pop(task_id, None)
        self._keys = {k: c for k, c in self._keys.items() if c.task_id != task_id}
        self._effects = {k: e for k, e in self._effects.items() if e.task_id != task_id}
        self._decisions = {k: d for k, d in self._decisions.items() if d.task_id != task_id}

    async def sweep_tasks(self, finished_before: float, limit: int) -> int:
        ended = sorted(
            (t for row in self._tasks.values() if (t := row.task).status.terminal and t.finished_at is not None),
            key=lambda t: t.finished_at or 0.0,
        )
        gone = [t.id for t in ended if (t.finished_at or 0.0) < finished_before][:limit]
        for task_id in gone:
            self._delete(task_id)
            self._outbox = {k: m for k, m in self._outbox.items() if m.task_id != task_id or m.status == "pending"}
            self._emails = {k: e for k, e in self._emails.items() if e.task_id != task_id or e.status == "queued"}
        return len(gone)

    def _put(self, value: Any) -> Any:
        packed = pack(value)
        if packed.blob_id is not None and packed.blob is not None:
            self._blobs[packed.blob_id] = packed.blob
            return BlobRef(id=packed.blob_id, size=packed.size)
        return json.loads(packed.inline or "null")  # a JSON round trip, exactly as the SQLite store does

    async def record_step(
        self,
        lease: Lease,
        step: StepCheckpoint,
        events: Sequence[EventSpec],
        now: float,
        *,
        effect: EffectSettlement | None = None,
    ) -> None:
        row = self._fence(lease)
        stored = replace(step, result=self._put(step.result), error=copy.deepcopy(step.error), usage=dict(step.usage))
        self._steps.setdefault(lease.task_id, {})[step.key] = stored
        if effect is not None:
            self._settle(effect, now)
        for ev in events:
            self._append(row, ev[0], ev[1], ev[2] if len(ev) == 3 else now)

    async def load_steps(self, task_id: str) -> list[StepCheckpoint]:
        steps = sorted(self._steps.get(task_id, {}).values(), key=lambda s: (s.seq, s.key))
        return [replace(s, result=copy.deepcopy(s.result)) for s in steps]

    async def load_blob(self, ref: BlobRef) -> Any:
        if ref.id not in self._blobs:
            raise StoreError(f"blob {ref.id} is missing")
        return unpack_blob(self._blobs[ref.id])

    async def set_state(
        self, lease: Lease, key: str, value: Any, event: tuple[str, dict[str, Any]] | None, now: float
    ) -> None:
        row = self._fence(lease)
        self._state.setdefault(lease.task_id, {})[key] = self._put(value)
        if event is not None:
            self._append(row, event[0], event[1], now)

    async def load_state(self, task_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self._state.get(task_id, {}).items():
            out[key] = await self.load_blob(value) if isinstance(value, BlobRef) else copy.deepcopy(value)
        return out

    async def sweep_idempotency(self, now: float) -> int:
        expired = [k for k, v in self._keys.items() if v.expires_at <= now]
        for k in expired:
            del self._keys[k]
        return len(expired)

    async def record_model_call(self, tenant: str, call: ModelCallRecord) -> None:
        key = (call.model_id, hour_bucket(call.at), call.provider)
        st = self._model_stats.setdefault(
            key, ModelStats(model_id=call.model_id, provider=call.provider, bucket=key[1])
        )
        minute = (call.provider, call.model_id, minute_bucket(call.at), call.latency_bin())
        sums = self._model_minutes.setdefault(minute, [0] * len(WINDOW_COUNTERS))
        sums[:] = [a + b for a, b in zip(sums, call.window_counts(), strict=True)]
        horizon = window_horizon(call.at)
        for stale in [k for k in self._model_minutes if k[2] < horizon]:
            del self._model_minutes[stale]
        st.calls += 1
        st.errors += int(call.error)
        st.structured += int(call.json_valid is not None)
        st.json_valid += int(bool(call.json_valid))
        st.schema_valid += int(bool(call.schema_valid))
        st.refusals += int(call.refusal)
        st.truncations += int(call.truncated)
        st.latency_ms_sum += call.latency_ms
        st.latency_ms_max = max(st.latency_ms_max, call.latency_ms)
        st.input_tokens += call.input_tokens
        st.output_tokens += call.output_tokens
        st.cost_usd += call.cost_usd
        day = self._tenant_usage.setdefault((tenant, day_bucket(call.at)), [0, 0, 0, 0.0])
        day[0] += 1
        day[1] += call.input_tokens
        day[2] += call.output_tokens
        day[3] += call.cost_usd

    async def model_stats(self, model_id: str | None = None, since: float = 0.0) -> list[ModelStats]:
        rows = [
            replace(st)
            for (mid, bucket, _), st in sorted(self._model_stats.items())
            if bucket >= hour_bucket(since) and (model_id is None or mid == model_id)
        ]
        return rows

    async def model_window(self, since: float) -> list[ModelWindow]:
        first = minute_bucket(since)
        return ModelWindow.fold(
            (provider, model_id, b, *sums)
            for (provider, model_id, minute, b), sums in self._model_minutes.items()
            if minute >= first
        )

    async def tenant_usage(self, tenant: str, since: float) -> TenantUsage:
        days = [v for (t, day), v in self._tenant_usage.items() if t == tenant and day >= day_bucket(since)]
        return TenantUsage(
            tenant=tenant,
            since=day_bucket(since),
            calls=int(sum(d[0] for d in days)),
            input_tokens=int(sum(d[1] for d in days)),
            output_tokens=int(sum(d[2] for d in days)),
            cost_usd=float(sum(d[3] for d in days)),
        )

    async def get_limits(self, tenant: str) -> TenantLimits | None:
        return self._limits.get(tenant)

    async def set_limits(self, tenant: str, limits: TenantLimits, now: float) -> None:
        if limits == TenantLimits():
            self._limits.pop(tenant, None)
        else:
            self._limits[tenant] = limits

    async def take_token(self, bucket: str, rate_per_s: float, size: int, now: float) -> RateDecision:
        # No await between the read and the write: atomic on the event loop.
        self._buckets[bucket], decision = take_token(self._buckets.get(bucket), rate_per_s, size, now)
        return decision

    async def active_tasks(self, tenant: str) -> int:
        active = (TaskStatus.queued, TaskStatus.running)
        return sum(1 for row in self._tasks.values() if row.task.tenant == tenant and row.task.status in active)

    async def append(self, lease: Lease, type: str, data: dict[str, Any], now: float) -> Event:
        return self._append(self._fence(lease), type, data, now)

    def append_nowait(self, lease: Lease, type: str, data: dict[str, Any], now: float) -> asyncio.Future[Event]:
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self._append(self._fence(lease), type, data, now))
        except LeaseLost as exc:
            future.set_exception(exc)
        return future

    async def read(self, task_id: str, after: int, limit: int = 500) -> list[Event]:
        row = self._tasks.get(task_id)
        return [] if row is None else copy.deepcopy(row.events[after : after + limit])

    async def due(self, now: float, limit: int, *, claim_s: float = 0.0) -> list[OutboxMessage]:
        due = [m for m in self._outbox.values() if m.status == "pending" and self._next_at[m.id] <= now]
        found = sorted(due, key=lambda m: self._next_at[m.id])[:limit]
        for m in found if claim_s else ():
            self._next_at[m.id] = now + claim_s
        return [replace(m) for m in found]

    async def delivered(self, msg_id: str, now: float) -> None:
        m = self._outbox[msg_id]
        m.status, m.attempts, m.last_error = "delivered", m.attempts + 1, None

    async def retry_at(self, msg_id: str, when: float, error: str) -> None:
        m = self._outbox[msg_id]
        m.attempts, m.last_error = m.attempts + 1, error
        self._next_at[msg_id] = when

    async def dead(self, msg_id: str, error: str) -> None:
        m = self._outbox[msg_id]
        m.status, m.attempts, m.last_error = "dead", m.attempts + 1, error

    async def disable_endpoint(self, tenant: str, url: str, now: float) -> None:
        self._disabled.add((tenant, url))
        for m in self._outbox.values():
            if m.tenant == tenant and m.url == url and m.status == "pending":
                m.status, m.last_error = "disabled", "endpoint disabled (410 Gone)"

    async def messages(self, task_id: str) -> list[OutboxMessage]:
        return [replace(m) for m in sorted(self._outbox.values(), key=lambda m: m.id) if m.task_id == task_id]

    async def create_key(
        self, tenant: str, scopes: frozenset[str], now: float, *, expires_at: float | None = None
    ) -> str:
        new = KeySecret.mint()
        self._api_keys[new.id] = new.record(tenant, scopes, now, expires_at)
        return new.plaintext

    def _key(self, key_id: str, tenant: str | None) -> KeyRecord | None:
        key = self._api_keys.get(key_id)
        return key if key is not None and tenant in (None, key.tenant) else None

    async def verify_key(self, key: str, now: float | None = None) -> ApiKey | None:
        presented = KeySecret.parse(key)
        record = self._api_keys.get(presented.id) if presented is not None else None
        at = time.time() if now is None else now
        if presented is None or record is None or not record.accepts(presented, at):
            return None
        if record.use_due(at):
            record.last_used_at = at
        return record.api_key()

    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        found = [k for k in self._api_keys.values() if tenant in (None, k.tenant)]
        return [replace(k) for k in sorted(found, key=lambda k: (k.created_at, k.id))]

    async def revoke_key(self, key_id: str, now: float, *, tenant: str | None = None) -> KeyRecord | None:
        key = self._key(key_id, tenant)
        if key is None:
            return None
        self._api_keys[key_id] = key.revoked(now)
        return replace(self._api_keys[key_id])

    async def rotate_key(
        self, key_id: str, now: float, *, grace_s: float = 0.0, tenant: str | None = None
    ) -> tuple[KeyRecord, str] | None:
        key = self._key(key_id, tenant)
        if key is None:
            return None
        minted = KeySecret.mint()
        old, new = key.retired(now, grace_s), key.successor(minted, now)
        self._api_keys[key_id], self._api_keys[new.id] = old, new
        return replace(new), minted.plaintext

    async def reseal_secrets(self, reseal: Callable[[str], str | None]) -> int:
        # All or nothing, as one transaction: every new value is worked out before any is stored.
        tasks = {
            i: new
            for i, r in self._tasks.items()
            if r.task.webhook_secret and (new := reseal(r.task.webhook_secret)) is not None
        }
        messages = {i: new for i, m in self._outbox.items() if m.secret and (new := reseal(m.secret)) is not None}
        for task_id, secret in tasks.items():
            self._tasks[task_id].task.webhook_secret = secret
        for msg_id, secret in messages.items():
            self._outbox[msg_id].secret = secret
        return len(tasks) + len(messages)

    # -- EffectLedger ------------------------------------------------------------------------------

    async def begin_effect(self, lease: Lease, effect: EffectRecord, now: float) -> tuple[EffectRecord, bool]:
        self._fence(lease)
        existing = self._effects.get(effect.key)
        if existing is not None:
            return copy.deepcopy(existing), False
        stored = replace(copy.deepcopy(effect), created_at=now, updated_at=now)
        self._effects[effect.key] = stored
        return copy.deepcopy(stored), True

    async def settle_effect(self, lease: Lease, settlement: EffectSettlement, now: float) -> None:
        self._fence(lease)
        self._settle(settlement, now)

    def _settle(self, s: EffectSettlement, now: float) -> None:
        rec = self._effects.get(s.key)
        if rec is None:
            return
        rec.status, rec.result, rec.error, rec.updated_at = (
            s.status,
            copy.deepcopy(s.result),
            copy.deepcopy(s.error),
            now,
        )
        if s.executions is not None:
            rec.executions = s.executions

    async def get_effect(self, key: str) -> EffectRecord | None:
        rec = self._effects.get(key)
        return copy.deepcopy(rec) if rec else None

    async def list_effects(self, task_id: str) -> list[EffectRecord]:
        found = [copy.deepcopy(e) for e in self._effects.values() if e.task_id == task_id]
        return sorted(found, key=lambda e: (e.created_at, e.key))

    # -- DecisionStore -----------------------------------------------------------------------------

    def _pending(self, task_id: str) -> int:
        return sum(1 for (t, _), d in self._decisions.items() if t == task_id and d.verdict is None)

    async def request_decisions(
        self, lease: Lease, decisions: Sequence[Decision], envelope: dict[str, Any], now: float
    ) -> None:
        row = self._fence(lease)
        for d in decisions:
            if (d.task_id, d.call_id) not in self._decisions:
                self._decisions[(d.task_id, d.call_id)] = replace(copy.deepcopy(d), requested_at=now)
                self._append(row, "decision_requested", {**d.public(), "requested_at": now}, now)
        pending = self._pending(lease.task_id)
        row.task.status = park_status(pending)
        row.task.envelope = copy.deepcopy(envelope) if pending else None
        row.task.attempts = max(row.task.attempts - 1, 0)
        row.task.updated_at = now
        row.lease_expires_at = None
        self._append(row, "status", {"status": row.task.status.value, "pending_decisions": pending}, now)
        if pending:
            self._webhook(row.task, row.task.status, envelope, now)  # tell whoever decides

    async def decide(self, task_id: str, tenant: str, decision: Decision, now: float) -> Decision:
        current = self._decisions.get((task_id, decision.call_id))
        decided, changed = decide(task_id, tenant, self._task(task_id), current, decision, now)
        if changed:
            self._decisions[(task_id, decision.call_id)] = decided
            self._recorded_verdict(decided, now)
        return copy.deepcopy(decided)

    def _recorded_verdict(self, d: Decision, now: float) -> bool:
        """Log ``d``'s verdict; queue the task once nothing it waits on is open (True if so)."""
        row = self._tasks[d.task_id]
        self._append(row, "decision_made", d.public(), now)
        if self._pending(d.task_id) or row.task.status is not TaskStatus.waiting_for_approval:
            return False
        row.task.status, row.task.envelope, row.task.updated_at = TaskStatus.queued, None, now
        self._append(row, "status", {"status": "queued"}, now)
        return True

    async def load_decisions(self, task_id: str) -> list[Decision]:
        found = [copy.deepcopy(d) for (t, _), d in self._decisions.items() if t == task_id]
        return sorted(found, key=lambda d: (d.requested_at, d.call_id))

    async def expire_decisions(self, requested_before: float, now: float) -> list[str]:
        queued = []
        for key, d in sorted(self._decisions.items()):
            if d.verdict is None and d.requested_at < requested_before:
                self._decisions[key] = d.expire(now)
                if self._recorded_verdict(self._decisions[key], now):
                    queued.append(d.task_id)
        return queued

    # -- EmailOutbox -------------------------------------------------------------------------------

    async def enqueue_email(self, message: EmailMessage, now: float) -> tuple[EmailMessage, bool]:
        existing = self._emails.get(message.key)
        if existing is not None:
            return copy.deepcopy(existing), False
        stored = replace(copy.deepcopy(message), status="queued", next_at=now, created_at=now)
        self._emails[message.key] = stored
        return copy.deepcopy(stored), True

    async def get_email(self, key: str) -> EmailMessage | None:
        msg = self._emails.get(key)
        return copy.deepcopy(msg) if msg else None

    async def due_emails(self, now: float, limit: int, *, claim_s: float = 0.0) -> list[EmailMessage]:
        due = [m for m in self._emails.values() if m.status == "queued" and m.next_at <= now]
        found = [copy.deepcopy(m) for m in sorted(due, key=lambda m: m.next_at)[:limit]]
        for m in found if claim_s else ():
            self._emails[m.key].next_at = now + claim_s
        return found

    async def email_sent(self, key: str, now: float) -> None:
        msg = self._emails[key]
        msg.status, msg.sent_at, msg.attempts, msg.error = "sent", now, msg.attempts + 1, None

    async def email_retry(self, key: str, when: float, error: str, *, give_up: bool = False) -> None:
        msg = self._emails[key]
        msg.status, msg.next_at, msg.attempts, msg.error = (
            "failed" if give_up else "queued",
            when,
            msg.attempts + 1,
            error[:2000],
        )
