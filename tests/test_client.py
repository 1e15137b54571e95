"""keel.client against a real server (the ``live`` fixture, and a ``keel serve`` subprocess killed and restarted
mid-stream), plus the client's own rules on ``httpx.MockTransport``: Retry-After pacing, problem parsing, and
resuming a cut stream without a gap or a duplicate."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import LiveServer, free_port, make_key
from keel.client import (
    AsyncKeelClient,
    Event,
    InvalidRequest,
    KeelClient,
    KeelConnectionError,
    NotFound,
    Problem,
    RateLimited,
    ServerError,
    StreamInterrupted,
    TaskStatus,
    Unauthorized,
    Verdict,
    WaitTimeout,
)
from keel.settings import Settings
from keel.testing.pdfs import make_pdf
from keel_processes import Servers

CONTRACT = make_pdf(["MASTER SERVICES AGREEMENT\nPayment is due within 30 days of the invoice date."])


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.embedding_model = "hash:64"  # uploads embed; the real embedder has tests of its own
    settings.tools = ["endpoint_tools:TOOLS"]  # create_ticket: a write tool, for approvals
    settings.sse_heartbeat_s = 0.5
    return settings


def client(live: LiveServer, key: str | None = None, **kw: Any) -> KeelClient:
    return KeelClient(live.url, key or live.key, **kw)


# -- against a live server -------------------------------------------------------------------------------------


def test_upload_submit_wait_result(live: LiveServer, tmp_path: Path) -> None:
    path = tmp_path / "vendor-a.pdf"
    path.write_bytes(CONTRACT)
    with client(live) as keel:
        doc = keel.upload(path)
        assert doc.ingested and doc.id.startswith("doc_") and doc.source == "upload:vendor-a.pdf", doc
        assert doc.pages == 1 and doc.chunks >= 1
        assert keel.upload(CONTRACT, filename="again.pdf").id == doc.id  # the same bytes: the stored document
        with path.open("rb") as f:
            assert keel.upload(f).id == doc.id
        assert keel.document(doc.id) == doc

        body = {"steps": 2, "step_seconds": 0.05}
        handle = keel.submit("diagnostic", body, metadata={"ticket": "OPS-1"}, idempotency_key="k-1")
        assert handle.status is TaskStatus.queued and handle.links.events == f"/v1/tasks/{handle.id}/events"
        assert not handle.replayed
        again = keel.submit("diagnostic", body, metadata={"ticket": "OPS-1"}, idempotency_key="k-1")
        assert again.id == handle.id and again.replayed
        with pytest.raises(InvalidRequest) as reused:
            keel.submit("diagnostic", {"steps": 3}, idempotency_key="k-1")
        assert reused.value.status == 422 and "Idempotency-Key" in str(reused.value.detail)

        done = keel.wait(handle.id, timeout=30)
        assert done.status is TaskStatus.succeeded and done.metadata == {"ticket": "OPS-1"}
        assert done.envelope is not None and done.envelope.status == "success"
        assert done.envelope.metadata["steps"], done.envelope
        listed = keel.list_tasks(status=[TaskStatus.succeeded], limit=10)
        assert [t.id for t in listed.items] == [handle.id]
        assert keel.list_tasks(status=["running"]).items == []

        keel.delete_document(doc.id)
        with pytest.raises(NotFound):
            keel.document(doc.id)


def test_events_come_once_in_order_until_end(live: LiveServer) -> None:
    with client(live) as keel:
        task = keel.submit("diagnostic", {"steps": 3, "step_seconds": 0.1})
        events = list(keel.events(task.id))
        assert [e.id for e in events] == list(range(1, len(events) + 1))
        assert events[-1].type == "end" and events[-1].envelope is not None
        assert events[-1].envelope.status == "success"
        assert {"step_started", "step_completed", "progress"} <= {e.type for e in events}
        # From the middle: exactly what follows; past the end: nothing (the server answers 204).
        assert list(keel.events(task.id, after=3)) == events[3:]
        assert list(keel.events(task.id, after=events[-1].id)) == []


def test_problems_become_typed_exceptions(live: LiveServer) -> None:
    with KeelClient(live.url, "keel_not_a_key") as stranger, pytest.raises(Unauthorized) as denied:
        stranger.submit("diagnostic")
    assert denied.value.status == 401 and denied.value.type == "urn:keel:problem:unauthorized"
    assert denied.value.title == "Unauthorized" and denied.value.detail
    assert denied.value.headers["www-authenticate"] == "Bearer"

    with client(live) as keel:
        with pytest.raises(NotFound) as missing:
            keel.get("tsk_000000000000000000000000")
        problem = missing.value.problem
        assert (problem.status, problem.code, problem.title) == (404, "not_found", "Not Found")
        assert missing.value.detail and missing.value.method == "GET"
        with pytest.raises(NotFound):
            list(keel.events("tsk_000000000000000000000000"))

        # Both problem shapes keel has used: top-level `errors`, and `context.errors`.
        with pytest.raises(InvalidRequest) as invalid:
            keel.submit("diagnostic", budget={"max_steps": 0})
        assert invalid.value.code == "validation_error"
        assert [e["pointer"] for e in invalid.value.errors] == ["/budget/max_steps"]
        with pytest.raises(InvalidRequest) as bad_input:
            keel.submit("diagnostic", {"steps": "many"})
        assert "/input/steps" in json.dumps(bad_input.value.errors), bad_input.value.extensions
        assert bad_input.value.errors and "pointer" in bad_input.value.errors[0]

    with KeelClient(f"http://127.0.0.1:{free_port()}", live.key) as nobody, pytest.raises(KeelConnectionError):
        nobody.get("tsk_x")


def test_cancel_keeps_the_partial_result(live: LiveServer) -> None:
    with client(live) as keel:
        task = keel.submit("diagnostic", {"steps": 50, "step_seconds": 0.2})
        for event in keel.events(task.id):
            if event.type == "step_completed":
                break  # leaving the loop closes the stream
        cancelled = keel.cancel(task.id)
        assert cancelled.id == task.id
        done = keel.wait(task.id, timeout=20)
        assert done.status is TaskStatus.cancelled and done.envelope is not None
        assert done.envelope.errors[0].type == "cancelled"
        assert keel.cancel(task.id).status is TaskStatus.cancelled  # idempotent


def test_approve_a_parked_call(live: LiveServer, approver_key: str) -> None:
    with client(live) as keel, client(live, approver_key) as approver:
        task = keel.submit("tool_call", {"tool": "create_ticket", "args": {"title": "refund"}}, approval="always")
        parked = keel.wait(task.id, timeout=20)
        assert parked.status is TaskStatus.waiting_for_approval
        assert parked.envelope is not None and parked.envelope.status == "needs_clarification"
        (pending,) = keel.approvals(task.id)
        assert pending.tool == "create_ticket" and pending.args == {"title": "refund"} and pending.verdict is None
        with pytest.raises(WaitTimeout) as still:
            keel.wait(task.id, timeout=0.3, stop_at_approval=False)
        assert still.value.task.status is TaskStatus.waiting_for_approval

        decided = approver.approve(task.id, pending.call_id, note="fine")
        assert decided.verdict is Verdict.approve and decided.note == "fine"
        done = keel.wait(task.id, timeout=20)
        assert done.status is TaskStatus.succeeded and done.envelope is not None
        assert done.envelope.result["result"]["title"] == "refund"
        with pytest.raises(InvalidRequest):  # a different verdict on a decided call
            approver.deny(task.id, pending.call_id)


@pytest.fixture
def approver_key(live: LiveServer) -> str:
    """A key that may decide approvals (made before an async test's loop runs: ``make_key`` runs its own)."""
    return live.new_key("acme", "tasks:read,tasks:approve")


async def test_async_twin(live: LiveServer, approver_key: str, tmp_path: Path) -> None:
    path = tmp_path / "vendor-a.pdf"
    path.write_bytes(CONTRACT)
    async with AsyncKeelClient(live.url, live.key) as keel, AsyncKeelClient(live.url, approver_key) as approver:
        doc = await keel.upload(path)
        assert doc.ingested

        task = await keel.submit("diagnostic", {"steps": 2, "step_seconds": 0.05}, idempotency_key="a-1")
        assert (await keel.submit("diagnostic", {"steps": 2, "step_seconds": 0.05}, idempotency_key="a-1")).replayed
        events = [e async for e in keel.events(task.id)]
        assert [e.id for e in events] == list(range(1, len(events) + 1)) and events[-1].type == "end"
        done = await keel.wait(task.id, timeout=20)
        assert done.status is TaskStatus.succeeded and (await keel.list_tasks()).items[0].id == task.id

        slow = await keel.submit("diagnostic", {"steps": 50, "step_seconds": 0.2})
        await keel.cancel(slow.id)
        assert (await keel.wait(slow.id, timeout=20)).status is TaskStatus.cancelled

        parked = await keel.submit("tool_call", {"tool": "create_ticket", "args": {"title": "a"}}, approval="always")
        assert (await keel.wait(parked.id, timeout=20)).status is TaskStatus.waiting_for_approval
        (pending,) = await keel.approvals(parked.id)
        assert (await approver.decide(parked.id, pending.call_id, "deny")).verdict is Verdict.deny
        assert (await keel.wait(parked.id, timeout=20)).status.terminal

        with pytest.raises(NotFound) as missing:
            await keel.get("tsk_000000000000000000000000")
        assert missing.value.status == 404
    async with AsyncKeelClient(live.url, "keel_not_a_key") as stranger:
        with pytest.raises(Unauthorized):
            await stranger.upload(b"text", filename="a.txt")


def test_stream_survives_a_server_restart(servers: Servers, tmp_path: Path) -> None:
    """SIGKILL the server mid-stream and start it again: the client reconnects with Last-Event-ID and sees every
    event of the task exactly once, in order, up to ``end``."""
    port, data = free_port(), tmp_path / "data"
    data.mkdir()
    key = make_key(data, "acme", frozenset({"tasks:read", "tasks:write"}))
    env = {"KEEL_SSE_RETRY_MS": "200"}
    server = servers.start(port, data, env=env)
    sent: list[str | None] = []
    http = httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {key}"},
        event_hooks={"request": [lambda r: sent.append(r.headers.get("last-event-id"))]},
    )
    with http, KeelClient(http_client=http) as keel:
        task = keel.submit("diagnostic", {"steps": 8, "step_seconds": 0.3})
        seen: list[Event] = []
        for event in keel.events(task.id):
            seen.append(event)
            if len(seen) == 4:
                server.kill9()
                server = servers.start(port, data, env=env)
        ids = [e.id for e in seen]
        assert ids == list(range(1, len(ids) + 1)), ids
        assert seen[-1].type == "end" and seen[-1].envelope is not None
        assert seen[-1].envelope.status == "success"
        stream_requests = sent[1:]  # the first request was the submit
        assert stream_requests[0] is None and len(stream_requests) >= 2, sent
        assert int(stream_requests[1] or 0) >= 4, sent  # resumed after what it had, not from the start
        assert keel.get(task.id).status is TaskStatus.succeeded


