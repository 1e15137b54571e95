"""The client's error tree: every failure the client raises derives from :class:`KeelClientError`.

::

    KeelClientError
    ├── KeelAPIError            # the server answered with an RFC 9457 problem (any non-2xx)
    │   ├── InvalidRequest      # 400, 422: the body, a header or a parameter is wrong (``errors`` has pointers)
    │   ├── Unauthorized        # 401: missing or unknown API key
    │   ├── Forbidden           # 403: the key lacks a scope
    │   ├── NotFound            # 404: no such task, document or call for this tenant
    │   ├── Conflict            # 409: the same Idempotency-Key is still in flight
    │   ├── PayloadTooLarge     # 413
    │   ├── RateLimited         # 429 (``retry_after``)
    │   └── ServerError         # 5xx
    ├── KeelConnectionError     # no answer at all: refused, reset, timed out
    ├── WaitTimeout             # ``wait()`` ran out of time; ``task`` is the last state seen
    └── StreamInterrupted       # the event stream could not be resumed; ``last_event_id`` says where it stopped

A problem body is parsed generically: the five RFC 9457 members become attributes and every other member is kept
in ``extensions``, so the client reads today's shapes (``context.errors`` under ``invalid_request``, top-level
``errors`` under ``validation_error``) and whatever a later server adds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from keel.client._types import Task

_MEMBERS = ("type", "title", "status", "detail", "instance")


class KeelClientError(Exception):
    """Root of every error the client raises."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """RFC 9457 problem details, as the server sent them."""

    type: str = "about:blank"
    """A URI naming the kind of problem; keel's are ``urn:keel:problem:<code>``."""
    title: str = ""
    status: int
    detail: str | None = None
    instance: str | None = None
    extensions: dict[str, Any] = field(default_factory=dict)
    """Every member beyond the five standard ones (``errors``, ``context``, …), untouched."""

    @property
    def code(self) -> str:
        """The last segment of ``type`` (``not_found``, ``validation_error``, …); ``""`` for ``about:blank``."""
        return "" if self.type == "about:blank" else self.type.rsplit(":", 1)[-1].rsplit("/", 1)[-1]

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Per-field errors (``{"pointer", "message", …}``), from top-level ``errors`` or ``context.errors``:
        the two shapes keel has used."""
        found = self.extensions.get("errors")
        if found is None and isinstance(self.extensions.get("context"), dict):
            found = self.extensions["context"].get("errors")
        return [e for e in found if isinstance(e, dict)] if isinstance(found, list) else []

    @classmethod
    def of(cls, response: httpx.Response) -> Problem:
        """The problem a response carries; a body that is not a JSON object (a proxy's HTML page) still gives
        the status, the reason phrase as title and the start of the text as detail."""
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            text = response.text.strip()[:500] or None
            return cls(title=response.reason_phrase, status=response.status_code, detail=text)
        status = body.get("status")
        return cls(
            type=str(body.get("type") or "about:blank"),
            title=str(body.get("title") or response.reason_phrase),
            status=status if isinstance(status, int) else response.status_code,
            detail=None if body.get("detail") is None else str(body["detail"]),
            instance=None if body.get("instance") is None else str(body["instance"]),
            extensions={k: v for k, v in body.items() if k not in _MEMBERS},
        )


class KeelAPIError(KeelClientError):
    """The server answered with a problem. ``status``, ``type``, ``title``, ``detail`` and ``extensions`` are the
    problem's; ``headers`` are the response's (``WWW-Authenticate``, ``Retry-After``)."""

    def __init__(self, problem: Problem, *, method: str = "", url: str = "", headers: httpx.Headers | None = None):
        where = f" ({method} {url})" if method else ""
        super().__init__(f"{problem.status} {problem.title}: {problem.detail or problem.type}{where}")
        self.problem = problem
        self.method = method
        self.url = url
        self.headers = headers or httpx.Headers()

    @property
    def status(self) -> int:
        return self.problem.status

    @property
    def type(self) -> str:
        return self.problem.type

    @property
    def title(self) -> str:
        return self.problem.title

    @property
    def detail(self) -> str | None:
        return self.problem.detail

    @property
    def code(self) -> str:
        return self.problem.code

    @property
    def extensions(self) -> dict[str, Any]:
        return self.problem.extensions

    @property
    def errors(self) -> list[dict[str, Any]]:
        return self.problem.errors

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked the client to wait (``Retry-After``), if it did."""
        return retry_after(self.headers)


class InvalidRequest(KeelAPIError):
    """400 or 422: the request is wrong; ``errors`` point at what."""


class Unauthorized(KeelAPIError):
    """401: no API key, or one the server does not know."""


class Forbidden(KeelAPIError):
    """403: the key lacks a scope the call needs."""


class NotFound(KeelAPIError):
    """404: no such resource for this key's tenant (another tenant's task is a 404 too)."""


class Conflict(KeelAPIError):
    """409: a request with this Idempotency-Key is still in flight."""


class PayloadTooLarge(KeelAPIError):
    """413: the body is over the server's limit."""


class RateLimited(KeelAPIError):
    """429: slow down; ``retry_after`` says for how long."""


class ServerError(KeelAPIError):
    """5xx: the server failed; the request may be retried."""


_BY_STATUS: dict[int, type[KeelAPIError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
}


def api_error(response: httpx.Response) -> KeelAPIError:
    """The typed exception for a non-2xx response: one table, one place."""
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else KeelAPIError)
    request = response.request
    return cls(Problem.of(response), method=request.method, url=str(request.url), headers=response.headers)


class KeelConnectionError(KeelClientError):
    """The server could not be reached, or the connection broke before an answer (the cause is chained)."""


class WaitTimeout(KeelClientError):
    """``wait()`` gave up; the task goes on on the server. ``task`` is the last state the client saw."""

    def __init__(self, task: Task, timeout: float) -> None:
        super().__init__(f"task {task.id} still {task.status} after {timeout:g}s")
        self.task = task
        self.timeout = timeout


class StreamInterrupted(KeelClientError):
    """The event stream broke and could not be resumed; reading again from ``last_event_id`` loses nothing."""

    def __init__(self, task_id: str, last_event_id: int, attempts: int) -> None:
        super().__init__(f"the events of {task_id} broke off after id {last_event_id}; {attempts} reconnects failed")
        self.task_id = task_id
        self.last_event_id = last_event_id


def retry_after(headers: httpx.Headers) -> float | None:
    """``Retry-After`` in seconds, from delta-seconds or an HTTP date; ``None`` when absent or unreadable."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
