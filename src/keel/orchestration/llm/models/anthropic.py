"""Anthropic Messages API over httpx: ``anthropic:<model>``.

Structured output uses Anthropic's native mechanism: a single tool whose input schema is the output schema, with
``tool_choice`` forcing it; the tool's input is the answer.
"""

from __future__ import annotations

import json
from typing import Any

from keel.errors import ModelHTTPError
from keel.orchestration.llm.models._http import EventDecoder, HTTPAdapter
from keel.orchestration.llm.models.base import (
    FinishEvent,
    FinishReason,
    Message,
    ModelCall,
    ModelResponse,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    UsageEvent,
)

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


class AnthropicModel(HTTPAdapter):
    provider = "anthropic"
    adapter_version = ADAPTER_VERSION
    endpoint = "/v1/messages"
    answer_kind = "message"
    default_base_url = "https://api.anthropic.com"

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"anthropic-version": API_VERSION, **({"x-api-key": api_key} if api_key else {})}

    def body(self, call: ModelCall, *, stream: bool) -> dict[str, Any]:
        s = call.options
        system = "\n\n".join(m.content for m in call.messages if m.role == "system")
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": s.max_tokens or DEFAULT_MAX_TOKENS,
            "messages": [_message(m) for m in call.messages if m.role != "system"],
        }
        if system:
            body["system"] = system
        body.update(s.as_wire(max_tokens=None, seed=None, stop="stop_sequences"))  # the Messages API has no seed
        specs = [{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in call.tools]
        if call.output_schema is not None:
            specs.append(
                {
                    "name": OUTPUT_TOOL,
                    "description": "Return the answer in this shape.",
                    "input_schema": call.output_schema,
                }
            )
            body["tool_choice"] = {"type": "tool", "name": OUTPUT_TOOL}
        if specs:
            body["tools"] = specs
        if stream:
            body["stream"] = True
        body.update(s.extra)
        return body

    def parse(self, data: Any) -> ModelResponse:
        blocks = data["content"]
        text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
        calls = [
            ToolCall(id=b.get("id", ""), name=b.get("name", ""), arguments=_arguments(b.get("input")))
            for b in blocks
            if b.get("type") == "tool_use"
        ]
        usage = data.get("usage") or {}
        return ModelResponse(
            text=text,
            tool_calls=calls,
            input_tokens=int(usage.get("input_tokens") or 0),
            output_tokens=int(usage.get("output_tokens") or 0),
            finish_reason=_FINISH.get(data.get("stop_reason") or "end_turn", "stop"),
            model_id=data.get("model", ""),
        )

    def decoder(self) -> _StreamState:
        return _StreamState()

    def settle(self, resp: ModelResponse) -> None:
        forced = [c for c in resp.tool_calls if c.name == OUTPUT_TOOL]
        if forced:  # structured output arrives as the forced tool's input
            resp.text = forced[0].arguments
            resp.tool_calls = [c for c in resp.tool_calls if c.name != OUTPUT_TOOL]
            if resp.finish_reason == "tool_calls":
                resp.finish_reason = "stop"
        if resp.finish_reason == "refusal":
            resp.refusal = resp.refusal or resp.text or "the model refused"


class _StreamState(EventDecoder):
    """Anthropic's event protocol, folded into keel's stream events."""

    unfinished = "the stream ended without message_stop"

    def __init__(self) -> None:
        super().__init__()
        self.blocks: dict[int, str] = {}
        self.model_id = ""
        self.input_tokens = 0
        self.output_tokens = 0
        self.reason: FinishReason = "stop"

    def decode(self, kind: str, data: str) -> list[StreamEvent]:
        return self.handle(kind, json.loads(data) if data else {})

    def finish(self) -> FinishEvent | None:
        return FinishEvent(reason=self.reason, model_id=self.model_id) if self.done else None

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
            self.done = True
        elif kind == "error":
            err = data.get("error") or {}
            status = _ERROR_STATUS.get(err.get("type", ""), 500)
            raise ModelHTTPError("anthropic", status, json.dumps(data), message=err.get("message", ""))
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
