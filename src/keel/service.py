"""keel's application service: the one typed entry point every edge calls.

The REST routes, the endpoint families, MCP and the CLI (and any edge to come: an OpenAI-compatible facade, a
trace page) reach tasks, events, tools and memory only through :class:`Keel`. A rule an edge used to write for
itself (what a submission must pass before it is stored, how to wait for a task to settle, what a task cancelled
before it ran says) is written once, here, and every edge gets it the same way.

This module imports no driver and nothing of ``keel.interaction``: :mod:`keel.app` picks the store and the engine
and builds the service; an edge only translates its wire format to these operations and back. So HTTP headers,
status codes and SSE framing stay in ``keel.interaction``; what they report comes from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError

from keel import logs, observability
from keel.errors import (
    Forbidden,
    IdempotencyInFlight,
    IdempotencyKeyReused,
    InputError,
    NotFound,
    QuotaExceeded,
    TooManyTasks,
)
from keel.memory.limits import RateDecision, TenantLimits, day_start, month_start, next_month_start
from keel.memory.retrieval import Memory, Retrieval
from keel.memory.stores import KeyStore, Stores
from keel.memory.types import (
    ApiKey,
    CreateOutcome,
    Decision,
    DecisionKind,
    DocumentRecord,
    EffectRecord,
    Event,
    IdempotencyClaim,
    KeyRecord,
    KeySecret,
    ModelStats,
    NewTask,
    Session,
    StepCheckpoint,
    Task,
    TaskStatus,
    Verdict,
    document_id,
)
from keel.netguard import AllowList, resolve_target
from keel.orchestration.engine import Engine
from keel.orchestration.engine.runner import cancelled_envelope
from keel.orchestration.engine.runtime import Watch
from keel.orchestration.engine.workflow import Workflow, WorkflowRegistry
from keel.orchestration.llm.models.catalog import unpriced
from keel.orchestration.llm.reliability import SloReport, report
from keel.orchestration.tools import Tool, ToolCatalog, permitted
from keel.scopes import holds
from keel.secretbox import SecretBox
from keel.settings import Settings

log = logging.getLogger("keel.service")

IDLE_POLL_FACTOR = 8
"""An idle event stream backs off its safety-net poll up to this many poll intervals (see :meth:`Keel.events`)."""

__all__ = [
    "Idempotency",
    "Ingested",
    "Keel",
    "Keys",
    "LimitsView",
    "Progress",
    "Submission",
    "Submitted",
    "TaskPage",
    "Wakeups",
    "Webhook",
    "settled",
]

LIMITS_FRESH_S = 1.0
"""How long a tenant's limits, once read, are used without reading them again: every authenticated request needs
them, and a change made through another replica applies here within this time."""

Progress = Callable[[float, str | None], Awaitable[None]]
"""``progress(done, current_step)``: told each time a task being waited on gets further."""


class Wakeups(Protocol):
    """In-process wake-ups for whoever waits on a task (the in-process notifier, or Redis fan-out across replicas).
    The durable log and the task row stay the truth; a wake-up only says "look now"."""

    def notify(self, task_id: str) -> None: ...

    def watch(self, task_id: str) -> AbstractContextManager[Watch]:
        """The task's wake-ups and the events this process committed for it, while the block runs (clear ``woken``,
        take or read, then wait on it)."""
        ...


@dataclass(kw_only=True, slots=True, frozen=True)
class Webhook:
    """Where the task's terminal event is delivered, signed (Standard Webhooks)."""

    url: str
    """Refused at submission when it resolves to a private address, unless allowed (``webhook_allow``)."""
    secret: str


