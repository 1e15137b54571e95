"""The store conformance suite, one suite per seam (STYLE.md pattern 2). Every backend passes the suites of the
seams it serves: ``tests/backends/test_store_conformance.py`` runs them all over the in-memory twin, SQLite and Postgres
(each serves every seam), and ``tests/backends/test_redis.py`` runs the session suite over Redis.

Each check is a plain ``async def check_*(store)`` so any test runner can drive it; its parameter's type says which
seams it needs. Checks of the seams that commit together (tasks, events, outbox, workflow state, effects,
decisions) take one :class:`TaskBackend` serving them all, as every store does. A method added to a seam gets its
check in that seam's suite below, and every backend serving the seam runs it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from keel.errors import InputError, LeaseLost, NotFound, TaskNotFinished
from keel.memory.blobs import INLINE_LIMIT
from keel.memory.limits import TenantLimits, take_token
from keel.memory.stores import (
    DecisionStore,
    DocumentStore,
    EffectLedger,
    EmailOutbox,
    EventLog,
    KeyStore,
    LimitStore,
    ModelStatsStore,
    Outbox,
    RateBuckets,
    ResultCache,
    SecretStore,
    SessionStore,
    Store,
    TaskStore,
    VectorStore,
    WorkflowStore,
)
from keel.memory.types import (
    WINDOW_RETENTION_S,
    BlobRef,
    ChunkRecord,
    CreateOutcome,
    Decision,
    DecisionKind,
    DocumentRecord,
    DocumentStatus,
    EffectRecord,
    EffectSettlement,
    EffectStatus,
    EmailMessage,
    IdempotencyClaim,
    KeySecret,
    KeyState,
    ModelCallRecord,
    NewTask,
    SessionTurn,
    StepCheckpoint,
    StepStatus,
    TaskStatus,
    Verdict,
    bin_latency,
    latency_bin,
)

T0 = 1_000_000.0


class TaskBackend(TaskStore, EventLog, Outbox, WorkflowStore, EffectLedger, DecisionStore, Protocol):
    """The seams that commit together (a task's status, its events, its webhook message, its steps, effects and
    decisions): one backend serves them all."""


class VectorBackend(DocumentStore, VectorStore, Protocol):
    """Chunks belong to documents (deleting or expiring a document takes its chunks): one backend serves both."""


class CachedTasks(TaskStore, ResultCache, Protocol):
    """The result cache reads finished tasks."""


class SealedTasks(TaskBackend, SecretStore, Protocol):
    """Webhook secrets live in the task and outbox rows: one backend serves both."""


class LimitedTasks(TaskStore, LimitStore, Protocol):
    """The concurrency cap counts the tenant's tasks."""


def _new(tenant: str = "t1", **kw: object) -> NewTask:
    return NewTask(tenant=tenant, workflow="diagnostic", input={"steps": 1}, **kw)  # type: ignore[arg-type]


def _claim(key: str, h: str, ttl: float = 86_400) -> IdempotencyClaim:
    return IdempotencyClaim(key=key, request_hash=h, expires_at=T0 + ttl)


async def check_create_and_get(store: TaskBackend) -> None:
    res = await store.create_task(_new(), None, T0)
    assert res.outcome is CreateOutcome.created and res.task is not None
    task = await store.get_task(res.task.id, "t1")
    assert task is not None and task.status is TaskStatus.queued and task.input == {"steps": 1}
    assert await store.get_task(res.task.id, "other-tenant") is None
    events = await store.read(res.task.id, 0)
    assert [(e.seq, e.type, e.data) for e in events] == [(1, "status", {"status": "queued"})]


async def check_idempotency(store: TaskStore) -> None:
    first = await store.create_task(_new(), _claim("k", "h1"), T0)
    again = await store.create_task(_new(), _claim("k", "h1"), T0 + 1)
    assert again.outcome is CreateOutcome.replayed and again.task and first.task
    assert again.task.id == first.task.id
    other = await store.create_task(_new(), _claim("k", "h2"), T0 + 2)
    assert other.outcome is CreateOutcome.key_reused
    # Keys are scoped by tenant.
    elsewhere = await store.create_task(_new("t2"), _claim("k", "h2"), T0 + 3)
    assert elsewhere.outcome is CreateOutcome.created
    # An expired key may be reused, and the sweeper removes expired keys.
    late = await store.create_task(_new(), _claim("k", "h3"), T0 + 86_401)
    assert late.outcome is CreateOutcome.created
    assert await store.sweep_idempotency(T0 + 10 * 86_400) >= 1


async def check_concurrent_idempotent_creates(store: TaskStore) -> None:
    results = await asyncio.gather(*(store.create_task(_new(), _claim("same", "h"), T0) for _ in range(50)))
    ids = {r.task.id for r in results if r.task}
    assert len(ids) == 1
    assert sum(r.outcome is CreateOutcome.created for r in results) == 1
    assert len(await store.list_tasks("t1")) == 1


async def check_list_pagination_and_filter(store: TaskStore) -> None:
    ids = []
    for i in range(5):
        res = await store.create_task(_new(), None, T0 + i)
        assert res.task
        ids.append(res.task.id)
    page1 = await store.list_tasks("t1", limit=2)
    assert [t.id for t in page1] == ids[::-1][:2]
    page2 = await store.list_tasks("t1", limit=2, before=page1[-1].id)
    assert [t.id for t in page2] == ids[::-1][2:4]
    assert await store.list_tasks("t1", statuses=[TaskStatus.failed]) == []
    assert len(await store.list_tasks("t1", statuses=[TaskStatus.queued])) == 5
    assert await store.list_tasks("nobody") == []
    assert await store.queued_count() == 5
    assert await store.lease_next("w", T0 + 10, 10, 5) is not None
    assert await store.queued_count() == 4


