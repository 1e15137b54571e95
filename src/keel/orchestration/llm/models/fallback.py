"""A fallback chain: ask each model in turn while the previous one fails with a provider error."""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from keel.errors import ConfigError, UpstreamError
from keel.orchestration.llm.models.base import Adapter, Model, ModelCall, ModelResponse


class FallbackModel(Adapter):
    """``FallbackModel([primary, backup])``. A provider error (429, 5xx, a cut stream, a dead connection, a
    timeout) moves on to the next model; a 4xx, or an answer that arrives but is unusable, does not, because
    those are about the request, not the provider. The chain answers with whole responses (no token
    stream), and each response says which model answered."""

    def __init__(self, models: Sequence[Model]) -> None:
        if not models:
            raise ConfigError("a fallback chain needs at least one model")
        self.models = list(models)
        self.name = ",".join(m.name for m in self.models)
        self.provider = "fallback"
        self.model = self.name
        self.context_window = min(m.context_window for m in self.models)
        self.allow_floating = all(getattr(m, "allow_floating", False) for m in self.models)

    def count_tokens(self, text: str) -> int:
        return max(m.count_tokens(text) for m in self.models)

    async def answer(self, call: ModelCall) -> ModelResponse:
        last: BaseException | None = None
        for model in self.models:
            try:
                return await call.send(model)
            except UpstreamError as exc:
                if not exc.retryable:  # a 4xx is about the request; another provider would refuse it too
                    raise
                last = exc
            except (httpx.TransportError, TimeoutError) as exc:
                last = exc
        assert last is not None
        raise last
