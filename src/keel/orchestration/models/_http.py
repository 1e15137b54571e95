"""Shared HTTP plumbing for the provider adapters: one place that turns HTTP and transport failures into keel's
errors (as httpx's ``map_httpcore_exceptions`` and pydantic-ai's ``_map_api_errors`` do)."""

from __future__ import annotations

import contextlib
import email.utils
import json
import time

import httpx

from keel.errors import ModelHTTPError


def retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(when.timestamp() - time.time(), 0.0)
    return None


def error_message(body: str) -> str:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body[:300]
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"])
    return body[:300]


async def raise_for_status(provider: str, response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    body = (await response.aread()).decode(errors="replace")
    raise ModelHTTPError(
        provider,
        response.status_code,
        body,
        retry_after=retry_after(response.headers),
        message=error_message(body),
    )


def estimate_tokens(text: str) -> int:
    """Without the provider's tokenizer at hand (offline), about 4 characters a token for English text."""
    return max(1, (len(text) + 3) // 4) if text else 0
