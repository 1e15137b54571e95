"""Webhook delivery end to end: a real loopback receiver, Standard Webhooks signatures, retries, 410, dead
letters, Retry-After, SSRF refusal at submission; plus unit tests of the retry arithmetic."""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from conftest import LiveServer, wait_terminal
from keel.backends import open_store
from keel.errors import BlockedAddress
from keel.headers import retry_after_seconds
from keel.interaction import webhooks
from keel.interaction.webhooks import WebhookDispatcher
from keel.memory.types import NewTask, OutboxMessage, TaskStatus
from keel.netguard import AllowList
from keel.settings import Settings
from webhook_receiver import Receiver, new_secret, verify, wait_for

DIAG = {"workflow": "diagnostic", "input": {"steps": 1, "step_seconds": 0}}


# -- helpers ----------------------------------------------------------------------------------------------


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """conftest's settings, with per-test overrides via ``parametrize("settings", [{...}], indirect=True)``."""
    for name, value in getattr(request, "param", {}).items():
        setattr(settings, name, value)
    return settings


def submit(client: httpx.Client, url: str, secret: str) -> str:
    r = client.post("/v1/tasks", json={**DIAG, "webhook": {"url": url, "secret": secret}})
    assert r.status_code == 202, r.text
    task_id: str = r.json()["id"]
    return task_id


def outbox(live: LiveServer, task_id: str) -> list[OutboxMessage]:
    async def read() -> list[OutboxMessage]:
        store = open_store(live.settings.resolved_store_url)
        try:
            return await store.messages(task_id)
        finally:
            await store.aclose()

    return asyncio.run(read())


def wait_row(live: LiveServer, task_id: str, status: str, timeout: float = 10) -> OutboxMessage:
    """The task's single outbox row, once it reaches ``status``."""

    def probe() -> OutboxMessage | None:
        rows = outbox(live, task_id)
        assert len(rows) <= 1, rows
        return rows[0] if rows and rows[0].status == status else None

    return wait_for(probe, timeout, f"outbox row of {task_id} to be {status!r}")


# -- end to end -------------------------------------------------------------------------------------------


def test_delivery_verifies_with_standardwebhooks(receiver: Receiver, live: LiveServer) -> None:
    secret = new_secret()
    with live.client() as c:
        task_id = submit(c, receiver.url, secret)
        done = wait_terminal(c, task_id)
    assert done["status"] == "succeeded"
    row = wait_row(live, task_id, "delivered")
    [hit] = receiver.snapshot()

    payload = verify(secret, hit)
    assert payload["type"] == "task.succeeded"
    assert payload["data"]["task_id"] == task_id
    assert payload["data"]["status"] == "succeeded"
    envelope = payload["data"]["envelope"]
    assert envelope == done["envelope"]
    assert envelope["status"] == "success" and envelope["result"]["message"] == "diagnostic ran 1 steps"

    assert hit.path == "/hook"
    assert hit.headers["content-type"] == "application/json"
    assert hit.headers["webhook-id"] == row.id
    assert hit.headers["webhook-signature"].startswith("v1,")
    assert abs(int(hit.headers["webhook-timestamp"]) - hit.wall) <= 2
    assert row.event_type == "task.succeeded" and row.attempts == 1 and row.last_error is None


