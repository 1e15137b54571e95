"""``send_email``: a real write tool. Its effect is one row in the email outbox, keyed by the call's idempotency
key, so the same call can never queue two messages; a relay sends queued messages through SMTP when
``KEEL_SMTP_URL`` is set (and keeps them queued, visible, when it is not)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, EmailStr, Field

from keel.errors import ConfigError, UpstreamError
from keel.memory.stores import EmailOutbox
from keel.memory.types import EmailMessage
from keel.orchestration.tools import Reconciled, Tool, ToolContext

log = logging.getLogger("keel.email")


class SendEmailArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: list[EmailStr] = Field(min_length=1, max_length=20, description="Recipients.")
    subject: str = Field(min_length=1, max_length=300)
    body: str = Field(min_length=1, max_length=100_000, description="Plain text.")


def _outbox(tc: ToolContext) -> EmailOutbox:
    store = getattr(tc.services, "store", None)
    if store is None:
        raise ConfigError("send_email needs the store (Services.store)")
    return store  # type: ignore[no-any-return]


async def send_email(args: SendEmailArgs, tc: ToolContext) -> dict[str, Any]:
    """Send an email (queued in keel's outbox, then delivered by SMTP)."""
    if tc.idempotency_key is None:
        raise ConfigError("send_email is a write tool: call it through ctx.tool so it gets an idempotency key")
    message = EmailMessage(
        key=tc.idempotency_key,
        tenant=tc.tenant,
        task_id=tc.task_id,
        to=[str(a) for a in args.to],
        subject=args.subject,
        body=args.body,
    )
    stored, _ = await _outbox(tc).enqueue_email(message, time.time())
    return _receipt(stored)


async def reconcile_email(key: str, tc: ToolContext) -> Reconciled:
    """The outbox row is the effect: present means it happened."""
    stored = await _outbox(tc).get_email(key)
    return Reconciled(applied=stored is not None, result=_receipt(stored) if stored else None)


def _receipt(message: EmailMessage) -> dict[str, Any]:
    return {"queued": True, "message_id": message.message_id, "to": message.to, "subject": message.subject}


SEND_EMAIL = Tool(
    name="send_email",
    description="Send a plain-text email. A write: it needs approval once the task has read untrusted content.",
    fn=send_email,
    input_model=SendEmailArgs,
    effect="write",
    scopes=frozenset({"tools:email"}),
    reconcile=reconcile_email,
    source="builtin",
)


class Sender(Protocol):
    async def send(self, message: EmailMessage) -> None: ...


class EmailRelay:
    """Delivers queued messages: at-least-once towards SMTP, with backoff; the Message-ID makes retries
    recognisable. Without a sender the messages stay queued (and visible in the outbox)."""

    def __init__(
        self,
        outbox: EmailOutbox,
        sender: Sender | None,
        *,
        max_attempts: int = 8,
        poll_s: float = 1.0,
        backoff_base_s: float = 2.0,
    ) -> None:
        self.outbox = outbox
        self.sender = sender
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.backoff_base_s = backoff_base_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.sender is not None:
            self._task = asyncio.create_task(self._loop(), name="keel-email-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("email relay pass failed")
            await asyncio.sleep(self.poll_s)

    async def run_once(self) -> int:
        assert self.sender is not None
        sent = 0
        for msg in await self.outbox.due_emails(time.time(), 20, claim_s=120.0):  # one relay sends each at a time
            try:
                await self.sender.send(msg)
            except UpstreamError as exc:
                permanent = exc.status_code is not None and exc.status_code >= 500  # SMTP 5xx: permanent
                give_up = permanent or msg.attempts + 1 >= self.max_attempts
                delay = self.backoff_base_s * 2**msg.attempts * (1 + random.random() / 4)
                await self.outbox.email_retry(msg.key, time.time() + delay, exc.message, give_up=give_up)
                continue
            await self.outbox.email_sent(msg.key, time.time())
            sent += 1
        return sent
