"""A circuit breaker per model, for fallback chains, driven by the same rates and verdicts as ``GET /v1/slo``.

A model (provider and requested model) whose error or validity verdict (:data:`~keel.orchestration.llm.reliability.
BREAKER_METRICS`, against ``KEEL_SLO``) turns ``violated`` over at least ``min_calls`` calls is *open*: chains skip
it for ``cooldown_s``. Then it is *half-open*: one call at a time is let through as a probe; ``probes`` answered
probes in a row close it again (its counts start afresh, so the failures that opened it do not open it at once
again), and a failed probe opens it for another cooldown.

The state is kept in :class:`CircuitBreaker`, one per process, shared by every worker of the engine: the state
changes run without an ``await`` in between, so workers on one event loop see one consistent state, and two
workers never both probe. A circuit opens on either of two counts, judged apart (so no call counts twice): this
process's own calls since the circuit last closed, and every replica's calls over the last ``shared_s`` seconds,
read from the shared per-model stats every few seconds (:meth:`CircuitBreaker.follow`, matched by model id, which
for a pinned model is the one requested). A snapshot that reaches back before the circuit last closed is ignored
for it, so the failures that opened it do not open it again. Each replica still probes for itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from keel.memory.stores import ModelStatsStore
from keel.memory.types import WINDOW_COUNTERS, ModelCallRecord, ModelWindow
from keel.orchestration.llm.intervals import Direction, JudgedRate, RateVerdict
from keel.orchestration.llm.reliability import BREAKER_METRICS, METRICS, rate_reports

log = logging.getLogger("keel.models")


class CircuitState(StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


@dataclass(kw_only=True, slots=True, frozen=True)
class CircuitChange:
    """A model's circuit moved: what the ``model_circuit`` event says."""

    provider: str
    model_id: str
    state: CircuitState
    previous: CircuitState
    reason: str
    verdicts: dict[str, str]

    def as_event(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model_id": self.model_id,
            "state": self.state.value,
            "previous": self.previous.value,
            "reason": self.reason,
            "verdicts": self.verdicts,
        }


@dataclass(kw_only=True, slots=True, frozen=True)
class Admission:
    """May the chain ask this model now? ``probe``: the call is a half-open probe, to :meth:`CircuitBreaker.settle`."""

    allowed: bool
    state: CircuitState
    probe: bool = False
    reason: str = ""
    verdicts: dict[str, str] = field(default_factory=dict)
    change: CircuitChange | None = None


