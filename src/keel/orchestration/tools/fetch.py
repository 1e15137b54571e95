"""The body of the built-in ``fetch_url`` tool: one HTTP(S) GET through the SSRF guard, within hard caps.

Every hop goes through :func:`keel.netguard.guarded_request`: the host is resolved once and checked, the
connection is pinned to the checked address (so a second DNS answer cannot move it), and each redirect target
is checked again. The client never uses a proxy (a proxy would resolve the name by itself).

The caps are enforced, never silently: a body over ``max_bytes`` (declared or streamed), a content type that
is not allowed, or a fetch that takes longer than ``timeout_s`` end in :class:`FetchRefused`; an HTTP error from
the final hop ends in :class:`keel.errors.UpstreamError`; an address the SSRF rules refuse ends in
:class:`keel.errors.BlockedAddress`.

:func:`probe_document` asks the same guarded client, cheaply, whether a document URL can work at all (a ``HEAD``,
or the first byte of a ``GET``), so that a task can be refused at submission rather than after its retries.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
from dataclasses import dataclass
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from keel import observability
from keel.errors import BlockedAddress, DocumentRejected, KeelError, UpstreamError
from keel.headers import retry_after
from keel.memory.ingest.pipeline import Fetched, Fetcher
from keel.netguard import NO_ALLOW, AllowList, guarded_request

_TEXT_TYPES = frozenset({"application/json", "application/xml", "application/xhtml+xml", "application/javascript"})


class FetchRefused(KeelError):
    """A fetch was stopped by one of its caps: size, content type or time."""

    code = "fetch_refused"
    status = 422


class FetchArgs(BaseModel):
    """Fetch one web page or document over HTTP(S)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=4096,
        description="The absolute http:// or https:// URL to fetch. Private and internal addresses are refused.",
    )
    max_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Refuse bodies larger than this many bytes. Can only lower the configured limit.",
    )


@dataclass(kw_only=True, slots=True, frozen=True)
class FetchLimits:
    """The operator's caps for ``fetch_url``."""

    max_bytes: int = 5_000_000
    """Largest body accepted; a larger one is refused, never truncated."""
    timeout_s: float = 20.0
    """Wall-clock limit for the whole fetch: every redirect hop and the body."""
    max_redirects: int = 5
    content_types: tuple[str, ...] = (
        "text/",
        "application/json",
        "application/pdf",
        "application/xml",
        "application/xhtml+xml",
    )
    """Allowed media types (parameters ignored): an entry ending in ``/`` allows the whole top-level type,
    any other entry exactly that media type."""
    allow: AllowList = NO_ALLOW
    """Hosts and networks exempt from the SSRF rules (tests and local development only)."""


class FetchResult(BaseModel):
    """What ``fetch_url`` returns."""

    url: str = Field(description="The final URL, after redirects.")
    status: int = Field(description="The HTTP status of the final response.")
    content_type: str = Field(description="The Content-Type header of the final response.")
    text: str | None = Field(default=None, description="The body as text, for text-like content types.")
    content_b64: str | None = Field(default=None, description="The body, base64-encoded, for binary types (PDF).")
    bytes: int = Field(description="Size of the body in bytes.")
    truncated: bool = Field(
        default=False, description="Always false: a body over the size limit is refused, never cut off."
    )


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """Built once: loading the CA bundle costs ~25 ms, and every fetch gets a fresh client."""
    return httpx.create_ssl_context(trust_env=False)


def _media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


def _type_allowed(media: str, allowed: tuple[str, ...]) -> bool:
    for entry in (a.strip().lower() for a in allowed):
        if media == entry or (entry.endswith("/") and media.startswith(entry) and len(media) > len(entry)):
            return True
    return False


def _is_text(media: str) -> bool:
    return media.startswith("text/") or media in _TEXT_TYPES or media.endswith(("+json", "+xml"))


def _logical_url(response: httpx.Response) -> str:
    """The URL as the caller would write it: the pinned IP swapped back for the name in the Host header."""
    request = response.request
    try:
        named = httpx.URL(f"{request.url.scheme}://{request.headers['Host']}")
        return str(request.url.copy_with(host=named.host, port=named.port))
    except (KeyError, httpx.InvalidURL):
        return str(request.url)


def _refused(url: str, reason: str, message: str) -> FetchRefused:
    return FetchRefused(f"refused to fetch {url!r}: {message}", detail={"url": url, "reason": reason})