@dataclass(kw_only=True, slots=True)
class Submission:
    """A task to create, as any edge describes it (the wire body is the edge's; this is what it means)."""

    workflow: str
    input: dict[str, Any]
    """Raw: validated against the workflow's input model by :meth:`Keel.submit`."""
    webhook: Webhook | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    tools: list[str] | None = None
    """The tool allowlist (None: every tool the key may use)."""
    approval: Literal["auto", "always"] = "auto"
    cache_max_age_s: float | None = None
    """Accept the stored result of an identical request at most this old (None: always run)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Idempotency:
    """A caller's idempotency key and the hash of what it sent with it. The edge hashes its own request (a REST
    body, an MCP call), because "the same request" is a question about its wire format."""

    key: str
    request_hash: str

    @classmethod
    def of(cls, edge: Literal["rest", "mcp"], key: str, request_hash: str) -> Idempotency:
        """The caller's ``key`` in its edge's own namespace: a REST ``Idempotency-Key: mcp:k`` and an MCP
        ``_meta.idempotency_key`` ``k`` are two keys, not one (each edge hashes its request in its own format, so
        one edge's key reused by the other would only ever be refused as "a different request")."""
        return cls(key=f"{edge}:{key}", request_hash=request_hash)


@dataclass(kw_only=True, slots=True)
class Submitted:
    task: Task
    outcome: Literal["created", "replayed", "cached"]
    """``replayed``: an earlier request with the same idempotency key made it; ``cached``: the earlier, finished
    task whose result the submission allowed (``cache_max_age_s``)."""
    age_s: int = 0
    """For ``cached``: seconds since that task finished."""


@dataclass(kw_only=True, slots=True)
class TaskPage:
    tasks: list[Task]
    next_cursor: str | None


@dataclass(kw_only=True, slots=True)
class Ingested:
    document: DocumentRecord
    fresh: bool
    """False when the same bytes were ingested before (the stored document is returned)."""


@dataclass(kw_only=True, frozen=True, slots=True)
class Keys:
    """API key management, for the operator's CLI (on the data dir or store, no server needed) and any edge to
    come alike: what a key's life allows is :class:`~keel.memory.types.KeyRecord`'s, stored through the
    :class:`~keel.memory.stores.KeyStore` seam. ``tenant`` limits an operation to one tenant's keys (None: any);
    ``by``, the scopes of the key asking (None: the operator's CLI), limits it to keys that hold nothing ``by`` does
    not (:func:`~keel.scopes.holds`): a tenant's admin can neither make an ``operator`` key nor take one over by
    rotating it."""

    store: KeyStore
    clock: Callable[[], float] = time.time

    async def create(
        self,
        tenant: str,
        scopes: frozenset[str],
        *,
        expires_at: float | None = None,
        by: frozenset[str] | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key: its record and its plaintext (shown once)."""
        _within(by, scopes)
        now = self.clock()
        tenant = tenant.strip()
        if not tenant:
            raise InputError("a key needs a tenant")
        if not scopes:
            raise InputError("a key needs at least one scope")
        if expires_at is not None and expires_at <= now:
            raise InputError("a key's expiry must be in the future")
        plaintext = await self.store.create_key(tenant, scopes, now, expires_at=expires_at)
        minted = KeySecret.parse(plaintext)
        assert minted is not None
        return minted.record(tenant, scopes, now, expires_at), plaintext

    async def list(self, tenant: str | None = None) -> list[KeyRecord]:
        return await self.store.list_keys(tenant)

    async def revoke(self, key_id: str, *, tenant: str | None = None, by: frozenset[str] | None = None) -> KeyRecord:
        """Revoked at once: the next request with it is refused, on every replica (they verify against the
        store). Repeatable."""
        await self._managed(key_id, tenant, by)
        key = await self.store.revoke_key(key_id, self.clock(), tenant=tenant)
        if key is None:
            raise NotFound(f"no key {key_id}")
        return key

    async def rotate(
        self, key_id: str, *, grace_s: float = 0.0, tenant: str | None = None, by: frozenset[str] | None = None
    ) -> tuple[KeyRecord, str]:
        """A new key (record, plaintext) with the old one's tenant, scopes and expiry; the old one is revoked at
        once, or expires after ``grace_s``."""
        if grace_s < 0:
            raise InputError("the grace period cannot be negative")
        await self._managed(key_id, tenant, by)
        rotated = await self.store.rotate_key(key_id, self.clock(), grace_s=grace_s, tenant=tenant)
        if rotated is None:
            raise NotFound(f"no key {key_id}")
        return rotated

    async def verify(self, token: str) -> ApiKey | None:
        return await self.store.verify_key(token, self.clock())

    async def _managed(self, key_id: str, tenant: str | None, by: frozenset[str] | None) -> None:
        if by is not None:
            found = next((k for k in await self.store.list_keys(tenant) if k.id == key_id), None)
            if found is not None:  # an unknown key is the store's NotFound, as before
                _within(by, found.scopes)


def _within(by: frozenset[str] | None, scopes: Iterable[str]) -> None:
    """Refuses (403) a key management that would give, or take over, a scope the asking key (``by``) lacks."""
    if by is not None and (beyond := sorted(s for s in scopes if not holds(by, s))):
        raise Forbidden(f"this API key cannot manage a key with the scopes {beyond}: it does not hold them itself")


@dataclass(kw_only=True, slots=True)
class LimitsView:
    """A tenant's limits as an operator sees them: its own, the server's defaults, what applies, and where the
    tenant stands against them."""

    tenant: str
    own: TenantLimits
    defaults: TenantLimits
    effective: TenantLimits
    active_tasks: int
    cost_today_usd: float
    cost_month_usd: float


def settled(task: Task) -> bool:
    """Whether waiting on the task is over: it is terminal, or it waits for a person and will not move by itself."""
    return task.status.terminal or task.status is TaskStatus.waiting_for_approval


@dataclass(kw_only=True)
class Keel:
    """The application service: every operation an edge offers, for the key (tenant) that asks.

    Built and wired by :func:`keel.app.running`; the fields are the seams it runs on. A missing task, document
    or session raises :class:`~keel.errors.NotFound`; another tenant's looks missing."""

    settings: Settings
    stores: Stores
    """One handle per store seam (tasks, events, decisions, …), each on the backend that serves it."""
    registry: WorkflowRegistry
    runtime: Engine
    notifier: Wakeups
    tools: ToolCatalog
    memory: Memory
    webhook_allow: AllowList
    """Hosts a webhook may target although they resolve to a private address (tests, local development)."""
    secrets: SecretBox
    """Seals a webhook's secret before it is stored: the store never holds it in plain text."""
    clock: Callable[[], float] = time.time
    _in_flight: set[tuple[str, str]] = field(default_factory=set, init=False)
    """``(tenant, idempotency key)`` of submissions being stored right now: a concurrent twin gets a 409."""
    _admitting: dict[str, asyncio.Lock] = field(default_factory=dict, init=False)
    _limits_read: dict[str, tuple[float, TenantLimits | None]] = field(default_factory=dict, init=False)
    """Per tenant: when its own limits were read from the store (monotonic), and what they were."""
    """Per tenant with a task cap: its count and its insert happen under this lock, so the cap is exact here."""

    # -- submission ------------------------------------------------------------------------------------------------

    async def submit(self, key: ApiKey, sub: Submission, idempotency: Idempotency | None = None) -> Submitted:
        """Validate (the workflow, its input, its ``admit`` hook, the webhook target, the tool allowlist) before
        anything is stored, answer from the result cache when the submission allows it, honour the idempotency
        key, store the task durably and wake the engine. Every task-creating edge comes through here."""
        wf = self.registry.get(sub.workflow)
        if wf is None:
            raise InputError(f"unknown workflow {sub.workflow!r}", detail={"known": self.registry.names()})
        try:
            # Strict, as JSON: `true` is no step count and `"5"` no integer, while a string still makes an enum or
            # a date (what JSON has for them). The input came as JSON, so writing it out again loses nothing.
            parsed = wf.input_model.model_validate_json(json.dumps(sub.input), strict=True)
        except ValidationError as exc:
            errors = [{"pointer": "/input/" + "/".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()]
            raise InputError("input does not match the workflow's schema", detail={"errors": errors}) from None
        self._check_cost_budget(sub, parsed)
        if wf.admit is not None:
            await wf.admit(self, key.tenant, parsed)
        if sub.webhook is not None:
            await resolve_target(sub.webhook.url, allow=self.webhook_allow)
        policy = self._policy(sub, key)
        if (request := logs.request_id.get()) is not None:
            policy["request_id"] = request  # so the worker's log lines about the task name the request behind it
        input_json = parsed.model_dump(mode="json")
        fingerprint = self._fingerprint(sub, input_json)
        if sub.cache_max_age_s is not None:
            cached = await self.stores.cache.cached_result(key.tenant, fingerprint, self.clock() - sub.cache_max_age_s)
            if cached is not None:
                age = max(0, int(self.clock() - (cached.finished_at or self.clock())))
                return Submitted(task=cached, outcome="cached", age_s=age)
        limits = await self.limits(key.tenant)
        budget = await self._within_quota(key.tenant, limits, sub.budget)
        new = NewTask(
            tenant=key.tenant,
            workflow=sub.workflow,
            input=input_json,
            webhook_url=sub.webhook.url if sub.webhook else None,
            webhook_secret=self.secrets.seal(sub.webhook.secret) if sub.webhook else None,
            budget=budget,
            metadata=observability.current().carry(sub.metadata),
            estimated_duration_s=wf.estimate(parsed),
            policy=policy,
            cache_key=fingerprint,
        )
        if limits.max_tasks is None:
            return await self._store_task(key.tenant, new, idempotency)
        async with self._admitting.setdefault(key.tenant, asyncio.Lock()):
            active = await self.stores.limits.active_tasks(key.tenant)
            if active >= limits.max_tasks:
                raise TooManyTasks(
                    f"this tenant has {active} tasks queued or running, its limit; submit again when one ends",
                    retry_after_s=2.0,  # as a queued task's poll asks: a slot frees when any task ends
                    detail={"limit": limits.max_tasks, "active": active},
                )
            return await self._store_task(key.tenant, new, idempotency)

    # -- per-tenant limits -----------------------------------------------------------------------------------------

    @property
    def default_limits(self) -> TenantLimits:
        s = self.settings
        return TenantLimits(
            rate_per_s=s.limit_rate_per_s,
            burst=s.limit_burst,
            max_tasks=s.limit_max_tasks,
            daily_cost_usd=s.limit_daily_cost_usd,
            monthly_cost_usd=s.limit_monthly_cost_usd,
        )

    async def limits(self, tenant: str) -> TenantLimits:
        """The limits that apply to ``tenant``: its own (read at most :data:`LIMITS_FRESH_S` ago) over the server's
        defaults."""
        read = self._limits_read.get(tenant)
        now = time.monotonic()
        if read is None or now - read[0] > LIMITS_FRESH_S:
            read = (now, await self.stores.limits.get_limits(tenant))
            self._limits_read[tenant] = read
        own = read[1]
        return own.over(self.default_limits) if own is not None else self.default_limits

    async def limits_view(self, tenant: str) -> LimitsView:
        own = await self.stores.limits.get_limits(tenant) or TenantLimits()
        now = self.clock()
        return LimitsView(
            tenant=tenant,
            own=own,
            defaults=self.default_limits,
            effective=own.over(self.default_limits),
            active_tasks=await self.stores.limits.active_tasks(tenant),
            cost_today_usd=(await self.stores.stats.tenant_usage(tenant, day_start(now))).cost_usd,
            cost_month_usd=(await self.stores.stats.tenant_usage(tenant, month_start(now))).cost_usd,
        )

    async def set_limits(self, tenant: str, limits: TenantLimits) -> LimitsView:
        """Replace ``tenant``'s own limits (every replica reads them from the store on the next request)."""
        await self.stores.limits.set_limits(tenant, limits, self.clock())
        self._limits_read.pop(tenant, None)
        return await self.limits_view(tenant)

    async def take_request(self, tenant: str) -> RateDecision | None:
        """Spend one of the tenant's request tokens; None when it has no rate limit. The edge refuses the request
        when the decision says so, and reports the decision in its headers either way."""
        limits = await self.limits(tenant)
        if limits.rate_per_s is None:
            return None
        return await self.stores.buckets.take_token(
            f"tenant:{tenant}", limits.rate_per_s, limits.bucket_size, self.clock()
        )

    async def _within_quota(self, tenant: str, limits: TenantLimits, budget: dict[str, Any]) -> dict[str, Any]:
        """The task's budget, its ``max_cost_usd`` lowered to what is left of the tenant's daily and monthly
        quotas, so a run that would overspend stops ``budget_exceeded`` like any budget. Refuses the submission
        (:class:`QuotaExceeded`, 429 until the period ends) when nothing is left."""
        now = self.clock()
        left: list[float] = []
        for quota, since, until, period in (
            (limits.daily_cost_usd, day_start(now), day_start(now) + 86400, "daily"),
            (limits.monthly_cost_usd, month_start(now), next_month_start(now), "monthly"),
        ):
            if quota is None:
                continue
            spent = (await self.stores.stats.tenant_usage(tenant, since)).cost_usd
            if spent >= quota:
                raise QuotaExceeded(
                    f"this tenant's {period} cost quota of ${quota:g} is spent (${spent:.4f})",
                    retry_after_s=until - now,
                    detail={"quota": period, "limit_usd": quota, "spent_usd": round(spent, 10)},
                )
            left.append(quota - spent)
        if not left:
            return budget
        cap = min(left)
        given = budget.get("max_cost_usd")
        return {**budget, "max_cost_usd": cap if given is None else min(given, cap)}

    async def _store_task(self, tenant: str, new: NewTask, idempotency: Idempotency | None) -> Submitted:
        claim = None
        if idempotency is not None:
            claim = IdempotencyClaim(
                key=idempotency.key,
                request_hash=idempotency.request_hash,
                expires_at=self.clock() + self.settings.idempotency_ttl_hours * 3600,
            )
            scope = (tenant, idempotency.key)
            if scope in self._in_flight:
                raise IdempotencyInFlight("a request with this Idempotency-Key is still being processed; retry later")
            self._in_flight.add(scope)
        try:
            result = await self.stores.tasks.create_task(new, claim, self.clock())
        finally:
            if idempotency is not None:
                self._in_flight.discard((tenant, idempotency.key))
        if result.outcome is CreateOutcome.key_reused:
            raise IdempotencyKeyReused("this Idempotency-Key was already used with a different request body")
        assert result.task is not None
        if result.outcome is CreateOutcome.replayed:
            return Submitted(task=result.task, outcome="replayed")
        self.runtime.wake()
        task = result.task
        observability.current().task_created(task.workflow)
        log.info("queued %s", task.workflow, extra={"task_id": task.id, "tenant": task.tenant})
        return Submitted(task=task, outcome="created")

    def _fingerprint(self, sub: Submission, input_json: dict[str, Any]) -> str:
        """What makes two requests identical for the result cache: workflow, validated input (a document id is
        derived from the document's bytes, so equal ids mean equal contents), the model and embedding model that
        would answer, and every setting that shapes the result (budget, tool allowlist, approval rule)."""
        canonical = json.dumps(
            {
                "workflow": sub.workflow,
                "input": input_json,
                "model": self.settings.default_model,
                "embedding": self.memory.embedder.space.key,
                "budget": sub.budget,
                "tools": sub.tools,
                "approval": sub.approval,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _check_cost_budget(self, sub: Submission, parsed: BaseModel) -> None:
        """A ``max_cost_usd`` budget on a model whose price nobody knows could never trip (its calls count $0):
        refuse it before anything runs. The model is the input's ``model`` or ``KEEL_DEFAULT_MODEL``."""
        if sub.budget.get("max_cost_usd") is None:
            return
        chosen = getattr(parsed, "model", None)
        spec = chosen if isinstance(chosen, str) and chosen else self.settings.default_model
        missing = unpriced(spec, self.settings.model_prices)
        if missing:
            raise InputError(
                "max_cost_usd cannot be enforced: no price is known for " + ", ".join(missing),
                detail={
                    "errors": [
                        {
                            "pointer": "/budget/max_cost_usd",
                            "message": f"no price is known for {', '.join(missing)}; set it in KEEL_MODEL_PRICES "
                            "or drop the cost budget",
                        }
                    ]
                },
            )

    def _policy(self, sub: Submission, key: ApiKey) -> dict[str, Any]:
        """What the task may do, fixed at submission: its tool allowlist, the submitting key's scopes, approvals."""
        if sub.tools is not None:
            problems = []
            for i, name in enumerate(sub.tools):
                tool = self.tools.get(name)
                if tool is None:
                    problems.append({"pointer": f"/tools/{i}", "message": f"no tool named {name!r}"})
                elif not permitted(tool, key.scopes):
                    missing = ", ".join(sorted(tool.scopes - key.scopes))
                    problems.append({"pointer": f"/tools/{i}", "message": f"{name} needs the scope(s) {missing}"})
            if problems:
                raise InputError("the tool allowlist names tools this key cannot use", detail={"errors": problems})
        return {"tools": sub.tools, "scopes": sorted(key.scopes), "approval": sub.approval}

    # -- tasks -----------------------------------------------------------------------------------------------------

    async def get(self, tenant: str, task_id: str) -> Task:
        task = await self.stores.tasks.get_task(task_id, tenant)
        if task is None:
            raise NotFound(f"no task {task_id}")
        return task

    async def list_tasks(
        self, tenant: str, *, statuses: Sequence[TaskStatus] = (), limit: int = 50, cursor: str | None = None
    ) -> TaskPage:
        """Newest first; ``next_cursor`` (the last task's id) is set only when more follow."""
        tasks = await self.stores.tasks.list_tasks(tenant, statuses=statuses, limit=limit + 1, before=cursor)
        return TaskPage(tasks=tasks[:limit], next_cursor=tasks[limit - 1].id if len(tasks) > limit else None)

    async def wait(
        self, task: Task, *, wait_s: float, tenant: str | None = None, progress: Progress | None = None
    ) -> Task:
        """The task once it is :func:`settled`, or as it is when ``wait_s`` runs out. ``progress`` hears each
        advance meanwhile. Woken in-process at once; the poll interval catches writers in other processes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        reported = -1.0
        with self.notifier.watch(task.id) as watch:
            woken = watch.woken
            while not settled(task):
                if progress is not None and task.progress > reported:
                    reported = task.progress
                    await progress(task.progress, task.current_step)
                left = deadline - loop.time()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(left, self.settings.poll_interval_s))
                woken.clear()  # before the read: a commit landing during it wakes the next wait
                found = await self.stores.tasks.get_task(task.id, tenant)
                if found is None:  # cannot happen for a task the caller holds; answer with it all the same
                    break
                task = found
        return task

    async def delete(self, tenant: str, task_id: str) -> None:
        """Forget an ended task and what it recorded (its events, steps, state, decisions, effect rows and
        idempotency keys; deliveries it queued still go out). A task that has not ended is refused
        (:class:`~keel.errors.TaskNotFinished`, 409): cancel it first."""
        if not await self.stores.tasks.delete_task(task_id, tenant):
            raise NotFound(f"no task {task_id}")

    async def cancel(self, tenant: str, task_id: str) -> Task:
        """Idempotent. A queued or parked task is cancelled at once (its envelope:
        :func:`~keel.orchestration.engine.runner.cancelled_envelope`); a running one is interrupted and keeps its
        partial result. Returns the task as it is now (not terminal yet when running)."""
        task = await self.stores.tasks.request_cancel(task_id, tenant)
        if task is None:
            raise NotFound(f"no task {task_id}")
        if task.status in (TaskStatus.queued, TaskStatus.waiting_for_approval):
            await self.stores.tasks.finish(None, task.id, TaskStatus.cancelled, cancelled_envelope(task), self.clock())
            self.notifier.notify(task.id)
        elif task.status is TaskStatus.running:
            self.runtime.cancel(task.id)
        return await self.get(tenant, task_id)

    # -- events ----------------------------------------------------------------------------------------------------

    async def has_events(self, tenant: str, task_id: str, after: int = 0) -> bool:
        """Whether a stream of the task's events after sequence number ``after`` has anything to say: False once
        the task is finished and the log holds nothing after ``after``. A cursor the log never issued is refused."""
        task = await self.get(tenant, task_id)
        if after and [e.seq for e in await self.stores.events.read(task_id, after - 1, limit=1)] != [after]:
            # Ids come only from this log, so a cursor it never issued is a client bug; refusing it here keeps the
            # stream loop free of a per-poll "is the cursor past the end?" check.
            raise InputError(f"Last-Event-ID {after} is not an event of task {task_id}")
        return not (task.status.terminal and not await self.stores.events.read(task_id, after, limit=1))

    async def events(self, task_id: str, after: int = 0) -> AsyncIterator[Event]:
        """The task's durable event log after sequence number ``after``, as it grows, up to and including ``end``."""
        async for batch in self.event_batches(task_id, after):
            for ev in batch:
                yield ev

    async def event_batches(self, task_id: str, after: int = 0) -> AsyncIterator[list[Event]]:
        """:meth:`events` as the batches they become available in, so an edge can send each batch at once (one
        socket write for a burst of tokens, not one per token).

        A reader is woken as soon as an event of the task is committed (the notifier: in process, or through Redis
        across replicas), and the events this process committed come with the wake-up; the log is read for the
        rest. The poll is only the safety net for a wake-up that cannot come, so an idle stream polls less and less
        often, up to ``IDLE_POLL_FACTOR`` poll intervals, and back to one as soon as anything arrives: ten thousand
        streams of tasks waiting in the queue must not read the log twenty thousand times a second."""
        cursor = after
        wait = self.settings.poll_interval_s
        with self.notifier.watch(task_id) as watch:
            while True:
                watch.woken.clear()  # before the read: a commit landing during it still wakes the wait below
                # What this process just committed comes with the wake-up; anything else is read from the log.
                batch = watch.take(cursor) or await self.stores.events.read(task_id, cursor)
                if batch:
                    ends = [i for i, ev in enumerate(batch) if ev.type == "end"]
                    batch = batch[: ends[0] + 1] if ends else batch
                    cursor = batch[-1].seq
                    yield batch
                    if ends:
                        return
                    wait = self.settings.poll_interval_s
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watch.woken.wait(), wait)
                wait = min(2 * wait, IDLE_POLL_FACTOR * self.settings.poll_interval_s)

    # -- approvals and effects -------------------------------------------------------------------------------------

    async def decisions(self, tenant: str, task_id: str) -> list[Decision]:
        await self.get(tenant, task_id)
        return await self.stores.decisions.load_decisions(task_id)

    async def decide(
        self,
        key: ApiKey,
        task_id: str,
        call_id: str,
        verdict: Verdict,
        *,
        result: Any = None,
        note: str | None = None,
    ) -> Decision:
        """Answer a parked task's question; once nothing it waits on is undecided it is queued again. The same
        decision again is harmless; a different one is refused."""
        decision = Decision(
            task_id=task_id,
            call_id=call_id,
            kind=DecisionKind.approval,  # the stored kind wins; this carries the answer
            tool="",
            args={},
            step="",
            reason="",
            verdict=verdict,
            result=result,
            note=note,
            decided_by=f"{key.tenant}:{key.id}",
        )
        stored = await self.stores.decisions.decide(task_id, key.tenant, decision, self.clock())
        self.runtime.wake()
        self.notifier.notify(task_id)
        return stored

    async def effects(self, tenant: str, task_id: str) -> list[EffectRecord]:
        await self.get(tenant, task_id)
        return await self.stores.effects.list_effects(task_id)

    async def steps(self, tenant: str, task_id: str) -> list[StepCheckpoint]:
        """The task's recorded steps in call order, with when each finished and how long it took: the timeline a
        trace shows, for a task whose log was written before anyone watched it."""
        await self.get(tenant, task_id)
        return await self.stores.workflows.load_steps(task_id)

    # -- catalog ---------------------------------------------------------------------------------------------------

    def workflows(self) -> list[Workflow[Any]]:
        found = (self.registry.get(name) for name in self.registry.names())
        return [wf for wf in found if wf is not None]

    def tools_for(self, key: ApiKey) -> list[Tool]:
        """The tools this key may use."""
        return [t for t in self.tools if permitted(t, key.scopes)]

    async def model_stats(self, model_id: str | None, *, hours: float) -> list[ModelStats]:
        return await self.stores.stats.model_stats(model_id, self.clock() - hours * 3600)

    @property
    def keys(self) -> Keys:
        return Keys(store=self.stores.keys, clock=self.clock)

    async def slo(self) -> SloReport:
        """Each pinned model's rates over the last ``KEEL_SLO_WINDOW_H``, judged against ``KEEL_SLO`` (also what
        the verdict gauges of ``/metrics`` are read from, at each scrape)."""
        window_s = self.settings.slo_window_h * 3600
        windows = await self.stores.stats.model_window(self.clock() - window_s)
        return SloReport(window_s=window_s, models=[report(w, self.settings.slo) for w in windows])

    async def verify_key(self, token: str) -> ApiKey | None:
        """The key behind ``token``, if it may be used now; read from the store every time (no cache), so a
        revocation or an expiry holds from the next request on, on every replica."""
        return await self.keys.verify(token)

    async def queue_depth(self) -> int:
        """Tasks waiting for a worker, every tenant's (for ``/metrics``)."""
        return await self.stores.tasks.queued_count()

    async def ping(self) -> None:
        """A read that fails when the store is unreachable (``/readyz``)."""
        await self.stores.events.read("readyz", 0, limit=1)

    # -- documents, retrieval, sessions ----------------------------------------------------------------------------

    async def ingest_bytes(
        self, tenant: str, data: bytes, *, source: str, media_type: str | None = None, password: str | None = None
    ) -> Ingested:
        sha = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        known = await self.find_document(tenant, document_id(tenant, sha))
        work = self.memory.ingestor.ingest_bytes(
            tenant, data, source=source, media_type=media_type, password=password, sha256=sha
        )
        doc = await _finish_anyway(work)
        return Ingested(document=doc, fresh=known is None or known.status.value != "ingested")

    async def ingest_url(self, tenant: str, url: str, *, password: str | None = None) -> Ingested:
        doc = await _finish_anyway(self.memory.ingestor.ingest_url(tenant, url, password=password))
        return Ingested(document=doc, fresh=True)

    async def find_document(self, tenant: str, document_id: str) -> DocumentRecord | None:
        """The tenant's document, or None (unknown, expired or deleted)."""
        return await self.memory.documents.get_document(tenant, document_id, self.memory.clock())

    async def document(self, tenant: str, document_id: str) -> DocumentRecord:
        doc = await self.find_document(tenant, document_id)
        if doc is None:
            raise NotFound(f"no document {document_id!r}")
        return doc

    async def documents(self, tenant: str, *, limit: int = 100) -> list[DocumentRecord]:
        return await self.memory.documents.list_documents(tenant, self.memory.clock(), limit=limit)

    async def delete_document(self, tenant: str, document_id: str) -> None:
        """Delete the document and every chunk of it, in every embedding space."""
        if not await self.memory.documents.delete_document(tenant, document_id):
            raise NotFound(f"no document {document_id!r}")

    async def search(self, tenant: str, query: str, *, k: int = 5, documents: Sequence[str] | None = None) -> Retrieval:
        return await self.memory.search(tenant, query, k=k, documents=documents)

    async def spaces(self) -> tuple[str, dict[str, int]]:
        """The embedding space queries use now, and every space (model@version) that holds chunks, with counts."""
        return self.memory.embedder.space.key, await self.memory.vectors.spaces(self.memory.clock())

    async def session(self, tenant: str, session_id: str) -> Session:
        session = await self.memory.sessions.get_session(tenant, session_id, self.memory.clock())
        if session is None:
            raise NotFound(f"no session {session_id!r} (unknown or expired)")
        return session

    async def delete_session(self, tenant: str, session_id: str) -> None:
        if not await self.memory.sessions.delete_session(tenant, session_id):
            raise NotFound(f"no session {session_id!r}")


async def _finish_anyway(work: Awaitable[DocumentRecord]) -> DocumentRecord:
    """Shielded: a caller that hangs up does not abandon a half-ingested document; it finishes, and asking again
    with the same bytes returns it."""
    return await asyncio.shield(asyncio.ensure_future(work))
