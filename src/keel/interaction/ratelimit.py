"""A tenant's request rate at the HTTP edge: one token per authenticated request, 429 when the bucket is empty, and
the IETF ``RateLimit`` / ``RateLimit-Policy`` fields (draft-ietf-httpapi-ratelimit-headers-09) on every answer.

The bucket lives in the store (:meth:`keel.memory.stores.LimitStore.take_token`), so replicas on one store share
it; this module only turns the service's decision into headers and a problem.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from fastapi import Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.errors import RateLimited
from keel.memory.limits import RateDecision
from keel.memory.types import ApiKey
from keel.service import Keel

POLICY = "tenant"
"""The policy's name in the fields: one bucket per tenant."""
_STATE = "keel_rate_limit"


def rate_headers(decision: RateDecision) -> dict[str, str]:
    """``RateLimit-Policy: "tenant";q=<bucket size>;w=<seconds to fill it>`` and
    ``RateLimit: "tenant";r=<tokens left>;t=<seconds until full>`` (whole seconds, rounded up)."""
    return {
        "RateLimit-Policy": f'"{POLICY}";q={decision.limit};w={math.ceil(decision.window_s)}',
        "RateLimit": f'"{POLICY}";r={decision.remaining};t={math.ceil(decision.reset_s)}',
    }


async def spend(keel: Keel, key: ApiKey) -> RateDecision | None:
    """Spend one of the key's tenant's request tokens: raises :class:`RateLimited` (429, ``Retry-After`` and the
    fields) when none is left. None when the tenant has no rate limit."""
    decision = await keel.take_request(key.tenant)
    if decision is not None and not decision.allowed:
        raise RateLimited(
            "this tenant's request rate is exceeded; retry after the time Retry-After gives",
            retry_after_s=decision.retry_after_s,
            headers=rate_headers(decision),
            detail={"limit": decision.limit, "window_s": decision.window_s},
        )
    return decision


async def charge(request: Request, keel: Keel, key: ApiKey) -> None:
    """:func:`spend`, and the answer carries the fields (:class:`RateLimitHeaders`)."""
    decision = await spend(keel, key)
    if decision is not None:
        request.scope.setdefault("state", {})[_STATE] = decision


def rate_limited(service: Callable[[], Keel]) -> Callable[[str], Awaitable[ApiKey | None]]:
    """A ``verify_key`` for an edge served outside FastAPI's dependencies (``/mcp``): the key, charged one request
    of its tenant's rate as a REST request is."""

    async def verify(token: str) -> ApiKey | None:
        keel = service()
        key = await keel.verify_key(token)
        if key is not None:
            await spend(keel, key)
        return key

    return verify


class RateLimitHeaders:
    """ASGI middleware: adds the ``RateLimit`` fields of the request's decision (set by :func:`charge`) to its
    answer, whatever the route returns (a model, a ``JSONResponse``, a stream)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_fields(message: Message) -> None:
            decision = scope.get("state", {}).get(_STATE)
            if message["type"] == "http.response.start" and isinstance(decision, RateDecision):
                headers = MutableHeaders(scope=message)
                for name, value in rate_headers(decision).items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_fields)
