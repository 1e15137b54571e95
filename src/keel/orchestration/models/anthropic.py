"""Anthropic Messages API over httpx: ``anthropic:<model>``.

Structured output uses Anthropic's native mechanism: a single tool whose input schema is the output schema, with
``tool_choice`` forcing it; the tool's input is the answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from httpx_sse import EventSource

from keel.errors import ModelHTTPError, StreamCut
from keel.orchestration.models._http import estimate_tokens, raise_for_status, stamp
from keel.orchestration.models.base import (
    FinishEvent,
    FinishReason,
    Message,
    ModelResponse,
    ModelSettings,
    ResponseBuilder,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    UsageEvent,
)
from keel.orchestration.models.catalog import ModelInfo, lookup

ADAPTER_VERSION = "keel-anthropic/1"
API_VERSION = "2023-06-01"
OUTPUT_TOOL = "keel_output"
DEFAULT_MAX_TOKENS = 4096  # the Messages API requires max_tokens

_FINISH: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "refusal",
    "pause_turn": "stop",
}
_ERROR_STATUS = {"rate_limit_error": 429, "overloaded_error": 529, "api_error": 500, "invalid_request_error": 400}


class AnthropicModel:
    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.anthropic.com",
        api_key: str | None = None,
        info: ModelInfo | None = None,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.model = model
        self.provider = "anthropic"
        self.name = f"anthropic:{model}"
        self.base_url = base_url.rstrip("/")
        self.info = info or lookup(model)
        self.context_window = self.info.context_window
        self._headers = {"anthropic-version": API_VERSION, **({"x-api-key": api_key} if api_key else {})}
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0))

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _body(
        self,
        messages: list[Message],
        tools: Sequence[ToolSpec],
        output_schema: dict[str, Any] | None,
        settings: ModelSettings | None,
        stream: bool,
    ) -> dict[str, Any]:
        s = settings or ModelSettings()
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": s.max_tokens or DEFAULT_MAX_TOKENS,
            "messages": [_message(m) for m in messages if m.role != "system"],
        }
        if system:
            body["system"] = system
        if s.temperature is not None:
            body["temperature"] = s.temperature
        if s.top_p is not None:
            body["top_p"] = s.top_p
        if s.stop:
            body["stop_sequences"] = list(s.stop)
        specs = [{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools]
        if output_schema is not None:
            specs.append(
                {"name": OUTPUT_TOOL, "description": "Return the answer in this shape.", "input_schema": output_schema}
            )
            body["tool_choice"] = {"type": "tool", "name": OUTPUT_TOOL}
        if specs:
            body["tools"] = specs
        if stream:
            body["stream"] = True
        body.update(s.extra)
        return body

    def complete(self, resp: ModelResponse, started: float) -> ModelResponse:
        """Stamp a response with what the envelope records: provider, models, adapter, latency, cost."""
        forced = [c for c in resp.tool_calls if c.name == OUTPUT_TOOL]
        if forced:  # structured output arrives as the forced tool's input
            resp.text = forced[0].arguments
            resp.tool_calls = [c for c in resp.tool_calls if c.name != OUTPUT_TOOL]
            if resp.finish_reason == "tool_calls":
                resp.finish_reason = "stop"
        if resp.finish_reason == "refusal":
            resp.refusal = resp.refusal or resp.text or "the model refused"
        return stamp(
            resp,
            provider=self.provider,
            model=self.model,
            adapter_version=ADAPTER_VERSION,
            info=self.info,
            started=started,
        )

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
            response = await self._client.post(f"{self.base_url}/v1/messages", json=body, headers=self._headers)
        except httpx.RemoteProtocolError as exc:  # the body broke off mid-way
            raise StreamCut(self.provider, "", f"{type(exc).__name__}: {exc}") from exc
        await raise_for_status(self.provider, response)
        try:
            data = response.json()
            blocks = data["content"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StreamCut(self.provider, response.text[:200], f"unreadable message body: {exc}") from exc
        text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
        calls = [
            ToolCall(id=b.get("id", ""), name=b.get("name", ""), arguments=_arguments(b.get("input")))
            for b in blocks
            if b.get("type") == "tool_use"
        ]
        usage = data.get("usage") or {}
        resp = ModelResponse(
            text=text,
            tool_calls=calls,
            input_tokens=int(usage.get("input_tokens") or 0),
            output_tokens=int(usage.get("output_tokens") or 0),
            finish_reason=_FINISH.get(data.get("stop_reason") or "end_turn", "stop"),
            model_id=data.get("model", ""),
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
        state = _StreamState()
        async with self._client.stream(
            "POST", f"{self.base_url}/v1/messages", json=body, headers=self._headers
        ) as response:
            await raise_for_status(self.provider, response)
            try:
                async for sse in EventSource(response).aiter_sse():
                    for event in state.handle(sse.event, json.loads(sse.data) if sse.data else {}):
                        yield event
                    if state.stopped:
                        break
            except (httpx.TransportError, json.JSONDecodeError) as exc:
                raise StreamCut(self.provider, state.built.partial_text, f"{type(exc).__name__}: {exc}") from exc
            if not state.stopped:
                raise StreamCut(self.provider, state.built.partial_text, "the stream ended without message_stop")
        yield FinishEvent(reason=state.reason, model_id=state.model_id)


class _StreamState:
    """Anthropic's event protocol, folded into keel's stream events."""

    def __init__(self) -> None:
        self.built = ResponseBuilder()
        self.blocks: dict[int, str] = {}
        self.model_id = ""
        self.input_tokens = 0
        self.output_tokens = 0
        self.reason: FinishReason = "stop"
        self.stopped = False

    def handle(self, kind: str, data: dict[str, Any]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if kind == "message_start":
            msg = data.get("message") or {}
            self.model_id = msg.get("model", "")
            self.input_tokens = int((msg.get("usage") or {}).get("input_tokens") or 0)
        elif kind == "content_block_start":
            block = data.get("content_block") or {}
            index = int(data.get("index", 0))
            self.blocks[index] = block.get("type", "")
            if block.get("type") == "tool_use":
                out.append(ToolCallDelta(index=index, id=block.get("id"), name=block.get("name")))
        elif kind == "content_block_delta":
            out.extend(self._delta(int(data.get("index", 0)), data.get("delta") or {}))
        elif kind == "message_delta":
            delta = data.get("delta") or {}
            self.reason = _FINISH.get(delta.get("stop_reason") or "end_turn", "stop")
            self.output_tokens = int((data.get("usage") or {}).get("output_tokens") or 0)
            out.append(UsageEvent(input_tokens=self.input_tokens, output_tokens=self.output_tokens))
        elif kind == "message_stop":
            self.stopped = True
        elif kind == "error":
            err = data.get("error") or {}
            status = _ERROR_STATUS.get(err.get("type", ""), 500)
            raise ModelHTTPError("anthropic", status, json.dumps(data), message=err.get("message", ""))
        for event in out:
            self.built.add(event)
        return out

    @staticmethod
    def _delta(index: int, delta: dict[str, Any]) -> list[StreamEvent]:
        if delta.get("type") == "text_delta":
            return [TextDelta(text=delta.get("text", ""))]
        if delta.get("type") == "input_json_delta":
            return [ToolCallDelta(index=index, arguments=delta.get("partial_json", ""))]
        return []


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value if value is not None else {})


def _message(m: Message) -> dict[str, Any]:
    if m.role == "tool":
        return {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": m.tool_call_id or "", "content": m.content}],
        }
    if m.tool_calls:
        blocks: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
        blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.parsed() or {}} for c in m.tool_calls]
        return {"role": "assistant", "content": blocks}
    return {"role": m.role, "content": m.content}
