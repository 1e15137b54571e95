"""Redis for what several API replicas must share: session memory, and live wake-ups for event streams.

* :class:`RedisSessionStore` is the session tier (:class:`~keel.memory.stores.SessionStore`) with SQLite's
  semantics: tenant-scoped, a sliding TTL, an expired session never read and started afresh by the next write.
  :func:`keel.backends.open_stores` makes it the app's ``sessions`` handle when ``KEEL_REDIS_URL`` is set.
* :class:`RedisRateBuckets` are the request-rate token buckets (:class:`~keel.memory.stores.RateBuckets`) of every
  replica, one Lua script a take: no row lock for a busy tenant, as Postgres's table has.
* :class:`RedisNotifier` is a :class:`~keel.orchestration.engine.runtime.Notifier` whose ``notify`` also reaches the
  other replicas over pub/sub. The durable event log stays the source of truth: a lost message, or Redis being
  down, only means a reader wakes at its poll interval instead of at once.

Keys (``P`` is the prefix; tenant and session id are percent-encoded, so neither can contain ``:``)::

    P:session:TENANT:SID          hash: created_at, updated_at, expires_at, next_seq, context (JSON)
    P:session:TENANT:SID:turns    list of turns (JSON), oldest first
    P:sessions:expiry             sorted set: TENANT:SID scored by expires_at, for sweep_sessions
    P:bucket:NAME                 hash: tokens, at (expires once a bucket left alone would be full again)

Every write is one Lua script, so it is atomic. Redis expires both keys by itself ``ttl`` after the write
(a relative ``PEXPIRE``: never before the stored ``expires_at`` on the writer's clock, whatever the skew between
clocks); reads also check ``expires_at > now``, so a caller's clock (an injected one in tests) is obeyed. The
scripts build key names from the prefix, so this targets a single Redis server (or a primary with replicas),
not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

try:
    import redis.asyncio as aioredis
    from redis.asyncio.client import PubSub
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("Redis support needs the redis driver: pip install 'keel-runtime[redis]'") from exc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential, wait_random

from keel.memory.limits import RateDecision, decision
from keel.memory.types import Session, SessionTurn
from keel.orchestration.engine.runtime import Notifier

__all__ = ["RedisNotifier", "RedisRateBuckets", "RedisSessionStore"]

log = logging.getLogger("keel.redis")

# Make sure a live session exists (an expired one starts afresh), push its expiry, then append turns or set the
# context. KEYS: session hash, turns list, expiry set. ARGV: now, expires_at, ttl in ms, expiry-set member,
# context JSON ('' to leave it), then each turn as a JSON object without its seq (added here, in order).
_WRITE = """
local now = tonumber(ARGV[1])
local exp = redis.call('HGET', KEYS[1], 'expires_at')
if exp and tonumber(exp) <= now then
  exp = false
end
if not exp then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'created_at', ARGV[1], 'context', '{}', 'next_seq', 1)
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1], 'expires_at', ARGV[2])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'context', ARGV[5])
end
if #ARGV > 5 then
  local seq = tonumber(redis.call('HGET', KEYS[1], 'next_seq'))
  for i = 6, #ARGV do
    redis.call('RPUSH', KEYS[2], '{"seq":' .. string.format('%d', seq) .. ',' .. string.sub(ARGV[i], 2))
    seq = seq + 1
  end
  redis.call('HSET', KEYS[1], 'next_seq', seq)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[4])
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# Delete up to ARGV[2] sessions whose expires_at <= ARGV[1]. KEYS: expiry set. ARGV[3]: session key prefix.
# Returns {members looked at, sessions deleted}; a member whose keys Redis already expired is only unlisted.
_SWEEP = """
local now = tonumber(ARGV[1])
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local removed = 0
for _, m in ipairs(members) do
  local key = ARGV[3] .. m
  local exp = redis.call('HGET', key, 'expires_at')
  if exp and tonumber(exp) > now then
    redis.call('ZADD', KEYS[1], exp, m)
  else
    removed = removed + redis.call('EXISTS', key)
    redis.call('DEL', key, key .. ':turns')
    redis.call('ZREM', KEYS[1], m)
  end
end
return {#members, removed}
"""

