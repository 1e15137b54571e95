"""The SSRF guard: hostile URL forms, address classification, allowlists, pinning and redirect re-checks.

No test touches the network beyond loopback: ``socket.getaddrinfo`` is replaced for every test so that a few
fake names resolve from a table, ``localhost`` resolves from /etc/hosts, and anything else must be numeric.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.errors import BlockedAddress
from keel.netguard import (
    AllowList,
    Target,
    guarded_request,
    is_public_ip,
    parse_host_ip,
    pinned_request_args,
    resolve_target,
)

FAKE_DNS = {
    "public.test": ["93.184.216.34", "2606:4700::1"],
    "mixed.test": ["93.184.216.34", "10.0.0.7"],
    "rebind.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "v6local.test": ["::1"],
    "api.internal": ["127.0.0.2"],
}


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name in FAKE_DNS:
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port, 0, 0))
                if ":" in ip
                else (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))
                for ip in FAKE_DNS[name]
            ]
        if name != "localhost":
            flags |= socket.AI_NUMERICHOST  # anything else must not reach a resolver
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


HOSTILE = [
    # loopback, every encoding
    "http://127.0.0.1/",
    "https://127.0.0.1/",
    "http://127.0.0.1:8080/admin",
    "http://127.255.255.254/",
    "http://127.1/",
    "http://127.0.1/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0X7F000001/",
    "http://0x7f000001./",
    "http://0177.0.0.1/",
    "http://0x7f.0.0.1/",
    "http://0x7f.0x0.0x0.0x1/",
    "http://0x7f.1/",
    "http://017700000001/",
    "http://127.000.000.001/",
    "http://127.0.0.1./",
    "http://%31%32%37.0.0.1/",
    "http://[::1]/",
    "http://[0:0:0:0:0:0:0:1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::127.0.0.1]/",
    "http://localhost/",
    "http://LOCALHOST:8000/",
    # unspecified
    "http://0.0.0.0/",
    "http://0/",
    "http://0x0/",
    "http://[::]/",
    # private
    "http://10.0.0.1/",
    "http://10.255.255.255/",
    "http://167772161/",
    "http://012.0.0.1/",
    "http://172.16.0.1/",
    "http://172.31.255.255/",
    "http://192.168.0.1/",
    "http://192.168.1.1:8443/",
    "http://0xc0a80001/",
    # link-local and the cloud metadata endpoint
    "http://169.254.169.254/latest/meta-data/",
    "http://2852039166/",
    "http://0xa9fea9fe/",
    "http://0251.0376.0251.0376/",
    "http://0xa9.0xfe.0xa9.0xfe/",
    "http://169.254.43518/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[fd00:ec2::254]/",
    # CGNAT
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    # ULA and site-local
    "http://[fd00::1]/",
    "http://[fc00::1]/",
    "http://[fec0::1]/",
    # IPv6 transition addresses embedding a private IPv4
    "http://[64:ff9b::7f00:1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[64:ff9b:1::a00:1]/",
    "http://[2002:7f00:1::]/",
    "http://[2002:a9fe:a9fe::1]/",
    "http://[2001:0:404:404::80ff:fffe]/",  # Teredo, client 127.0.0.1
    # multicast, broadcast, reserved
    "http://224.0.0.1/",
    "http://239.255.255.250/",
    "http://[ff02::1]/",
    "http://255.255.255.255/",
    "http://4294967295/",
    "http://240.0.0.1/",
    "http://[100::1]/",
    # documentation and benchmarking
    "http://192.0.0.1/",
    "http://192.0.2.1/",
    "http://198.51.100.1/",
    "http://203.0.113.1/",
    "http://198.18.0.1/",
    "http://[2001:db8::1]/",
    # other schemes
    "file:///etc/passwd",
    "gopher://127.0.0.1:70/_stats",
    "ftp://93.184.216.34/",
    "dict://127.0.0.1:11211/",
    "javascript:alert(1)",
    "data:text/html,hi",
    # userinfo and parser-confusion tricks
    "http://evil@127.0.0.1/",
    "http://example.com@127.0.0.1/",
    "http://user:pass@93.184.216.34/",
    "http://127.0.0.1#@example.com/",
    "http://127.0.0.1\\@example.com/",
    "http://127.0.0.1:80@example.com/",
    "http://1.1.1.1 &@127.0.0.1/",
    # no host, or an address that is not a valid one
    "http:///127.0.0.1/",
    "http:127.0.0.1/",
    "//127.0.0.1/",
    "http://4294967296/",
    "http://1.2.3.4.5/",
    "http://256.0.0.1/",
    "http://08.0.0.1/",
    "http://[::g]/",
    # names that resolve to non-public addresses (fake DNS)
    "http://rebind.test/",
    "http://mixed.test/",
    "http://metadata.test/",
    "http://v6local.test/",
]


def test_enough_hostile_forms() -> None:
    assert len(set(HOSTILE)) == len(HOSTILE) >= 60


@pytest.mark.parametrize("url", HOSTILE)
async def test_hostile_url_is_refused(url: str) -> None:
    with pytest.raises(BlockedAddress) as info:
        await resolve_target(url)
    assert info.value.detail["url"] == url
    assert info.value.detail["reason"] != "cannot resolve host"
    assert info.value.status == 422


def test_httpx_parsing_quirks() -> None:
    """What httpx makes of a few forms; browsers read the backslash one as host 127.0.0.1."""
    assert httpx.URL("http://127.0.0.1#@example.com/").host == "127.0.0.1"
    backslash = httpx.URL("http://127.0.0.1\\@example.com/")
    assert (backslash.host, backslash.userinfo) == ("example.com", b"127.0.0.1%5C")
    assert httpx.URL("http://2130706433/").host == "2130706433"  # left for getaddrinfo to decode
    with pytest.raises(httpx.InvalidURL):
        httpx.URL("http://0177.0.0.1/")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0x", "0.0.0.0"),
        ("%31%32%37.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:7f00:1", "::ffff:127.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
        ("fe80::1%25eth0", "fe80::1"),
        ("example.com", None),
        ("1.2.3.4x", None),
        ("0x7g", None),
        ("localhost", None),
    ],
)
def test_parse_host_ip(host: str, expected: str | None) -> None:
    assert parse_host_ip(host) == (ip_address(expected) if expected else None)


@pytest.mark.parametrize("host", ["1.2.3.4.5", "4294967296", "256.0.0.1", "1.2.65536", "08", "1.2.3.09", "::g"])
def test_parse_host_ip_rejects_malformed_numbers(host: str) -> None:
    with pytest.raises(ValueError):
        parse_host_ip(host)


@pytest.mark.parametrize(
    ("ip", "public"),
    [
        ("8.8.8.8", True),
        ("93.184.216.34", True),
        ("2606:4700::1", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True),
        ("2002:808:808::1", True),
        ("2001:0:404:404::f7f7:f7f7", True),  # Teredo, client 8.8.8.8
        ("172.32.0.1", True),
        ("100.128.0.1", True),
        ("172.15.255.255", True),
        ("2001:0:a00:1::f7f7:f7f7", False),  # Teredo, server 10.0.0.1
        ("::ffff:0:a00:1", False),  # IPv4-translated 10.0.0.1
        ("3fff::1", False),
        ("2001:2::1", False),
        ("192.88.99.1", False),
    ],
)
def test_is_public_ip(ip: str, public: bool) -> None:
    assert is_public_ip(ip_address(ip)) is public


@pytest.mark.parametrize(
    ("url", "ip", "port"),
    [
        ("http://93.184.216.34/", "93.184.216.34", 80),
        ("https://[2606:4700::1]:8443/x?q=1", "2606:4700::1", 8443),
        ("http://0x5db8d822/", "93.184.216.34", 80),
        ("https://public.test/", "93.184.216.34", 443),
    ],
)
async def test_public_target_is_accepted(url: str, ip: str, port: int) -> None:
    target = await resolve_target(url)
    assert (target.ip, target.port, target.url) == (ip_address(ip), port, httpx.URL(url))


async def test_unresolvable_host() -> None:
    with pytest.raises(BlockedAddress, match="cannot resolve host"):
        await resolve_target("http://nowhere.test/")


def test_allowlist_parse() -> None:
    assert AllowList.parse(" 127.0.0.1, 10.0.0.0/8 ,Example.Internal.,[::1],") == AllowList(
        ("127.0.0.1", "10.0.0.0/8", "example.internal", "::1")
    )
    assert AllowList.parse(["a", "b"]) == AllowList(("a", "b"))
    assert AllowList.parse(None) == AllowList.parse("") == AllowList()


def test_allowlist_matching() -> None:
    allow = AllowList.parse("127.0.0.0/8,::1,example.internal")
    assert allow.allows_ip(IPv4Address("127.0.0.5"))
    assert allow.allows_ip(IPv6Address("::1"))
    assert not allow.allows_ip(IPv4Address("10.0.0.1"))
    assert not allow.allows_ip(IPv6Address("::ffff:127.0.0.1"))
    assert allow.allows_host("EXAMPLE.internal")
    assert not allow.allows_host("other.internal")


async def test_allowlist_lets_local_targets_through() -> None:
    target = await resolve_target("http://127.0.0.1:8765/", allow=AllowList.parse("127.0.0.1"))
    assert (target.ip, target.port) == (IPv4Address("127.0.0.1"), 8765)
    assert (await resolve_target("http://127.0.0.5/", allow=AllowList.parse("127.0.0.0/8"))).ip == IPv4Address(
        "127.0.0.5"
    )
    assert (await resolve_target("http://localhost/", allow=AllowList.parse("localhost"))).ip.is_loopback
    assert (await resolve_target("http://mixed.test/", allow=AllowList.parse("10.0.0.0/8"))).ip == IPv4Address(
        "93.184.216.34"
    )
    with pytest.raises(BlockedAddress):
        await resolve_target("http://127.0.0.2/", allow=AllowList.parse("127.0.0.1"))


def test_pinned_request_args() -> None:
    url = httpx.URL("https://example.com:8443/p?q=1")
    pinned, headers, extensions = pinned_request_args(Target(url, "example.com", 8443, IPv4Address("1.2.3.4")))
    assert pinned == httpx.URL("https://1.2.3.4:8443/p?q=1")
    assert headers == {"Host": "example.com:8443"}
    assert extensions == {"sni_hostname": "example.com"}

    url = httpx.URL("http://public.test/")
    pinned, headers, extensions = pinned_request_args(Target(url, "public.test", 80, IPv6Address("2606:4700::1")))
    assert pinned == httpx.URL("http://[2606:4700::1]/")
    assert (headers, extensions) == ({"Host": "public.test"}, {})


@given(
    st.one_of(
        st.integers(int(IPv4Address("127.0.0.0")), int(IPv4Address("127.255.255.255"))),
        st.integers(int(IPv4Address("10.0.0.0")), int(IPv4Address("10.255.255.255"))),
    )
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_integer_encodings_of_private_addresses_are_refused(n: int) -> None:
    for host in (str(n), hex(n)):
        with pytest.raises(BlockedAddress):
            asyncio.run(resolve_target(f"http://{host}/"))


# -- live loopback servers -------------------------------------------------------------------------------


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Stub:
    """Raw HTTP/1.1: ``routes`` maps a path (sans query) to (status, headers); else 200 echoing Host."""

    routes: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[:-2]
        method, path, _ = request_line.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.hits.append(Hit(method, path, headers, body))
        status, extra = self.routes.get(path.partition("?")[0], (200, {}))
        payload = f"host={headers.get('host')}".encode()
        head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(payload)}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in extra.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        writer.close()


Serve = Callable[[str], Awaitable[Stub]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def start(host: str) -> Stub:
        stub = Stub()
        server = await asyncio.start_server(stub.handle, host, 0)
        servers.append(server)
        stub.port = server.sockets[0].getsockname()[1]
        return stub

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as c:
        yield c


async def test_allowlisted_server_is_reached_with_original_host(serve: Serve, client: httpx.AsyncClient) -> None:
    stub = await serve("127.0.0.2")
    url = f"http://api.internal:{stub.port}/hello"
    response = await guarded_request(client, "GET", url, allow=AllowList.parse("api.internal"))
    assert response.status_code == 200
    assert response.text == f"host=api.internal:{stub.port}"
    assert [(h.method, h.path) for h in stub.hits] == [("GET", "/hello")]


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:{port}/",
        "http://2130706433:{port}/",
        "http://0x7f.1:{port}/",
        "http://localhost:{port}/",
        "http://rebind.test:{port}/",
        "http://[::ffff:127.0.0.1]:{port}/",
        "//127.0.0.1:{port}/",
        "gopher://127.0.0.1:{port}/",
    ],
)
async def test_redirect_to_canary_is_refused(serve: Serve, client: httpx.AsyncClient, location: str) -> None:
    canary = await serve("127.0.0.1")
    redirector = await serve("127.0.0.2")
    redirector.routes["/go"] = (302, {"Location": location.format(port=canary.port)})
    with pytest.raises(BlockedAddress):
        await guarded_request(
            client, "GET", f"http://127.0.0.2:{redirector.port}/go", allow=AllowList.parse("127.0.0.2")
        )
    assert len(redirector.hits) == 1
    assert canary.hits == []


async def test_relative_303_switches_to_get(serve: Serve, client: httpx.AsyncClient) -> None:
    stub = await serve("127.0.0.2")
    stub.routes["/start"] = (303, {"Location": "done?x=1"})
    response = await guarded_request(
        client,
        "POST",
        f"http://127.0.0.2:{stub.port}/start?y=2",
        allow=AllowList.parse("127.0.0.2"),
        params={"z": "3"},
        json={"a": 1},
    )
    assert response.status_code == 200
    assert [(h.method, h.path, h.body) for h in stub.hits] == [
        ("POST", "/start?y=2&z=3", b'{"a":1}'),
        ("GET", "/done?x=1", b""),
    ]
    assert "content-type" not in stub.hits[1].headers


async def test_307_keeps_method_and_body(serve: Serve, client: httpx.AsyncClient) -> None:
    stub = await serve("127.0.0.2")
    stub.routes["/start"] = (307, {"Location": "/again"})
    await guarded_request(
        client,
        "POST",
        f"http://127.0.0.2:{stub.port}/start",
        allow=AllowList.parse("127.0.0.2"),
        content=b"hi",
    )
    assert [(h.method, h.path, h.body) for h in stub.hits] == [
        ("POST", "/start", b"hi"),
        ("POST", "/again", b"hi"),
    ]


async def test_cross_origin_redirect_drops_credentials(serve: Serve, client: httpx.AsyncClient) -> None:
    stub = await serve("127.0.0.2")
    stub.routes["/start"] = (302, {"Location": f"http://127.0.0.2:{stub.port}/next"})
    await guarded_request(
        client,
        "GET",
        f"http://api.internal:{stub.port}/start",
        allow=AllowList.parse("api.internal,127.0.0.2"),
        headers={"Authorization": "Bearer secret"},
    )
    assert [h.headers.get("authorization") for h in stub.hits] == ["Bearer secret", None]


async def test_too_many_redirects(serve: Serve, client: httpx.AsyncClient) -> None:
    stub = await serve("127.0.0.2")
    stub.routes["/loop"] = (302, {"Location": "/loop"})
    with pytest.raises(BlockedAddress, match="too many redirects"):
        await guarded_request(
            client,
            "GET",
            f"http://127.0.0.2:{stub.port}/loop",
            allow=AllowList.parse("127.0.0.2"),
            max_redirects=2,
        )
    assert len(stub.hits) == 3
