"""What an API key may do: its scopes, and the one rule of what a set of them holds.

A key belongs to one tenant. ``admin`` holds every scope that stays within its tenant (its tasks, tools, approvals
and keys). Two scopes reach past the tenant, so ``admin`` does not hold them: ``operator``, for any tenant's limits
(a tenant's own admin cannot lift its own rate, task cap or cost quotas) and what is counted over every tenant
(``GET /v1/models/stats``, ``GET /v1/slo``); and ``metrics``, for Prometheus's scrape of the whole server. The
server's operator holds them (``keel keys create --tenant ops --scopes admin,operator,metrics``); a key made over
HTTP never gets a scope its maker lacks.
"""

from __future__ import annotations

from collections.abc import Iterable

ADMIN = "admin"
OPERATOR = "operator"
METRICS = "metrics"
SCOPES = frozenset(
    {
        "tasks:read",
        "tasks:write",
        "tasks:approve",  # decide on a paused task's tool calls
        "tools:net",  # fetch_url: outbound HTTP to public addresses
        "tools:email",  # send_email
        METRICS,  # GET /metrics (Prometheus)
        ADMIN,
        OPERATOR,
    }
)
BEYOND_ADMIN = frozenset({OPERATOR, METRICS})
"""The scopes ``admin`` does not imply: they reach past its tenant."""


def holds(held: Iterable[str], scope: str) -> bool:
    """Whether a key with the scopes ``held`` may do what ``scope`` allows: it has it, or it has ``admin`` and
    ``scope`` stays within the tenant."""
    have = set(held)
    return scope in have or (ADMIN in have and scope not in BEYOND_ADMIN)