def _check_head(response: httpx.Response, url: str, cap: int, allowed: tuple[str, ...]) -> str:
    """Status, type, encoding and declared size, before any of the body is read. Returns the media type."""
    if not response.is_success:
        raise UpstreamError(
            f"fetching {url!r} returned HTTP {response.status_code}",
            status_code=response.status_code,
            retry_after=retry_after(response.headers),
        )
    content_type = response.headers.get("Content-Type", "")
    media = _media_type(content_type)
    if not _type_allowed(media, allowed):
        raise _refused(url, "content_type", f"content type {content_type or '(none)'!r} is not allowed")
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _refused(url, "content_encoding", f"content encoding {encoding!r} is not supported")
    try:
        declared = int(response.headers.get("Content-Length", ""))
    except ValueError:
        declared = None
    if declared is not None and declared > cap:
        raise _refused(url, "too_large", f"body is larger than {cap} bytes (Content-Length {declared})")
    return media


async def _read_capped(response: httpx.Response, url: str, cap: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > cap:
            raise _refused(url, "too_large", f"body is larger than {cap} bytes")
    return bytes(body)


@dataclass(kw_only=True, slots=True)
class _Body:
    url: str
    status: int
    content_type: str
    media: str
    charset: str | None
    data: bytes


async def _fetch_body(client: httpx.AsyncClient, url: str, cap: int, limits: FetchLimits) -> _Body:
    response = await guarded_request(
        client,
        "GET",
        url,
        allow=limits.allow,
        max_redirects=limits.max_redirects,
        stream=True,
        # The size cap counts what is buffered: no compression bombs. The trace goes on downstream when tracing.
        headers={"Accept-Encoding": "identity", **observability.current().outgoing_headers()},
    )
    try:
        final_url = _logical_url(response)
        media = _check_head(response, final_url, cap, limits.content_types)
        body = await _read_capped(response, final_url, cap)
    finally:
        await response.aclose()
    return _Body(
        url=final_url,
        status=response.status_code,
        content_type=response.headers.get("Content-Type", ""),
        media=media,
        charset=response.charset_encoding,
        data=body,
    )


async def _guarded(url: str, cap: int, limits: FetchLimits, client: httpx.AsyncClient | None) -> _Body:
    try:
        async with asyncio.timeout(limits.timeout_s):
            if client is not None:
                return await _fetch_body(client, url, cap, limits)
            async with httpx.AsyncClient(
                trust_env=False, verify=_ssl_context(), timeout=limits.timeout_s, follow_redirects=False
            ) as own:
                return await _fetch_body(own, url, cap, limits)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise _refused(url, "timeout", f"took longer than {limits.timeout_s:g} s") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"fetching {url!r} failed: {type(exc).__name__}: {exc}") from exc


def document_fetcher(limits: FetchLimits) -> Fetcher:
    """The ingestion pipeline's fetcher: the raw bytes of a document URL, through the same guard and caps as
    ``fetch_url``. A timeout becomes UpstreamError (retried); a refused size or type, DocumentRejected."""

    async def fetch_document(url: str) -> Fetched:
        try:
            body = await _guarded(url, limits.max_bytes, limits, None)
        except FetchRefused as exc:
            reason = str(exc.detail.get("reason", ""))
            if reason == "timeout":
                raise UpstreamError(exc.message) from exc
            why = "too_large" if reason == "too_large" else "unsupported_type"
            raise DocumentRejected(exc.message, reason=why, document=url) from exc
        return Fetched(data=body.data, media_type=body.media, url=body.url, status=body.status)

    return fetch_document


async def fetch(args: FetchArgs, limits: FetchLimits, *, client: httpx.AsyncClient | None = None) -> FetchResult:
    """Fetch ``args.url`` within ``limits``. Raises BlockedAddress, FetchRefused or UpstreamError.

    Without ``client`` a fresh one is used for this call (no proxy, no environment settings): connections are
    pooled by IP, so a shared client could reuse a TLS connection opened for another name on the same address.
    """
    cap = min(limits.max_bytes, args.max_bytes) if args.max_bytes is not None else limits.max_bytes
    body = await _guarded(args.url, cap, limits, client)
    result = FetchResult(url=body.url, status=body.status, content_type=body.content_type, bytes=len(body.data))
    if _is_text(body.media):
        try:
            result.text = body.data.decode(body.charset or "utf-8", errors="replace")
        except LookupError:  # an unknown charset name
            result.text = body.data.decode("utf-8", errors="replace")
    else:
        result.content_b64 = base64.b64encode(body.data).decode("ascii")
    return result


