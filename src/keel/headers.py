"""HTTP header and error-body parsing shared by every outbound client (model adapters, embeddings, fetch_url,
webhook delivery): one reading of ``Retry-After`` and of a provider's error body, not one per client."""

from __future__ import annotations

import contextlib
import email.utils
import json
import time
from collections.abc import Mapping
from datetime import UTC


def retry_after_seconds(value: str | None, now: float, *, fractional: bool = False) -> float | None:
    """``Retry-After`` as seconds from ``now``: delta-seconds (digits only, as RFC 9110 §10.2.3 says, so "-5" and
    "1.5" are garbage; ``fractional`` accepts "1.5", which model providers' rate limiters send), or an HTTP date.
    None when it is missing or unreadable; never negative."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    if fractional and value.isascii() and value.replace(".", "", 1).isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # HTTP dates are always GMT (RFC 9110 §5.6.7)
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - now)
    return None


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds a server asks to wait: OpenAI's ``retry-after-ms`` when present, else ``Retry-After`` (fractional
    seconds accepted)."""
    with contextlib.suppress(TypeError, ValueError):
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(float(ms) / 1000, 0.0)
    return retry_after_seconds(headers.get("retry-after"), time.time() if now is None else now, fractional=True)


def error_message(body: str) -> str:
    """The human message in a provider's error body: OpenAI's ``{"error": {"message"}}``, Ollama's and llama.cpp's
    ``{"error": "..."}``, else the body's start."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300]
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"])
    if isinstance(err, str):
        return err
    return body[:300]
