"""Small, pure statistics for rates of model behaviour: a Wilson score interval for one rate, and a
two-proportion z-test for the difference of two. No scipy: the normal tail is ``math.erfc``.

Why Wilson and not the textbook ``p ± z·sqrt(p(1-p)/n)``: at the rates that matter here (97% valid JSON, 1% errors)
and at a few dozen calls, the textbook interval leaves [0, 1], and collapses to a point at 0 or n successes; Wilson's
stays inside and keeps a width (Brown, Cai & DasGupta, "Interval Estimation for a Binomial Proportion", 2001).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["TwoProportionTest", "normal_two_sided_p", "two_proportion_z_test", "verdict", "wilson_interval"]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of ``successes / n`` (95% for the default ``z``); ``(0.0, 1.0)`` when ``n`` is 0:
    nothing observed, nothing excluded."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within 0..{n}, got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = (z / (1 + z2 / n)) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class TwoProportionTest:
    diff: float
    """``p1 - p2``."""
    z: float
    p_value: float
    """Two-sided."""


def normal_two_sided_p(z: float) -> float:
    """P(|Z| ≥ |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2))


def two_proportion_z_test(successes1: int, n1: int, successes2: int, n2: int) -> TwoProportionTest:
    """Whether two rates differ: the pooled two-proportion z-test. With no variance to speak of (both all
    successes, or all failures, or an empty sample) the difference is not significant: p = 1."""
    if n1 <= 0 or n2 <= 0:
        return TwoProportionTest(diff=0.0, z=0.0, p_value=1.0)
    p1, p2 = successes1 / n1, successes2 / n2
    pooled = (successes1 + successes2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return TwoProportionTest(diff=p1 - p2, z=0.0, p_value=1.0)
    z = (p1 - p2) / se
    return TwoProportionTest(diff=p1 - p2, z=z, p_value=normal_two_sided_p(z))


def verdict(low: float, high: float, threshold: float) -> Literal["ok", "uncertain", "violated"]:
    """A rate that should be at least ``threshold``, judged by its interval ``[low, high]``: ``ok`` when the whole
    interval clears the threshold, ``violated`` when the whole interval falls short, ``uncertain`` in between."""
    if low >= threshold:
        return "ok"
    if high < threshold:
        return "violated"
    return "uncertain"
