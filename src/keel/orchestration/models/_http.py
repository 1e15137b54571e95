"""Shared HTTP plumbing for the provider adapters: one place that turns HTTP and transport failures into keel's
errors (as httpx's ``map_httpcore_exceptions`` and pydantic-ai's ``_map_api_errors`` do)."""

from __future__ import annotations

import contextlib
import email.utils
import json
import time

import httpx

from keel.errors import ModelHTTPError
from keel.orchestration.models.base import ModelResponse
from keel.orchestration.models.catalog import ModelInfo


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


def stamp(
    resp: ModelResponse, *, provider: str, model: str, adapter_version: str, info: ModelInfo, started: float
) -> ModelResponse:
    """What every response records for the envelope: provider, the model asked for and the one that answered
    (the provider's id, else the name asked for), adapter version, latency and cost at the model's price."""
    resp.provider = provider
    resp.requested_model = model
    resp.adapter_version = adapter_version
    resp.latency_ms = round((time.perf_counter() - started) * 1000, 3)
    resp.model_id = resp.model_id or model
    resp.cost_usd = info.cost(resp.input_tokens, resp.output_tokens)
    return resp
