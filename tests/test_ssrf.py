"""Acceptance for ``fetch_url``: it refuses internal addresses in every encoding and via redirects, within caps.

A *canary* server listens on 127.0.0.1 (and on [::1] at the same port when it can) and counts every TCP
connection it accepts; the hostile URLs point at it, and after every test its count must still be 0. Servers
that play the "public" internet listen on 127.0.0.2, which the tests exempt from the SSRF rules with an
allowlist of exactly that address (Linux routes all of 127/8 to the loopback interface).

No test touches the network beyond loopback: ``socket.getaddrinfo`` is replaced so that a few fake names
resolve from a table, ``localhost`` from the system, and anything else must be numeric.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pydantic
import pytest

from keel.errors import BlockedAddress, UpstreamError
from keel.netguard import AllowList
from keel.orchestration.tools.fetch import FetchArgs, FetchLimits, FetchRefused, FetchResult, fetch
from keel.testing.loop import LoopTicks

PUBLIC = AllowList.parse("127.0.0.2")
"""The one address the tests treat as public."""

# -- the canary -------------------------------------------------------------------------------------------


class _CanaryHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\ncanary")


class _CanaryServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, counter: Canary) -> None:
        self.address_family = family
        self.counter = counter
        super().__init__(address, _CanaryHandler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.counter.hit()  # every accepted connection counts, whether or not a request follows
        return True


@dataclass
class Canary:
    port: int = 0
    hits: int = 0
    ipv6: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hit(self) -> None:
        with self.lock:
            self.hits += 1


@contextlib.contextmanager
def running_canary() -> Iterator[Canary]:
    counter = Canary()
    servers = [_CanaryServer(("127.0.0.1", 0), socket.AF_INET, counter)]
    counter.port = servers[0].server_address[1]
    try:  # the same port on [::1], so that IPv6 spellings of loopback would be caught too
        servers.append(_CanaryServer(("::1", counter.port), socket.AF_INET6, counter))
        counter.ipv6 = True
    except OSError:
        pass
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield counter
    finally:
        for server, thread in zip(servers, threads, strict=True):
            server.shutdown()
            thread.join()
            server.server_close()


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    with running_canary() as counter:
        yield counter


@pytest.fixture(autouse=True)
def canary_untouched(canary: Canary) -> Iterator[None]:
    before = canary.hits
    yield
    assert canary.hits == before == 0


# -- fake DNS and a spy on every request sent -------------------------------------------------------------

FAKE_DNS: dict[str, list[str]] = {
    "internal.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "mixed.test": ["127.0.0.2", "10.0.0.7"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "public.test": ["127.0.0.2"],
}


@dataclass
class Resolver:
    """Answers from FAKE_DNS, or from ``flips`` (a name's answers, one per lookup, the last one repeated)."""

    flips: dict[str, list[str]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)

    def answer(self, name: str) -> list[str] | None:
        if name in self.flips:
            seen = self.lookups.count(name)
            return [self.flips[name][min(seen, len(self.flips[name]) - 1)]]
        return FAKE_DNS.get(name)


@pytest.fixture(autouse=True)
def resolver(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    real = socket.getaddrinfo
    state = Resolver()

    def fake(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        answer = state.answer(name)
        state.lookups.append(name)
        if answer is not None:
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port, 0, 0))
                if ":" in ip
                else (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))
                for ip in answer
            ]
        if name.rstrip(".").lower() == "localhost":
            return real("localhost", port, family, type, proto, flags)
        return real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)  # never a real DNS query

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return state


