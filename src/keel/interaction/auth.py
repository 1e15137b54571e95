"""Bearer API keys with scopes. Keys are hashed at rest; every task belongs to the key's tenant."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request

from keel.errors import AuthError, Forbidden
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


def require(scope: str) -> Callable[[Request], Awaitable[ApiKey]]:
    async def dependency(request: Request) -> ApiKey:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("missing bearer API key")
        key: ApiKey | None = await request.app.state.keel.store.verify_key(token.strip())
        if key is None:
            raise AuthError("invalid API key")
        if scope not in key.scopes and "admin" not in key.scopes:
            raise Forbidden(f"this API key lacks the scope {scope!r}")
        return key

    return dependency
