"""SSRF guard for outbound HTTP requests to caller-supplied URLs (webhooks, fetch tools, callbacks).

The rules, in order:

1. The scheme must be allowed (``http`` and ``https`` by default), the URL must have a host, and it must not
   carry userinfo (``user:pass@``): userinfo is the classic way to make a URL *look* like it targets one host
   while it targets another.
2. A host written as an IP address is recognised in every form libc ``inet_aton`` and browsers accept --
   decimal (``2130706433``), hex (``0x7f000001``), octal (``0177.0.0.1``), short (``127.1``), mixed
   (``0x7f.1``), percent-encoded, with a trailing dot -- and IPv6 literals with or without a zone id. A host
   whose last label is numeric but which is not a valid address is refused rather than sent to DNS.
3. Any other host is resolved with ``loop.getaddrinfo`` (in the executor; the event loop never blocks), and
   the URL is refused if *any* resolved address is not public: one private answer is enough for a resolver
   to rebind the name later.
4. "Public" is decided by :func:`is_public_ip`: loopback, private, link-local, CGNAT, unspecified,
   multicast, broadcast, reserved, documentation and benchmark ranges, ULA and site-local are refused. For
   IPv6 only global unicast (``2000::/3``) counts, and addresses that embed an IPv4 address (IPv4-mapped,
   IPv4-compatible, NAT64, 6to4, Teredo) are judged by that embedded address.
5. An :class:`AllowList` of hostnames, IPs and CIDRs bypasses rules 2-4 (for local testing).

The checked address is then *pinned*: :func:`pinned_request_args` rewrites the URL to connect to exactly
that IP, keeping the original name in the ``Host`` header and TLS SNI, so a second DNS answer cannot
redirect the connection (DNS rebinding). :func:`guarded_request` does all of this per hop and re-checks
every redirect target. Clients should not route through a proxy, which would do its own resolution.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any
from urllib.parse import unquote

import httpx

from keel.errors import BlockedAddress

IPAddress = IPv4Address | IPv6Address

_DEFAULT_PORTS = {"http": 80, "https": 443}

_BLOCKED_V4 = tuple(
    IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network" / unspecified
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. broadcast 255.255.255.255
    )
)
_GLOBAL_UNICAST_V6 = IPv6Network("2000::/3")
_BLOCKED_V6 = tuple(
    IPv6Network(n)
    for n in (
        "2001:2::/48",  # benchmarking
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation (RFC 9637)
    )
)
_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")
_IPV4_TRANSLATED = IPv6Network("::ffff:0:0:0/96")
_IPV4_COMPATIBLE = IPv6Network("::/96")
_NAT64 = IPv6Network("64:ff9b::/96")
_SIXTOFOUR = IPv6Network("2002::/16")
_TEREDO = IPv6Network("2001::/32")


def _blocked(url: object, reason: str) -> BlockedAddress:
    return BlockedAddress(f"blocked URL {str(url)!r}: {reason}", detail={"url": str(url), "reason": reason})


@dataclass(frozen=True, slots=True)
class AllowList:
    """Hosts or CIDRs that bypass the private-address rules (for local testing).

    Parsed from e.g. ``"127.0.0.1,10.0.0.0/8,example.internal"``. Entries that parse as an IP address or
    network match addresses; every entry also matches a hostname exactly (case-insensitive).
    """

    entries: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str | Sequence[str] | None) -> AllowList:
        items = spec.split(",") if isinstance(spec, str) else (spec or ())
        return cls(tuple(e for e in (item.strip().strip("[]").rstrip(".").lower() for item in items) if e))

    def allows_host(self, host: str) -> bool:
        return host.strip("[]").rstrip(".").lower() in self.entries

    def allows_ip(self, ip: IPAddress) -> bool:
        for entry in self.entries:
            try:
                network = ip_network(entry, strict=False)
            except ValueError:
                continue  # a hostname entry
            if ip.version == network.version and ip in network:
                return True
        return False


#: The default: nothing bypasses the rules.
NO_ALLOW = AllowList()


def _embedded_v4(ip: IPv6Address) -> tuple[IPv4Address, ...] | None:
    """The IPv4 address(es) an IPv6 transition address carries, or None if it carries none."""
    if ip in _TEREDO:  # 2001:0:<server>:<flags>:<port>:<client XOR 0xffffffff>
        return IPv4Address((int(ip) >> 64) & 0xFFFFFFFF), IPv4Address(~int(ip) & 0xFFFFFFFF)
    if ip in _SIXTOFOUR:
        return (IPv4Address((int(ip) >> 80) & 0xFFFFFFFF),)
    if any(ip in net for net in (_IPV4_MAPPED, _IPV4_TRANSLATED, _IPV4_COMPATIBLE, _NAT64)):
        return (IPv4Address(int(ip) & 0xFFFFFFFF),)
    return None


def is_public_ip(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses (see the module docstring for the rules)."""
    if isinstance(ip, IPv4Address):
        return not any(ip in net for net in _BLOCKED_V4)
    embedded = _embedded_v4(ip)
    if embedded is not None:
        return all(is_public_ip(v4) for v4 in embedded)
    return ip in _GLOBAL_UNICAST_V6 and not any(ip in net for net in _BLOCKED_V6)