async def check_lease_fencing(store: TaskBackend) -> None:
    res = await store.create_task(_new(), None, T0)
    assert res.task
    lease = await store.lease_next("w1", T0, 10, 5)
    assert lease is not None and lease.task_id == res.task.id and lease.attempt == 1
    assert await store.lease_next("w2", T0 + 1, 10, 5) is None  # held
    ev = await store.append(lease, "progress", {"p": 0.5}, T0 + 1)
    assert ev.seq == 3  # queued, running, progress
    # The lease expires; another worker takes over with a higher token; the old one is fenced out.
    lease2 = await store.lease_next("w2", T0 + 11, 10, 5)
    assert lease2 is not None and lease2.token > lease.token and lease2.attempt == 2
    for write in (
        store.append(lease, "progress", {}, T0 + 12),
        store.set_progress(lease, 0.9, "x", T0 + 12),
        store.record_step(lease, StepCheckpoint(key="s", seq=1, fn="f"), [], T0 + 12),
        store.set_state(lease, "partial", 1, None, T0 + 12),
        store.finish(lease, res.task.id, TaskStatus.succeeded, {"status": "success"}, T0 + 12),
    ):
        try:
            await write
        except LeaseLost:
            continue
        raise AssertionError("a write under an expired lease was committed")
    assert not (await store.renew_lease(lease, T0 + 12, 10)).held
    assert (await store.renew_lease(lease2, T0 + 12, 10)).held


async def check_finish_outbox_and_end_event(store: TaskBackend) -> None:
    res = await store.create_task(_new(webhook_url="https://h.example/x", webhook_secret="whsec_x"), None, T0)
    assert res.task
    lease = await store.lease_next("w", T0, 10, 5)
    assert lease
    end = await store.finish(lease, res.task.id, TaskStatus.succeeded, {"status": "success"}, T0 + 1)
    assert end is not None and end.type == "end"
    task = await store.get_task(res.task.id)
    assert task and task.status is TaskStatus.succeeded and task.progress == 1.0 and task.finished_at == T0 + 1
    again = await store.finish(None, res.task.id, TaskStatus.failed, {"status": "failed"}, T0 + 2)
    assert again is None  # terminal is final
    msgs = await store.messages(res.task.id)
    assert len(msgs) == 1 and msgs[0].event_type == "task.succeeded" and msgs[0].status == "pending"
    assert [m.id for m in await store.due(T0 + 1, 10)] == [msgs[0].id]
    await store.retry_at(msgs[0].id, T0 + 100, "HTTP 500")
    assert await store.due(T0 + 50, 10) == []
    await store.delivered(msgs[0].id, T0 + 101)
    (msg,) = await store.messages(res.task.id)
    assert msg.status == "delivered" and msg.attempts == 2


async def check_due_messages_are_claimed(store: TaskBackend) -> None:
    res = await store.create_task(_new(webhook_url="https://h.example/x", webhook_secret="whsec_x"), None, T0)
    assert res.task
    await store.finish(None, res.task.id, TaskStatus.succeeded, {"status": "success"}, T0)
    [msg] = await store.messages(res.task.id)
    assert [m.id for m in await store.due(T0 + 1, 10, claim_s=30)] == [msg.id]
    assert await store.due(T0 + 2, 10, claim_s=30) == []  # claimed: another dispatcher does not send it too
    assert [m.id for m in await store.due(T0 + 32, 10, claim_s=30)] == [msg.id]  # its claimant died: due again


async def check_due_emails_are_claimed(store: EmailOutbox) -> None:
    email = EmailMessage(key="c1", tenant="t1", task_id=None, to=["a@example.com"], subject="s", body="b")
    await store.enqueue_email(email, T0)
    assert [m.key for m in await store.due_emails(T0 + 1, 10, claim_s=60)] == ["c1"]
    assert await store.due_emails(T0 + 2, 10, claim_s=60) == []
    assert [m.key for m in await store.due_emails(T0 + 62, 10)] == ["c1"]


async def check_disabled_endpoint(store: TaskBackend) -> None:
    a = await store.create_task(_new(webhook_url="https://h.example/x", webhook_secret="s"), None, T0)
    assert a.task
    await store.finish(None, a.task.id, TaskStatus.cancelled, {"status": "failed"}, T0)
    await store.disable_endpoint("t1", "https://h.example/x", T0)
    assert [m.status for m in await store.messages(a.task.id)] == ["disabled"]
    b = await store.create_task(_new(webhook_url="https://h.example/x", webhook_secret="s"), None, T0)
    assert b.task
    await store.finish(None, b.task.id, TaskStatus.cancelled, {"status": "failed"}, T0)
    assert [m.status for m in await store.messages(b.task.id)] == ["disabled"]
    assert await store.due(T0 + 1, 10) == []


async def check_cancel_and_requeue(store: TaskStore) -> None:
    res = await store.create_task(_new(), None, T0)
    assert res.task
    lease = await store.lease_next("w", T0, 10, 5)
    assert lease
    cancelled = await store.request_cancel(res.task.id, "t1")
    assert cancelled and cancelled.cancel_requested
    assert (await store.renew_lease(lease, T0 + 1, 10)).cancel_requested
    assert await store.request_cancel(res.task.id, "t2") is None
    assert await store.requeue_running() == 1
    task = await store.get_task(res.task.id)
    assert task and task.status is TaskStatus.queued


async def check_poison_dead_letter(store: TaskStore) -> None:
    res = await store.create_task(_new(), None, T0)
    assert res.task
    now = T0
    for _ in range(3):
        assert await store.lease_next("w", now, 1, 3) is not None
        now += 2  # the worker "crashed": its lease expires
    assert await store.lease_next("w", now, 1, 3) is None
    task = await store.get_task(res.task.id)
    assert task and task.status is TaskStatus.failed and task.dead_lettered
    assert task.envelope and task.envelope["errors"][0]["type"] == "dead_letter"


async def check_progress_is_not_poison(store: TaskBackend) -> None:
    """A task whose worker is killed from outside on every lease, but which records a step each time, is never
    dead-lettered; once its checkpoints stop moving, the same number of crashes in a row dead-letters it."""
    res = await store.create_task(_new(), None, T0)
    assert res.task
    now = T0
    for seq in range(1, 8):  # seven crashes, well past the limit of 3, each after one new checkpoint
        lease = await store.lease_next("w", now, 1, 3)
        assert lease is not None and lease.task_id == res.task.id, f"dead-lettered while progressing (lease {seq})"
        step = StepCheckpoint(key=f"s{seq}", seq=seq, fn="f", run_attempt=lease.attempt)
        await store.record_step(lease, step, [], now)
        now += 2  # the worker "crashed": its lease expires
    for _ in range(3):  # now it crashes at the same place: no new checkpoint
        assert await store.lease_next("w", now, 1, 3) is not None
        now += 2
    assert await store.lease_next("w", now, 1, 3) is None
    task = await store.get_task(res.task.id)
    assert task and task.status is TaskStatus.failed and task.dead_lettered and task.attempts == 10
    assert task.envelope and "3 times in a row" in task.envelope["errors"][0]["message"]


