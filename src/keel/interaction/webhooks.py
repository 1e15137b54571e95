"""Webhook delivery from the durable outbox, following the Standard Webhooks spec.

``webhook-id`` is the outbox message id (stable across retries); ``webhook-timestamp`` is set per attempt;
``webhook-signature`` is ``v1,`` + base64 HMAC-SHA256, computed by the ``standardwebhooks`` library.
A 410 disables the endpoint; after ``max_attempts`` a message goes to the dead-letter list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
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
        self._client = httpx.AsyncClient(timeout=timeout_s, trust_env=False)
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="keel-webhooks")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            try:
                # Claimed for longer than a delivery can take: another worker's dispatcher skips them meanwhile.
                batch = await self.outbox.due(self.clock(), 20, claim_s=self.timeout_s * 2 + 5)
                outcomes = await asyncio.gather(*(self.deliver(m) for m in batch), return_exceptions=True)
                for msg, outcome in zip(batch, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        # Never leave a message pinned: an unexpected error still counts as an attempt.
                        log.error("webhook %s delivery raised %r", msg.id, outcome)
                        await self._retry(msg, msg.attempts + 1, f"internal error: {outcome!r}", None)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook dispatch loop error")
                batch = []
            if not batch:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)

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
