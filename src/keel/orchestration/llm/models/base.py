"""The model seam: one request method, one stream method yielding typed events, token counting and a context window.

Adapters (``openai:``, ``openai-compatible:``, ``anthropic:``, ``local:``) implement it, all on
:class:`StreamingAdapter`; ``keel.testing.models`` has ``FakeModel`` and ``FunctionModel`` for unit tests. Every
adapter reports what a reader of the envelope needs to trust an answer: the provider, the model requested, the
model id the provider says answered, the adapter's version, the settings, token usage and whether the output was
cut short or refused (:meth:`StreamingAdapter.complete`, the one place that stamps them).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "refusal", "content_filter", "cut"]


@dataclass(kw_only=True, slots=True, frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """The raw JSON text the model produced (it may be invalid; :meth:`parsed` says)."""

    def parsed(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.arguments or "{}")
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None


@dataclass(kw_only=True, slots=True, frozen=True)
class Message:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    """On an assistant message: the calls it made."""
    tool_call_id: str | None = None
    """On a tool message: which call this is the result of."""


@dataclass(kw_only=True, slots=True, frozen=True)
class ToolSpec:
    """A tool offered to the model: a name, a description and a JSON schema for its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelSettings:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Provider-specific request fields, passed through as they are."""

    def as_record(self) -> dict[str, Any]:
        out = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop) or None,
        }
        return {k: v for k, v in out.items() if v is not None}

    def as_wire(self, **names: str | None) -> dict[str, Any]:
        """The settings that are set, as a request body carries them (``stop`` as a list): each under its own name,
        under the wire's name where ``names`` renames it (``stop="stop_sequences"``), or left out where ``names``
        maps it to None (a field the API lacks, or one the adapter sets itself)."""
        out: dict[str, Any] = {}
        for key, value in self.as_record().items():
            name = names.get(key, key)
            if name is not None:
                out[name] = value
        return out


# -- stream events ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True, frozen=True)
class TextDelta:
    text: str


@dataclass(kw_only=True, slots=True, frozen=True)
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    """A fragment of the arguments' JSON text."""


@dataclass(kw_only=True, slots=True, frozen=True)
class RefusalDelta:
    text: str


@dataclass(kw_only=True, slots=True, frozen=True)
class UsageEvent:
    input_tokens: int
    output_tokens: int


@dataclass(kw_only=True, slots=True, frozen=True)
class FinishEvent:
    reason: FinishReason
    model_id: str = ""


StreamEvent = TextDelta | ToolCallDelta | RefusalDelta | UsageEvent | FinishEvent


@dataclass(kw_only=True, slots=True)
class ModelResponse:
    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: FinishReason = "stop"
    model_id: str = ""
    """The exact model the provider says answered (a dated checkpoint when it gives one)."""
    cost_usd: float = 0.0
    refusal: str | None = None
    provider: str = ""
    requested_model: str = ""
    adapter_version: str = ""
    latency_ms: float = 0.0
    usage_counted: bool = False
    """True when the provider reported no usage and keel counted the tokens itself."""
    fallback: bool = False
    """Answered by a fallback chain after an earlier model of it failed or was skipped."""


