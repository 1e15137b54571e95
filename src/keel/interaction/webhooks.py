"""Webhook delivery from the durable outbox, following the Standard Webhooks spec.

``webhook-id`` is the outbox message id (stable across retries); ``webhook-timestamp`` is set per attempt;
``webhook-signature`` is ``v1,`` + base64 HMAC-SHA256, computed by the ``standardwebhooks`` library.
A 410 disables the endpoint; after ``max_attempts`` a message goes to the dead-letter list.

Each endpoint (tenant and URL) is delivered to on its own: at most ``per_endpoint`` requests at once (default one,
in order), at most ``concurrency`` requests in all. Nothing waits for a batch, so one slow receiver delays only
its own messages, and a 410 stops every message to its endpoint that has not been sent yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from keel import observability
from keel.errors import BlockedAddress
from keel.headers import retry_after_seconds
from keel.memory.stores import Outbox
from keel.memory.types import OutboxMessage
from keel.netguard import AllowList, guarded_request

log = logging.getLogger("keel.webhooks")


def sign(msg: OutboxMessage, body: str, timestamp: datetime, secret: str | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt, signed with ``secret`` (default: the message's own)."""
    signature = Webhook(secret if secret is not None else msg.secret).sign(msg.id, timestamp, body)
    return {
        "webhook-id": msg.id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": "keel-webhooks/0.1",
    }


@dataclass(slots=True)
class _Endpoint:
    """One receiver's messages claimed and not yet sent, and the lanes sending them."""

    waiting: deque[tuple[OutboxMessage, float]] = field(default_factory=deque)
    lanes: set[asyncio.Task[None]] = field(default_factory=set)