# KEYS: session hash, turns list, expiry set. ARGV: expiry-set member. Returns 1 when the session existed.
_DELETE = """
redis.call('ZREM', KEYS[3], ARGV[1])
local n = redis.call('EXISTS', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
return n
"""

_SWEEP_BATCH = 500

# keel.memory.limits.take_token, in Lua (the conformance suite holds the two to the same decisions). KEYS: the
# bucket. ARGV: rate per second, size, now. Returns {1 if taken else 0, tokens left} (a string: Redis would
# truncate a Lua number to an integer).
_TAKE = """
local rate = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local tokens = size
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
if held[1] then
  tokens = math.min(size, tonumber(held[1]) + math.max(0, now - tonumber(held[2])) * rate)
end
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
local left = string.format('%.17g', tokens)
redis.call('HSET', KEYS[1], 'tokens', left, 'at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil((size - tokens) / rate * 1000) + 1000)
return {taken, left}
"""


def _num(value: float) -> str:
    return repr(float(value))  # round-trips exactly through Redis strings and Lua numbers


class RedisSessionStore:
    """Session memory in Redis (:class:`~keel.memory.stores.SessionStore`), shared by every replica.

    ``url`` is a ``redis://`` or ``rediss://`` URL; ``prefix`` starts every key, so several deployments (or
    tests) can share one server. At most ``max_connections`` commands are in flight; more wait for a free
    connection (``pool_timeout_s`` at most). Writes are not retried automatically: an append whose reply was
    lost may have run, and running it again would store its turns twice, so the error goes to the caller.
    """

    def __init__(
        self, url: str, *, prefix: str = "keel", max_connections: int = 32, pool_timeout_s: float = 10.0
    ) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout_s,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = aioredis.Redis.from_pool(pool)
        self._prefix = prefix
        self._expiry = f"{prefix}:sessions:expiry"
        self._write = self._redis.register_script(_WRITE)
        self._sweep = self._redis.register_script(_SWEEP)
        self._delete = self._redis.register_script(_DELETE)

    async def aclose(self) -> None:
        await self._redis.aclose()

    def _keys(self, tenant: str, session_id: str) -> tuple[str, str, str]:
        member = f"{quote(tenant, safe='')}:{quote(session_id, safe='')}"
        key = f"{self._prefix}:session:{member}"
        return key, f"{key}:turns", member

    async def _touch(
        self,
        tenant: str,
        session_id: str,
        ttl_s: float,
        now: float,
        *,
        context: dict[str, Any] | None = None,
        turns: Sequence[SessionTurn] = (),
    ) -> Session:
        key, turns_key, member = self._keys(tenant, session_id)
        encoded = [
            json.dumps({"role": t.role, "content": t.content, "at": t.at or now, "metadata": t.metadata}) for t in turns
        ]
        meta, rows = await self._write(
            keys=[key, turns_key, self._expiry],
            args=[
                _num(now),
                _num(now + ttl_s),
                max(1, math.ceil(ttl_s * 1000)),
                member,
                "" if context is None else json.dumps(context),
                *encoded,
            ],
        )
        session = _session(tenant, session_id, dict(zip(meta[::2], meta[1::2], strict=True)), rows)
        assert session is not None
        return session

    async def append_turns(
        self, tenant: str, session_id: str, turns: Sequence[SessionTurn], ttl_s: float, now: float
    ) -> Session:
        return await self._touch(tenant, session_id, ttl_s, now, turns=turns)

    async def set_session_context(
        self, tenant: str, session_id: str, context: dict[str, Any], ttl_s: float, now: float
    ) -> Session:
        return await self._touch(tenant, session_id, ttl_s, now, context=context)

    async def get_session(self, tenant: str, session_id: str, now: float, *, last: int | None = None) -> Session | None:
        key, turns_key, _ = self._keys(tenant, session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(key)
            if last is None or last < 0:
                pipe.lrange(turns_key, 0, -1)
            elif last > 0:
                pipe.lrange(turns_key, -last, -1)  # only the tail crosses the wire
            meta, *rest = await pipe.execute()
        session = _session(tenant, session_id, meta, rest[0] if rest else [])
        return session if session is not None and session.expires_at > now else None

    async def delete_session(self, tenant: str, session_id: str) -> bool:
        key, turns_key, member = self._keys(tenant, session_id)
        return bool(await self._delete(keys=[key, turns_key, self._expiry], args=[member]))

    async def sweep_sessions(self, now: float) -> int:
        """Delete the sessions expired at ``now``; return how many this call deleted (those Redis already
        expired by itself are only unlisted)."""
        removed = 0
        while True:
            seen, gone = await self._sweep(
                keys=[self._expiry], args=[_num(now), _SWEEP_BATCH, f"{self._prefix}:session:"]
            )
            removed += int(gone)
            if int(seen) < _SWEEP_BATCH:
                return removed


def _session(tenant: str, session_id: str, meta: dict[str, str], rows: Sequence[str]) -> Session | None:
    if not meta:
        return None
    turns = []
    for row in rows:
        t = json.loads(row)
        turns.append(
            SessionTurn(role=t["role"], content=t["content"], at=t["at"], seq=t["seq"], metadata=t["metadata"])
        )
    return Session(
        id=session_id,
        tenant=tenant,
        created_at=float(meta["created_at"]),
        updated_at=float(meta["updated_at"]),
        expires_at=float(meta["expires_at"]),
        context=json.loads(meta["context"]),
        turns=turns,
    )


def _log_retry(state: RetryCallState) -> None:
    # The first failure and then one in 20 as a warning: a long outage must not flood the log.
    n = state.attempt_number
    log.log(
        logging.WARNING if n == 1 or n % 20 == 0 else logging.DEBUG,
        "redis notifier: cannot subscribe (attempt %d: %s); retrying in %.2f s",
        n,
        state.outcome.exception() if state.outcome else None,
        state.next_action.sleep if state.next_action else 0.0,
    )


class RedisRateBuckets:
    """Request-rate token buckets in Redis (:class:`~keel.memory.stores.RateBuckets`), shared by every replica.
    ``url`` and ``prefix`` as for :class:`RedisSessionStore`. A take is not retried: its reply lost, it may have
    spent the token, and the request fails rather than spend two."""

    def __init__(
        self, url: str, *, prefix: str = "keel", max_connections: int = 32, pool_timeout_s: float = 10.0
    ) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout_s,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = aioredis.Redis.from_pool(pool)
        self._prefix = prefix
        self._take = self._redis.register_script(_TAKE)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def take_token(self, bucket: str, rate_per_s: float, size: int, now: float) -> RateDecision:
        key = f"{self._prefix}:bucket:{quote(bucket, safe='')}"
        taken, left = await self._take(keys=[key], args=[_num(rate_per_s), size, _num(now)])
        return decision(bool(taken), float(left), rate_per_s, size)


class RedisNotifier(Notifier):
    """A :class:`~keel.orchestration.engine.runtime.Notifier` shared by every replica through Redis pub/sub.

    ``notify`` wakes this process's waiters at once and queues the task id for publishing (it never blocks);
    one subscription per process wakes the waiters of ids published by the other replicas. When Redis is
    unreachable, notifications between replicas are lost (each ``wait`` still returns by its timeout, and
    readers find the events in the durable log at their next poll) and the subscriber reconnects with
    exponential backoff; on reconnecting it wakes every local waiter once, to catch what it missed.

    Call :meth:`start` inside the event loop before serving, and :meth:`stop` at shutdown.

    ``channel`` is shared by the replicas of one deployment; ``max_backoff_s`` caps the wait between attempts to
    subscribe again; a connection that answers nothing for ``3 * health_check_s`` (it is PINGed when idle) is
    dropped and made again; at most ``queue_size`` task ids wait to be published (more are dropped, logged).
    """

    def __init__(
        self,
        url: str,
        *,
        channel: str = "keel:events",
        max_backoff_s: float = 5.0,
        health_check_s: float = 5.0,
        queue_size: int = 10_000,
    ) -> None:
        super().__init__()
        self.channel = channel
        self._url = url
        self._max_backoff_s = max_backoff_s
        self._health_check_s = health_check_s
        self._origin = uuid.uuid4().hex  # our own messages come back to us: skip them, the waiters were woken
        self._queue: asyncio.Queue[str] = asyncio.Queue(queue_size)
        self._publisher = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._dropping = False
        self.connected = asyncio.Event()
        """Set while the subscription is live."""
        self.subscriptions = 0
        """How many times the subscription was made (1 + reconnects)."""

    def notify(self, task_id: str) -> None:
        super().notify(task_id)
        if not self._tasks:
            return  # not started (or stopped): this process's waiters are all there is
        try:
            self._queue.put_nowait(task_id)
        except asyncio.QueueFull:
            if not self._dropping:
                log.warning("redis notifier: publish queue full; dropping wake-ups (readers fall back to polling)")
            self._dropping = True

    async def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._subscribe(), name="keel-redis-subscriber"),
                asyncio.create_task(self._publish(), name="keel-redis-publisher"),
            ]

    async def stop(self, *, drain_s: float = 1.0) -> None:
        """Publish what is queued (for ``drain_s`` at most), then end the subscription and close."""
        tasks, self._tasks = self._tasks, []  # notify() stops queueing
        if tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), drain_s)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._publisher.aclose()

    def _wake_all(self) -> None:
        for task_id in list(self._waiters):
            super().notify(task_id)

    async def _publish(self) -> None:
        failing = False
        while True:
            ids = [await self._queue.get()]
            while not self._queue.empty():
                ids.append(self._queue.get_nowait())
            self._dropping = False
            try:
                async with self._publisher.pipeline(transaction=False) as pipe:
                    for task_id in dict.fromkeys(ids):  # once each, in order
                        pipe.publish(self.channel, f"{self._origin} {task_id}")
                    await pipe.execute()
            except Exception as exc:  # never let the publisher die: notify() would queue into the void
                if not failing:
                    log.warning("redis notifier: cannot publish (%s); other replicas fall back to polling", exc)
                failing = True
            else:
                if failing:
                    log.info("redis notifier: publishing again")
                failing = False
            finally:
                for _ in ids:
                    self._queue.task_done()

    async def _subscribe(self) -> None:
        while True:
            try:
                client, pubsub = await self._connect_with_backoff()
            except Exception:  # not a connection error: a bug or a misconfiguration; keep trying, loudly
                log.exception("redis notifier: cannot subscribe")
                await asyncio.sleep(self._max_backoff_s)
                continue
            try:
                log.info("redis notifier: subscribed to %s", self.channel)
                self.subscriptions += 1
                self.connected.set()
                self._wake_all()
                await self._listen(pubsub)
            except (RedisError, OSError) as exc:
                log.warning("redis notifier: subscription lost (%s); reconnecting", exc)
            except Exception:
                log.exception("redis notifier: subscriber failed; reconnecting")
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # unannotated before redis-py 8.2
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(0.05)  # a connection that drops at once must not spin

    async def _connect_with_backoff(self) -> tuple[aioredis.Redis, PubSub]:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((RedisError, OSError)),
            wait=wait_exponential(multiplier=0.05, max=self._max_backoff_s) + wait_random(0, 0.05),
            before_sleep=_log_retry,
        ):
            with attempt:
                return await self._connect()
        raise AssertionError("unreachable: the retry loop never gives up")

    async def _connect(self) -> tuple[aioredis.Redis, PubSub]:
        # No retries inside the driver: this loop reconnects, so it knows when to wake the waiters.
        client = aioredis.Redis.from_url(
            self._url,
            decode_responses=True,
            socket_connect_timeout=2.0,
            socket_timeout=2 * self._health_check_s + 1.0,
            retry=Retry(NoBackoff(), 0),
        )
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
        except BaseException:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # unannotated before redis-py 8.2
            await client.aclose()
            raise
        return client, pubsub

    async def _listen(self, pubsub: PubSub) -> None:
        # A closed connection fails the read at once; a silent one (a peer gone without a FIN) is found by
        # our PINGs going unanswered.
        loop = asyncio.get_running_loop()
        last_heard = pinged = loop.time()
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(1.0, self._health_check_s))
            now = loop.time()
            if msg is not None:
                last_heard = now
                if msg.get("type") == "message":
                    origin, _, task_id = str(msg["data"]).partition(" ")
                    if origin != self._origin and task_id:
                        super().notify(task_id)
            elif now - last_heard > 3 * self._health_check_s:
                raise RedisConnectionError(f"no reply from Redis in {now - last_heard:.1f} s")
            if now - max(last_heard, pinged) >= self._health_check_s:
                pinged = now
                await pubsub.ping()
