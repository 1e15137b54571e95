"""OpenAI Chat Completions over httpx: ``openai:<model>`` and ``openai-compatible:<base_url>#<model>`` (vLLM,
Ollama, the llama.cpp server, LM Studio). Wire mapping lives here; authentication is a header set at
construction; HTTP and transport errors are mapped once, in ``_http``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from httpx_sse import EventSource

from keel.errors import StreamCut
from keel.orchestration.models._http import estimate_tokens, raise_for_status, stamp
from keel.orchestration.models.base import (
    FinishEvent,
    FinishReason,
    Message,
    ModelResponse,
    ModelSettings,
    RefusalDelta,
    ResponseBuilder,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    UsageEvent,
)
from keel.orchestration.models.catalog import ModelInfo, lookup

ADAPTER_VERSION = "keel-openai/1"

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


class OpenAIModel:
    """An OpenAI-style chat completions endpoint."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        provider: str = "openai",
        info: ModelInfo | None = None,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.model = model
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self.name = f"openai:{model}" if provider == "openai" else f"openai-compatible:{self.base_url}#{model}"
        self.info = info or lookup(model)
        self.context_window = self.info.context_window
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0))
        self._headers = headers

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- wire mapping ------------------------------------------------------------------------------------------

    def _body(
        self,
        messages: list[Message],
        tools: Sequence[ToolSpec],
        output_schema: dict[str, Any] | None,
        settings: ModelSettings | None,
        stream: bool,
    ) -> dict[str, Any]:
        s = settings or ModelSettings()
        body: dict[str, Any] = {"model": self.model, "messages": [_message(m) for m in messages]}
        if s.max_tokens is not None:
            # OpenAI itself now wants max_completion_tokens; compatible servers still read max_tokens.
            body["max_completion_tokens" if self.provider == "openai" else "max_tokens"] = s.max_tokens
        for key in ("temperature", "top_p", "seed"):
            if getattr(s, key) is not None:
                body[key] = getattr(s, key)
        if s.stop:
            body["stop"] = list(s.stop)
        if tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
                }
                for t in tools
            ]
        if output_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": output_schema, "strict": False},
            }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(s.extra)
        return body

    def complete(self, resp: ModelResponse, started: float) -> ModelResponse:
        """Stamp a response with what the envelope records: provider, models, adapter, latency, cost."""
        if resp.refusal:
            resp.finish_reason = "refusal"
        return stamp(
            resp,
            provider=self.provider,
            model=self.model,
            adapter_version=ADAPTER_VERSION,
            info=self.info,
            started=started,
        )

    # -- the seam ----------------------------------------------------------------------------------------------

    async def request(
        self,
        messages: list[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        output_schema: dict[str, Any] | None = None,
        settings: ModelSettings | None = None,
    ) -> ModelResponse:
        started = time.perf_counter()
        body = self._body(messages, tools, output_schema, settings, stream=False)
        try:
            response = await self._client.post(f"{self.base_url}/chat/completions", json=body, headers=self._headers)
        except httpx.RemoteProtocolError as exc:  # the body broke off mid-way
            raise StreamCut(self.provider, "", f"{type(exc).__name__}: {exc}") from exc
        await raise_for_status(self.provider, response)
        try:
            data = response.json()
            choice = data["choices"][0]
            msg = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise StreamCut(self.provider, response.text[:200], f"unreadable completion body: {exc}") from exc
        usage = data.get("usage") or {}
        calls = [
            ToolCall(id=c.get("id", ""), name=c["function"]["name"], arguments=c["function"].get("arguments", ""))
            for c in msg.get("tool_calls") or []
        ]
        resp = ModelResponse(
            text=msg.get("content") or "",
            tool_calls=calls,
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=_FINISH.get(choice.get("finish_reason") or "stop", "stop"),
            model_id=data.get("model", ""),
            refusal=msg.get("refusal"),
        )
        return self.complete(resp, started)

    async def stream(
        self,
        messages: list[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        output_schema: dict[str, Any] | None = None,
        settings: ModelSettings | None = None,
    ) -> AsyncIterator[StreamEvent]:
        body = self._body(messages, tools, output_schema, settings, stream=True)
        built = ResponseBuilder()
        async with self._client.stream(
            "POST", f"{self.base_url}/chat/completions", json=body, headers=self._headers
        ) as response:
            await raise_for_status(self.provider, response)
            done = False
            try:
                async for sse in EventSource(response).aiter_sse():
                    if sse.data.strip() == "[DONE]":
                        done = True
                        break
                    for event in _chunk_events(json.loads(sse.data)):
                        built.add(event)
                        if not isinstance(event, FinishEvent):
                            yield event
            except (httpx.TransportError, json.JSONDecodeError) as exc:
                raise StreamCut(self.provider, built.partial_text, f"{type(exc).__name__}: {exc}") from exc
            if not done or built.finish is None:
                raise StreamCut(self.provider, built.partial_text, "the stream ended without its finish")
        yield built.finish


def _message(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _chunk_events(chunk: dict[str, Any]) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    usage = chunk.get("usage")
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content"):
            events.append(TextDelta(text=delta["content"]))
        if delta.get("refusal"):
            events.append(RefusalDelta(text=delta["refusal"]))
        for call in delta.get("tool_calls") or []:
            fn = call.get("function") or {}
            events.append(
                ToolCallDelta(
                    index=int(call.get("index", 0)),
                    id=call.get("id"),
                    name=fn.get("name"),
                    arguments=fn.get("arguments") or "",
                )
            )
        if choice.get("finish_reason"):
            reason = _FINISH.get(choice["finish_reason"], "stop")
            events.append(FinishEvent(reason=reason, model_id=chunk.get("model", "")))
    if usage:
        events.append(
            UsageEvent(
                input_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
            )
        )
    return events
