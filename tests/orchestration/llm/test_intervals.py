"""The Wilson interval against published values, and the verdict rule in both directions."""

from __future__ import annotations

import random

import pytest

from keel.orchestration.llm.intervals import Direction, RateVerdict, verdict, wilson


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (score, no continuity correction).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_published_intervals(k: int, n: int, low: float, high: float) -> None:
    got = wilson(k, n)
    assert (got.low, got.high) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))
    assert got.rate == k / n and got.n == n


def test_wilson_edges() -> None:
    none = wilson(0, 0)
    assert (none.low, none.high, none.rate) == (0.0, 1.0, None)  # nothing measured: anything is possible
    all_ok = wilson(50, 50)
    assert all_ok.high == 1.0 and 0.92 < all_ok.low < 0.93  # never a zero-width interval at the edge
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_wilson_covers_the_true_rate_about_95_percent_of_the_time() -> None:
    rng = random.Random(19)
    p, n, trials = 0.08, 200, 2000
    covered = 0
    for _ in range(trials):
        k = sum(rng.random() < p for _ in range(n))
        iv = wilson(k, n)
        covered += iv.low <= p <= iv.high
    assert 0.93 <= covered / trials <= 0.97


def test_a_ceiling_is_ok_below_violated_above_uncertain_across() -> None:
    ceiling = Direction.ceiling
    assert verdict(wilson(0, 400), 0.02, ceiling) is RateVerdict.ok  # high 0.0095
    assert verdict(wilson(8, 400), 0.02, ceiling) is RateVerdict.uncertain  # 2% measured: the interval straddles
    assert verdict(wilson(40, 400), 0.02, ceiling) is RateVerdict.violated  # low 0.074
    assert verdict(wilson(0, 0), 0.02, ceiling) is RateVerdict.uncertain


def test_a_floor_mirrors_it() -> None:
    floor = Direction.floor
    assert verdict(wilson(995, 1000), 0.97, floor) is RateVerdict.ok  # low 0.988
    assert verdict(wilson(97, 100), 0.97, floor) is RateVerdict.uncertain
    assert verdict(wilson(900, 1000), 0.97, floor) is RateVerdict.violated  # high 0.917
    # The same data, seen as the complement against the complementary ceiling, gets the same verdict.
    for k in range(0, 101, 5):
        assert verdict(wilson(k, 100), 0.9, floor) is verdict(wilson(100 - k, 100), 0.1, Direction.ceiling)
    assert [v.level for v in RateVerdict] == [0, 1, 2]