async def check_api_keys(store: KeyStore) -> None:
    key = await store.create_key("acme", frozenset({"tasks:read"}), T0)
    found = await store.verify_key(key)
    assert found and found.tenant == "acme" and found.scopes == {"tasks:read"} and found.expires_at is None
    assert await store.verify_key(key + "x") is None
    assert await store.verify_key("keel_nope_nope") is None
    assert await store.verify_key("garbage") is None


def _key_id(plaintext: str) -> str:
    parsed = KeySecret.parse(plaintext)
    assert parsed is not None
    return parsed.id


async def check_key_expiry_and_last_use(store: KeyStore) -> None:
    key = await store.create_key("acme", frozenset({"tasks:read"}), T0, expires_at=T0 + 100)
    found = await store.verify_key(key, T0 + 10)
    assert found is not None and found.expires_at == T0 + 100
    assert await store.verify_key(key, T0 + 100) is None  # expired at its expires_at
    [listed] = [k for k in await store.list_keys("acme") if k.id == _key_id(key)]
    assert listed.last_used_at == T0 + 10 and listed.state(T0 + 100) is KeyState.expired
    # A use is recorded at most once a minute: a verification 30 s later writes nothing, one 61 s later does.
    await store.verify_key(key, T0 + 40)
    assert [k.last_used_at for k in await store.list_keys("acme") if k.id == listed.id] == [T0 + 10]
    await store.verify_key(key, T0 + 71)
    assert [k.last_used_at for k in await store.list_keys("acme") if k.id == listed.id] == [T0 + 71]


async def check_key_revoke_and_rotate(store: KeyStore) -> None:
    a = await store.create_key("acme", frozenset({"tasks:read", "tasks:write"}), T0, expires_at=T0 + 10_000)
    b = await store.create_key("other", frozenset({"tasks:read"}), T0 + 1)
    assert {k.id for k in await store.list_keys("acme")} >= {_key_id(a)}
    assert _key_id(b) not in {k.id for k in await store.list_keys("acme")}
    assert {_key_id(a), _key_id(b)} <= {k.id for k in await store.list_keys()}
    # Another tenant's key looks missing; revoking takes effect on the next verification, and is repeatable.
    assert await store.revoke_key(_key_id(b), T0 + 2, tenant="acme") is None
    assert await store.verify_key(b, T0 + 3) is not None
    revoked = await store.revoke_key(_key_id(b), T0 + 3)
    assert revoked is not None and revoked.revoked_at == T0 + 3 and revoked.state(T0 + 3) is KeyState.revoked
    assert await store.verify_key(b, T0 + 3) is None
    again = await store.revoke_key(_key_id(b), T0 + 9)
    assert again is not None and again.revoked_at == T0 + 3
    assert await store.revoke_key("nope", T0) is None
    # Rotation: the new key has the old one's tenant, scopes and expiry; the old one stops at once...
    rotated = await store.rotate_key(_key_id(a), T0 + 4)
    assert rotated is not None
    record, plaintext = rotated
    assert (
        record.tenant == "acme" and record.scopes == {"tasks:read", "tasks:write"} and record.expires_at == T0 + 10_000
    )
    assert await store.verify_key(a, T0 + 5) is None
    new = await store.verify_key(plaintext, T0 + 5)
    assert new is not None and new.id == record.id != _key_id(a)
    # ...or after a grace period, never later than it would have expired.
    rotated = await store.rotate_key(record.id, T0 + 6, grace_s=60)
    assert rotated is not None
    assert await store.verify_key(plaintext, T0 + 65) is not None and await store.verify_key(plaintext, T0 + 66) is None
    assert await store.verify_key(rotated[1], T0 + 66) is not None
    # A revoked key cannot be rotated (its holder is not who should get a new one); a missing one is None.
    try:
        await store.rotate_key(_key_id(b), T0 + 7)
        raise AssertionError("a revoked key was rotated")
    except InputError:
        pass
    assert await store.rotate_key("nope", T0) is None


async def check_reseal_secrets(store: SealedTasks) -> None:
    res = await store.create_task(_new(webhook_url="https://h.example/x", webhook_secret="plain"), None, T0)
    assert res.task is not None
    await store.finish(None, res.task.id, TaskStatus.cancelled, {"status": "failed", "errors": []}, T0 + 1)
    [msg] = await store.messages(res.task.id)
    assert msg.secret == "plain"
    assert await store.reseal_secrets(lambda s: None if s.startswith("sealed:") else "sealed:" + s) == 2
    [msg] = await store.messages(res.task.id)
    task = await store.get_task(res.task.id)
    assert msg.secret == "sealed:plain" and task is not None and task.webhook_secret == "sealed:plain"
    assert await store.reseal_secrets(lambda s: None if s.startswith("sealed:") else "sealed:" + s) == 0

    # All or nothing: a failure part-way stores nothing.
    def fail(secret: str) -> str:
        raise ValueError("no key opens it")

    try:
        await store.reseal_secrets(fail)
        raise AssertionError("reseal_secrets swallowed the failure")
    except ValueError:
        pass
    [msg] = await store.messages(res.task.id)
    assert msg.secret == "sealed:plain"


