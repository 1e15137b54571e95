"""Statistical SLAs per pinned model: which rates are measured over which calls, and their verdicts.

A model is a (provider, model id) pair. Its rates come from the counters of :class:`~keel.memory.types.ModelWindow`
(``GET /v1/slo``, over ``KEEL_SLO_WINDOW_H``) or of the circuit breaker's recent calls
(:mod:`keel.orchestration.llm.models.circuit`); both go through :func:`rate_reports`, so a rate means the same
everywhere. Each rate carries its Wilson 95% interval, its ``n``, and, where ``KEEL_SLO`` sets a threshold, a
verdict (the rule is :func:`keel.orchestration.llm.intervals.verdict`'s).

Denominators: validity rates are over structured answers (a JSON schema or an output type was asked for, and an
answer came back: not a failed call, a refusal or a cut-off); error, refusal and truncation rates are over settled
calls (every call but the cancelled ones, which say nothing about the model); repair, fallback and cancellation
rates are over all calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keel.errors import ConfigError
from keel.memory.types import ModelWindow
from keel.orchestration.llm.intervals import Direction, JudgedRate, judge


@dataclass(kw_only=True, slots=True, frozen=True)
class Metric:
    counter: str
    """The :data:`~keel.memory.types.WINDOW_COUNTERS` name of the numerator."""
    over: str
    """The denominator: ``structured``, ``settled`` (calls - cancelled) or ``calls``."""
    direction: Direction


METRICS: dict[str, Metric] = {
    "json_valid": Metric(counter="json_valid", over="structured", direction=Direction.floor),
    "schema_valid": Metric(counter="schema_valid", over="structured", direction=Direction.floor),
    "error": Metric(counter="errors", over="settled", direction=Direction.ceiling),
    "error_429": Metric(counter="errors_429", over="settled", direction=Direction.ceiling),
    "error_5xx": Metric(counter="errors_5xx", over="settled", direction=Direction.ceiling),
    "error_timeout": Metric(counter="errors_timeout", over="settled", direction=Direction.ceiling),
    "error_cut": Metric(counter="errors_cut", over="settled", direction=Direction.ceiling),
    "refusal": Metric(counter="refusals", over="settled", direction=Direction.ceiling),
    "truncation": Metric(counter="truncations", over="settled", direction=Direction.ceiling),
    "repair": Metric(counter="repairs", over="calls", direction=Direction.ceiling),
    "fallback": Metric(counter="fallbacks", over="calls", direction=Direction.ceiling),
    "cancelled": Metric(counter="cancelled", over="calls", direction=Direction.ceiling),
}
"""Every rate ``/v1/slo`` reports, by the name ``KEEL_SLO`` gives thresholds under."""

BREAKER_METRICS = ("error", "error_429", "error_5xx", "error_timeout", "error_cut", "json_valid", "schema_valid")
"""The rates whose ``violated`` verdict opens a model's circuit: its errors and the validity of its answers."""


def check_thresholds(raw: Mapping[str, Any]) -> dict[str, float]:
    """``KEEL_SLO`` checked: known rate names, each threshold a number in [0, 1]. A typo must not pass for an SLA
    that is never checked."""
    out: dict[str, float] = {}
    for name, value in raw.items():
        if name not in METRICS:
            raise ConfigError(f"KEEL_SLO names an unknown rate {name!r}; known: {', '.join(METRICS)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"KEEL_SLO[{name!r}] must be a rate between 0 and 1, not {value!r}")
        out[name] = float(value)
    return out


def rate_reports(counts: Mapping[str, int], thresholds: Mapping[str, float]) -> dict[str, JudgedRate]:
    """Every rate of :data:`METRICS` from a model's counters, with its interval and verdict."""
    totals = {
        "calls": counts["calls"],
        "settled": counts["calls"] - counts["cancelled"],
        "structured": counts["structured"],
    }
    return {
        name: judge(counts[metric.counter], totals[metric.over], thresholds.get(name), metric.direction)
        for name, metric in METRICS.items()
    }


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelReport:
    """One model's place in ``GET /v1/slo``."""

    provider: str
    model_id: str
    metrics: dict[str, JudgedRate]
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_n: int


def report(window: ModelWindow, thresholds: Mapping[str, float]) -> ModelReport:
    return ModelReport(
        provider=window.provider,
        model_id=window.model_id,
        metrics=rate_reports(window.counts, thresholds),
        latency_p50_ms=window.latency_ms(0.5),
        latency_p95_ms=window.latency_ms(0.95),
        latency_n=sum(window.latency_bins.values()),
    )


@dataclass(kw_only=True, slots=True, frozen=True)
class SloReport:
    """``GET /v1/slo``: every model called within the window, its rates, intervals and verdicts."""

    window_s: float
    models: list[ModelReport]
