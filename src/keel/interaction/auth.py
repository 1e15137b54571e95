"""Bearer API keys with scopes. Keys are hashed at rest; every task belongs to the key's tenant.

Every request verifies its key against the store (one indexed read, about 0.09 ms on SQLite), with no cache: a
revocation or an expiry made anywhere (``keel keys revoke`` in another process, ``/v1/keys``, another replica)
holds from the next request on. A cache of verified keys added here must keep that promise: never keep a key
past its :attr:`~keel.memory.types.ApiKey.expires_at`, and drop it on every replica when it is revoked (Redis
pub/sub where ``KEEL_REDIS_URL`` is set; on SQLite nothing tells an in-process cache about a CLI revocation, so
there it cannot cache at all).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from keel.errors import AuthError, Forbidden
from keel.interaction.deps import keel_of
from keel.interaction.ratelimit import charge
from keel.memory.types import ApiKey
from keel.scopes import holds

BEARER = HTTPBearer(
    scheme_name="bearerAuth",
    bearerFormat="keel API key",
    description="A keel API key: `Authorization: Bearer keel_…` (create one with `keel keys create`). An "
    "operation's security requirement names the scope it needs; a key with `admin` holds every scope.",
    auto_error=False,  # keel answers a missing key itself: 401 problem+json, with keel's own message
)
"""The OpenAPI ``http``/``bearer`` security scheme: what Swagger's Authorize button fills in."""

VerifyKey = Callable[[str], Awaitable[ApiKey | None]]


async def authorize(token: str | None, verify_key: VerifyKey, scope: str) -> ApiKey:
    """The key ``token`` names, if it :func:`~keel.scopes.holds` ``scope``. Raises :class:`AuthError` (401) for a
    missing or unknown key, :class:`Forbidden` (403) for a missing scope."""
    if not token:
        raise AuthError("missing bearer API key")
    key = await verify_key(token)
    if key is None:
        raise AuthError("invalid API key")
    if not holds(key.scopes, scope):
        raise Forbidden(f"this API key lacks the scope {scope!r}")
    return key


async def authenticate(authorization: str, verify_key: VerifyKey, scope: str) -> ApiKey:
    """:func:`authorize` for a raw ``Authorization`` header, read as :data:`BEARER` reads it: ``/mcp`` is served
    outside FastAPI's dependencies, and must accept exactly the keys the REST routes accept."""
    scheme, token = get_authorization_scheme_param(authorization)
    return await authorize(token if scheme.lower() == "bearer" else None, verify_key, scope)


def require(scope: str) -> Callable[..., Awaitable[ApiKey]]:
    """A route dependency: the request's key, holding ``scope``, charged one request of its tenant's rate. Through
    :data:`BEARER` with ``scope`` as the requirement's role, so the OpenAPI document lists both on every protected
    operation."""

    # The default, not an Annotated hint: this module's annotations are strings, and ``scope`` is no global.
    async def dependency(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Security(BEARER, scopes=[scope]),  # noqa: B008
    ) -> ApiKey:
        keel = keel_of(request)
        key = await authorize(credentials.credentials if credentials else None, keel.verify_key, scope)
        await charge(request, keel, key)  # the tenant's request rate: 429 when its bucket is empty
        return key

    return dependency


Reader = Annotated[ApiKey, Depends(require("tasks:read"))]
Writer = Annotated[ApiKey, Depends(require("tasks:write"))]
Approver = Annotated[ApiKey, Depends(require("tasks:approve"))]
Admin = Annotated[ApiKey, Depends(require("admin"))]
Operator = Annotated[ApiKey, Depends(require("operator"))]
"""What reaches past the key's tenant: any tenant's limits, counters over every tenant (:mod:`keel.scopes`)."""
