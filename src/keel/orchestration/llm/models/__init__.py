"""Models: the seam, the adapters, and ``infer_model`` which picks an adapter from a string.

``infer_model("openai:gpt-4o-mini-2024-07-18")``, ``infer_model("openai-compatible:http://localhost:8080/v1#qwen")``,
``infer_model("anthropic:claude-3-5-haiku-20241022")``, ``infer_model("local:smollm2")``, ``infer_model("test")``.
Adapters are imported lazily; one whose extra is missing fails with the install command. ``test`` is not built in:
:mod:`keel.testing.models` provides it, declared as an entry point (see :mod:`keel.providers`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from keel.errors import ConfigError
from keel.orchestration.llm.models.base import (
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
from keel.orchestration.llm.models.catalog import price
from keel.orchestration.llm.models.circuit import CircuitBreaker
from keel.providers import Provider, Registry, Spec, chain, openai_endpoint

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
    "MODEL_PROVIDERS",
    "ModelFactory",
    "ModelRegistry",
    "infer_model",
    "register_model_provider",
    "stream_response",
    "supports_streaming",
]


ModelFactory = Callable[[Spec, dict[str, Any]], Model | None]
"""Builds a model from a spec and the price table (``KEEL_MODEL_PRICES``); None when the spec is not one it reads."""


def register_model_provider(name: str, build: ModelFactory, *, form: str) -> None:
    """Let ``infer_model`` build ``<name>:…`` specs with ``build``; ``form`` is how such a spec is written
    (``"mine:<model>"``), for the error that lists the accepted forms. A package can declare one instead, as an
    entry point in the ``keel.models`` group naming a :class:`~keel.providers.Provider` (as :mod:`keel.testing` does
    for ``test``)."""
    MODEL_PROVIDERS.register(Provider(name=name, form=form, build=build))


def infer_model(
    spec: str,
    *,
    prices: dict[str, Any] | None = None,
    allow_floating: bool = False,
    breaker: CircuitBreaker | None = None,
) -> Model:
    """Build the adapter that ``spec`` names. API keys come from the usual environment variables.

    A comma-separated list (``anthropic:claude-…,openai:gpt-…``) is a fallback chain, tried in order, skipping the
    models whose circuit ``breaker`` holds open.
    """
    members = chain(spec)
    if len(members) > 1:
        from keel.orchestration.llm.models.fallback import FallbackModel

        return FallbackModel(
            [infer_model(s, prices=prices, allow_floating=allow_floating) for s in members], breaker=breaker
        )
    spec = members[0] if members else spec
    parsed = Spec.parse(spec)
    provider = MODEL_PROVIDERS.get(parsed.provider)
    model = provider.build(parsed, prices or {}) if provider is not None else None
    if model is None:
        forms = MODEL_PROVIDERS.forms()
        raise ConfigError(f"unknown model {spec!r}; use {', '.join(forms[:-1])} or {forms[-1]}")
    # A local or test model answers the same tomorrow: each says so itself; the setting allows any model.
    model.allow_floating = allow_floating or getattr(model, "allow_floating", False)  # type: ignore[attr-defined]
    return model


def _openai(spec: Spec, prices: dict[str, Any]) -> Model | None:
    from keel.orchestration.llm.models.openai import OpenAIModel

    where = openai_endpoint(spec)
    if where is None:
        return None
    info = price(spec.provider, where.model, prices, base_url=where.base_url)
    return OpenAIModel(where.model, base_url=where.base_url, api_key=where.api_key, provider=spec.provider, info=info)


def _anthropic(spec: Spec, prices: dict[str, Any]) -> Model | None:
    from keel.orchestration.llm.models.anthropic import AnthropicModel

    if not spec.rest:
        return None
    return AnthropicModel(
        spec.rest,
        base_url=os.environ.get("ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
        api_key=_key("ANTHROPIC_API_KEY", spec.text),
        info=price("anthropic", spec.rest, prices),
    )


def _local(spec: Spec, prices: dict[str, Any]) -> Model | None:
    if not spec.rest:
        return None
    try:
        from keel.orchestration.llm.models.local import LocalModel
    except ImportError as exc:
        raise ConfigError(
            f"model {spec.text!r} needs the embedded llama.cpp runtime: pip install 'keel-runtime[local]' ({exc})"
        ) from None
    return LocalModel.load(spec.rest)


def _key(var: str, spec: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"model {spec!r} needs an API key: set {var}")
    return value


MODEL_PROVIDERS: Registry[ModelFactory] = Registry(
    "keel.models",
    [
        Provider(name="openai", form="openai:<model>", build=_openai),
        Provider(name="openai-compatible", form="openai-compatible:<base_url>#<model>", build=_openai),
        Provider(name="anthropic", form="anthropic:<model>", build=_anthropic),
        Provider(name="local", form="local:<name>", build=_local),
    ],
)
"""The providers ``infer_model`` knows: these built-ins, then ``register_model_provider``'s and the entry points."""


class ModelRegistry:
    """Builds each model spec once and shares it: what ``ctx.model()`` draws from. Its ``breaker`` (one per
    process) holds the circuits of every fallback chain it builds, and is fed every model call the process makes."""

    def __init__(
        self,
        default: str,
        *,
        prices: dict[str, Any] | None = None,
        allow_floating: bool = False,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.default = default
        self._prices = prices or {}
        self._allow_floating = allow_floating
        self.breaker = breaker
        self._models: dict[str, Model] = {}

    def get(self, spec: str | None = None) -> Model:
        key = spec or self.default
        if key not in self._models:
            self._models[key] = infer_model(
                key, prices=self._prices, allow_floating=self._allow_floating, breaker=self.breaker
            )
        return self._models[key]

    async def aclose(self) -> None:
        """Close the models built here that hold connections (an HTTP adapter's pool, a chain's models)."""
        built, self._models = list(self._models.values()), {}
        for model in built:
            close = getattr(model, "aclose", None)
            if callable(close):
                await close()

    def add(self, spec: str, model: Model) -> None:
        """Register a ready-made model under a name (tests, custom adapters)."""
        self._models[spec] = model