_HEX = re.compile(r"0[xX][0-9a-fA-F]*")
_OCTAL = re.compile(r"0[0-7]+")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
#: A label that makes a host an IPv4 address when it is the last one (the WHATWG "ends in a number" rule).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")


def _ipv4_number(part: str) -> int:
    """One inet_aton component: ``0x`` hex, leading-zero octal, or decimal. Raises ValueError."""
    if _HEX.fullmatch(part):
        return int(part[2:] or "0", 16)
    if _OCTAL.fullmatch(part):
        return int(part, 8)
    if _DECIMAL.fullmatch(part):
        return int(part)
    raise ValueError(f"not an IPv4 number: {part!r}")


def parse_host_ip(host: str) -> IPAddress | None:
    """The IP address a URL host denotes, as libc ``inet_aton`` and browsers read it; None for a hostname.

    Raises ValueError for a host that is written as an address but is not a valid one (e.g. ``1.2.3.4.5``,
    ``4294967296``, ``[::g]``): such a host must not be handed to DNS either.
    """
    host = unquote(host.strip())
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        return IPv6Address(host.partition("%")[0])
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # one trailing dot
    if not _NUMERIC_LABEL.fullmatch(parts[-1]):
        return None
    if len(parts) > 4:
        raise ValueError(f"too many parts for an IPv4 address: {host!r}")
    *head, last = (_ipv4_number(p) for p in parts)
    if any(n > 0xFF for n in head) or last >= 1 << (8 * (5 - len(parts))):
        raise ValueError(f"IPv4 component out of range: {host!r}")
    value = last
    for i, n in enumerate(head):
        value |= n << (8 * (3 - i))
    return IPv4Address(value)


@dataclass(frozen=True, slots=True)
class Target:
    """A checked destination: connect to ``ip``, but speak to ``host`` (Host header, SNI)."""

    url: httpx.URL
    host: str
    port: int
    ip: IPAddress


def _parse_url(url: str | httpx.URL) -> httpx.URL:
    try:
        return httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise _blocked(url, f"invalid URL ({exc})") from exc


