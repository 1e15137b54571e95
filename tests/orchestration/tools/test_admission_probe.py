"""Document URLs are probed at submission: ``document_analysis`` refuses one that cannot work (a refused connection,
a host that does not resolve, an HTTP 4xx) with a 422 naming it, before anything is stored or a model is called,
and accepts one that fails in a way a retry may cure (a 5xx, a timeout), which ingestion then retries.

The probe itself (``probe_document``) is a HEAD through the SSRF guard, confirmed by a one-byte GET when the HEAD
answer is not to be trusted (405, 501, 403)."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import LiveServer, wait_terminal
from keel.netguard import AllowList
from keel.orchestration.tools.fetch import FetchLimits, probe_document
from keel.settings import Settings
from keel.testing.analyst import ScriptedAnalyst
from keel.testing.fake_llm import FakeOpenAIServer

LOOPBACK = FetchLimits(allow=AllowList.parse("127.0.0.1"))
UNRESOLVABLE = "http://keel-admission-probe.invalid/contract.pdf"  # .invalid never resolves (RFC 6761)
PDF = b"%PDF-1.4\n% not a real document: the probe never reads a body\n"


class Site:
    """A loopback HTTP server whose paths answer the ways document hosts do; it records every request."""

    # path -> (status of HEAD, status of GET); None: the server has no HEAD (http.server answers 501)
    ROUTES: dict[str, tuple[int | None, int]] = {
        "/ok.pdf": (200, 200),
        "/missing.pdf": (404, 404),
        "/gone.pdf": (410, 410),
        "/busy.pdf": (503, 503),
        "/rate-limited.pdf": (429, 429),
        "/no-head.pdf": (405, 206),
        "/no-head-501.pdf": (None, 206),
        "/signed.pdf": (403, 206),  # a URL signed for GET only
        "/forbidden.pdf": (403, 403),
        "/empty.pdf": (405, 416),  # a Range past the end of an empty body
    }

    def __init__(self) -> None:
        self.hits: list[tuple[str, str, str | None]] = []
        self.head_delay_s = 0.0
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                site.hits.append((method, self.path, self.headers.get("Range")))
                if self.path == "/to-metadata":
                    self.send_response(302)
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                head, get = site.ROUTES.get(self.path, (404, 404))
                status = head if method == "HEAD" else get
                if status is None:
                    self.send_error(501)
                    return
                body = PDF if status < 300 else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/pdf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if method == "GET":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                if site.head_delay_s:
                    time.sleep(site.head_delay_s)
                if self.path == "/no-head-501.pdf":
                    self.send_error(501)
                    site.hits.append(("HEAD", self.path, None))
                    return
                self._answer("HEAD")

            def do_GET(self) -> None:  # noqa: N802
                self._answer("GET")

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def methods(self, path: str) -> list[str]:
        return [m for m, p, _ in self.hits if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site()
    yield s
    s.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    return f"http://127.0.0.1:{port}/contract.pdf"  # nothing listens there: the connection is refused


# -- the probe ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "verdict", "methods"),
    [
        ("/ok.pdf", "reachable", ["HEAD"]),
        ("/missing.pdf", "unreachable", ["HEAD"]),
        ("/gone.pdf", "unreachable", ["HEAD"]),
        ("/busy.pdf", "unknown", ["HEAD"]),
        ("/rate-limited.pdf", "unknown", ["HEAD"]),
        ("/no-head.pdf", "reachable", ["HEAD", "GET"]),
        ("/no-head-501.pdf", "reachable", ["HEAD", "GET"]),
        ("/signed.pdf", "reachable", ["HEAD", "GET"]),
        ("/forbidden.pdf", "unreachable", ["HEAD", "GET"]),
        ("/empty.pdf", "reachable", ["HEAD", "GET"]),
    ],
)
async def test_probe_verdict_by_answer(site: Site, path: str, verdict: str, methods: list[str]) -> None:
    probe = await probe_document(site.url(path), LOOPBACK)
    assert probe.verdict == verdict, probe
    assert site.methods(path) == methods
    assert all(r == "bytes=0-0" for m, p, r in site.hits if m == "GET")  # never the whole body
    if verdict == "unreachable":
        assert f"HTTP {probe.status}" in probe.reason and site.url(path) in probe.reason


async def test_probe_refused_connection_and_unresolvable_host_are_unreachable() -> None:
    refused = await probe_document(closed_port_url(), LOOPBACK)
    assert refused.verdict == "unreachable" and "connection refused" in refused.reason
    nowhere = await probe_document(UNRESOLVABLE, LOOPBACK)
    assert nowhere.verdict == "unreachable" and "cannot resolve host" in nowhere.reason


async def test_probe_keeps_the_ssrf_rules_on_every_hop(site: Site) -> None:
    blocked = await probe_document(site.url("/ok.pdf"), FetchLimits())  # loopback, not allowed
    assert blocked.verdict == "unreachable" and "not public" in blocked.reason and site.hits == []
    redirected = await probe_document(site.url("/to-metadata"), LOOPBACK)
    assert redirected.verdict == "unreachable" and "169.254.169.254" in redirected.reason


async def test_probe_that_gets_no_answer_in_time_is_unknown_not_unreachable(site: Site) -> None:
    site.head_delay_s = 1.0
    slow = await probe_document(site.url("/ok.pdf"), LOOPBACK, timeout_s=0.2)
    assert slow.verdict == "unknown" and "did not answer within 0.2 s" in slow.reason
    capped = await probe_document(site.url("/ok.pdf"), FetchLimits(allow=LOOPBACK.allow, timeout_s=0.2))
    assert capped.verdict == "unknown"  # the operator's fetch timeout caps the probe's too


# -- at submission, over HTTP ---------------------------------------------------------------------------------------


@pytest.fixture
def llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", "sk-test")
    with FakeOpenAIServer() as server:
        server.respond_with(ScriptedAnalyst().http_reply)
        yield server


@pytest.fixture
def settings(settings: Settings, llm: FakeOpenAIServer) -> Settings:
    """conftest's settings: the fake provider as the default model, loopback URLs allowed, three fetch retries."""
    return settings.model_copy(
        update={
            "default_model": f"openai-compatible:{llm.base_url}#analyst-2026-01-01",
            "model_prices": {"analyst": {"input": 1.0, "output": 2.0, "context_window": 16_000}},
            "embedding_model": "hash:64",
            "fetch_allow_hosts": "127.0.0.1",
            "ingest_fetch_retries": 3,
        }
    )


