"""Bearer API keys with scopes. Keys are hashed at rest; every task belongs to the key's tenant."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from keel.errors import AuthError, Forbidden
from keel.interaction.deps import keel_of
from keel.memory.types import ApiKey

SCOPES = frozenset(
    {
        "tasks:read",
        "tasks:write",
        "tasks:approve",  # decide on a paused task's tool calls
        "tools:net",  # fetch_url: outbound HTTP to public addresses
        "tools:email",  # send_email
        "admin",
    }
)


VerifyKey = Callable[[str], Awaitable[ApiKey | None]]


async def authenticate(authorization: str, verify_key: VerifyKey, scope: str) -> ApiKey:
    """The key an ``Authorization: Bearer <key>`` header carries, if it holds ``scope`` (or ``admin``). Raises
    :class:`AuthError` (401) for a missing or unknown key, :class:`Forbidden` (403) for a missing scope. The REST
    routes and ``/mcp`` both authenticate so."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing bearer API key")
    key = await verify_key(token.strip())
    if key is None:
        raise AuthError("invalid API key")
    if scope not in key.scopes and "admin" not in key.scopes:
        raise Forbidden(f"this API key lacks the scope {scope!r}")
    return key


def require(scope: str) -> Callable[[Request], Awaitable[ApiKey]]:
    """A route dependency: the request's key, holding ``scope``."""

    async def dependency(request: Request) -> ApiKey:
        return await authenticate(request.headers.get("authorization", ""), keel_of(request).verify_key, scope)

    return dependency


Reader = Annotated[ApiKey, Depends(require("tasks:read"))]
Writer = Annotated[ApiKey, Depends(require("tasks:write"))]
Approver = Annotated[ApiKey, Depends(require("tasks:approve"))]
Admin = Annotated[ApiKey, Depends(require("admin"))]
