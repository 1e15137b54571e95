"""What every router shares: the application service of the request, and the OpenAPI table of problem answers."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated, Any

from fastapi import Depends, Request

from keel.service import Keel

Responses = dict[int | str, dict[str, Any]]


def problem(description: str) -> dict[str, Any]:
    """One documented problem answer. Its body schema, ``Problem`` as ``application/problem+json``, is added to
    every non-2xx answer in one place (:func:`keel.interaction.openapi.finish`)."""
    return {"description": description}


def errors(missing: str | None = None) -> Responses:
    """The problem answers every authenticated route documents: 401, 403, 429 (the tenant's request rate), and 404
    when ``missing`` says what may not be found."""
    table: Responses = {
        401: problem("Missing or invalid API key"),
        403: problem("The key lacks a scope"),
        429: problem("A limit of the key's tenant: its request rate, tasks or cost quota (see `Retry-After`)"),
    }
    if missing is not None:
        table[404] = problem(missing)
    return table


def keel_of(request: Request) -> Keel:
    """The service the app's lifespan built (no request is served before it)."""
    keel: Keel = request.app.state.keel
    return keel


async def _app(request: Request) -> Keel:
    # A coroutine, not a plain function: FastAPI runs a plain dependency in a worker thread, one hop per request.
    return keel_of(request)


App = Annotated[Keel, Depends(_app)]
"""A route parameter: the application service."""


def new_session(tenant: str, idempotency_key: str | None) -> str:
    """The session a conversation starts when the caller names none. A retry with the same Idempotency-Key must
    mint the same session, or its body (and so its hash) would differ and the retry would be refused."""
    if idempotency_key is not None:
        return "ses_" + hashlib.sha256(f"{tenant}\x1f{idempotency_key}".encode()).hexdigest()[:24]
    return "ses_" + secrets.token_hex(12)