# -- probing a document URL before a task is accepted ---------------------------------------------------------------

PROBE_TIMEOUT_S = 5.0
"""Default time limit of a probe (lowered further by ``FetchLimits.timeout_s``): a probe that gets no answer in
time says "unknown", never "unreachable"."""
_RETRYABLE_4XX = frozenset({408, 425, 429})  # the statuses below 500 that ingestion retries too
_HEAD_UNRELIABLE = frozenset({403, 405, 501})
"""HEAD answers confirmed with a GET: 405/501 are servers without HEAD, and a URL signed for GET only (an S3
presigned URL) answers HEAD with 403."""

Verdict = Literal["reachable", "unreachable", "unknown"]


@dataclass(kw_only=True, slots=True, frozen=True)
class Probe:
    """What a probe learned about a document URL, without fetching the document."""

    url: str
    verdict: Verdict
    """``unreachable``: fetching it cannot work, and retrying will not help (a refused connection, a host that does
    not resolve or that the SSRF rules refuse, an HTTP 4xx). ``unknown``: a failure a retry may cure (a timeout,
    a 5xx, 408/425/429, a dropped connection); ingestion retries those. ``reachable``: it answered."""
    reason: str
    """One line, for the caller: why it is unreachable, or what was seen."""
    status: int | None = None


def _connection_refused(exc: BaseException) -> bool:
    """True when the error chain holds a refused TCP connection (each attempt's, when there were several)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return True
        if isinstance(current, BaseExceptionGroup):
            return all(_connection_refused(e) for e in current.exceptions)
        current = current.__cause__ or current.__context__
    return False


async def _status_of(client: httpx.AsyncClient, method: str, url: str, limits: FetchLimits, **headers: str) -> int:
    response = await guarded_request(
        client,
        method,
        url,
        allow=limits.allow,
        max_redirects=limits.max_redirects,
        stream=True,
        headers={"Accept-Encoding": "identity", **headers},
    )
    await response.aclose()  # the status is all a probe needs: the body is never read
    return response.status_code


async def _probe_status(client: httpx.AsyncClient, url: str, limits: FetchLimits) -> int:
    status = await _status_of(client, "HEAD", url, limits)
    if status in _HEAD_UNRELIABLE:
        status = await _status_of(client, "GET", url, limits, Range="bytes=0-0")
    return status


async def probe_document(
    url: str,
    limits: FetchLimits,
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
    client: httpx.AsyncClient | None = None,
) -> Probe:
    """Whether ``url`` can be fetched, asked through the same SSRF guard and redirect policy as the fetch itself,
    within ``min(timeout_s, limits.timeout_s)``. Never raises for what it finds: the answer is the verdict."""
    budget = min(timeout_s, limits.timeout_s)

    def said(verdict: Verdict, reason: str, status: int | None = None) -> Probe:
        return Probe(url=url, verdict=verdict, reason=reason, status=status)

    try:
        async with asyncio.timeout(budget):
            if client is not None:
                status = await _probe_status(client, url, limits)
            else:
                async with httpx.AsyncClient(
                    trust_env=False, verify=_ssl_context(), timeout=budget, follow_redirects=False
                ) as own:
                    status = await _probe_status(own, url, limits)
    except BlockedAddress as exc:  # the SSRF rules, a host that does not resolve, a redirect loop
        return said("unreachable", exc.message)
    except (TimeoutError, httpx.TimeoutException):
        return said("unknown", f"{url!r} did not answer within {budget:g} s")
    except httpx.HTTPError as exc:
        if _connection_refused(exc):
            return said("unreachable", f"cannot reach {url!r}: connection refused")
        return said("unknown", f"probing {url!r} failed: {type(exc).__name__}: {exc}")
    answer = f"HTTP {status} {httpx.codes.get_reason_phrase(status)}".rstrip()
    if status < 400 or status == 416:  # 416: a Range past the end of an empty body; the URL itself works
        return said("reachable", answer, status)
    if status >= 500 or status in _RETRYABLE_4XX:
        return said("unknown", f"{url!r} answered {answer}", status)
    return said("unreachable", f"cannot fetch {url!r}: it answered {answer}", status)
