"""A fallback chain: ask each model in turn while the previous one fails with a provider error, skipping the models
whose circuit is open (:mod:`keel.orchestration.llm.models.circuit`).

What happened to each model of the chain is told to whoever watches (:func:`watch_chain`): the model step records a
failed model's call under that model's own provider and id (never under the chain's, nor the model that answered
in the end), lists the skipped ones in the envelope, and puts each circuit change on the task's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import httpx

from keel.errors import ConfigError, ModelUnavailable, UpstreamError
from keel.orchestration.llm.models.base import Adapter, Model, ModelCall, ModelResponse
from keel.orchestration.llm.models.circuit import Admission, CircuitBreaker, CircuitChange


@dataclass(kw_only=True, slots=True)
class ChainAttempt:
    """One model of the chain that did not answer: it failed (``error``) or was skipped (``skipped``: why)."""

    model: Model
    error: BaseException | None = None
    skipped: str = ""
    circuit: str = ""
    """The circuit's state when it was skipped."""
    verdicts: dict[str, str] = field(default_factory=dict)
    latency_ms: float = 0.0


@dataclass(kw_only=True, slots=True)
class ChainLog:
    """What the chains asked during one call: the models that did not answer, in order, and circuit changes."""

    attempts: list[ChainAttempt] = field(default_factory=list)
    changes: list[CircuitChange] = field(default_factory=list)


_watching: contextvars.ContextVar[ChainLog | None] = contextvars.ContextVar("keel_chain_log", default=None)


@contextlib.contextmanager
def watch_chain() -> Iterator[ChainLog]:
    """Collect what fallback chains called in this context do, until the block ends."""
    log = ChainLog()
    token = _watching.set(log)
    try:
        yield log
    finally:
        _watching.reset(token)


def model_key(model: Model) -> tuple[str, str]:
    """(provider, model as requested): how a model's circuit and its call records are keyed."""
    return getattr(model, "provider", ""), getattr(model, "model", model.name)


class FallbackModel(Adapter):
    """``FallbackModel([primary, backup])``. A provider error (429, 5xx, a cut stream, a dead connection, a
    timeout) moves on to the next model; a 4xx, or an answer that arrives but is unusable, does not, because
    those are about the request, not the provider. The chain answers with whole responses (no token
    stream), and each response says which model answered.

    With a ``breaker``, a model whose circuit is open is skipped without being asked; when every model is, the call
    fails at once with :class:`~keel.errors.ModelUnavailable`."""

    def __init__(self, models: Sequence[Model], *, breaker: CircuitBreaker | None = None) -> None:
        if not models:
            raise ConfigError("a fallback chain needs at least one model")
        self.models = list(models)
        self.breaker = breaker
        self.name = ",".join(m.name for m in self.models)
        self.provider = "fallback"
        self.model = self.name
        self.context_window = min(m.context_window for m in self.models)
        self.allow_floating = all(getattr(m, "allow_floating", False) for m in self.models)

    def count_tokens(self, text: str) -> int:
        return max(m.count_tokens(text) for m in self.models)

    async def aclose(self) -> None:
        for model in self.models:
            close = getattr(model, "aclose", None)
            if callable(close):
                await close()

    async def answer(self, call: ModelCall) -> ModelResponse:
        log = _watching.get() or ChainLog()
        last: BaseException | None = None
        for model in self.models:
            admission = self._admit(model, log)
            if admission is not None and not admission.allowed:
                log.attempts.append(
                    ChainAttempt(
                        model=model, skipped=admission.reason, circuit=admission.state.value,
                        verdicts=admission.verdicts,
                    )
                )  # fmt: skip
                continue
            probe = admission is not None and admission.probe
            started = time.perf_counter()
            try:
                resp = await call.send(model)
            except (UpstreamError, httpx.TransportError, TimeoutError) as exc:
                latency = round((time.perf_counter() - started) * 1000, 3)
                log.attempts.append(ChainAttempt(model=model, error=exc, latency_ms=latency))
                self._settle(model, probe, log, ok=False, detail=str(exc))
                if isinstance(exc, UpstreamError) and not exc.retryable:
                    raise  # a 4xx is about the request; another provider would refuse it too
                last = exc
                continue
            except asyncio.CancelledError as exc:
                latency = round((time.perf_counter() - started) * 1000, 3)
                log.attempts.append(ChainAttempt(model=model, error=exc, latency_ms=latency))
                if probe and self.breaker is not None:
                    self.breaker.release(*model_key(model))
                raise
            self._settle(model, probe, log, ok=True)
            return resp
        if last is not None:
            raise last
        skipped = [a for a in log.attempts if a.skipped and any(a.model is m for m in self.models)]
        raise ModelUnavailable(
            [
                {"provider": model_key(a.model)[0], "model_id": model_key(a.model)[1], "circuit": a.circuit,
                 "reason": a.skipped, "verdicts": a.verdicts}
                for a in skipped
            ]
        )  # fmt: skip

    def _admit(self, model: Model, log: ChainLog) -> Admission | None:
        if self.breaker is None:
            return None
        admission = self.breaker.admit(*model_key(model))
        if admission.change is not None:
            log.changes.append(admission.change)
        return admission

    def _settle(self, model: Model, probe: bool, log: ChainLog, *, ok: bool, detail: str = "") -> None:
        if probe and self.breaker is not None:
            change = self.breaker.settle(*model_key(model), ok=ok, detail=detail)
            if change is not None:
                log.changes.append(change)
