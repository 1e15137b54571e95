"""RFC 9457 problem details: every non-2xx response, mapped in one place. No tracebacks, no paths.

One shape on every endpoint: ``type`` (``urn:keel:problem:<slug>``), ``title``, ``status``, ``detail``, and the
error's own extension members at the top level. A request that does not validate, whether FastAPI found it (the
body or a parameter) or keel did (a workflow's input schema, a tool allowlist, an upload), is ``validation_error``
with ``errors[]``: one ``{pointer, message}`` per problem, ``pointer`` a JSON pointer into the request body.
:class:`Problem` is that shape; the OpenAPI document declares it on every non-2xx response
(:mod:`keel.interaction.openapi`), and every body here is built through it, so the two cannot drift.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from keel.errors import InputError, KeelError, LimitExceeded

log = logging.getLogger("keel.http")
PROBLEM_JSON = "application/problem+json"
VALIDATION_ERROR = "urn:keel:problem:validation_error"


class ProblemError(BaseModel):
    """One reason a request was refused."""

    model_config = ConfigDict(extra="allow")
    pointer: str = Field(description="JSON pointer (RFC 6901) into the request body, e.g. `/input/documents/0`.")
    message: str = Field(description="What is wrong there.")
    type: str | None = Field(None, description="The validator's kind, e.g. `missing` or `string_too_short`.")


class Problem(BaseModel):
    """RFC 9457 problem details: the body of every non-2xx answer (`application/problem+json`)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:keel:problem:not_found",
                    "title": "Not Found",
                    "status": 404,
                    "detail": "no task tsk_9c1f0e",
                },
                {
                    "type": VALIDATION_ERROR,
                    "title": "Validation failed",
                    "status": 422,
                    "detail": "input does not match the workflow's schema",
                    "errors": [{"pointer": "/input/steps", "message": "Input should be a valid integer"}],
                },
            ]
        },
    )
    type: str = Field("about:blank", description="`urn:keel:problem:<slug>`; the slug is stable and machine-readable.")
    title: str = Field(description="The HTTP status phrase, or a short summary of the problem kind.")
    status: int = Field(ge=400, le=599, description="The HTTP status code, repeated.")
    detail: str | None = Field(None, description="What went wrong with this request, for a person.")
    instance: str | None = Field(None, description="A URI for this occurrence, when there is one.")
    errors: list[ProblemError] | None = Field(
        None, description="With `validation_error`: every field that failed, by JSON pointer."
    )


_MEMBERS = frozenset(Problem.model_fields)


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    type: str | None = None,
    headers: Mapping[str, str] | None = None,
    extensions: Mapping[str, object] | None = None,
) -> JSONResponse:
    """A problem+json answer. ``extensions`` are extension members (``errors`` among them); they never shadow the
    standard ones (a colliding name, such as an upstream ``status``, is left out rather than misreport the
    answer's own)."""
    extra = {k: v for k, v in (extensions or {}).items() if k not in _MEMBERS or k == "errors"}
    body = Problem.model_validate(
        {**extra, "type": type or "about:blank", "title": title, "status": status, "detail": detail or None}
    )
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _pointer(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def of_error(exc: KeelError) -> JSONResponse:
    """A :class:`KeelError` as a problem: its code is the slug, its message the detail, its ``detail`` mapping
    the extension members. A plain :class:`InputError` that lists ``errors`` is a ``validation_error``, the same
    kind as a body FastAPI refused: a client handles one shape, whichever layer caught the mistake."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if isinstance(exc, LimitExceeded):
        headers = exc.headers
    if type(exc) is InputError and "errors" in exc.detail:
        return problem(exc.status, "Validation failed", exc.message, type=VALIDATION_ERROR, extensions=exc.detail)
    return problem(
        exc.status,
        HTTPStatus(exc.status).phrase,
        exc.message,
        type=f"urn:keel:problem:{exc.code}",
        headers=headers,
        extensions=exc.detail,
    )


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(routes: Sequence[BaseRoute], scope: Scope) -> set[str]:
    """Every method some route serves at the request's path (asked of the routes themselves, as the router asks
    them), and ``OPTIONS``, which every path with a route answers (204 with this set as ``Allow``). A 405's
    ``Allow`` is the same set, so the two always agree with the routes."""
    methods = {"OPTIONS"}
    base = {"type": "http", "path": scope["path"], "root_path": scope.get("root_path", ""), "headers": []}
    for method in _METHODS:
        probe = {**base, "method": method}
        if any(route.matches(dict(probe))[0] is Match.FULL for route in routes):
            methods.add(method)
    return methods


def install(app: FastAPI) -> None:
    @app.exception_handler(KeelError)
    async def keel_error(request: Request, exc: KeelError) -> JSONResponse:
        return of_error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"pointer": _pointer(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        malformed = any(e["type"] == "json_invalid" for e in errors)
        return problem(
            422,
            "Malformed JSON" if malformed else "Validation failed",
            "The request body is not valid JSON." if malformed else "The request does not match the schema.",
            type="urn:keel:problem:malformed_json" if malformed else VALIDATION_ERROR,
            extensions={"errors": errors},
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        slug = "body_too_large" if exc.status_code == 413 else None
        headers = exc.headers
        if exc.status_code == 405:
            # The router names only the first route that matched the path; a path is often served by several.
            allow = ", ".join(sorted(allowed_methods(request.app.routes, request.scope)))
            if request.method == "OPTIONS":
                return Response(status_code=204, headers={"Allow": allow})
            headers = {**(headers or {}), "Allow": allow}
        return problem(
            exc.status_code,
            HTTPStatus(exc.status_code).phrase,
            str(exc.detail) if exc.detail else None,
            type=f"urn:keel:problem:{slug}" if slug else None,
            headers=headers,
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "Internal Server Error", "An unexpected error occurred; it has been logged.")
