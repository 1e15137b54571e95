"""The model seam, as much of it as orchestration needs: one request method, token counting and a context window.

Adapters (OpenAI-compatible, Anthropic, embedded llama.cpp) implement it; ``keel.testing.models`` has the
``FakeModel`` and ``FunctionModel`` that unit tests use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(kw_only=True, slots=True, frozen=True)
class Message:
    role: Role
    content: str


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelSettings:
    max_tokens: int | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class ModelResponse:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = "stop"
    model_id: str = ""
    """The exact model the provider says answered (a dated checkpoint when it gives one)."""
    cost_usd: float = 0.0


class Model(Protocol):
    name: str
    """Provider and model as requested, e.g. ``local:smollm2`` or ``test``."""
    context_window: int
    """Tokens the model accepts, prompt and output together."""

    async def request(
        self,
        messages: list[Message],
        *,
        output_schema: dict[str, Any] | None = None,
        settings: ModelSettings | None = None,
    ) -> ModelResponse: ...

    def count_tokens(self, text: str) -> int: ...
