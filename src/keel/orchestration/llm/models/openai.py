"""OpenAI Chat Completions over httpx: ``openai:<model>`` and ``openai-compatible:<base_url>#<model>`` (vLLM,
Ollama, the llama.cpp server, LM Studio). Wire mapping lives here; authentication is a header set at
construction; posting, reading the events and mapping HTTP and transport errors are done once, in ``_http``."""

from __future__ import annotations

import json
from typing import Any

from keel.orchestration.llm.models._http import EventDecoder, HTTPAdapter
from keel.orchestration.llm.models.base import (
    FinishEvent,
    FinishReason,
    Message,
    ModelCall,
    ModelResponse,
    RefusalDelta,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    UsageEvent,
)

ADAPTER_VERSION = "keel-openai/1"

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


class OpenAIModel(HTTPAdapter):
    """An OpenAI-style chat completions endpoint. ``provider`` is ``openai`` or ``openai-compatible``."""

    provider = "openai"
    adapter_version = ADAPTER_VERSION
    endpoint = "/chat/completions"
    answer_kind = "completion"
    default_base_url = "https://api.openai.com/v1"

    def spec(self) -> str:
        return (
            f"openai:{self.model}" if self.provider == "openai" else f"openai-compatible:{self.base_url}#{self.model}"
        )

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    # -- wire mapping ------------------------------------------------------------------------------------------

    def body(self, call: ModelCall, *, stream: bool) -> dict[str, Any]:
        s = call.options
        body: dict[str, Any] = {"model": self.model, "messages": [_message(m) for m in call.messages]}
        # OpenAI itself now wants max_completion_tokens; compatible servers still read max_tokens.
        body.update(s.as_wire(max_tokens="max_completion_tokens" if self.provider == "openai" else "max_tokens"))
        if call.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
                }
                for t in call.tools
            ]
        if call.output_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": call.output_schema, "strict": False},
            }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(s.extra)
        return body

    def parse(self, data: Any) -> ModelResponse:
        choice = data["choices"][0]
        msg = choice.get("message") or {}
        usage = data.get("usage") or {}
        calls = [
            ToolCall(id=c.get("id", ""), name=c["function"]["name"], arguments=c["function"].get("arguments", ""))
            for c in msg.get("tool_calls") or []
        ]
        return ModelResponse(
            text=msg.get("content") or "",
            tool_calls=calls,
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=_FINISH.get(choice.get("finish_reason") or "stop", "stop"),
            model_id=data.get("model", ""),
            refusal=msg.get("refusal"),
        )

    def decoder(self) -> _Chunks:
        return _Chunks()

    def settle(self, resp: ModelResponse) -> None:
        if resp.refusal:
            resp.finish_reason = "refusal"


class _Chunks(EventDecoder):
    """Chat completion chunks, then ``[DONE]``."""

    unfinished = "the stream ended without its finish"

    def decode(self, kind: str, data: str) -> list[StreamEvent]:
        if data.strip() == "[DONE]":
            self.done = True
            return []
        return _chunk_events(json.loads(data))

    def finish(self) -> FinishEvent | None:
        return self.built.finish if self.done else None


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
