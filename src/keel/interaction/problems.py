"""RFC 9457 problem details: every non-2xx response, mapped in one place. No tracebacks, no paths."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from keel.errors import KeelError

log = logging.getLogger("keel.http")
PROBLEM_JSON = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    type: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"type": type or "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _pointer(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(KeelError)
    async def keel_error(request: Request, exc: KeelError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return problem(
            exc.status,
            HTTPStatus(exc.status).phrase,
            exc.message,
            type=f"urn:keel:problem:{exc.code}",
            headers=headers,
            **({"context": exc.detail} if exc.detail else {}),
        )

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
            type="urn:keel:problem:" + ("malformed_json" if malformed else "validation_error"),
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = "body_too_large" if exc.status_code == 413 else None
        return problem(
            exc.status_code,
            HTTPStatus(exc.status_code).phrase,
            str(exc.detail) if exc.detail else None,
            type=f"urn:keel:problem:{slug}" if slug else None,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "Internal Server Error", "An unexpected error occurred; it has been logged.")