def submit(live: LiveServer, documents: list[str]) -> Any:
    with live.client() as c:
        return c.post(
            "/v1/tasks",
            json={"workflow": "document_analysis", "input": {"request": "Compare them.", "documents": documents}},
        )


def test_unreachable_urls_are_refused_at_submission_with_no_model_call(
    live: LiveServer, llm: FakeOpenAIServer, site: Site
) -> None:
    good = site.url("/ok.pdf")
    cases = {
        "closed port": closed_port_url(),
        "404": site.url("/missing.pdf"),
        "unresolvable": UNRESOLVABLE,
    }
    for why, bad in cases.items():
        r = submit(live, [good, bad])
        assert r.status_code == 422, (why, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        [error] = r.json()["errors"]
        assert error["pointer"] == "/input/documents/1", (why, error)
        assert bad in error["message"], (why, error)
    # All at once: each bad entry named by its own pointer, the good ones not.
    r = submit(live, [cases["404"], good, cases["closed port"], cases["unresolvable"]])
    assert r.status_code == 422
    pointers = [e["pointer"] for e in r.json()["errors"]]
    assert pointers == ["/input/documents/0", "/input/documents/2", "/input/documents/3"]
    assert llm.requests == []  # not one model call
    with live.client() as c:
        assert c.get("/v1/tasks").json()["items"] == []  # and nothing stored


def test_a_url_answering_503_is_accepted_and_left_to_the_ingestion_retries(
    live: LiveServer, llm: FakeOpenAIServer, site: Site
) -> None:
    busy = site.url("/busy.pdf")
    r = submit(live, [busy])
    assert r.status_code == 202, r.text
    assert site.methods("/busy.pdf") == ["HEAD"]  # the probe
    with live.client() as c:
        done: Any = wait_terminal(c, r.json()["id"], timeout=60)
    assert site.methods("/busy.pdf") == ["HEAD", "GET", "GET", "GET", "GET"]  # then one fetch and three retries
    assert "document_unreachable" in [e["type"] for e in done["envelope"]["errors"]], done
