"""Per-tenant limits: the values and their rules, no I/O.

A tenant's limits are what an operator set for it (``PUT /v1/tenants/{tenant}/limits``) over the server's defaults
(``KEEL_LIMIT_*``). The token bucket's arithmetic lives here, once: a store only loads a bucket, calls
:func:`take_token` and saves what it returns, inside one transaction, so every replica sharing the store shares the
bucket and no two requests spend the same token.
"""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass, fields, replace


@dataclass(kw_only=True, slots=True, frozen=True)
class TenantLimits:
    """Every limit is optional; None means "no limit here" (and, on a tenant's own limits, "the default")."""

    rate_per_s: float | None = None
    """Sustained requests per second (the token bucket's refill rate)."""
    burst: int | None = None
    """The bucket's size: requests allowed at once after a quiet spell (default: one second's worth, at least 1)."""
    max_tasks: int | None = None
    """Tasks of the tenant queued or running at once; a submission beyond it is refused."""
    daily_cost_usd: float | None = None
    """Model spend per UTC day."""
    monthly_cost_usd: float | None = None
    """Model spend per UTC calendar month."""

    def over(self, defaults: TenantLimits) -> TenantLimits:
        """These limits, each unset one taken from ``defaults``."""
        return replace(
            defaults, **{f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        )

    @property
    def bucket_size(self) -> int:
        if self.burst is not None:
            return self.burst
        return max(1, math.ceil(self.rate_per_s or 0))


@dataclass(kw_only=True, slots=True, frozen=True)
class Bucket:
    """A token bucket as stored: the tokens it held at ``at``."""

    tokens: float
    at: float


@dataclass(kw_only=True, slots=True, frozen=True)
class RateDecision:
    """What one request's take from the bucket says, and what the ``RateLimit`` headers report."""

    allowed: bool
    limit: int
    """The bucket's size (the policy's quota)."""
    remaining: int
    """Whole tokens left after this request."""
    window_s: float
    """Seconds an empty bucket takes to fill (the policy's window)."""
    reset_s: float
    """Seconds until the bucket is full again."""
    retry_after_s: float
    """When refused: seconds until one token is back (0 when allowed)."""


def take_token(bucket: Bucket | None, rate_per_s: float, size: int, now: float) -> tuple[Bucket, RateDecision]:
    """Refill ``bucket`` (None: a new, full one) at ``rate_per_s`` up to ``size`` and take one token if there is one.
    Returns the bucket to store and the decision. A clock that went back refills nothing (never a negative span)."""
    if bucket is None:
        tokens = float(size)
    else:
        tokens = min(float(size), bucket.tokens + max(0.0, now - bucket.at) * rate_per_s)
    allowed = tokens >= 1.0
    if allowed:
        tokens -= 1.0
    return Bucket(tokens=tokens, at=now), decision(allowed, tokens, rate_per_s, size)


MAX_WAIT_S = 1e9
"""The longest span a decision reports (about 31 years). A rate the API accepts can be as small as the smallest
float (``gt=0``), and a bucket divided by it is infinite: no header can say that, and ``ceil(inf)`` raised on every
request of the tenant (found by the reliability battery's Schemathesis run)."""


def decision(allowed: bool, tokens: float, rate_per_s: float, size: int) -> RateDecision:
    """What a take that left ``tokens`` in the bucket reports (also for a store that takes in its own language)."""

    def span(amount: float) -> float:
        return min(amount / rate_per_s, MAX_WAIT_S)

    return RateDecision(
        allowed=allowed,
        limit=size,
        remaining=int(tokens),
        window_s=span(size),
        reset_s=span(size - tokens),
        retry_after_s=0.0 if allowed else span(1.0 - tokens),
    )


def day_start(at: float) -> float:
    """The start of ``at``'s UTC day."""
    return at // 86400 * 86400


def month_start(at: float) -> float:
    """The start of ``at``'s UTC calendar month."""
    t = time.gmtime(at)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))


def next_month_start(at: float) -> float:
    t = time.gmtime(at)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))