async def _resolve(url: httpx.URL, host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise _blocked(url, "cannot resolve host") from exc
    ips = list(dict.fromkeys(ip_address(str(info[4][0]).partition("%")[0]) for info in infos))
    if not ips:
        raise _blocked(url, "cannot resolve host")
    return ips


async def resolve_target(
    url: str | httpx.URL,
    *,
    allow: AllowList = NO_ALLOW,
    schemes: frozenset[str] = frozenset({"http", "https"}),
) -> Target:
    """Check ``url`` against the SSRF rules and pin it to one address; raise BlockedAddress if refused."""
    parsed = _parse_url(url)
    if parsed.scheme not in schemes:
        raise _blocked(url, f"scheme {parsed.scheme!r} not allowed")
    if not parsed.raw_host:
        raise _blocked(url, "no host")
    if parsed.userinfo:
        raise _blocked(url, "userinfo in URL not allowed")
    port = parsed.port if parsed.port is not None else _DEFAULT_PORTS.get(parsed.scheme)
    if port is None:
        raise _blocked(url, "no port")
    host = parsed.raw_host.decode("ascii")
    try:
        literal = parse_host_ip(host)
    except ValueError as exc:
        raise _blocked(url, f"invalid IP address ({exc})") from exc
    if literal is not None:
        if not (is_public_ip(literal) or allow.allows_ip(literal)):
            raise _blocked(url, f"address {literal} is not public")
        return Target(parsed, host, port, literal)
    ips = await _resolve(parsed, host, port)
    if not allow.allows_host(host):
        bad = [ip for ip in ips if not (is_public_ip(ip) or allow.allows_ip(ip))]
        if bad:
            raise _blocked(url, f"host {host!r} resolves to non-public address {bad[0]}")
    return Target(parsed, host, port, ips[0])


def pinned_request_args(target: Target) -> tuple[httpx.URL, dict[str, str], dict[str, object]]:
    """``(url, headers, extensions)`` that make httpx connect to ``target.ip`` but address ``target.host``.

    httpx pools connections by (scheme, IP, port): an HTTPS connection opened for one name may be reused for
    another name pinned to the same IP, so use a client per destination when that matters.
    """
    url = target.url.copy_with(host=str(target.ip))
    host = f"[{target.host}]" if ":" in target.host else target.host
    if target.port != _DEFAULT_PORTS.get(target.url.scheme):
        host = f"{host}:{target.port}"
    extensions: dict[str, object] = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    return url, {"Host": host}, extensions


def _next_method(method: str, status: int, kwargs: dict[str, Any], headers: httpx.Headers) -> str:
    """Browser redirect semantics: 303, and 301/302 after POST, become a GET without a body."""
    if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
        for key in ("content", "data", "files", "json"):
            kwargs.pop(key, None)
        for name in ("Content-Type", "Content-Length", "Transfer-Encoding"):
            headers.pop(name, None)
        return "GET"
    return method


async def _send(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL,
    headers: httpx.Headers,
    extensions: dict[str, Any],
    *,
    stream: bool,
    **kwargs: Any,
) -> httpx.Response:
    """One hop, never following redirects; ``stream=True`` leaves the body unread (what ``client.stream`` does)."""
    if not stream:
        return await client.request(
            method, url, headers=headers, extensions=extensions, follow_redirects=False, **kwargs
        )
    auth = kwargs.pop("auth", httpx.USE_CLIENT_DEFAULT)
    request = client.build_request(method, url, headers=headers, extensions=extensions, **kwargs)
    return await client.send(request, stream=True, auth=auth, follow_redirects=False)


async def guarded_request(
    client: httpx.AsyncClient,
    method: str,
    url: str | httpx.URL,
    *,
    allow: AllowList = NO_ALLOW,
    max_redirects: int = 5,
    stream: bool = False,
    **kwargs: Any,
) -> httpx.Response:
    """Send a request through the SSRF rules, following up to ``max_redirects`` redirects, each re-checked.

    ``kwargs`` go to :meth:`httpx.AsyncClient.request` (``follow_redirects`` is always False). Credentials
    (``Authorization``, ``Cookie``) are dropped when a redirect leaves the original origin. With ``stream=True``
    the final response's body is not read: the caller reads it (``aiter_bytes``/``aiter_raw``) and must
    ``await response.aclose()``, as with :meth:`httpx.AsyncClient.send`.
    """
    current = _parse_url(url)
    if params := kwargs.pop("params", None):
        current = current.copy_merge_params(params)  # like the client; httpx.URL(params=) drops the query
    headers = httpx.Headers(kwargs.pop("headers", None))
    user_extensions = dict(kwargs.pop("extensions", None) or {})
    origin = (current.scheme, current.host, current.port)
    for _ in range(max_redirects + 1):
        target = await resolve_target(current, allow=allow)
        pinned_url, host_header, extensions = pinned_request_args(target)
        if (current.scheme, current.host, current.port) != origin:
            for name in ("Authorization", "Cookie"):
                headers.pop(name, None)
        hop_headers = headers.copy()
        hop_headers.update(host_header)
        try:
            response = await _send(
                client, method, pinned_url, hop_headers, {**user_extensions, **extensions}, stream=stream, **kwargs
            )
        except httpx.RemoteProtocolError as exc:  # httpx parses Location even when not following it
            if not str(exc).startswith("Invalid URL in location header"):
                raise
            raise _blocked(current, f"invalid redirect location ({exc})") from exc
        if not response.is_redirect:  # a 3xx with a Location header
            return response
        await response.aclose()
        location = response.headers["Location"]
        try:
            current = current.join(location)
        except httpx.InvalidURL as exc:
            raise _blocked(location, f"invalid redirect location ({exc})") from exc
        method = _next_method(method, response.status_code, kwargs, headers)
    raise _blocked(url, f"too many redirects (more than {max_redirects})")