@pytest.fixture(autouse=True)
def sent(monkeypatch: pytest.MonkeyPatch) -> list[httpx.URL]:
    """Every request any httpx client sends (redirect hops included)."""
    urls: list[httpx.URL] = []
    real_send = httpx.AsyncClient.send

    async def spy(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        urls.append(request.url)
        return await real_send(self, request, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", spy)
    return urls


# -- scripted "public" servers on 127.0.0.2 ----------------------------------------------------------------

Handler = Callable[[asyncio.StreamWriter], Awaitable[None]]


def respond(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    async def handler(writer: asyncio.StreamWriter) -> None:
        head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    return handler


def redirect(status: int, location: str) -> Handler:
    return respond(status, headers={"Location": location})


@dataclass
class Server:
    """Raw HTTP/1.1 on 127.0.0.2: ``routes`` maps a path to a handler that writes the whole response."""

    port: int = 0
    routes: dict[str, Handler] = field(default_factory=dict)
    hits: list[tuple[str, str | None]] = field(default_factory=list)
    """``(path, Host header)`` per request."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            request_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[:-2]
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
            path = request_line.split(" ")[1]
            self.hits.append((path, headers.get("host")))
            await self.routes.get(path, respond(200, b"ok", {"Content-Type": "text/plain"}))(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up, as it should when it refuses a response
        finally:
            writer.close()


Serve = Callable[..., Awaitable[Server]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    started: list[tuple[asyncio.Server, Server]] = []

    async def start(port: int = 0) -> Server:
        stub = Server()
        server = await asyncio.start_server(stub.handle, "127.0.0.2", port)
        stub.port = server.sockets[0].getsockname()[1]
        started.append((server, stub))
        return stub

    yield start
    for server, stub in started:
        server.close()
        for task in stub.tasks:
            task.cancel()
        await asyncio.gather(*stub.tasks, return_exceptions=True)
        await server.wait_closed()


def limits(**overrides: Any) -> FetchLimits:
    return FetchLimits(**{"allow": PUBLIC, "timeout_s": 5.0, **overrides})


# -- 1. hostile URLs, each refused before anything is sent -------------------------------------------------

HOSTILE = [
    # loopback, the canary itself, in every spelling
    "http://127.0.0.1:{port}/",
    "https://127.0.0.1:{port}/",
    "http://127.0.0.1:{port}/admin?x=1",
    "http://127.1:{port}/",
    "http://127.0.1:{port}/",
    "http://2130706433:{port}/",
    "http://2130706433.:{port}/",
    "http://0x7f000001:{port}/",
    "http://0X7F000001:{port}/",
    "http://0x7f000001.:{port}/",
    "http://017700000001:{port}/",
    "http://0177.0.0.1:{port}/",
    "http://0177.0000.0000.0001:{port}/",
    "http://0177.1:{port}/",
    "http://0x7f.0.0.1:{port}/",
    "http://0x7f.0x0.0x0.0x1:{port}/",
    "http://0x7f.1:{port}/",
    "http://0x7f.0.1:{port}/",
    "http://127.000.000.001:{port}/",
    "http://127.0.0.1.:{port}/",
    "http://127.127.127.127:{port}/",
    "http://127.255.255.254:{port}/",
    "http://%31%32%37.0.0.1:{port}/",
    "http://%31%32%37%2e%30%2e%30%2e%31:{port}/",
    "http://127\u30020\u30020\u30021:{port}/",  # ideographic full stops
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:{port}/",  # fullwidth digits
    "http://\u2460\u2461\u2466.0.0.1:{port}/",  # circled digits
    "http://[::1]:{port}/",
    "http://[0:0:0:0:0:0:0:1]:{port}/",
    "http://[0000:0000:0000:0000:0000:0000:0000:0001]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://[::ffff:7f00:1]:{port}/",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/",
    "http://[::127.0.0.1]:{port}/",  # IPv4-compatible
    "http://[::ffff:0:127.0.0.1]:{port}/",  # IPv4-translated
    "http://[64:ff9b::127.0.0.1]:{port}/",  # NAT64
    "http://[64:ff9b::7f00:1]:{port}/",
    "http://[2002:7f00:1::]:{port}/",  # 6to4
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]:{port}/",  # Teredo, client 127.0.0.1
    "http://localhost:{port}/",
    "http://localhost.:{port}/",
    "http://LOCALHOST:{port}/",
    "http://LocalHost.:{port}/",
    "http://internal.test:{port}/",  # a name that resolves to 127.0.0.1
    "http://mapped.test:{port}/",  # ... to ::ffff:127.0.0.1
    "http://mixed.test:{port}/",  # ... to one allowed and one private address: one is enough to refuse
    "http://\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3:{port}/",  # circled letters
    # unspecified ("this host")
    "http://0.0.0.0:{port}/",
    "http://0:{port}/",
    "http://0x0:{port}/",
    "http://000.000.000.000:{port}/",
    "http://[::]:{port}/",
    # private ranges
    "http://10.0.0.1/",
    "http://10.255.255.255:{port}/",
    "http://167772161/",
    "http://012.0.0.1/",
    "http://172.16.0.1/",
    "http://172.31.255.255/",
    "http://0xac100001/",
    "http://192.168.0.1/",
    "http://192.168.1.1:8443/",
    "http://0xc0a80001/",
    "http://3232235521/",
    # link-local and the cloud metadata endpoint
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.169.254./latest/meta-data/",
    "http://2852039166/",
    "http://0xa9fea9fe/",
    "http://0251.0376.0251.0376/",
    "http://0xa9.0xfe.0xa9.0xfe/",
    "http://169.254.43518/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://[64:ff9b::169.254.169.254]/",
    "http://metadata.test/",
    "http://[fd00:ec2::254]/",  # the AWS metadata endpoint over IPv6
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]:{port}/",
    "http://[fe80::1%25lo]:{port}/",
    # carrier-grade NAT
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    # ULA and site-local
    "http://[fd00::1]/",
    "http://[fc00::1]/",
    "http://[fec0::1]/",
    # multicast, broadcast, reserved
    "http://224.0.0.1/",
    "http://239.255.255.250:1900/",
    "http://[ff02::1]/",
    "http://255.255.255.255/",
    "http://4294967295/",
    "http://240.0.0.1/",
    # userinfo and parser-confusion tricks
    "http://public.example@127.0.0.1:{port}/",
    "http://user:pass@127.0.0.1:{port}/",
    "http://127.0.0.2@127.0.0.1:{port}/",
    "http://public.example:80@127.0.0.1:{port}/",
    "http://127.0.0.1:{port}#@public.example/",
    "http://127.0.0.1:{port}?@public.example/",
    "http://127.0.0.1:{port}\\@public.example/",
    "http://127.0.0.1%2f@public.example/",
    # malformed: an address that is not one, or no host at all
    "http://4294967296/",
    "http://127.0.0.1.1:{port}/",
    "http://256.0.0.1/",
    "http://08.0.0.1/",
    "http:///127.0.0.1:{port}/",
    "//127.0.0.1:{port}/",
    "127.0.0.1:{port}",
    # other schemes
    "file:///etc/passwd",
    "file://localhost/etc/passwd",
    "gopher://127.0.0.1:{port}/_GET%20/",
    "ftp://127.0.0.1:{port}/",
    "dict://127.0.0.1:{port}/info",
    "ws://127.0.0.1:{port}/",
    "data:text/plain,hello",
    "javascript:alert(1)",
]


async def test_the_canary_counts_what_reaches_it() -> None:
    """The control: a separate canary, exempted from the rules, is reached, and counted, on both families."""
    with running_canary() as other:
        loopback = AllowList.parse("127.0.0.1,::1")
        result = await fetch(FetchArgs(url=f"http://127.0.0.1:{other.port}/"), FetchLimits(allow=loopback))
        assert (result.text, other.hits) == ("canary", 1)
        if other.ipv6:
            await fetch(FetchArgs(url=f"http://[::1]:{other.port}/"), FetchLimits(allow=loopback))
            assert other.hits == 2


def test_enough_hostile_encodings() -> None:
    assert len(set(HOSTILE)) == len(HOSTILE) >= 60
    assert sum("{port}" in url for url in HOSTILE) > len(HOSTILE) / 2


@pytest.mark.parametrize("url", HOSTILE)
async def test_hostile_url_is_refused(url: str, canary: Canary, sent: list[httpx.URL]) -> None:
    url = url.format(port=canary.port)
    with pytest.raises(BlockedAddress) as info:
        await fetch(FetchArgs(url=url), FetchLimits(timeout_s=2.0))
    assert info.value.detail["reason"] != "cannot resolve host"  # refused by a rule, not by luck
    assert sent == []  # refused before any request went out


async def test_hostile_url_is_refused_with_a_caller_client(canary: Canary, sent: list[httpx.URL]) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        for url in ("http://2130706433:{port}/", "http://[::ffff:7f00:1]:{port}/", "http://localhost:{port}/"):
            with pytest.raises(BlockedAddress):
                await fetch(FetchArgs(url=url.format(port=canary.port)), FetchLimits(), client=client)
    assert sent == []


async def test_allowlist_is_exact(canary: Canary) -> None:
    """127.0.0.2 is allowed; its neighbours are not, nor a name that also answers with a private address."""
    for url in (
        "http://127.0.0.1:{port}/",
        "http://127.0.0.3:{port}/",
        "http://[::ffff:127.0.0.2]:{port}/",
        "http://mixed.test:{port}/",
    ):
        with pytest.raises(BlockedAddress, match="not public|non-public address"):
            await fetch(FetchArgs(url=url.format(port=canary.port)), limits())


# -- 2. redirects to internal addresses -----------------------------------------------------------------

REDIRECT_TARGETS = [
    "http://127.0.0.1:{port}/",
    "http://2130706433:{port}/",
    "http://0x7f.1:{port}/",
    "http://0177.0.0.1:{port}/",
    "http://localhost:{port}/",
    "http://internal.test:{port}/",
    "http://[::1]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "//127.0.0.1:{port}/",  # scheme-relative
    "http://public.example@127.0.0.1:{port}/",
    "http://169.254.169.254/latest/meta-data/",
    "gopher://127.0.0.1:{port}/",
    "file:///etc/passwd",
    "/chain",  # relative hops on the allowed host that end at the canary
]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("location", REDIRECT_TARGETS)
async def test_redirect_to_internal_address_is_refused(
    status: int, location: str, serve: Serve, canary: Canary, sent: list[httpx.URL]
) -> None:
    public = await serve()
    public.routes["/go"] = redirect(status, location.format(port=canary.port))
    public.routes["/chain"] = redirect(status, "chain/2")
    public.routes["/chain/2"] = redirect(status, "../chain/3?x=1")
    public.routes["/chain/3?x=1"] = redirect(status, f"http://127.0.0.1:{canary.port}/")
    with pytest.raises(BlockedAddress):
        await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/go"), limits())
    assert public.hits and len(sent) == len(public.hits)
    assert all(url.host == "127.0.0.2" for url in sent)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_within_the_allowed_host_is_followed(status: int, serve: Serve) -> None:
    public = await serve()
    public.routes["/start"] = redirect(status, "/other")
    result = await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/start"), limits())
    assert result.url == f"http://127.0.0.2:{public.port}/other"
    assert (result.status, result.text) == (200, "ok")
    assert [path for path, _ in public.hits] == ["/start", "/other"]


async def test_too_many_redirects_are_refused(serve: Serve) -> None:
    public = await serve()
    public.routes["/loop"] = redirect(302, "/loop")
    with pytest.raises(BlockedAddress, match="too many redirects"):
        await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/loop"), limits(max_redirects=2))
    assert len(public.hits) == 3


# -- 3. DNS rebinding: the checked address is the one connected to --------------------------------------


async def test_connection_is_pinned_to_the_checked_address(
    serve: Serve, canary: Canary, resolver: Resolver, sent: list[httpx.URL]
) -> None:
    """The name answers 127.0.0.2 (allowed) first and 127.0.0.1 (the canary, same port) ever after."""
    public = await serve(port=canary.port)
    resolver.flips["flip.test"] = ["127.0.0.2", "127.0.0.1"]
    result = await fetch(FetchArgs(url=f"http://flip.test:{canary.port}/page"), limits())
    assert result.url == f"http://flip.test:{canary.port}/page"
    assert result.text == "ok"
    assert public.hits == [("/page", f"flip.test:{canary.port}")]  # the original name in the Host header
    assert resolver.lookups.count("flip.test") == 1  # never resolved again: the second answer was not used
    assert [url.host for url in sent] == ["127.0.0.2"]


async def test_each_redirect_hop_is_resolved_and_checked_again(
    serve: Serve, canary: Canary, resolver: Resolver
) -> None:
    public = await serve(port=canary.port)
    public.routes["/page"] = redirect(302, "/again")  # same name, same port: a rebinding DNS answers 127.0.0.1
    resolver.flips["flip.test"] = ["127.0.0.2", "127.0.0.1"]
    with pytest.raises(BlockedAddress, match="non-public address 127.0.0.1"):
        await fetch(FetchArgs(url=f"http://flip.test:{canary.port}/page"), limits())
    assert [path for path, _ in public.hits] == ["/page"]
    assert resolver.lookups.count("flip.test") == 2


# -- 4. caps: size, content type, time; upstream errors -------------------------------------------------


def trickle(head: bytes, *, chunked: bool, total: int, record: list[int]) -> Handler:
    """Headers, then body chunks of 64 KiB until ``total`` bytes or until the client goes away."""

    async def handler(writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < total:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await writer.drain()
                sent += len(chunk)
        finally:
            record.append(sent)

    return handler


async def test_declared_oversize_body_is_refused_up_front(serve: Serve) -> None:
    public = await serve()
    record: list[int] = []
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000000000\r\n\r\n"
    public.routes["/big"] = trickle(head, chunked=False, total=10**9, record=record)
    started = time.monotonic()
    with pytest.raises(FetchRefused, match="larger than 100000 bytes") as info:
        await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/big"), limits(max_bytes=100_000))
    assert info.value.detail["reason"] == "too_large"
    assert info.value.code == "fetch_refused"
    assert time.monotonic() - started < 2


async def test_chunked_oversize_body_is_cut_off_while_streaming(serve: Serve) -> None:
    public = await serve()
    record: list[int] = []
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    public.routes["/endless"] = trickle(head, chunked=True, total=10**9, record=record)
    with pytest.raises(FetchRefused, match="larger than 200000 bytes") as info:
        await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/endless"), limits(max_bytes=200_000))
    assert info.value.detail["reason"] == "too_large"
    for _ in range(100):  # the server notices the hang-up
        if record:
            break
        await asyncio.sleep(0.02)
    assert record and record[0] < 64 * 2**20  # far from the gigabyte on offer: only socket buffers filled


@pytest.mark.parametrize(("configured", "requested", "refused"), [(10_000, 1_000, True), (1_000, 10_000, True)])
async def test_caller_cap_can_only_lower_the_limit(
    configured: int, requested: int, refused: bool, serve: Serve
) -> None:
    public = await serve()
    public.routes["/page"] = respond(200, b"y" * 5_000, {"Content-Type": "text/plain"})
    args = FetchArgs(url=f"http://127.0.0.2:{public.port}/page", max_bytes=requested)
    with pytest.raises(FetchRefused, match=f"larger than {min(configured, requested)} bytes"):
        await fetch(args, limits(max_bytes=configured))
    result = await fetch(args.model_copy(update={"max_bytes": 5_000}), limits(max_bytes=5_000))
    assert result.bytes == 5_000


@pytest.mark.parametrize(
    "content_type",
    ["application/octet-stream", "image/png", "image/svg+xml", "application/pdfx", "text", "", "video/mp4; a=b"],
)
async def test_disallowed_content_type_is_refused_before_the_body(content_type: str, serve: Serve) -> None:
    public = await serve()
    headers = f"Content-Type: {content_type}\r\n" if content_type else ""
    head = f"HTTP/1.1 200 OK\r\n{headers}Content-Length: 1000000\r\n\r\n".encode()
    public.routes["/file"] = hang_after(head)  # headers only, then silence
    started = time.monotonic()
    with pytest.raises(FetchRefused, match="content type") as info:
        await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/file"), limits())
    assert info.value.detail["reason"] == "content_type"
    assert time.monotonic() - started < 2  # did not wait for a body that never comes


async def test_compressed_body_is_refused(serve: Serve) -> None:
    public = await serve()
    public.routes["/gz"] = respond(200, b"\x1f\x8b...", {"Content-Type": "text/plain", "Content-Encoding": "gzip"})
    with pytest.raises(FetchRefused, match="content encoding 'gzip'"):
        await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/gz"), limits())
    assert public.hits


def hang_after(head: bytes, trickle_every: float | None = None) -> Handler:
    async def handler(writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        await writer.drain()
        while True:
            await asyncio.sleep(trickle_every or 3600)
            writer.write(b"z")
            await writer.drain()

    return handler


@pytest.mark.parametrize(
    ("head", "every"),
    [
        (b"", None),  # never answers
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n", None),  # stalls in the body
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n", 0.05),  # a byte at a time
    ],
    ids=["no-answer", "stalled-body", "slow-drip"],
)
async def test_slow_server_is_refused_after_the_total_timeout(head: bytes, every: float | None, serve: Serve) -> None:
    public = await serve()
    public.routes["/slow"] = hang_after(head, every)
    started = time.monotonic()
    async with LoopTicks(every=0.02) as loop:
        with pytest.raises(FetchRefused, match=r"took longer than 0\.5 s") as info:
            await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/slow"), limits(timeout_s=0.5))
    elapsed = time.monotonic() - started
    assert info.value.detail["reason"] == "timeout"
    assert 0.4 < elapsed < 2
    assert loop.ticks >= 10  # the event loop kept running throughout


@pytest.mark.parametrize(("status", "retryable"), [(404, False), (403, False), (500, True), (503, True)])
async def test_http_error_is_an_upstream_error(status: int, retryable: bool, serve: Serve) -> None:
    public = await serve()
    public.routes["/x"] = respond(status, b"nope", {"Content-Type": "text/plain", "Retry-After": "7"})
    with pytest.raises(UpstreamError) as info:
        await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/x"), limits())
    assert info.value.status_code == status
    assert info.value.retryable is retryable
    assert info.value.retry_after == 7.0


async def test_connection_refused_is_an_upstream_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.2", 0))
        closed_port = sock.getsockname()[1]
    with pytest.raises(UpstreamError) as info:
        await fetch(FetchArgs(url=f"http://127.0.0.2:{closed_port}/"), limits())
    assert info.value.status_code is None


# -- 5. what a successful fetch returns -----------------------------------------------------------------


async def test_text_page(serve: Serve) -> None:
    public = await serve()
    body = "<p>caf\u00e9</p>".encode("latin-1")
    public.routes["/page"] = respond(200, body, {"Content-Type": "text/html; charset=ISO-8859-1"})
    result = await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/page"), limits())
    assert result == FetchResult(
        url=f"http://127.0.0.2:{public.port}/page",
        status=200,
        content_type="text/html; charset=ISO-8859-1",
        text="<p>caf\u00e9</p>",
        content_b64=None,
        bytes=len(body),
        truncated=False,
    )


async def test_json_without_charset_is_utf8_with_replacement(serve: Serve) -> None:
    public = await serve()
    public.routes["/data"] = respond(200, b'{"a": "\xc3\xa9\xff"}', {"Content-Type": "application/json"})
    result = await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/data"), limits())
    assert result.text == '{"a": "\u00e9\ufffd"}'
    assert (result.content_b64, result.bytes) == (None, 12)


async def test_unknown_charset_falls_back_to_utf8(serve: Serve) -> None:
    public = await serve()
    public.routes["/t"] = respond(200, "\u00e9".encode(), {"Content-Type": "text/plain; charset=no-such-charset"})
    result = await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/t"), limits())
    assert result.text == "\u00e9"


async def test_pdf_comes_back_as_base64(serve: Serve) -> None:
    public = await serve()
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n\x00\x01\x02\xff" * 100
    public.routes["/doc.pdf"] = respond(200, pdf, {"Content-Type": "application/pdf"})
    result = await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/doc.pdf"), limits())
    assert result.text is None
    assert result.content_b64 is not None and base64.b64decode(result.content_b64) == pdf
    assert (result.status, result.content_type, result.truncated) == (200, "application/pdf", False)
    assert result.bytes == len(pdf)


async def test_chunked_body_within_the_cap(serve: Serve) -> None:
    public = await serve()
    record: list[int] = []
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def handler(writer: asyncio.StreamWriter) -> None:
        await trickle(head, chunked=True, total=3 * 65536, record=record)(writer)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    public.routes["/chunks"] = handler
    result = await fetch(FetchArgs(url=f"http://127.0.0.2:{public.port}/chunks"), limits(max_bytes=3 * 65536))
    assert result.bytes == 3 * 65536 and result.text == "x" * 3 * 65536


async def test_allowed_name_keeps_its_name(serve: Serve, resolver: Resolver) -> None:
    public = await serve()
    result = await fetch(FetchArgs(url=f"http://public.test:{public.port}/p?q=1"), limits())
    assert result.url == f"http://public.test:{public.port}/p?q=1"
    assert public.hits == [("/p?q=1", f"public.test:{public.port}")]


# -- 6. the arguments a model sees ------------------------------------------------------------------------


def test_fetch_args_schema() -> None:
    schema = FetchArgs.model_json_schema()
    assert set(schema["properties"]) == {"url", "max_bytes"}
    assert schema["required"] == ["url"]
    assert schema["additionalProperties"] is False
    assert all(prop.get("description") for prop in schema["properties"].values())
    with pytest.raises(pydantic.ValidationError):
        FetchArgs.model_validate({"url": "http://example.com/", "headers": {"Host": "localhost"}})
    with pytest.raises(pydantic.ValidationError):
        FetchArgs(url="http://example.com/" + "a" * 4096)
    with pytest.raises(pydantic.ValidationError):
        FetchArgs(url="http://example.com/", max_bytes=0)


def test_canary_was_never_hit(canary: Canary) -> None:
    assert canary.hits == 0
