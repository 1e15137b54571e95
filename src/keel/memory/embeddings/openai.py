"""The OpenAI ``/embeddings`` API over httpx: ``openai:<model>`` and ``openai-compatible:<base_url>#<model>`` (vLLM,
Ollama, the llama.cpp server, LM Studio, ...).

Texts go in batches of ``batch_size`` (default 64), one request at a time. Each request is retried, with exponential
backoff plus jitter, on 408, 429 (waiting at least what ``Retry-After`` asks), 5xx, timeouts and transport errors;
other 4xx fail at once. HTTP and transport failures are mapped to keel's errors in one place, :meth:`_send`:
an HTTP error becomes :class:`~keel.errors.ModelHTTPError`, a timeout or broken connection an
:class:`~keel.errors.UpstreamError` without a status code.

**The space's version is the user's responsibility.** Providers do not expose weight versions, so
``EmbeddingSpace.version`` is the ``version`` option (default ``"1"``; ``+dim<n>`` is appended when ``dimensions`` is
given, since a shortened vector is a different space). If the provider changes the model behind a name, bump
``version``: stored vectors of the old key are then re-embedded instead of being compared with new ones.

**token_spans is an approximation.** Without the provider's tokenizer offline, tokens are approximated by a regex:
runs of up to 3 digits (as cl100k/o200k split numbers), runs of up to 6 letters, and every other non-space
character alone. That counts at least as many tokens as a BPE tokenizer on ordinary English prose (so chunks sized
from it stay under ``max_tokens``), but it is not exact: leave a margin when the limit matters.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import numpy as np
import tenacity

from keel.errors import ConfigError, ModelHTTPError, UpstreamError
from keel.headers import error_message, retry_after
from keel.memory.embeddings import EmbeddingSpace
from keel.providers import OPENAI_BASE_URL

__all__ = ["OpenAIEmbedder"]

ADAPTER_VERSION = "keel-openai-embeddings/1"

#: Native dimensions of OpenAI's embedding models, so ``space.dim`` is known before the first request.
KNOWN_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}

_TOKEN = re.compile(r"\d{1,3}|[^\W\d_]{1,6}|\S")
_RETRY_4XX = frozenset({408, 429})


class OpenAIEmbedder:
    """An OpenAI-style ``POST {base_url}/embeddings`` endpoint. Satisfies :class:`~keel.memory.embeddings.Embedder`."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str = OPENAI_BASE_URL,
        api_key: str | None = None,
        provider: str = "openai",
        version: str = "1",
        dimensions: int | None = None,
        batch_size: int = 64,
        max_tokens: int = 8191,
        timeout_s: float = 60.0,
        max_attempts: int = 5,
        initial_backoff: float = 0.5,
        max_backoff: float = 20.0,
        jitter: float = 0.25,
        max_retry_after: float = 60.0,
        space_model: str | None = None,
        client: httpx.AsyncClient | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        """
        ``model``: the provider's model name. ``base_url``: up to and including ``/v1``. ``api_key``: sent as a
        bearer token when set. ``provider``: ``"openai"`` or ``"openai-compatible"`` (names the space and errors).
        ``version``: the space version (see the module docstring). ``dimensions``: asked of the provider (models
        that support shortening) and fixes ``space.dim``; otherwise ``space.dim`` is the model's known size, or 0
        until the first answer. ``batch_size``: texts per request. ``max_tokens``: the model's input limit.
        ``timeout_s``: per request. ``max_attempts``: tries per batch, the first included. ``initial_backoff``,
        ``max_backoff``, ``jitter``: seconds of exponential backoff (doubling, capped) plus up to ``jitter`` random
        seconds. ``max_retry_after``: a ``Retry-After`` asking for longer than this fails at once instead.
        ``space_model``: overrides the space's model name (``<provider>:<model>``, whatever the host).
        ``client``: an httpx client to use (the caller closes it). ``sleep``: the async sleep between tries.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {max_attempts}")
        if dimensions is not None and dimensions < 1:
            raise ConfigError(f"dimensions must be positive, got {dimensions}")
        self.model = model
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        # The model and its version name the space, not the host: a server that moves (or OPENAI_BASE_URL pointed
        # at a proxy) serves the same vectors, so what was stored stays in reach.
        name = f"{provider}:{model}"
        dim = dimensions or (KNOWN_DIMS.get(model, 0) if provider == "openai" else 0)
        self.space = EmbeddingSpace(
            model=space_model or name,
            version=f"{version}+dim{dimensions}" if dimensions else version,
            dim=dim,
        )
        self.max_tokens = max_tokens
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.jitter = jitter
        self.max_retry_after = max_retry_after
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0))
        self._sleep = sleep
        self.requests_sent = 0
        """HTTP requests sent, retries included."""
        self.texts_embedded = 0
        """Texts embedded successfully."""
        self.tokens_used = 0
        """Input tokens the provider reported (``usage.total_tokens``)."""

    # -- the seam ------------------------------------------------------------------------------------------------

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Approximate token spans (see the module docstring): never fewer than a BPE tokenizer on prose."""
        return [m.span() for m in _TOKEN.finditer(text)]

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        parts = [
            await self._embed_batch(texts[start : start + self.batch_size])
            for start in range(0, len(texts), self.batch_size)
        ]
        if not parts:
            return np.zeros((0, self.space.dim), dtype=np.float32)
        return np.concatenate(parts)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # -- retries -------------------------------------------------------------------------------------------------

    async def _embed_batch(self, batch: list[str]) -> np.ndarray:
        kwargs: dict[str, Any] = {"sleep": self._sleep} if self._sleep is not None else {}
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception(self._retryable),
            reraise=True,
            **kwargs,
        )
        async for attempt in retrying:
            with attempt:
                vectors = await self._send(batch)
        self.texts_embedded += len(batch)
        return vectors

    def _retryable(self, exc: BaseException) -> bool:
        if not isinstance(exc, UpstreamError):
            return False
        code = exc.status_code
        if code is not None and code < 500 and code not in _RETRY_4XX:
            return False
        return exc.retry_after is None or exc.retry_after <= self.max_retry_after

    def _wait(self, state: tenacity.RetryCallState) -> float:
        backoff = min(self.initial_backoff * 2.0 ** (state.attempt_number - 1), self.max_backoff)
        backoff += random.uniform(0, self.jitter) if self.jitter > 0 else 0.0
        exc = state.outcome.exception() if state.outcome is not None else None
        asked: float | None = exc.retry_after if isinstance(exc, UpstreamError) else None
        return max(asked, backoff) if asked is not None else backoff

    # -- the wire: the one place errors are mapped ------------------------------------------------------------------

    async def _send(self, batch: list[str]) -> np.ndarray:
        # The API rejects empty strings; a space embeds as "nothing" the same way on every provider we know.
        body: dict[str, Any] = {"model": self.model, "input": [t if t else " " for t in batch]}
        if self.dimensions is not None:
            body["dimensions"] = self.dimensions
        self.requests_sent += 1
        try:
            response = await self._client.post(f"{self.base_url}/embeddings", json=body, headers=self._headers)
            raw = await response.aread()
        except httpx.TimeoutException as exc:
            raise UpstreamError(f"{self.provider} embeddings request timed out: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise UpstreamError(f"{self.provider} embeddings request failed: {type(exc).__name__}: {exc}") from exc
        text = raw.decode(errors="replace")
        if response.status_code >= 400:
            raise ModelHTTPError(
                self.provider,
                response.status_code,
                text,
                retry_after=retry_after(response.headers),
                message=error_message(text),
            )
        try:
            return self._vectors(json.loads(text), len(batch))
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(
                f"{self.provider} returned an unusable embeddings body: {exc}", status_code=response.status_code
            ) from exc

    def _vectors(self, data: dict[str, Any], expected: int) -> np.ndarray:
        items = sorted(data["data"], key=lambda item: int(item["index"]))
        if [int(item["index"]) for item in items] != list(range(expected)):
            raise ValueError(f"expected indexes 0..{expected - 1}, got {len(items)} items")
        rows = [_decode(item["embedding"]) for item in items]
        vectors = np.stack(rows).astype(np.float32, copy=False)
        dim = vectors.shape[1]
        if self.space.dim == 0:
            self.space = dataclasses.replace(self.space, dim=dim)
        elif dim != self.space.dim:
            raise ValueError(f"vectors of {dim} dimensions, expected {self.space.dim}")
        usage = data.get("usage") or {}
        self.tokens_used += int(usage.get("total_tokens") or usage.get("prompt_tokens") or 0)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit: np.ndarray = vectors / np.maximum(norms, 1e-12)
        return unit


def _decode(embedding: Any) -> np.ndarray:
    if isinstance(embedding, str):  # encoding_format="base64": little-endian float32
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    if not isinstance(embedding, list) or not embedding:
        raise TypeError("an embedding is neither a list of floats nor base64")
    return np.asarray(embedding, dtype=np.float32)