class Model(Protocol):
    name: str
    """Provider and model as requested, e.g. ``openai:gpt-4o-mini-2024-07-18`` or ``local:smollm2``."""
    context_window: int
    """Tokens the model accepts, prompt and output together."""

    async def request(
        self,
        messages: list[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        output_schema: dict[str, Any] | None = None,
        settings: ModelSettings | None = None,
    ) -> ModelResponse: ...

    def count_tokens(self, text: str) -> int: ...


class StreamingModel(Model, Protocol):
    def complete(self, response: ModelResponse, started: float) -> ModelResponse:
        """Stamp a response built from the stream with provider, models, adapter version, latency and cost."""
        ...

    def stream(
        self,
        messages: list[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        output_schema: dict[str, Any] | None = None,
        settings: ModelSettings | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Yield events as they come; the last is a :class:`FinishEvent`. A stream that ends without one, or
        breaks off, raises :class:`keel.errors.StreamCut` instead of passing for complete."""
        ...


def supports_streaming(model: Model) -> bool:
    return callable(getattr(model, "stream", None)) and callable(getattr(model, "complete", None))


async def stream_response(
    model: StreamingModel,
    messages: list[Message],
    *,
    on_event: Callable[[StreamEvent], Awaitable[None]] | None = None,
    tools: Sequence[ToolSpec] = (),
    output_schema: dict[str, Any] | None = None,
    settings: ModelSettings | None = None,
) -> ModelResponse:
    """Stream a call, hand every event to ``on_event`` (if any) as it arrives, and return the whole response."""
    started = time.perf_counter()
    events = model.stream(messages, tools=tools, output_schema=output_schema, settings=settings)
    return await collect(model, events, started, on_event=on_event)


async def collect(
    model: StreamingModel,
    events: AsyncIterator[StreamEvent],
    started: float,
    *,
    on_event: Callable[[StreamEvent], Awaitable[None]] | None = None,
) -> ModelResponse:
    """Fold ``model``'s stream into the response it stands for, stamped by ``model.complete``."""
    built = ResponseBuilder()
    async for event in events:
        built.add(event)
        if on_event is not None:
            await on_event(event)
    return model.complete(built.build(), started)


class ResponseBuilder:
    """Folds stream events into a :class:`ModelResponse`, the way every adapter's non-streamed answer looks."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.refusal: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}
        self.usage: UsageEvent | None = None
        self.finish: FinishEvent | None = None

    def add(self, event: StreamEvent) -> None:
        if isinstance(event, TextDelta):
            self.text.append(event.text)
        elif isinstance(event, ToolCallDelta):
            call = self.calls.setdefault(event.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = event.id or call["id"]
            call["name"] = event.name or call["name"]
            call["arguments"] += event.arguments
        elif isinstance(event, RefusalDelta):
            self.refusal.append(event.text)
        elif isinstance(event, UsageEvent):
            self.usage = event
        else:
            self.finish = event

    @property
    def partial_text(self) -> str:
        return "".join(self.text)

    def build(self) -> ModelResponse:
        assert self.finish is not None, "a response is built only from a finished stream"
        calls = [ToolCall(id=c["id"], name=c["name"], arguments=c["arguments"]) for _, c in sorted(self.calls.items())]
        return ModelResponse(
            text="".join(self.text),
            tool_calls=calls,
            input_tokens=self.usage.input_tokens if self.usage else 0,
            output_tokens=self.usage.output_tokens if self.usage else 0,
            finish_reason=self.finish.reason,
            model_id=self.finish.model_id,
            refusal="".join(self.refusal) or None,
        )


# -- what keel's adapters share ----------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelCall:
    """One call as an adapter receives it: the seam's arguments gathered once, so an adapter's answer, stream and
    wire mapping each take one value."""

    messages: list[Message]
    tools: tuple[ToolSpec, ...] = ()
    output_schema: dict[str, Any] | None = None
    settings: ModelSettings | None = None

    @property
    def options(self) -> ModelSettings:
        """The settings asked for, or the defaults."""
        return self.settings or ModelSettings()

    async def send(self, model: Model) -> ModelResponse:
        """Ask ``model`` the same thing (a fallback chain asks each of its models)."""
        return await model.request(
            self.messages, tools=self.tools, output_schema=self.output_schema, settings=self.settings
        )


class Adapter(ABC):
    """The seam's keyword signature, written once: an adapter implements :meth:`answer` for a :class:`ModelCall`."""

    name: str
    context_window: int

    async def request(
        self,
        messages: list[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        output_schema: dict[str, Any] | None = None,
        settings: ModelSettings | None = None,
    ) -> ModelResponse:
        call = ModelCall(messages=messages, tools=tuple(tools), output_schema=output_schema, settings=settings)
        return await self.answer(call)

    @abstractmethod
    async def answer(self, call: ModelCall) -> ModelResponse: ...

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...


class StreamingAdapter(Adapter):
    """An adapter that streams (:class:`StreamingModel`): it implements :meth:`events`, and answers a request from
    its stream unless it overrides :meth:`answer`. Every response it returns is stamped by :meth:`complete`, the
    one place that says what the envelope records of a call."""

    provider: str
    model: str
    """The model as asked for (what ``requested_model`` records)."""
    adapter_version: str

    def stream(
        self,
        messages: list[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        output_schema: dict[str, Any] | None = None,
        settings: ModelSettings | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Yield events as they come; the last is a :class:`FinishEvent`. A stream that ends without one, or breaks
        off, raises :class:`keel.errors.StreamCut` instead of passing for complete."""
        return self.events(
            ModelCall(messages=messages, tools=tuple(tools), output_schema=output_schema, settings=settings)
        )

    @abstractmethod
    def events(self, call: ModelCall) -> AsyncIterator[StreamEvent]: ...

    async def answer(self, call: ModelCall) -> ModelResponse:
        return await collect(self, self.events(call), time.perf_counter())

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD for a call of that many tokens: nothing for a model that runs here."""
        return 0.0

    def settle(self, resp: ModelResponse) -> None:
        """Provider-specific touches to a response before it is stamped (a refusal's finish reason, ...)."""

    def complete(self, resp: ModelResponse, started: float) -> ModelResponse:
        """Stamp a response with what the envelope records: provider, models, adapter, latency and cost."""
        resp.latency_ms = round((time.perf_counter() - started) * 1000, 3)
        return self.stamp(resp)

    def stamp(self, resp: ModelResponse) -> ModelResponse:
        """:meth:`complete` without the latency: the provider, the model asked for and the one that answered (the
        provider's id, else the name asked for), the adapter's version and the cost at the model's price."""
        self.settle(resp)
        resp.provider = self.provider
        resp.requested_model = self.model
        resp.adapter_version = self.adapter_version
        resp.model_id = resp.model_id or self.model
        resp.cost_usd = self.cost(resp.input_tokens, resp.output_tokens)
        return resp