# -- the client's own rules, on a mock transport ---------------------------------------------------------------


def _task(status: str, **extra: Any) -> dict[str, Any]:
    links = {"self": "/v1/tasks/tsk_1", "events": "/v1/tasks/tsk_1/events", "cancel": "/v1/tasks/tsk_1/cancel"}
    base = {"id": "tsk_1", "workflow": "w", "status": status, "progress": 0.5, "created_at": 1.0}
    return {**base, "updated_at": 1.0, "links": links, **extra}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


def mock(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(base_url="http://keel.test", transport=httpx.MockTransport(handler))


def test_wait_sleeps_what_retry_after_asks_and_times_out() -> None:
    answers = iter(
        [
            httpx.Response(200, json=_task("queued"), headers={"Retry-After": "2"}),
            httpx.Response(
                503, json={"type": "about:blank", "title": "Busy", "status": 503}, headers={"Retry-After": "5"}
            ),
            httpx.Response(429, json={"title": "Slow down", "status": 429}, headers={"Retry-After": "3"}),
            httpx.Response(200, json=_task("running"), headers={"Retry-After": "1"}),
            httpx.Response(200, json=_task("succeeded", envelope={"status": "success", "result": 42, "x-new": 1})),
        ]
    )
    clock = FakeClock()
    with KeelClient(http_client=mock(lambda r: next(answers)), clock=clock, sleep=clock.sleep) as keel:
        done = keel.wait("tsk_1", timeout=60)
    assert clock.slept == [2, 5, 3, 1]
    assert done.envelope is not None and done.envelope.result == 42
    assert done.envelope.model_extra == {"x-new": 1}  # an unknown member is kept, not refused

    clock = FakeClock()
    running = httpx.Response(200, json=_task("running"), headers={"Retry-After": "30"})
    with KeelClient(http_client=mock(lambda r: running), clock=clock, sleep=clock.sleep) as keel:
        with pytest.raises(WaitTimeout) as late:
            keel.wait("tsk_1", timeout=45)
    assert clock.slept == [30, 15] and late.value.task.status is TaskStatus.running

    clock = FakeClock()
    refused = httpx.Response(429, json={"title": "Too Many Requests", "status": 429}, headers={"Retry-After": "9"})
    with KeelClient(http_client=mock(lambda r: refused), clock=clock, sleep=clock.sleep) as keel:
        with pytest.raises(RateLimited) as limited:
            keel.wait("tsk_1", timeout=20)  # never one answer: the error, not a timeout
    assert limited.value.retry_after == 9 and clock.slept == [9, 9, 2]


def test_problem_bodies_parse_generically() -> None:
    request = httpx.Request("POST", "http://keel.test/v1/tasks")
    new_shape = httpx.Response(
        422,
        json={
            "type": "urn:keel:problem:validation_error",
            "title": "Validation failed",
            "status": 422,
            "detail": "The request does not match the schema.",
            "errors": [{"pointer": "/input/steps", "message": "not an int"}],
            "trace_id": "abc",
        },
        request=request,
    )
    problem = Problem.of(new_shape)
    assert problem.code == "validation_error" and problem.extensions["trace_id"] == "abc"
    assert problem.errors == [{"pointer": "/input/steps", "message": "not an int"}]
    old_shape = httpx.Response(
        422,
        json={
            "type": "urn:keel:problem:invalid_request",
            "title": "x",
            "status": 422,
            "context": {"errors": [{"pointer": "/a"}]},
        },
        request=request,
    )
    assert Problem.of(old_shape).errors == [{"pointer": "/a"}]
    html = httpx.Response(502, text="<html>bad gateway</html>", request=request)
    assert Problem.of(html) == Problem(title="Bad Gateway", status=502, detail="<html>bad gateway</html>")

    with KeelClient(http_client=mock(lambda r: httpx.Response(502, text="upstream"))) as keel:
        with pytest.raises(ServerError) as failed:
            keel.cancel("tsk_1")
    assert failed.value.status == 502 and failed.value.detail == "upstream"


def _frames(events: list[tuple[int, str]], *, retry: bool = True) -> bytes:
    head = ": keel event stream\nretry: 10\n\n" if retry else ""
    body = "".join(f"id: {i}\nevent: {t}\ndata: {json.dumps({'n': i})}\n\n" for i, t in events)
    return (head + body).encode()


class CutStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """Sends its bytes, then breaks the connection (or, with ``cut=False``, ends cleanly)."""

    def __init__(self, data: bytes, *, cut: bool = True) -> None:
        self.data = data
        self.cut = cut

    def __iter__(self) -> Iterator[bytes]:
        yield self.data
        if self.cut:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    async def __aiter__(self) -> Any:
        for chunk in self:
            yield chunk


class DroppingServer:
    """An SSE endpoint that cuts each connection after two events, replays one event already sent (a duplicate
    the client must drop), refuses one reconnect with a 503, and ends on the last visit; it records each
    request's ``Last-Event-ID``."""

    def __init__(self) -> None:
        self.asked: list[str | None] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.asked.append(request.headers.get("last-event-id"))
            visit = len(self.asked)
        after = int(request.headers.get("last-event-id") or 0)
        sse = {"content-type": "text/event-stream"}
        if visit == 3:
            return httpx.Response(
                503, json={"title": "Service Unavailable", "status": 503}, headers={"Retry-After": "0.5"}
            )
        if visit == 4:  # the stream closes cleanly before the end: a graceful shutdown
            return httpx.Response(
                200, headers=sse, stream=CutStream(_frames([(after, "progress")], retry=False), cut=False)
            )
        if visit >= 5:
            return httpx.Response(200, headers=sse, stream=CutStream(_frames([(after + 1, "end")]), cut=False))
        start = max(after, 1)  # from the second visit on, it resends `after` itself first
        return httpx.Response(
            200,
            headers=sse,
            stream=CutStream(
                _frames([(start, "progress"), (start + 1, "progress"), (start + 2, "progress")][: 2 + (after > 0)])
            ),
        )


def test_events_resume_after_every_kind_of_drop() -> None:
    server = DroppingServer()
    clock = FakeClock()
    with KeelClient(http_client=mock(server), clock=clock, sleep=clock.sleep) as keel:
        events = list(keel.events("tsk_1"))
    assert [(e.id, e.type) for e in events] == [
        (1, "progress"),
        (2, "progress"),
        (3, "progress"),
        (4, "progress"),
        (5, "end"),
    ]
    assert [e.data for e in events] == [{"n": i} for i in range(1, 6)]
    assert server.asked == [None, "2", "4", "4", "4"]
    assert clock.slept == [0.01, 0.01, 0.5, 0.01]  # the server's `retry:`, and its Retry-After for the 503


async def test_async_events_resume_after_every_kind_of_drop() -> None:
    server = DroppingServer()
    clock = FakeClock()
    http = httpx.AsyncClient(base_url="http://keel.test", transport=httpx.MockTransport(server))
    async with AsyncKeelClient(http_client=http, clock=clock, sleep=clock.asleep) as keel:
        events = [e async for e in keel.events("tsk_1")]
    await http.aclose()
    assert [e.id for e in events] == [1, 2, 3, 4, 5] and events[-1].type == "end"
    assert server.asked == [None, "2", "4", "4", "4"]


def test_events_give_up_after_max_reconnects() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    clock = FakeClock()
    with KeelClient(http_client=mock(down), clock=clock, sleep=clock.sleep, max_reconnects=3) as keel:
        with pytest.raises(StreamInterrupted) as broke:
            list(keel.events("tsk_1", after=7))
    assert broke.value.last_event_id == 7 and len(clock.slept) == 3
    assert isinstance(broke.value.__cause__, httpx.ConnectError)


async def test_async_waits_with_the_injected_clock() -> None:
    answers = iter(
        [
            httpx.Response(200, json=_task("running"), headers={"Retry-After": "4"}),
            httpx.Response(200, json=_task("failed")),
        ]
    )
    clock = FakeClock()
    http = httpx.AsyncClient(base_url="http://keel.test", transport=httpx.MockTransport(lambda r: next(answers)))
    async with http, AsyncKeelClient(http_client=http, clock=clock, sleep=clock.asleep) as keel:
        assert (await keel.wait("tsk_1")).status is TaskStatus.failed
    assert clock.slept == [4]


def test_the_client_needs_nothing_of_the_server() -> None:
    """``import keel.client`` loads no web framework, driver or model runtime: a caller installs keel's base
    dependencies and nothing of the server is started or imported but the wire enums."""
    code = (
        "import sys, keel.client; "
        "print(sorted(m for m in sys.modules if m.startswith('keel.') and not m.startswith('keel.client'))); "
        "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'numpy', 'sse_starlette') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["['keel.errors', 'keel.memory', 'keel.memory.types']", "[]"], done.stdout
