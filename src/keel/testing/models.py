"""Models for unit tests: ``FunctionModel`` answers with a function of the messages, ``FakeModel`` from a script.

Both count tokens as whitespace-separated words, so tests can reason about context windows exactly.
:data:`TEST_MODEL_PROVIDER` is the ``test`` spec (``KEEL_DEFAULT_MODEL=test``: an echo of the last message), declared
as a ``keel.models`` entry point in ``pyproject.toml`` so that production code never imports this module.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from keel.orchestration.llm.models.base import (
    FinishEvent,
    Message,
    Model,
    ModelCall,
    ModelResponse,
    ModelSettings,
    RefusalDelta,
    StreamEvent,
    StreamingAdapter,
    TextDelta,
    ToolCallDelta,
    ToolSpec,
    UsageEvent,
)
from keel.providers import Provider, Spec


@dataclass(kw_only=True, slots=True, frozen=True)
class AgentInfo:
    """What a FunctionModel's function sees besides the messages."""

    output_schema: dict[str, Any] | None
    settings: ModelSettings | None
    call_index: int
    tools: Sequence[ToolSpec] = ()


Reply = str | ModelResponse
ModelFunction = Callable[[list[Message], AgentInfo], Reply | Awaitable[Reply]]


def count_words(text: str) -> int:
    return len(text.split())


@dataclass(eq=False, repr=False)  # compared and shown as the object it is, like every other model
class FunctionModel(StreamingAdapter):
    """Answers with ``fn(messages, info)``: a reply's text, or a whole :class:`ModelResponse`."""

    fn: ModelFunction
    _: KW_ONLY
    name: str = "test:function"
    context_window: int = 8192
    cost_per_token_usd: float = 0.0
    delay_s: float = 0.0
    calls: list[list[Message]] = field(default_factory=list, init=False)
    """The messages of every call, in order."""

    provider = "test"
    adapter_version = "keel-test/1"
    allow_floating = True

    def __post_init__(self) -> None:
        self.model = self.name

    def count_tokens(self, text: str) -> int:
        return count_words(text)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens + output_tokens) * self.cost_per_token_usd

    async def answer(self, call: ModelCall) -> ModelResponse:
        messages = call.messages
        self.calls.append(list(messages))
        prompt_tokens = sum(count_words(m.content) for m in messages)
        if prompt_tokens > self.context_window:
            raise AssertionError(f"prompt of {prompt_tokens} tokens overflows the {self.context_window}-token window")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        info = AgentInfo(
            output_schema=call.output_schema, settings=call.settings, call_index=len(self.calls) - 1, tools=call.tools
        )
        reply = self.fn(list(messages), info)
        if inspect.isawaitable(reply):
            reply = await reply
        if isinstance(reply, ModelResponse):  # as scripted, but for what it leaves out
            reply.provider = reply.provider or self.provider
            reply.requested_model = reply.requested_model or self.name
            reply.model_id = reply.model_id or self.name
            return reply
        return self.stamp(ModelResponse(text=reply, input_tokens=prompt_tokens, output_tokens=count_words(reply)))

    async def events(self, call: ModelCall) -> AsyncIterator[StreamEvent]:
        """The same answer as :meth:`request`, a word at a time."""
        resp = await self.answer(call)
        for piece in re.findall(r"\S+\s*|\s+", resp.text):
            yield TextDelta(text=piece)
        for i, call_ in enumerate(resp.tool_calls):
            yield ToolCallDelta(index=i, id=call_.id, name=call_.name, arguments=call_.arguments)
        if resp.refusal:
            yield RefusalDelta(text=resp.refusal)
        yield UsageEvent(input_tokens=resp.input_tokens, output_tokens=resp.output_tokens)
        yield FinishEvent(reason=resp.finish_reason, model_id=resp.model_id)


class FakeModel(FunctionModel):
    """Answers from ``script`` in order, repeating the last answer when the script runs out."""

    def __init__(self, script: Sequence[Reply], **kwargs: Any) -> None:
        if not script:
            raise ValueError("FakeModel needs at least one scripted reply")
        self.script = list(script)
        kwargs.setdefault("name", "test:fake")
        super().__init__(lambda _, info: self.script[min(info.call_index, len(self.script) - 1)], **kwargs)


def _echo(spec: Spec, prices: dict[str, Any]) -> Model:
    """``test`` or ``test:<anything>``: answers with the last message's text, for development and tests."""
    return FunctionModel(lambda messages, info: messages[-1].content if messages else "", name="test")


TEST_MODEL_PROVIDER = Provider(name="test", form="test", build=_echo)
"""The ``test`` model spec, found through the ``keel.models`` entry point of that name."""