async def check_sweep_tasks(store: TaskBackend) -> None:
    """Retention: ended tasks older than the cut-off go whole (events, steps, idempotency keys), in batches;
    running, parked and younger tasks stay, with every event still readable."""
    ids = []
    for i in range(3):
        hook = {"webhook_url": "https://h.example/x", "webhook_secret": "s"} if i < 2 else {}
        res = await store.create_task(_new(**hook), _claim(f"ret{i}", "h"), T0)
        assert res.task is not None
        ids.append(res.task.id)
        await store.finish(None, res.task.id, TaskStatus.cancelled, {"status": "failed", "errors": []}, T0 + i)
    # Of the expired tasks' webhook messages, a delivered one goes with its task; one still being tried stays.
    delivered, pending = [m for t in ids[:2] for m in await store.messages(t)]
    await store.delivered(delivered.id, T0 + 3)
    young = await store.create_task(_new(), None, T0)
    assert young.task is not None
    await store.finish(None, young.task.id, TaskStatus.cancelled, {"status": "failed", "errors": []}, T0 + 100)
    running = await store.create_task(_new(), None, T0)
    assert running.task is not None
    lease = await store.lease_next("w", T0, 1_000_000, 5)
    assert lease is not None
    await store.record_step(lease, StepCheckpoint(key="s", seq=1, fn="f", result={"x": 1}), [], T0 + 1)
    assert await store.sweep_tasks(T0 + 50, 2) == 2  # a bounded batch: the oldest two
    assert await store.get_task(ids[0]) is None and await store.read(ids[0], 0) == []
    assert await store.get_task(ids[2]) is not None
    assert await store.sweep_tasks(T0 + 50, 2) == 1 and await store.sweep_tasks(T0 + 50, 2) == 0
    assert await store.messages(ids[0]) == [] and [m.id for m in await store.messages(ids[1])] == [pending.id]
    assert await store.get_task(young.task.id) is not None
    assert [e.type for e in await store.read(young.task.id, 0)] == ["status", "end"]
    leased = await store.get_task(lease.task_id)
    assert leased is not None and leased.status is TaskStatus.running and await store.load_steps(lease.task_id)
    # An idempotency key never outlives its task's answer: the same request now makes a new task.
    again = await store.create_task(_new(), _claim("ret0", "h"), T0 + 60)
    assert again.outcome is CreateOutcome.created and again.task is not None and again.task.id != ids[0]


