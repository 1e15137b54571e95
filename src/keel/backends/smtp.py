"""The SMTP driver for the email outbox (aiosmtplib): one message, one connection, nothing blocks the loop."""

from __future__ import annotations

from email.message import EmailMessage as MimeMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib

from keel.errors import ConfigError, UpstreamError
from keel.memory.types import EmailMessage


class SmtpSender:
    """Sends through ``smtp://[user:pass@]host[:port]`` (STARTTLS when offered) or ``smtps://`` (implicit TLS)."""

    def __init__(self, url: str, *, sender: str, timeout_s: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ConfigError(f"KEEL_SMTP_URL must look like smtp://host:port or smtps://host, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (465 if parts.scheme == "smtps" else 25)
        self.tls = parts.scheme == "smtps"
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.sender = sender
        self.timeout_s = timeout_s

    async def send(self, message: EmailMessage) -> None:
        mime = MimeMessage()
        mime["From"] = self.sender
        mime["To"] = ", ".join(message.to)
        mime["Subject"] = message.subject
        # The idempotency key makes the Message-ID: a relay retry after a lost reply is recognisable downstream.
        mime["Message-ID"] = message.message_id
        mime.set_content(message.body)
        try:
            await aiosmtplib.send(
                mime,
                hostname=self.host,
                port=self.port,
                use_tls=self.tls,
                start_tls=None if not self.tls else False,
                username=self.username,
                password=self.password,
                timeout=self.timeout_s,
            )
        except aiosmtplib.SMTPResponseException as exc:
            raise UpstreamError(f"SMTP {exc.code}: {exc.message}", status_code=exc.code) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise UpstreamError(f"SMTP delivery failed: {exc}") from exc
