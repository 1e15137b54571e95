"""Shared HTTP plumbing for the provider adapters: one place that posts a call, reads its answer or its server-sent
events, and turns HTTP and transport failures into keel's errors (as httpx's ``map_httpcore_exceptions`` and
pydantic-ai's ``_map_api_errors`` do). An adapter keeps only its wire mapping and its authentication."""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import httpx
from httpx_sse import EventSource

from keel.errors import ModelHTTPError, StreamCut
from keel.headers import error_message, retry_after
from keel.orchestration.llm.models.base import (
    FinishEvent,
    ModelCall,
    ModelResponse,
    ResponseBuilder,
    StreamEvent,
    StreamingAdapter,
)
from keel.orchestration.llm.models.catalog import ModelInfo, price


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


class EventDecoder(ABC):
    """A provider's server-sent events, folded into keel's stream events as they arrive."""

    unfinished: ClassVar[str]
    """What a stream that ends before :attr:`done` lacks, for the :class:`StreamCut`."""

    def __init__(self) -> None:
        self.built = ResponseBuilder()
        """Every event so far (the partial text a :class:`StreamCut` carries)."""
        self.done = False
        """The provider said the stream is over: read no further."""

    def feed(self, kind: str, data: str) -> list[StreamEvent]:
        """The events one server-sent event carries, to pass on at once (the finish is held for :meth:`finish`)."""
        events = self.decode(kind, data)
        for event in events:
            self.built.add(event)
        return [e for e in events if not isinstance(e, FinishEvent)]

    @abstractmethod
    def decode(self, kind: str, data: str) -> list[StreamEvent]: ...

    @abstractmethod
    def finish(self) -> FinishEvent | None:
        """The last event once the stream is complete; None when it is not."""


class HTTPAdapter(StreamingAdapter):
    """An adapter over a provider's JSON API: it posts :meth:`body` to :attr:`endpoint`, non-streamed or streamed,
    and reads the answer with :meth:`parse` or the events with :meth:`decoder`."""

    endpoint: ClassVar[str]
    """The path under ``base_url`` that takes a call."""
    answer_kind: ClassVar[str]
    """What the API calls its answer (``completion``), for the error an unreadable one raises."""
    default_base_url: ClassVar[str]

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        provider: str | None = None,
        info: ModelInfo | None = None,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.model = model
        self.provider = provider or self.provider
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.name = self.spec()
        self.info = info or price(self.provider, model, base_url=self.base_url)
        self.context_window = self.info.context_window
        self._headers = self.auth_headers(api_key)
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0))

    def spec(self) -> str:
        """The spec ``infer_model`` builds this adapter from (its :attr:`name`)."""
        return f"{self.provider}:{self.model}"

    @abstractmethod
    def auth_headers(self, api_key: str | None) -> dict[str, str]: ...

    @abstractmethod
    def body(self, call: ModelCall, *, stream: bool) -> dict[str, Any]: ...

    @abstractmethod
    def parse(self, data: Any) -> ModelResponse:
        """The response a non-streamed answer holds; a ``KeyError``, ``IndexError`` or ``TypeError`` means the body
        is not the API's shape."""

    @abstractmethod
    def decoder(self) -> EventDecoder: ...

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return self.info.cost(input_tokens, output_tokens)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def answer(self, call: ModelCall) -> ModelResponse:
        started = time.perf_counter()
        url, body = f"{self.base_url}{self.endpoint}", self.body(call, stream=False)
        try:
            response = await self._client.post(url, json=body, headers=self._headers)
        except httpx.RemoteProtocolError as exc:  # the body broke off mid-way
            raise StreamCut(self.provider, "", f"{type(exc).__name__}: {exc}") from exc
        await raise_for_status(self.provider, response)
        try:
            resp = self.parse(response.json())
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise StreamCut(self.provider, response.text[:200], f"unreadable {self.answer_kind} body: {exc}") from exc
        return self.complete(resp, started)

    async def events(self, call: ModelCall) -> AsyncIterator[StreamEvent]:
        url, body = f"{self.base_url}{self.endpoint}", self.body(call, stream=True)
        decoder = self.decoder()
        async with self._client.stream("POST", url, json=body, headers=self._headers) as response:
            await raise_for_status(self.provider, response)
            try:
                async for sse in EventSource(response).aiter_sse():
                    for event in decoder.feed(sse.event, sse.data):
                        yield event
                    if decoder.done:
                        break
            except (httpx.TransportError, json.JSONDecodeError) as exc:
                raise StreamCut(self.provider, decoder.built.partial_text, f"{type(exc).__name__}: {exc}") from exc
            finish = decoder.finish()
            if finish is None:
                raise StreamCut(self.provider, decoder.built.partial_text, decoder.unfinished)
        yield finish
