"""Confidence intervals for rates, the verdict a threshold gives them, and whether two rates differ. Pure
arithmetic, no I/O (no scipy: the normal tail is ``math.erfc``).

A rate measured on ``n`` calls is a guess; the Wilson score interval says how far off it may be. It is used rather
than the textbook ``p ± z·sqrt(p(1-p)/n)`` because that one collapses to a zero-width interval at 0 or ``n``
successes (a model that failed 0 of 3 calls is not proven perfect) and can leave [0, 1]; Wilson's stays inside
[0, 1] and keeps a sensible width at small ``n`` (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it).

The verdict rule, written once here for every consumer (``GET /v1/slo``, the circuit breaker, ``keel eval``)::

    a "bad" rate (error, refusal, ...)  has a ceiling:  ok  when high <= threshold,  violated when low > threshold
    a "good" rate (json_valid, ...)     has a floor:    ok  when low >= threshold,   violated when high < threshold
    anything in between is uncertain (the interval straddles the threshold: more calls will tell)

That is the issue's "ok while the interval's upper bound clears the threshold, violated once the whole interval is
past it", read for both directions: a floor on json_valid is a ceiling on its complement (invalid JSON), so for a
good rate the bound that must clear the threshold is the low one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

Z95 = 1.959963984540054
"""The two-sided 95% normal quantile, Φ⁻¹(0.975)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Interval:
    """A measured rate: ``successes`` of ``n``, and its confidence interval [low, high]."""

    successes: int
    n: int
    low: float
    high: float

    @property
    def rate(self) -> float | None:
        """The point estimate; None when nothing was measured."""
        return self.successes / self.n if self.n else None


def wilson(successes: int, n: int, z: float = Z95) -> Interval:
    """The Wilson score interval of ``successes`` out of ``n`` (95% by default). With ``n == 0`` it is [0, 1]:
    nothing is known."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return Interval(successes=0, n=0, low=0.0, high=1.0)
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp the float noise at the ends: at 0 or n successes the exact bound is 0 or 1.
    return Interval(successes=successes, n=n, low=max(0.0, centre - half), high=min(1.0, centre + half))


class Direction(StrEnum):
    """Which side of its threshold a rate should stay on."""

    floor = "floor"
    """A good rate (json_valid, schema_valid): the threshold is a minimum."""
    ceiling = "ceiling"
    """A bad rate (error, refusal, truncation): the threshold is a maximum."""


class RateVerdict(StrEnum):
    ok = "ok"
    uncertain = "uncertain"
    violated = "violated"

    @property
    def level(self) -> int:
        """0, 1, 2: what the Prometheus gauge shows."""
        return _LEVELS[self]


_LEVELS = {RateVerdict.ok: 0, RateVerdict.uncertain: 1, RateVerdict.violated: 2}


def verdict(interval: Interval, threshold: float, direction: Direction) -> RateVerdict:
    """The verdict of a measured rate against its threshold (see the module docstring for the rule)."""
    if direction is Direction.ceiling:
        if interval.high <= threshold:
            return RateVerdict.ok
        return RateVerdict.violated if interval.low > threshold else RateVerdict.uncertain
    if interval.low >= threshold:
        return RateVerdict.ok
    return RateVerdict.violated if interval.high < threshold else RateVerdict.uncertain


@dataclass(kw_only=True, slots=True, frozen=True)
class JudgedRate(Interval):
    """A measured rate, its interval, and the verdict its threshold gives it: what ``GET /v1/slo``, the circuit
    breaker and ``keel eval`` report, in one shape."""

    threshold: float | None
    verdict: RateVerdict | None
    """None without a threshold."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "low": round(self.low, 6),
            "high": round(self.high, 6),
            "n": self.n,
            "threshold": self.threshold,
            "verdict": self.verdict.value if self.verdict else None,
        }


def judge(successes: int, n: int, threshold: float | None, direction: Direction) -> JudgedRate:
    """``successes`` of ``n`` with its Wilson interval, and, given a ``threshold``, its :func:`verdict`."""
    interval = wilson(successes, n)
    return JudgedRate(
        successes=interval.successes,
        n=interval.n,
        low=interval.low,
        high=interval.high,
        threshold=threshold,
        verdict=verdict(interval, threshold, direction) if threshold is not None else None,
    )


@dataclass(frozen=True, slots=True)
class TwoProportionTest:
    diff: float
    """``p1 - p2``."""
    z: float
    p_value: float
    """Two-sided."""


def normal_two_sided_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2))


def two_proportion_z_test(successes1: int, n1: int, successes2: int, n2: int) -> TwoProportionTest:
    """Whether two rates differ (``keel eval`` against a baseline): the pooled two-proportion z-test. With no
    variance to speak of (both all successes, or all failures, or an empty sample) the difference is not
    significant: p = 1."""
    if n1 <= 0 or n2 <= 0:
        return TwoProportionTest(diff=0.0, z=0.0, p_value=1.0)
    p1, p2 = successes1 / n1, successes2 / n2
    pooled = (successes1 + successes2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return TwoProportionTest(diff=p1 - p2, z=0.0, p_value=1.0)
    z = (p1 - p2) / se
    return TwoProportionTest(diff=p1 - p2, z=z, p_value=normal_two_sided_p(z))
