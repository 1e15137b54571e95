"""Models: the seam, the adapters, and ``infer_model`` which picks an adapter from a string.

``infer_model("openai:gpt-4o-mini-2024-07-18")``, ``infer_model("openai-compatible:http://localhost:8080/v1#qwen")``,
``infer_model("anthropic:claude-3-5-haiku-20241022")``, ``infer_model("local:smollm2")``, ``infer_model("test")``.
Adapters are imported lazily; one whose extra is missing fails with the install command.
"""

from __future__ import annotations

import os
from typing import Any

from keel.errors import ConfigError
from keel.orchestration.models.base import (
    FinishEvent,
    Message,
    Model,
    ModelResponse,
    ModelSettings,
    RefusalDelta,
    ResponseBuilder,
    StreamEvent,
    StreamingModel,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    UsageEvent,
    stream_response,
    supports_streaming,
)
from keel.orchestration.models.catalog import lookup

__all__ = [
    "FinishEvent",
    "Message",
    "Model",
    "ModelResponse",
    "ModelSettings",
    "RefusalDelta",
    "ResponseBuilder",
    "StreamEvent",
    "StreamingModel",
    "TextDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolSpec",
    "UsageEvent",
    "ModelRegistry",
    "infer_model",
    "stream_response",
    "supports_streaming",
]


def infer_model(spec: str, *, prices: dict[str, Any] | None = None, allow_floating: bool = False) -> Model:
    """Build the adapter that ``spec`` names. API keys come from the usual environment variables.

    A comma-separated list (``anthropic:claude-…,openai:gpt-…``) is a fallback chain, tried in order.
    """
    if "," in spec and not spec.startswith("openai-compatible:"):
        from keel.orchestration.models.fallback import FallbackModel

        return FallbackModel(
            [infer_model(s.strip(), prices=prices, allow_floating=allow_floating) for s in spec.split(",") if s.strip()]
        )
    provider, _, rest = spec.partition(":")
    model: Any
    if spec == "test" or provider == "test":
        from keel.testing.models import FunctionModel

        model = FunctionModel(lambda messages, info: messages[-1].content if messages else "", name="test")
    elif provider == "openai" and rest:
        from keel.orchestration.models.openai import OpenAIModel

        model = OpenAIModel(
            rest,
            base_url=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
            api_key=_key("OPENAI_API_KEY", spec),
            info=lookup(rest, prices),
        )
    elif provider == "openai-compatible" and "#" in rest:
        from keel.orchestration.models.openai import OpenAIModel

        base_url, _, name = rest.rpartition("#")
        model = OpenAIModel(
            name,
            base_url=base_url,
            api_key=os.environ.get("OPENAI_COMPATIBLE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
            provider="openai-compatible",
            info=lookup(name, prices),
        )
    elif provider == "anthropic" and rest:
        from keel.orchestration.models.anthropic import AnthropicModel

        model = AnthropicModel(
            rest,
            base_url=os.environ.get("ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
            api_key=_key("ANTHROPIC_API_KEY", spec),
            info=lookup(rest, prices),
        )
    elif provider == "local" and rest:
        try:
            from keel.orchestration.models.local import LocalModel
        except ImportError as exc:
            raise ConfigError(
                f"model {spec!r} needs the embedded llama.cpp runtime: pip install 'keel[local]' ({exc})"
            ) from None
        model = LocalModel.load(rest)
    else:
        raise ConfigError(
            f"unknown model {spec!r}; use openai:<model>, openai-compatible:<base_url>#<model>, "
            "anthropic:<model>, local:<name> or test"
        )
    model.allow_floating = allow_floating or provider in ("test", "local")
    return model  # type: ignore[no-any-return]


def _key(var: str, spec: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"model {spec!r} needs an API key: set {var}")
    return value


class ModelRegistry:
    """Builds each model spec once and shares it: what ``ctx.model()`` draws from."""

    def __init__(self, default: str, *, prices: dict[str, Any] | None = None, allow_floating: bool = False) -> None:
        self.default = default
        self._prices = prices or {}
        self._allow_floating = allow_floating
        self._models: dict[str, Model] = {}

    def get(self, spec: str | None = None) -> Model:
        key = spec or self.default
        if key not in self._models:
            self._models[key] = infer_model(key, prices=self._prices, allow_floating=self._allow_floating)
        return self._models[key]

    def add(self, spec: str, model: Model) -> None:
        """Register a ready-made model under a name (tests, custom adapters)."""
        self._models[spec] = model