async def check_workflow_steps_and_blobs(store: TaskBackend) -> None:
    res = await store.create_task(_new(), None, T0)
    assert res.task
    lease = await store.lease_next("w", T0, 10, 5)
    assert lease
    small = StepCheckpoint(key="a", seq=1, fn="mod.a", kind="tool", result={"n": 1}, usage={"tool_calls": 1})
    big_value = {"text": "lorem ipsum " * (INLINE_LIMIT // 6)}
    big = StepCheckpoint(key="b", seq=2, fn="mod.b", result=big_value, duration_ms=3.5, finished_at=T0 + 2)
    failed = StepCheckpoint(
        key="c", seq=3, fn="mod.c", status=StepStatus.failed, tries=3, error={"type": "timeout", "message": "slow"}
    )
    await store.record_step(lease, small, [("step_completed", {"step": "a"}), ("budget", {"steps": 1})], T0 + 1)
    await store.record_step(lease, big, [("step_completed", {"step": "b"})], T0 + 2)
    await store.record_step(lease, failed, [("step_failed", {"step": "c"})], T0 + 3)
    steps = await store.load_steps(res.task.id)
    assert [s.key for s in steps] == ["a", "b", "c"]
    assert steps[0].result == {"n": 1} and steps[0].kind == "tool" and steps[0].usage == {"tool_calls": 1}
    assert isinstance(steps[1].result, BlobRef) and steps[1].result.size > INLINE_LIMIT
    assert await store.load_blob(steps[1].result) == big_value
    assert steps[2].status is StepStatus.failed and steps[2].tries == 3 and steps[2].error == failed.error
    types = [e.type for e in await store.read(res.task.id, 0)]
    assert types[-4:] == ["step_completed", "budget", "step_completed", "step_failed"]
    await store.set_state(lease, "partial", {"done": [1, 2]}, ("partial_result", {"key": "done"}), T0 + 4)
    await store.set_state(lease, "big", big_value, None, T0 + 4)
    assert await store.load_state(res.task.id) == {"partial": {"done": [1, 2]}, "big": big_value}
    # A newer attempt takes over: the old run's writes are refused, so it cannot corrupt the retry's state.
    lease2 = await store.lease_next("w2", T0 + 100, 10, 5)
    assert lease2 is not None
    try:
        await store.record_step(lease, StepCheckpoint(key="d", seq=4, fn="mod.d"), [], T0 + 101)
    except LeaseLost:
        pass
    else:
        raise AssertionError("a zombie attempt recorded a step")
    assert [s.key for s in await store.load_steps(res.task.id)] == ["a", "b", "c"]


async def check_effect_ledger(store: TaskBackend) -> None:
    res = await store.create_task(_new(), None, T0)
    assert res.task is not None
    lease = await store.lease_next("w1", T0, 30, 5)
    assert lease is not None
    rec = EffectRecord(key="k1", task_id=res.task.id, step="tool:x", tool="x", args={"a": 1}, executions=1)
    stored, created = await store.begin_effect(lease, rec, T0)
    assert created and stored.status is EffectStatus.pending and stored.args == {"a": 1}
    again, created = await store.begin_effect(lease, rec, T0 + 1)
    assert not created and again.status is EffectStatus.pending  # the key is claimed once
    await store.settle_effect(
        lease, EffectSettlement(key="k1", status=EffectStatus.applied, result={"ok": True}, executions=1), T0 + 2
    )
    got = await store.get_effect("k1")
    assert got is not None and got.status is EffectStatus.applied and got.result == {"ok": True}
    assert [e.key for e in await store.list_effects(res.task.id)] == ["k1"]
    stale = await store.lease_next("w2", T0 + 60, 30, 5)  # the first lease expired: a new owner
    assert stale is not None
    try:
        await store.settle_effect(lease, EffectSettlement(key="k1", status=EffectStatus.failed), T0 + 61)
        raise AssertionError("a superseded lease settled an effect")
    except LeaseLost:
        pass


async def check_decisions_park_and_requeue(store: TaskBackend) -> None:
    res = await store.create_task(_new(webhook_url="https://hooks.example/k", webhook_secret="whsec_x"), None, T0)
    assert res.task is not None
    tid = res.task.id
    lease = await store.lease_next("w1", T0, 30, 5)
    assert lease is not None
    asks = [
        Decision(task_id=tid, call_id=c, kind=DecisionKind.approval, tool="send", args={}, step=c, reason="r")
        for c in ("c1", "c2")
    ]
    await store.request_decisions(lease, asks, {"status": "needs_clarification"}, T0 + 1)
    task = await store.get_task(tid)
    assert task is not None and task.status is TaskStatus.waiting_for_approval and task.envelope is not None
    assert await store.lease_next("w1", T0 + 2, 30, 5) is None  # a parked task holds no worker
    [told] = await store.messages(tid)  # whoever decides hears of it, from the same transaction
    assert told.event_type == "task.waiting_for_approval" and told.payload["data"]["status"] == "waiting_for_approval"
    answer = dataclasses.replace(asks[0], verdict=Verdict.approve, decided_by="p")
    assert (await store.decide(tid, "t1", answer, T0 + 3)).verdict is Verdict.approve
    assert (await store.decide(tid, "t1", answer, T0 + 4)).verdict is Verdict.approve  # repeatable
    try:
        await store.decide(tid, "t1", dataclasses.replace(asks[0], verdict=Verdict.deny), T0 + 5)
        raise AssertionError("a decided call was decided otherwise")
    except InputError:
        pass
    try:
        await store.decide(tid, "other", answer, T0 + 5)
        raise AssertionError("another tenant decided")
    except NotFound:
        pass
    task = await store.get_task(tid)
    assert task is not None and task.status is TaskStatus.waiting_for_approval  # c2 is still open
    await store.decide(tid, "t1", dataclasses.replace(asks[1], verdict=Verdict.deny), T0 + 6)
    task = await store.get_task(tid)
    assert task is not None and task.status is TaskStatus.queued and task.envelope is None
    types = [e.type for e in await store.read(tid, 0)]
    assert types.count("decision_requested") == 2 and types.count("decision_made") == 2


async def check_expired_decisions_are_denied(store: TaskBackend) -> None:
    res = await store.create_task(_new(), None, T0)
    assert res.task is not None
    tid = res.task.id
    lease = await store.lease_next("w1", T0, 30, 5)
    assert lease is not None
    ask = Decision(task_id=tid, call_id="c1", kind=DecisionKind.approval, tool="send", args={}, step="s", reason="r")
    await store.request_decisions(lease, [ask], {"status": "needs_clarification"}, T0 + 10)
    assert await store.expire_decisions(T0 + 5, T0 + 20) == []  # asked after the cut-off: left alone
    assert await store.expire_decisions(T0 + 11, T0 + 20) == [tid]
    [d] = await store.load_decisions(tid)
    assert d.verdict is Verdict.deny and d.decided_by == "keel" and d.note and "expired" in d.note
    task = await store.get_task(tid)
    assert task is not None and task.status is TaskStatus.queued
    assert await store.expire_decisions(T0 + 100, T0 + 100) == []  # nothing open any more


async def check_email_outbox(store: EmailOutbox) -> None:
    msg = EmailMessage(key="e1", tenant="t1", task_id=None, to=["a@example.com"], subject="s", body="b")
    stored, created = await store.enqueue_email(msg, T0)
    assert created and stored.status == "queued"
    _, created = await store.enqueue_email(msg, T0 + 1)
    assert not created  # one row per key
    assert [m.key for m in await store.due_emails(T0 + 1, 10)] == ["e1"]
    await store.email_retry("e1", T0 + 100, "421 try later")
    assert await store.due_emails(T0 + 2, 10) == []
    await store.email_sent("e1", T0 + 101)
    got = await store.get_email("e1")
    assert got is not None and got.status == "sent" and got.attempts == 2


async def check_model_stats(store: ModelStatsStore) -> None:
    hour = T0 - T0 % 3600
    ok = ModelCallRecord(
        provider="openai", requested_model="m", model_id="m-1", at=hour + 10, latency_ms=100.0, input_tokens=10,
        output_tokens=5, cost_usd=0.5, json_valid=True, schema_valid=True,
    )  # fmt: skip
    await store.record_model_call("t1", ok)
    await store.record_model_call("t1", dataclasses.replace(ok, latency_ms=300.0, json_valid=False, error=True))
    await store.record_model_call("t2", dataclasses.replace(ok, model_id="m-2", at=hour + 3600, json_valid=None))
    [m1] = await store.model_stats("m-1")
    assert (m1.calls, m1.errors, m1.structured, m1.json_valid, m1.schema_valid) == (2, 1, 2, 1, 2)
    assert m1.bucket == hour and m1.latency_ms_sum == 400.0 and m1.latency_ms_max == 300.0 and m1.input_tokens == 20
    assert [(s.model_id, s.bucket) for s in await store.model_stats()] == [("m-1", hour), ("m-2", hour + 3600)]
    assert [s.model_id for s in await store.model_stats(since=hour + 3600)] == ["m-2"]
    usage = await store.tenant_usage("t1", hour)
    assert (usage.calls, usage.input_tokens, usage.output_tokens, usage.cost_usd) == (2, 20, 10, 1.0)
    assert (await store.tenant_usage("nobody", hour)).calls == 0
    # Two providers serving one model id are two models, never one row under the first one's name.
    await store.record_model_call("t1", dataclasses.replace(ok, provider="openai-compatible", error=True))
    assert [(s.provider, s.calls, s.errors) for s in await store.model_stats("m-1")] == [
        ("openai", 2, 1),
        ("openai-compatible", 1, 1),
    ]


async def check_model_window(store: ModelStatsStore) -> None:
    """The rolling window: per-minute sums by (provider, model id), latency percentiles from the bins, a
    cancelled call counted as nothing but a call, and rows past the retention dropped."""
    minute = T0 - T0 % 60
    base = ModelCallRecord(provider="p", requested_model="m", model_id="m-1", at=minute + 1, latency_ms=100.0)
    for i in range(20):  # 20 answered calls, 10 ms to 200 ms
        await store.record_model_call("t", dataclasses.replace(base, latency_ms=10.0 * (i + 1), json_valid=i < 19,
                                                                schema_valid=i < 18))  # fmt: skip
    await store.record_model_call("t", dataclasses.replace(base, error=True, error_class="429", at=minute + 61))
    await store.record_model_call("t", dataclasses.replace(base, error=True, error_class="cut", truncated=True))
    await store.record_model_call("t", dataclasses.replace(base, cancelled=True, error=True))
    await store.record_model_call("t", dataclasses.replace(base, provider="q", refusal=True, fallback=True))
    [p, q] = await store.model_window(minute)
    assert (p.provider, p.model_id, q.provider) == ("p", "m-1", "q")
    c = p.counts
    assert (c["calls"], c["errors"], c["errors_429"], c["errors_cut"], c["cancelled"]) == (23, 2, 1, 1, 1)
    assert (c["structured"], c["json_valid"], c["schema_valid"], c["truncations"]) == (20, 19, 18, 1)
    assert sum(p.latency_bins.values()) == 20  # the failed and the cancelled calls have no latency
    p50, p95 = p.latency_ms(0.5), p.latency_ms(0.95)
    assert p50 is not None and p95 is not None
    assert 100 * 0.95 <= p50 <= 100 * 1.05 and 190 * 0.95 <= p95 <= 190 * 1.05  # within a bin's width
    assert (q.counts["refusals"], q.counts["fallbacks"], q.latency_ms(0.5)) == (1, 1, bin_latency(latency_bin(100.0)))
    [later] = await store.model_window(minute + 60)  # from the next minute on: only the 429
    assert (later.provider, later.counts["calls"], later.counts["errors_429"]) == ("p", 1, 1)
    await store.record_model_call("t", dataclasses.replace(base, at=minute + WINDOW_RETENTION_S + 120))
    [kept] = await store.model_window(0)
    assert kept.counts["calls"] == 1  # a week later, what the window can no longer reach is gone


# -- memory tiers -------------------------------------------------------------------------------------------


async def check_session_memory_ttl(store: SessionStore) -> None:
    s = await store.append_turns("t1", "s1", [SessionTurn(role="user", content="hi")], 60, T0)
    assert [(t.seq, t.role, t.content) for t in s.turns] == [(1, "user", "hi")] and s.expires_at == T0 + 60
    await store.append_turns(
        "t1",
        "s1",
        [SessionTurn(role="assistant", content="hello"), SessionTurn(role="user", content="q2")],
        60,
        T0 + 30,
    )
    got = await store.get_session("t1", "s1", T0 + 31)
    assert got is not None and [t.seq for t in got.turns] == [1, 2, 3] and got.expires_at == T0 + 90  # sliding
    last = await store.get_session("t1", "s1", T0 + 31, last=2)
    assert last is not None and [t.content for t in last.turns] == ["hello", "q2"]
    assert await store.get_session("t2", "s1", T0 + 31) is None  # another tenant's
    await store.set_session_context("t1", "s1", {"topic": "contracts"}, 60, T0 + 40)
    ctx = await store.get_session("t1", "s1", T0 + 41)
    assert ctx is not None and ctx.context == {"topic": "contracts"} and ctx.expires_at == T0 + 100
    assert await store.get_session("t1", "s1", T0 + 100) is None  # expired: never returned, swept or not
    fresh = await store.append_turns("t1", "s1", [SessionTurn(role="user", content="again")], 60, T0 + 101)
    assert [t.seq for t in fresh.turns] == [1] and fresh.context == {} and fresh.created_at == T0 + 101
    await store.append_turns("t1", "s2", [SessionTurn(role="user", content="x")], 10, T0)
    assert await store.sweep_sessions(T0 + 50) == 1  # s2 (expired at T0+10); s1 lives to T0+161
    assert await store.get_session("t1", "s1", T0 + 102) is not None
    assert await store.delete_session("t1", "s1") and await store.get_session("t1", "s1", T0 + 102) is None


def _doc(doc_id: str, tenant: str = "t1", expires_at: float | None = None) -> DocumentRecord:
    return DocumentRecord(
        id=doc_id, tenant=tenant, sha256="0" * 64, source="upload:x.pdf", media_type="application/pdf",
        expires_at=expires_at,
    )  # fmt: skip


def _vec(*xs: float) -> list[float]:
    norm = sum(x * x for x in xs) ** 0.5
    return [x / norm for x in xs]


def _chunk(
    doc: str,
    text: str,
    vec: list[float],
    *,
    space: str = "m@A",
    start: int = 0,
    tenant: str = "t1",
    expires_at: float | None = None,
) -> ChunkRecord:
    return ChunkRecord(
        document_id=doc, tenant=tenant, page=1, start=start, end=start + len(text), text=text,
        content_hash=f"h-{text}", space=space, vector=vec, expires_at=expires_at,
    )  # fmt: skip


async def check_documents(store: DocumentStore) -> None:
    saved = await store.save_document(_doc("doc_1"), T0)
    assert saved.status is DocumentStatus.ingesting and saved.created_at == T0
    saved.status, saved.pages, saved.warnings = DocumentStatus.ingested, 3, [{"type": "ocr_used"}]
    again = await store.save_document(saved, T0 + 5)
    assert again.status is DocumentStatus.ingested and again.pages == 3 and again.created_at == T0
    assert again.updated_at == T0 + 5 and again.warnings == [{"type": "ocr_used"}]
    assert await store.get_document("t2", "doc_1") is None
    await store.save_document(_doc("doc_2", expires_at=T0 + 10), T0)
    assert await store.get_document("t1", "doc_2", T0 + 10) is None  # expired
    assert [d.id for d in await store.list_documents("t1", T0 + 11)] == ["doc_1"]
    assert await store.delete_document("t1", "doc_1") and await store.get_document("t1", "doc_1") is None


async def check_vector_spaces_are_isolated(store: VectorBackend) -> None:
    await store.save_document(_doc("doc_a"), T0)
    await store.add_chunks(
        [_chunk("doc_a", "payment terms", _vec(1, 0, 0)), _chunk("doc_a", "liability", _vec(0, 1, 0), start=20)], T0
    )
    hits = await store.search_chunks("m@A", _vec(1, 0.1, 0), 5, tenant="t1", now=T0)
    assert [h.chunk.text for h in hits] == ["payment terms", "liability"] and hits[0].score > hits[1].score
    assert hits[0].chunk.space == "m@A" and hits[0].chunk.page == 1 and hits[0].chunk.end == len("payment terms")
    # The same model at another version: nothing of version A is ever compared with a version-B query.
    assert await store.search_chunks("m@B", _vec(1, 0.1, 0), 5, tenant="t1", now=T0) == []
    todo = await store.chunks_to_reindex("m@A", "m@B", 10, T0)
    assert [c.text for c in todo] == ["payment terms", "liability"]
    await store.add_chunks([dataclasses.replace(c, space="m@B", vector=_vec(0, 0, 1), id=0) for c in todo[:1]], T0)
    assert [c.text for c in await store.chunks_to_reindex("m@A", "m@B", 10, T0)] == ["liability"]
    hits_b = await store.search_chunks("m@B", _vec(0, 0, 1), 5, tenant="t1", now=T0)
    assert [(h.chunk.text, h.chunk.space) for h in hits_b] == [("payment terms", "m@B")]
    assert await store.spaces(T0) == {"m@A": 2, "m@B": 1}
    assert await store.drop_space("m@A") == 2 and await store.spaces(T0) == {"m@B": 1}
    assert await store.search_chunks("m@A", _vec(1, 0, 0), 5, tenant="t1", now=T0) == []


async def check_vector_dedup_filters_and_ttl(store: VectorBackend) -> None:
    await store.save_document(_doc("doc_x"), T0)
    await store.save_document(_doc("doc_y"), T0)
    await store.save_document(_doc("doc_z", tenant="t2"), T0)
    first = await store.add_chunks([_chunk("doc_x", "alpha", _vec(1, 0)), _chunk("doc_y", "beta", _vec(0.9, 0.1))], T0)
    again = await store.add_chunks([_chunk("doc_x", "alpha", _vec(1, 0))], T0 + 1)
    assert again == first[:1] and await store.chunk_count("m@A") == 2  # idempotent re-ingest
    await store.add_chunks([_chunk("doc_z", "gamma", _vec(1, 0), tenant="t2")], T0)
    await store.add_chunks([_chunk("doc_x", "short-lived", _vec(1, 0.01), start=50, expires_at=T0 + 10)], T0)
    hits = await store.search_chunks("m@A", _vec(1, 0), 10, tenant="t1", now=T0 + 5)
    assert sorted(h.chunk.text for h in hits) == ["alpha", "beta", "short-lived"]  # not t2's gamma
    hits = await store.search_chunks("m@A", _vec(1, 0), 10, tenant="t1", now=T0 + 10)
    assert sorted(h.chunk.text for h in hits) == ["alpha", "beta"]  # expired, though not swept yet
    only_y = await store.search_chunks("m@A", _vec(1, 0), 10, tenant="t1", now=T0, documents=["doc_y"])
    assert [h.chunk.text for h in only_y] == ["beta"]
    top1 = await store.search_chunks("m@A", _vec(1, 0), 1, tenant="t1", now=T0 + 10)
    assert [h.chunk.text for h in top1] == ["alpha"]
    assert await store.chunk_count("m@A", tenant="t1", now=T0 + 10) == 2
    assert await store.sweep_chunks(T0 + 10) == 1 and await store.chunk_count("m@A") == 3
    await store.save_document(_doc("doc_y", expires_at=T0 + 20), T0 + 1)  # a document's chunks expire with it
    assert await store.sweep_chunks(T0 + 20) == 1 and await store.get_document("t1", "doc_y") is None
    assert [h.chunk.text for h in await store.search_chunks("m@A", _vec(1, 0), 10, tenant="t1", now=T0 + 20)] == [
        "alpha"
    ]


async def check_document_chunks_in_reading_order(store: VectorBackend) -> None:
    await store.save_document(_doc("doc_r"), T0)
    await store.save_document(_doc("doc_r", tenant="t2"), T0)
    page2 = dataclasses.replace(_chunk("doc_r", "second page", _vec(0, 1)), page=2)
    await store.add_chunks(
        [
            page2,
            _chunk("doc_r", "later on page one", _vec(1, 1), start=40),
            _chunk("doc_r", "page one opens", _vec(1, 0)),
            _chunk("doc_r", "other space", _vec(1, 0), space="m@B"),
            _chunk("doc_r", "other tenant", _vec(1, 0), tenant="t2"),
            _chunk("doc_r", "gone soon", _vec(1, 0), start=80, expires_at=T0 + 5),
        ],
        T0,
    )
    found = await store.document_chunks("t1", "doc_r", "m@A", T0 + 5)
    assert [(c.page, c.start, c.text) for c in found] == [
        (1, 0, "page one opens"), (1, 40, "later on page one"), (2, 0, "second page"),
    ]  # fmt: skip
    assert all(c.vector is None for c in found)
    assert await store.document_chunks("t1", "doc_missing", "m@A", T0) == []


async def check_result_cache(store: CachedTasks) -> None:
    hit = await store.create_task(_new(cache_key="fp1"), None, T0)
    miss = await store.create_task(_new(cache_key="fp2"), None, T0)
    assert hit.task and miss.task
    for task_id, status in ((hit.task.id, TaskStatus.succeeded), (miss.task.id, TaskStatus.failed)):
        lease = await store.lease_next("w", T0, 10, 5)
        assert lease and lease.task_id == task_id
        await store.finish(lease, task_id, status, {"status": "success"}, T0 + 10)
    cached = await store.cached_result("t1", "fp1", T0)
    assert cached is not None and cached.id == hit.task.id and cached.cache_key == "fp1"
    assert await store.cached_result("t1", "fp1", T0 + 11) is None  # older than the caller accepts
    assert await store.cached_result("t2", "fp1", T0) is None
    assert await store.cached_result("t1", "fp2", T0) is None  # only successes are reused


async def check_delete_task(store: TaskBackend) -> None:
    res = await store.create_task(_new(), _claim("del", "h1"), T0)
    assert res.task is not None
    tid = res.task.id
    lease = await store.lease_next("w", T0, 30, 5)
    assert lease is not None
    try:
        await store.delete_task(tid, "t1")
        raise AssertionError("a running task was deleted")
    except TaskNotFinished:
        pass
    big_value = {"text": "lorem ipsum " * (INLINE_LIMIT // 6)}
    await store.record_step(lease, StepCheckpoint(key="a", seq=1, fn="m.a", result=big_value), [], T0 + 1)
    await store.set_state(lease, "partial", {"n": 1}, None, T0 + 1)
    effect = EffectRecord(key="dk", task_id=tid, step="tool:x", tool="x", args={}, executions=1)
    await store.begin_effect(lease, effect, T0 + 1)
    [step] = await store.load_steps(tid)
    assert isinstance(step.result, BlobRef)
    await store.finish(lease, tid, TaskStatus.succeeded, {"status": "success", "result": None, "errors": []}, T0 + 2)
    assert not await store.delete_task(tid, "t2")  # another tenant's task looks missing, and stays
    assert await store.get_task(tid) is not None
    assert await store.delete_task(tid, "t1")
    assert await store.get_task(tid) is None and await store.read(tid, 0) == []
    assert await store.load_steps(tid) == [] and await store.load_state(tid) == {}
    assert await store.get_effect("dk") is None
    assert not await store.delete_task(tid, "t1")  # already gone
    # the idempotency key went with it: the same request makes a new task
    again = await store.create_task(_new(), _claim("del", "h1"), T0 + 3)
    assert again.outcome is CreateOutcome.created and again.task is not None and again.task.id != tid


TASK_CHECKS: list[Callable[[TaskBackend], Awaitable[None]]] = [
    check_create_and_get,
    check_idempotency,
    check_concurrent_idempotent_creates,
    check_list_pagination_and_filter,
    check_lease_fencing,
    check_cancel_and_requeue,
    check_poison_dead_letter,
    check_progress_is_not_poison,
    check_delete_task,
    check_sweep_tasks,
]
OUTBOX_CHECKS: list[Callable[[TaskBackend], Awaitable[None]]] = [
    check_finish_outbox_and_end_event,
    check_due_messages_are_claimed,
    check_disabled_endpoint,
]
WORKFLOW_CHECKS: list[Callable[[TaskBackend], Awaitable[None]]] = [check_workflow_steps_and_blobs]
EFFECT_CHECKS: list[Callable[[TaskBackend], Awaitable[None]]] = [check_effect_ledger]
DECISION_CHECKS: list[Callable[[TaskBackend], Awaitable[None]]] = [
    check_decisions_park_and_requeue,
    check_expired_decisions_are_denied,
]
CACHE_CHECKS: list[Callable[[CachedTasks], Awaitable[None]]] = [check_result_cache]
KEY_CHECKS: list[Callable[[KeyStore], Awaitable[None]]] = [
    check_api_keys,
    check_key_expiry_and_last_use,
    check_key_revoke_and_rotate,
]
SECRET_CHECKS: list[Callable[[SealedTasks], Awaitable[None]]] = [check_reseal_secrets]
EMAIL_CHECKS: list[Callable[[EmailOutbox], Awaitable[None]]] = [check_email_outbox, check_due_emails_are_claimed]
STATS_CHECKS: list[Callable[[ModelStatsStore], Awaitable[None]]] = [check_model_stats, check_model_window]
SESSION_CHECKS: list[Callable[[SessionStore], Awaitable[None]]] = [check_session_memory_ttl]
DOCUMENT_CHECKS: list[Callable[[DocumentStore], Awaitable[None]]] = [check_documents]
VECTOR_CHECKS: list[Callable[[VectorBackend], Awaitable[None]]] = [
    check_vector_spaces_are_isolated,
    check_vector_dedup_filters_and_ttl,
    check_document_chunks_in_reading_order,
]


async def check_tenant_limits(store: LimitedTasks) -> None:
    assert await store.get_limits("t1") is None
    limits = TenantLimits(rate_per_s=2.5, burst=5, max_tasks=3, daily_cost_usd=1.25, monthly_cost_usd=10.0)
    await store.set_limits("t1", limits, T0)
    assert await store.get_limits("t1") == limits
    assert await store.get_limits("t2") is None
    await store.set_limits("t1", TenantLimits(max_tasks=1), T0 + 1)  # replaced, not merged
    assert await store.get_limits("t1") == TenantLimits(max_tasks=1)
    await store.set_limits("t1", TenantLimits(), T0 + 2)  # nothing set: the defaults again
    assert await store.get_limits("t1") is None

    for _ in range(3):
        await store.create_task(_new("t1"), None, T0)
    await store.create_task(_new("t2"), None, T0)
    lease = await store.lease_next("w", T0, 30, 5)
    assert lease is not None
    assert await store.active_tasks("t1") == 3  # queued and running both count
    await store.finish(lease, lease.task_id, TaskStatus.succeeded, {"status": "success"}, T0 + 1)
    done = await store.get_task(lease.task_id)
    assert done is not None
    assert await store.active_tasks(done.tenant) == (2 if done.tenant == "t1" else 0)


async def check_rate_buckets_are_atomic(store: RateBuckets) -> None:
    first = await store.take_token("t1", 1.0, 3, T0)
    assert first.allowed and first.limit == 3 and first.remaining == 2 and first.window_s == 3.0
    # Ten requests at once on a bucket with two tokens left: exactly two pass, whatever the interleaving.
    racing = await asyncio.gather(*(store.take_token("t1", 1.0, 3, T0) for _ in range(10)))
    assert sum(d.allowed for d in racing) == 2
    refused = await store.take_token("t1", 1.0, 3, T0 + 0.25)
    assert not refused.allowed and refused.remaining == 0 and abs(refused.retry_after_s - 0.75) < 1e-6
    assert (await store.take_token("t1", 1.0, 3, T0 + 1.0)).allowed  # refilled at 1 token a second
    assert (await store.take_token("t2", 1.0, 3, T0)).remaining == 2  # every bucket is its own


async def check_rate_buckets_follow_the_rule(store: RateBuckets) -> None:
    """Every decision is the one :func:`keel.memory.limits.take_token` makes (a backend that takes in its own
    language, Redis's Lua, is held to the Python rule here)."""
    bucket = None
    for i, at in enumerate([0.0, 0.1, 0.1, 0.2, 0.2, 0.2, 1.3, 1.35, 5.0, 5.01, 4.0, 4.5, 9.99, 10.0]):
        bucket, expected = take_token(bucket, 2.5, 3, T0 + at)
        got = await store.take_token("rule", 2.5, 3, T0 + at)
        assert (got.allowed, got.remaining, got.limit) == (expected.allowed, expected.remaining, expected.limit), i
        assert abs(got.retry_after_s - expected.retry_after_s) < 1e-9 and abs(got.reset_s - expected.reset_s) < 1e-9


LIMIT_CHECKS: list[Callable[[Store], Awaitable[None]]] = [check_tenant_limits]
BUCKET_CHECKS: list[Callable[[Store], Awaitable[None]]] = [
    check_rate_buckets_are_atomic,
    check_rate_buckets_follow_the_rule,
]


SUITES: dict[str, Sequence[Callable[[Store], Awaitable[None]]]] = {
    "tasks": TASK_CHECKS,
    "outbox": OUTBOX_CHECKS,
    "workflows": WORKFLOW_CHECKS,
    "effects": EFFECT_CHECKS,
    "decisions": DECISION_CHECKS,
    "cache": CACHE_CHECKS,
    "keys": KEY_CHECKS,
    "secrets": SECRET_CHECKS,
    "emails": EMAIL_CHECKS,
    "stats": STATS_CHECKS,
    "sessions": SESSION_CHECKS,
    "documents": DOCUMENT_CHECKS,
    "vectors": VECTOR_CHECKS,
    "limits": LIMIT_CHECKS,
    "buckets": BUCKET_CHECKS,
}
"""Each seam's suite, named as its handle on :class:`~keel.memory.stores.Stores`. A backend that serves every seam
(a :class:`~keel.memory.stores.Store`) runs them all."""

CHECKS: list[Callable[[Store], Awaitable[None]]] = [check for suite in SUITES.values() for check in suite]
