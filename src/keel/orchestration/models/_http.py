"""Shared HTTP plumbing for the provider adapters: one place that turns HTTP and transport failures into keel's
errors (as httpx's ``map_httpcore_exceptions`` and pydantic-ai's ``_map_api_errors`` do)."""

from __future__ import annotations

import time

import httpx

from keel.errors import ModelHTTPError
from keel.headers import error_message, retry_after
from keel.orchestration.models.base import ModelResponse
from keel.orchestration.models.catalog import ModelInfo


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
