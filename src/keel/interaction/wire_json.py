"""JSON on the wire: strict on the way in, never failing on the way out.

In: every JSON request body, on every edge (REST, the endpoint families, the OpenAI facade, MCP), is decoded once
more by :class:`StrictJson` before any route sees it, and refused with a 422 ``malformed_json`` problem when it holds
what JSON (RFC 8259) or I-JSON (RFC 7493) forbids but Python's ``json`` module lets through: a lone surrogate
(``"\\udc00"``, which no UTF-8 encoder can write back, so a task stored with one could never be read again), ``NaN``
and ``Infinity``, and a number too large for a double (``1e999``, which Python reads as infinity and JSON writes
back as ``null``). The rule lives here once, not on any field; pydantic then validates the body as usual.

Out: :func:`render` writes a response model as JSON and, should a stored value still hold a lone surrogate (a row
written before this check existed, or by another writer), replaces it with U+FFFD instead of failing: one bad row
must never turn a tenant's ``GET`` or listing into a 500.
"""

from __future__ import annotations

import email.message
import json
import math
import re
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, from_json
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.interaction.problems import problem

MALFORMED_JSON = "urn:keel:problem:malformed_json"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# A double overflows only past ~1.8e308: an exponent of three digits or more, or a mantissa of 309 digits. Bodies
# without either (nearly all) skip the walk for infinities.
_HUGE_NUMBER = re.compile(rb"\d[eE][+]?\d{3}|\d{309}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI would read a body of this type as JSON (``application/json``, ``*/*+json``, or no type)."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def check(body: bytes) -> tuple[str, str] | None:
    """Why ``body`` is refused, as ``(pointer, message)``; None when it is strict JSON, or when it is not JSON at all
    (left to the route, which answers a syntax error in its own way)."""
    try:
        value = from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        try:
            json.loads(body)
        except json.JSONDecodeError:
            return None  # not JSON for anyone: the route's own malformed-JSON answer (a 422 json_invalid)
        except UnicodeDecodeError:
            return "", "the body is not UTF-8 (RFC 8259 JSON is)"  # FastAPI would answer an undocumented 400
        except RecursionError:
            return "", "the body nests too deeply"
        except ValueError as unreadable:  # e.g. an integer of more digits than Python converts (4,300)
            return "", str(unreadable)
        return "", str(exc)  # JSON to Python, not to RFC 8259: a lone surrogate, NaN, Infinity, bad UTF-8
    if _HUGE_NUMBER.search(body):
        pointer = _non_finite(value, "")
        if pointer is not None:
            return pointer, "number out of range: larger than a double can hold"
    return None


def _non_finite(value: Any, pointer: str) -> str | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else pointer or "/"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{pointer}/{str(key).replace('~', '~0').replace('/', '~1')}")
        if found is not None:
            return found
    return None


class StrictJson:
    """Refuses a JSON request body that is not strict JSON (see the module docstring) with 422, before the app.

    The body is read here once (under :class:`~keel.interaction.limits.BodyLimit`, which wraps this) and handed
    on unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        content_type = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), None)
        if not is_json(content_type):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        refused = check(body) if body else None
        if refused is not None:
            pointer, reason = refused
            answer = problem(
                422,
                "Malformed JSON",
                "The request body is not strict JSON: no lone surrogates, NaN, Infinity or numbers beyond a double.",
                type=MALFORMED_JSON,
                extensions={"errors": [{"pointer": pointer, "message": reason, "type": "json_invalid"}]},
            )
            await answer(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect, as the server's receive does
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def scrub(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def render(model: BaseModel, *, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``model`` as a JSON response. A value JSON cannot carry (a lone surrogate in a stored row) is replaced,
    not raised: the rest of the answer (a whole page of tasks) is still served."""
    try:
        body = model.model_dump_json().encode()
    except PydanticSerializationError:
        body = json.dumps(scrub(model.model_dump(mode="json")), ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")