class _Recent:
    """One model's calls since its circuit last closed, at most ``maxlen`` and within the window, as running sums."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self.calls: deque[tuple[float, tuple[int, ...]]] = deque()
        self.sums = [0] * len(WINDOW_COUNTERS)

    def add(self, at: float, counts: tuple[int, ...]) -> None:
        self.calls.append((at, counts))
        self.sums = [a + b for a, b in zip(self.sums, counts, strict=True)]
        if len(self.calls) > self.maxlen:
            self._drop()

    def trim(self, horizon: float) -> None:
        while self.calls and self.calls[0][0] < horizon:
            self._drop()

    def _drop(self) -> None:
        _, counts = self.calls.popleft()
        self.sums = [a - b for a, b in zip(self.sums, counts, strict=True)]

    def counts(self) -> dict[str, int]:
        return dict(zip(WINDOW_COUNTERS, self.sums, strict=True))


@dataclass(kw_only=True, slots=True)
class _Circuit:
    recent: _Recent
    closed_at: float = 0.0
    """When probes last closed it: the shared counts from before then are not its own any more."""
    state: CircuitState = CircuitState.closed
    until: float = 0.0
    reason: str = ""
    verdicts: dict[str, str] = field(default_factory=dict)
    probing: bool = False
    successes: int = 0


def _describe(name: str, r: JudgedRate) -> str:
    side = "below" if METRICS[name].direction is Direction.floor else "above"
    return f"{name} {r.rate:.3f} (95% interval {r.low:.3f}–{r.high:.3f} over {r.n} calls) is {side} {r.threshold}"


class CircuitBreaker:
    """The circuits of every model this process calls. ``record`` is fed every model call; a fallback chain asks
    ``admit`` before each model and, for a probe, reports its outcome with ``settle`` (or ``release``)."""

    def __init__(
        self,
        *,
        thresholds: Mapping[str, float],
        window_s: float = 86400.0,
        cooldown_s: float = 60.0,
        probes: int = 2,
        min_calls: int = 5,
        max_recent: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.thresholds = {k: v for k, v in thresholds.items() if k in BREAKER_METRICS}
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self.probes = probes
        self.min_calls = min_calls
        self.max_recent = max_recent
        self.clock = clock
        self._circuits: dict[tuple[str, str], _Circuit] = {}
        self._shared: dict[tuple[str, str], dict[str, int]] = {}
        self._shared_since = 0.0

    def _circuit(self, provider: str, model: str) -> _Circuit:
        key = (provider, model)
        found = self._circuits.get(key)
        if found is None:
            found = self._circuits[key] = _Circuit(recent=_Recent(self.max_recent))
        return found

    def record(self, call: ModelCallRecord) -> None:
        """Count a finished call of ``call.requested_model`` at ``call.provider``."""
        if self.thresholds:
            self._circuit(call.provider, call.requested_model).recent.add(call.at, call.window_counts())

    def state(self, provider: str, model: str) -> CircuitState:
        return self._circuit(provider, model).state

    def observe_shared(self, windows: Iterable[ModelWindow], since: float) -> None:
        """Every replica's counts per model since ``since`` (a snapshot of the shared stats)."""
        self._shared = {(w.provider, w.model_id): dict(w.counts) for w in windows}
        self._shared_since = since

    async def refresh(self, stats: ModelStatsStore, *, shared_s: float) -> None:
        """Read every replica's last ``shared_s`` seconds from the shared stats. A failed read keeps the last
        snapshot (and says so): the breaker must not stop a chain because the store hiccuped."""
        since = self.clock() - shared_s
        try:
            self.observe_shared(await stats.model_window(since), since)
        except Exception as exc:  # any store failure: keep going on what we have
            log.warning("the circuit breaker could not read the shared model stats: %s", exc)

    async def follow(self, stats: ModelStatsStore, *, shared_s: float, every_s: float = 15.0) -> None:
        """:meth:`refresh` every ``every_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            await self.refresh(stats, shared_s=shared_s)

    def _judge(self, key: tuple[str, str], c: _Circuit, now: float) -> tuple[dict[str, str], str | None]:
        """The verdicts of the breaker's rates, and why the circuit must open (None: it need not)."""
        c.recent.trim(now - self.window_s)
        verdicts, why = self._verdicts(c.recent.counts(), "")
        shared = self._shared.get(key)
        if shared is not None and self._shared_since >= c.closed_at:
            across, why_across = self._verdicts(shared, "across replicas: ")
            for name, v in across.items():
                if v == RateVerdict.violated.value:
                    verdicts[name] = v
            why = why or why_across
        return verdicts, why

    def _verdicts(self, counts: dict[str, int], prefix: str) -> tuple[dict[str, str], str | None]:
        reports = rate_reports(counts, self.thresholds)
        verdicts = {n: r.verdict.value for n in self.thresholds if (r := reports[n]).verdict is not None}
        for name in self.thresholds:
            r = reports[name]
            if r.verdict is RateVerdict.violated and r.n >= self.min_calls:
                return verdicts, prefix + _describe(name, r)
        return verdicts, None

    def admit(self, provider: str, model: str) -> Admission:
        c = self._circuit(provider, model)
        now = self.clock()
        change: CircuitChange | None = None
        if c.state is CircuitState.closed:
            verdicts, why = self._judge((provider, model), c, now) if self.thresholds else ({}, None)
            if why is None:
                return Admission(allowed=True, state=c.state, verdicts=verdicts)
            c.verdicts, c.reason = verdicts, why
            change = self._move(c, provider, model, CircuitState.open, why, now)
            return Admission(allowed=False, state=c.state, reason=why, verdicts=verdicts, change=change)
        if c.state is CircuitState.open:
            if now < c.until:
                reason = f"circuit open for {c.until - now:.0f} s more: {c.reason}"
                return Admission(allowed=False, state=c.state, reason=reason, verdicts=c.verdicts)
            change = self._move(c, provider, model, CircuitState.half_open, "the cooldown is over: probing", now)
        if c.probing:
            reason = "circuit half-open: a probe is in flight"
            return Admission(allowed=False, state=c.state, reason=reason, verdicts=c.verdicts, change=change)
        c.probing = True
        return Admission(allowed=True, state=c.state, probe=True, verdicts=c.verdicts, change=change)

    def settle(self, provider: str, model: str, *, ok: bool, detail: str = "") -> CircuitChange | None:
        """A probe's outcome: ``ok`` (it answered) counts toward closing; a failure opens the circuit again."""
        c = self._circuit(provider, model)
        if c.state is not CircuitState.half_open:
            return None
        c.probing = False
        now = self.clock()
        if not ok:
            c.reason = f"a half-open probe failed: {detail}" if detail else "a half-open probe failed"
            return self._move(c, provider, model, CircuitState.open, c.reason, now)
        c.successes += 1
        if c.successes < self.probes:
            return None
        c.recent = _Recent(self.max_recent)  # counting starts afresh: the old failures are not the model's now
        c.verdicts, c.reason, c.closed_at = {}, "", now
        return self._move(c, provider, model, CircuitState.closed, f"{c.successes} probe(s) in a row answered", now)

    def release(self, provider: str, model: str) -> None:
        """A probe that ended without an outcome (cancelled): the next call may probe."""
        self._circuit(provider, model).probing = False

    def _move(self, c: _Circuit, provider: str, model: str, to: CircuitState, why: str, now: float) -> CircuitChange:
        previous, c.state = c.state, to
        c.successes, c.probing = 0, False
        if to is CircuitState.open:
            c.until = now + self.cooldown_s
        return CircuitChange(
            provider=provider, model_id=model, state=to, previous=previous, reason=why, verdicts=dict(c.verdicts)
        )