def test_tampering_fails_verification(receiver: Receiver, live: LiveServer) -> None:
    secret = new_secret()
    with live.client() as c:
        task_id = submit(c, receiver.url, secret)
        wait_terminal(c, task_id)
    wait_row(live, task_id, "delivered")
    [hit] = receiver.snapshot()
    verify(secret, hit)  # the untouched delivery verifies

    flipped = bytearray(hit.body)
    flipped[len(flipped) // 2] ^= 0x01  # stays ASCII, so only the signature can catch it
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(bytes(flipped), hit.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(hit.body, {**hit.headers, "webhook-id": hit.headers["webhook-id"] + "x"})
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(hit.body, hit.headers)


def test_retries_until_accepted_with_stable_id(receiver: Receiver, live: LiveServer) -> None:
    receiver.respond((500, {}), (500, {}), default=(200, {}))
    secret = new_secret()
    with live.client() as c:
        task_id = submit(c, receiver.url, secret)
        wait_terminal(c, task_id)
    row = wait_row(live, task_id, "delivered")
    hits = receiver.snapshot()  # the row is marked delivered only after the 200 was received

    assert [h.status for h in hits] == [500, 500, 200]
    assert {h.headers["webhook-id"] for h in hits} == {row.id}
    for hit in hits:  # each attempt carries its own timestamp, and the signature covers it
        assert abs(int(hit.headers["webhook-timestamp"]) - hit.wall) <= 2
        assert verify(secret, hit)["data"]["task_id"] == task_id
    assert len({h.body for h in hits}) == 1
    assert row.attempts == 3 and row.last_error is None


def test_410_disables_the_endpoint(receiver: Receiver, live: LiveServer) -> None:
    receiver.respond((410, {}), default=(200, {}))
    with live.client() as c:
        first = submit(c, receiver.url, new_secret())
        wait_terminal(c, first)
        row = wait_row(live, first, "disabled")
        assert row.last_error and "410" in row.last_error
        assert [h.status for h in receiver.wait_hits(1)] == [410]

        second = submit(c, receiver.url, new_secret())
        wait_terminal(c, second)
        wait_row(live, second, "disabled")

        # Another URL of the same receiver is not affected; once it is delivered, the dispatcher has
        # had its chances at the disabled row too.
        other = submit(c, receiver.base + "/other", new_secret())
        wait_terminal(c, other)
        wait_row(live, other, "delivered")

    time.sleep(3 * live.settings.poll_interval_s)
    assert [(h.path, h.status) for h in receiver.snapshot()] == [("/hook", 410), ("/other", 200)]
    assert outbox(live, second)[0].status == "disabled"


@pytest.mark.parametrize("settings", [{"webhook_max_attempts": 3}], indirect=True)
def test_always_failing_receiver_dead_letters(receiver: Receiver, live: LiveServer) -> None:
    receiver.respond(default=(503, {}))
    secret = new_secret()
    with live.client() as c:
        task_id = submit(c, receiver.url, secret)
        assert wait_terminal(c, task_id)["status"] == "succeeded"  # the task's outcome is unaffected
    row = wait_row(live, task_id, "dead")
    assert row.attempts == 3 and row.last_error == "HTTP 503"
    hits = receiver.snapshot()
    assert [h.status for h in hits] == [503, 503, 503]
    assert {h.headers["webhook-id"] for h in hits} == {row.id}
    time.sleep(3 * live.settings.poll_interval_s)
    assert len(receiver.snapshot()) == 3


# conftest caps backoff at 0.2 s, and the dispatcher clamps Retry-After to the backoff cap: raise the cap.
@pytest.mark.parametrize("settings", [{"webhook_backoff_max_s": 5.0}], indirect=True)
def test_retry_after_is_honoured(receiver: Receiver, live: LiveServer) -> None:
    receiver.respond((429, {"Retry-After": "1"}), default=(200, {}))
    secret = new_secret()
    with live.client() as c:
        task_id = submit(c, receiver.url, secret)
        wait_terminal(c, task_id)
    row = wait_row(live, task_id, "delivered")
    first, second = receiver.snapshot()
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 0.9
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == row.id
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    verify(secret, first)
    verify(secret, second)
    assert row.attempts == 2


SSRF_URLS = [
    ("http://10.0.0.1/hook", "blocked_address"),
    ("http://169.254.169.254/", "blocked_address"),
    ("http://169.254.169.254/latest/meta-data/", "blocked_address"),
    ("http://2852039166/", None),  # decimal 169.254.169.254
    ("http://0xa9.0xfe.0xa9.0xfe/", None),  # hex 169.254.169.254
    ("http://[::ffff:a9fe:a9fe]/", None),  # IPv4-mapped 169.254.169.254
    ("http://10.1/", None),  # short form of 10.0.0.1
]


def test_ssrf_targets_refused_at_submission(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tripwire: if a task were created anyway, its delivery must not leave the process.
    attempted: list[str] = []

    async def tripwire(client: object, method: str, url: str, **kw: object) -> httpx.Response:
        attempted.append(url)
        raise BlockedAddress("tripwire: test must not send webhook traffic")

    monkeypatch.setattr(webhooks, "guarded_request", tripwire)
    with live.client() as c:
        for url, code in SSRF_URLS:
            r = c.post("/v1/tasks", json={**DIAG, "webhook": {"url": url, "secret": new_secret()}})
            assert r.status_code == 422, (url, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            problem = r.json()
            assert problem["status"] == 422
            if code is not None:
                assert problem["type"] == f"urn:keel:problem:{code}", (url, problem)
        assert c.get("/v1/tasks").json()["items"] == []
    assert attempted == []


def test_bad_secret_refused_at_submission(receiver: Receiver, live: LiveServer) -> None:
    with live.client() as c:
        for secret in (new_secret(16), new_secret(65), "whsec_not base64!"):
            r = c.post("/v1/tasks", json={**DIAG, "webhook": {"url": receiver.url, "secret": secret}})
            assert r.status_code == 422, (secret, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
        assert c.get("/v1/tasks").json()["items"] == []
    assert receiver.snapshot() == []


# -- unit: retry arithmetic -------------------------------------------------------------------------------

NOW = 1_700_000_000.0


@pytest.mark.parametrize(("value", "expected"), [("120", 120.0), (" 7 ", 7.0), ("0", 0.0)])
def test_retry_after_seconds_form(value: str, expected: float) -> None:
    assert retry_after_seconds(value, NOW) == expected


def test_retry_after_http_date_form() -> None:
    future = email.utils.formatdate(NOW + 30, usegmt=True)  # e.g. "Tue, 14 Nov 2023 22:13:50 GMT"
    assert retry_after_seconds(future, NOW) == pytest.approx(30.0)
    past = email.utils.formatdate(NOW - 30, usegmt=True)
    assert retry_after_seconds(past, NOW) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5", "Fri, 99 Foo 2024", "0x10"])
def test_retry_after_garbage_is_ignored(value: str | None) -> None:
    assert retry_after_seconds(value, NOW) is None


def test_retry_after_unicode_digit_is_garbage() -> None:
    assert retry_after_seconds("²", NOW) is None


@dataclass
class FakeOutbox:
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    async def due(self, now: float, limit: int) -> list[OutboxMessage]:
        return []

    async def delivered(self, msg_id: str, now: float) -> None:
        self.calls.append(("delivered", msg_id))

    async def retry_at(self, msg_id: str, when: float, error: str) -> None:
        self.calls.append(("retry_at", msg_id, when, error))

    async def dead(self, msg_id: str, error: str) -> None:
        self.calls.append(("dead", msg_id, error))

    async def disable_endpoint(self, tenant: str, url: str, now: float) -> None:
        self.calls.append(("disable_endpoint", tenant, url))

    async def messages(self, task_id: str) -> list[OutboxMessage]:
        return []


def message(url: str, attempts: int = 0) -> OutboxMessage:
    return OutboxMessage(
        id="msg_test",
        tenant="acme",
        task_id="task_test",
        url=url,
        secret=new_secret(),
        event_type="task.succeeded",
        payload={"type": "task.succeeded", "data": {"task_id": "task_test"}},
        attempts=attempts,
        status="pending",
    )


async def test_backoff_grows_and_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    d = WebhookDispatcher(FakeOutbox(), allow=AllowList(), backoff_base_s=1.0, backoff_max_s=10.0)
    try:
        monkeypatch.setattr(webhooks.random, "uniform", lambda a, b: b)  # the top of the jitter range
        assert [d.backoff(n) for n in range(1, 7)] == [2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
        assert d.backoff(60) == 10.0
        monkeypatch.setattr(webhooks.random, "uniform", lambda a, b: a)  # the bottom: never below base / 2
        assert d.backoff(1) == d.backoff(10) == 0.5
        monkeypatch.undo()

        rng = random.Random(7)
        monkeypatch.setattr(webhooks.random, "uniform", rng.uniform)
        for attempt in range(1, 12):
            samples = [d.backoff(attempt) for _ in range(200)]
            assert 0.5 <= min(samples) and max(samples) <= min(10.0, 2.0**attempt)
        assert max(d.backoff(1) for _ in range(200)) < max(d.backoff(5) for _ in range(200))
    finally:
        await d.stop()


async def test_retry_uses_retry_after_and_dead_letters_at_max() -> None:
    out = FakeOutbox()
    d = WebhookDispatcher(
        out, allow=AllowList(), max_attempts=3, backoff_base_s=0.1, backoff_max_s=60, clock=lambda: NOW
    )
    try:
        msg = message("http://127.0.0.1:9/hook")
        await d._retry(msg, 1, "HTTP 429", 30.0)
        await d._retry(msg, 2, "HTTP 500", None)
        await d._retry(msg, 3, "HTTP 500", 30.0)
        (_, _, when1, err1), (_, _, when2, _), dead = out.calls
        assert err1 == "HTTP 429" and when1 == pytest.approx(NOW + 30.0)
        assert NOW + 0.05 <= when2 <= NOW + 0.4
        assert dead == ("dead", "msg_test", "HTTP 500")
    finally:
        await d.stop()


async def test_timestamp_is_taken_per_attempt(receiver: Receiver) -> None:
    clock = iter([NOW, NOW, NOW + 90, NOW + 90])  # deliver() reads the clock once before, once after sending
    d = WebhookDispatcher(FakeOutbox(), allow=AllowList.parse("127.0.0.1"), clock=lambda: next(clock))
    try:
        msg = message(receiver.url)
        await d.deliver(msg)
        await d.deliver(msg)
    finally:
        await d.stop()
    first, second = receiver.snapshot()
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "msg_test"
    assert (first.headers["webhook-timestamp"], second.headers["webhook-timestamp"]) == (
        str(int(NOW)),
        str(int(NOW + 90)),
    )
    assert first.body == second.body
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]


async def test_unicode_digit_retry_after_still_schedules_a_retry(receiver: Receiver) -> None:
    receiver.respond((503, {"Retry-After": "²"}))
    out = FakeOutbox()
    d = WebhookDispatcher(out, allow=AllowList.parse("127.0.0.1"), backoff_base_s=0.1, backoff_max_s=1)
    try:
        await d.deliver(message(receiver.url))
    finally:
        await d.stop()
    assert [c[0] for c in out.calls] == ["retry_at"]


# -- each endpoint on its own (issue 21, defects 4 and 5) ------------------------------------------------------


async def enqueue(store: Any, tenant: str, url: str, n: int = 1) -> list[str]:
    """``n`` tasks of ``tenant`` with a webhook to ``url``, finished at once: one outbox message each."""
    ids = []
    for _ in range(n):
        new = NewTask(tenant=tenant, workflow="diagnostic", input={}, webhook_url=url, webhook_secret=new_secret())
        created = await store.create_task(new, None, time.time())
        await store.finish(None, created.task.id, TaskStatus.succeeded, {"status": "success"}, time.time())
        ids.append(created.task.id)
    return ids


async def until(probe: Any, what: str, timeout: float = 10) -> None:
    """Wait for ``probe()`` (a plain or an async predicate) to hold."""
    deadline = time.monotonic() + timeout
    while not (await result if inspect.isawaitable(result := probe()) else result):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_slow_receiver_does_not_delay_another_tenants_webhook(receiver: Receiver, tmp_path: Any) -> None:
    """The battery: a healthy endpoint queued 1 s after a slow one got its delivery only at the slow one's
    timeout, because deliveries went in batches that waited for their slowest member."""
    receiver.gates["/slow"] = threading.Event()
    store = open_store(f"sqlite:///{tmp_path / 'k.db'}")
    d = WebhookDispatcher(store, allow=AllowList.parse("127.0.0.1"), timeout_s=20, poll_s=0.05)
    d.start()
    try:
        await enqueue(store, "slowcorp", receiver.base + "/slow")
        await until(lambda: len(receiver.snapshot()) == 1, "the slow delivery to start")
        [healthy] = await enqueue(store, "acme", receiver.url)
        d.wake()
        await until(lambda: any(h.path == "/hook" for h in receiver.snapshot()), "the healthy delivery")
        assert not receiver.gates["/slow"].is_set(), "the slow receiver has not answered yet"
        await until(lambda: _status(store, healthy, "delivered"), "the healthy message to be delivered")
    finally:
        receiver.gates["/slow"].set()
        await d.stop()
        await store.aclose()


async def test_a_410_stops_the_rest_of_its_endpoints_messages(receiver: Receiver, tmp_path: Any) -> None:
    """The battery: three messages to one endpoint sat in one batch and all three were sent, though the first
    answered 410."""
    receiver.respond((410, {}))
    store = open_store(f"sqlite:///{tmp_path / 'k.db'}")
    ids = await enqueue(store, "acme", receiver.url, 3)
    d = WebhookDispatcher(store, allow=AllowList.parse("127.0.0.1"), poll_s=0.05)
    d.start()
    try:

        async def all_disabled() -> bool:
            return all([await _status(store, i, "disabled") for i in ids])

        await until(all_disabled, "the endpoint's messages to be disabled")
        await asyncio.sleep(0.3)  # anything still queued in the dispatcher would go now
    finally:
        await d.stop()
        await store.aclose()
    assert [h.status for h in receiver.snapshot()] == [410]


async def test_concurrency_is_bounded_per_endpoint_and_overall(receiver: Receiver, tmp_path: Any) -> None:
    receiver.gates["/a"] = threading.Event()
    receiver.gates["/b"] = threading.Event()
    store = open_store(f"sqlite:///{tmp_path / 'k.db'}")
    for path in ("/a", "/b"):
        await enqueue(store, "acme", receiver.base + path, 4)
    d = WebhookDispatcher(
        store, allow=AllowList.parse("127.0.0.1"), timeout_s=20, poll_s=0.05, concurrency=3, per_endpoint=2
    )
    d.start()
    try:
        await until(lambda: len(receiver.snapshot()) >= 3, "three deliveries in flight")
        await asyncio.sleep(0.3)  # a fourth would arrive now if the bounds did not hold
        paths = [h.path for h in receiver.snapshot()]
        assert len(paths) == 3 and max(paths.count("/a"), paths.count("/b")) == 2, paths
        receiver.gates["/a"].set()
        receiver.gates["/b"].set()
        await until(lambda: len(receiver.snapshot()) == 8, "every message")
    finally:
        await d.stop()
        await store.aclose()


async def _status(store: Any, task_id: str, status: str) -> bool:
    return [m.status for m in await store.messages(task_id)] == [status]