class WebhookDispatcher:
    def __init__(
        self,
        outbox: Outbox,
        *,
        allow: AllowList,
        max_attempts: int = 8,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 3600.0,
        timeout_s: float = 10.0,
        poll_s: float = 0.5,
        concurrency: int = 32,
        per_endpoint: int = 1,
        clock: Callable[[], float] = time.time,
        open_secret: Callable[[str], str] | None = None,
    ) -> None:
        """``open_secret`` turns a stored secret into the signing key (:meth:`keel.secretbox.SecretBox.open`; the
        app always passes it); None for an outbox that holds plain secrets (unit tests)."""
        self.outbox = outbox
        self.open_secret = open_secret
        self.allow = allow
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.poll_s = poll_s
        self.clock = clock
        self.timeout_s = timeout_s
        self.per_endpoint = per_endpoint
        self.claim_s = timeout_s * 2 + 5
        """How long a claimed message is ours: another dispatcher skips it meanwhile (see ``Outbox.due``)."""
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=min(concurrency, 20))
        self._client = httpx.AsyncClient(timeout=timeout_s, trust_env=False, limits=limits)
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._endpoints: dict[tuple[str, str], _Endpoint] = {}
        self._disabled: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="keel-webhooks")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        lanes = [lane for endpoint in self._endpoints.values() for lane in endpoint.lanes]
        for task in [self._loop, *lanes]:
            if task is not None:
                task.cancel()
        for task in [self._loop, *lanes]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            claimed = 0
            try:
                claimed = await self.claim_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook dispatch loop error")
            if not claimed:  # a full claim may have more behind it: claim again at once
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)

    async def claim_once(self) -> int:
        """Claim due messages and hand each to its endpoint's lanes, without waiting for any delivery. An endpoint
        takes at most ``2 * per_endpoint`` messages waiting; the rest of its messages are left to their claim
        running out (due again in ``claim_s``), which also moves them behind other endpoints' messages: a
        backlog at one receiver cannot hold up the others. Returns how many were claimed."""
        now = self.clock()
        batch = await self.outbox.due(now, self._concurrency * 2, claim_s=self.claim_s)
        for msg in batch:
            endpoint_key = (msg.tenant, msg.url)
            if endpoint_key in self._disabled:
                continue
            endpoint = self._endpoints.get(endpoint_key)
            if endpoint is None:
                endpoint = self._endpoints[endpoint_key] = _Endpoint()
            if len(endpoint.waiting) >= 2 * self.per_endpoint:
                continue
            endpoint.waiting.append((msg, now + self.claim_s))
            endpoint.lanes = {lane for lane in endpoint.lanes if not lane.done()}
            while len(endpoint.lanes) < min(self.per_endpoint, len(endpoint.waiting)):
                endpoint.lanes.add(asyncio.create_task(self._lane(endpoint_key, endpoint), name="keel-webhook"))
        return len(batch) if len(batch) >= self._concurrency * 2 else 0

    async def _lane(self, endpoint_key: tuple[str, str], endpoint: _Endpoint) -> None:
        """Deliver the endpoint's waiting messages, one at a time, until none is left."""
        try:
            while endpoint.waiting:
                msg, claimed_until = endpoint.waiting.popleft()
                async with self._slots:
                    if endpoint_key in self._disabled:
                        continue  # a 410 disabled it (and every pending message to it) meanwhile
                    if self.clock() + self.timeout_s >= claimed_until:
                        continue  # the claim would run out mid-delivery: leave it to be claimed again
                    await self._deliver_once(msg)
        finally:
            current = asyncio.current_task()
            if current is not None:
                endpoint.lanes.discard(current)
            if not endpoint.lanes and not endpoint.waiting and self._endpoints.get(endpoint_key) is endpoint:
                del self._endpoints[endpoint_key]

    async def _deliver_once(self, msg: OutboxMessage) -> None:
        try:
            await self.deliver(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Never leave a message pinned: an unexpected error still counts as an attempt.
            log.error("webhook %s delivery raised %r", msg.id, exc)
            with contextlib.suppress(Exception):
                await self._retry(msg, msg.attempts + 1, f"internal error: {exc!r}", None)

    def backoff(self, attempt: int) -> float:
        # Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2^attempt)], never below base/2.
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return max(self.backoff_base_s / 2, random.uniform(0, ceiling))

    async def deliver(self, msg: OutboxMessage) -> None:
        body = json.dumps(msg.payload, separators=(",", ":"))
        attempt = msg.attempts + 1
        now = self.clock()
        try:
            response = await guarded_request(
                self._client,
                "POST",
                msg.url,
                allow=self.allow,
                max_redirects=0,
                content=body.encode(),
                headers=sign(
                    msg,
                    body,
                    datetime.fromtimestamp(now, UTC),
                    self.open_secret(msg.secret) if self.open_secret else None,
                )
                | observability.current().webhook_headers(msg),
            )
        except BlockedAddress as exc:
            if "redirect" in exc.message:
                await self.outbox.dead(msg.id, "the receiver answered with a redirect; webhooks do not follow them")
            else:
                await self.outbox.dead(msg.id, f"refused by SSRF rules: {exc.message}")
            return
        except httpx.HTTPError as exc:
            await self._retry(msg, attempt, f"{type(exc).__name__}: {exc}", None)
            return
        if 200 <= response.status_code < 300:
            observability.current().webhook_delivered("delivered")
            await self.outbox.delivered(msg.id, self.clock())
        elif response.status_code == 410:
            observability.current().webhook_delivered("disabled")
            self._disabled.add((msg.tenant, msg.url))
            await self.outbox.disable_endpoint(msg.tenant, msg.url, self.clock())
        else:
            hint = retry_after_seconds(response.headers.get("retry-after"), self.clock())
            await self._retry(msg, attempt, f"HTTP {response.status_code}", hint)

    async def _retry(self, msg: OutboxMessage, attempt: int, error: str, retry_after: float | None) -> None:
        observability.current().webhook_delivered("dead" if attempt >= self.max_attempts else "retry")
        if attempt >= self.max_attempts:
            log.warning("webhook %s dead-lettered after %d attempts: %s", msg.id, attempt, error)
            await self.outbox.dead(msg.id, error)
            return
        delay = self.backoff(attempt)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        await self.outbox.retry_at(msg.id, self.clock() + delay, error)
