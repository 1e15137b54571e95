"""Redis: session memory shared by replicas, and wake-ups for event streams across replicas.

A real redis-server, started by ``scripts/redis.sh`` (or the one at ``KEEL_TEST_REDIS_URL``); without one every
test here is skipped, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keel.backends.sqlite import SQLiteStore
from keel.memory.stores import SessionStore
from keel.memory.types import SessionTurn
from keel.testing.conformance import BUCKET_CHECKS, SESSION_CHECKS

redis = pytest.importorskip("redis.asyncio", reason="no redis driver: pip install 'keel-runtime[redis]'")

from keel.backends.redis import RedisNotifier, RedisRateBuckets, RedisSessionStore  # noqa: E402
from keel.memory.stores import RateBuckets  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "redis.sh"
T0 = 1_000_000.0


@dataclass
class RedisServer:
    """One redis-server run by scripts/redis.sh in its own directory."""

    dir: Path
    url: str = ""

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KEEL_REDIS_DIR": str(self.dir)}
        return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=600)

    def start(self) -> None:
        out = self.run("start")
        if out.returncode != 0:
            pytest.skip(f"no Redis for these tests: scripts/redis.sh start failed: {out.stderr.strip()}")
        self.url = out.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        self.run("stop")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("KEEL_TEST_REDIS_URL"):
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    return f"keel-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def sessions(redis_url: str, prefix: str) -> AsyncIterator[RedisSessionStore]:
    store = RedisSessionStore(redis_url, prefix=prefix)
    yield store
    await store.aclose()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def turn(content: str, role: str = "user") -> SessionTurn:
    return SessionTurn(role=role, content=content)


# -- session memory ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("check", SESSION_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_session_conformance(
    sessions: RedisSessionStore, check: Callable[[SessionStore], Awaitable[None]]
) -> None:
    """The session seam's suite on Redis: sessions behave as SQLite's do."""
    await check(sessions)


@pytest.mark.parametrize("check", BUCKET_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_rate_bucket_conformance(
    redis_url: str, prefix: str, check: Callable[[RateBuckets], Awaitable[None]]
) -> None:
    """The request-rate buckets' suite on Redis: its Lua script decides as keel.memory.limits.take_token does."""
    buckets = RedisRateBuckets(redis_url, prefix=prefix)
    try:
        await check(buckets)
    finally:
        await buckets.aclose()


async def test_open_stores_puts_sessions_in_redis(tmp_path: Path, redis_url: str) -> None:
    """With a Redis URL, the sessions handle is Redis's and every other handle the SQL store; closing the set
    closes both, each once."""
    from keel.backends import open_stores

    stores = open_stores(f"sqlite:///{tmp_path / 'k.db'}", redis_url=redis_url)
    try:
        assert isinstance(stores.sessions, RedisSessionStore) and isinstance(stores.tasks, SQLiteStore)
        assert isinstance(stores.buckets, RedisRateBuckets)
        assert stores.documents is stores.tasks is stores.events is stores.backend
        await stores.sessions.append_turns("t", "open-stores", [turn("hi")], 60, T0)
        assert await stores.backend.get_session("t", "open-stores", T0) is None  # not in SQLite
        assert await stores.sessions.delete_session("t", "open-stores")
    finally:
        await stores.aclose()


async def test_the_engine_sweep_reaches_sessions_in_redis(tmp_path: Path, redis_url: str) -> None:
    """The engine's periodic sweep deletes expired sessions through the memory layer's handle, so with Redis it is
    Redis's index that is swept, not the SQL store's empty table."""
    from types import SimpleNamespace

    from keel.backends import open_stores
    from keel.orchestration.engine.runner import sweep_expired

    stores = open_stores(f"sqlite:///{tmp_path / 'k.db'}", redis_url=redis_url)
    try:
        await stores.sessions.append_turns("t", "short-lived", [turn("hi")], 1, T0)
        memory = SimpleNamespace(sessions=stores.sessions, vectors=stores.vectors)
        await sweep_expired(stores.backend, T0 + 10, approval_ttl_s=None, memory=memory)  # type: ignore[arg-type]
        assert await stores.sessions.sweep_sessions(T0 + 10) == 0  # already swept, by the engine's sweep
    finally:
        await stores.aclose()


async def test_last_n_turns(sessions: RedisSessionStore) -> None:
    await sessions.append_turns("t", "s", [turn(f"m{i}") for i in range(1, 6)], 60, T0)
    got = await sessions.get_session("t", "s", T0, last=2)
    assert got is not None and [(t.seq, t.content) for t in got.turns] == [(4, "m4"), (5, "m5")]
    for last, seqs in ((0, []), (10, [1, 2, 3, 4, 5]), (None, [1, 2, 3, 4, 5])):
        got = await sessions.get_session("t", "s", T0, last=last)
        assert got is not None and [t.seq for t in got.turns] == seqs, last


async def test_turns_round_trip(sessions: RedisSessionStore) -> None:
    t = SessionTurn(role="tool", content='{"x": "é\\n"}', at=T0 - 0.123456789, metadata={"call": [1, 2.5, None]})
    stored = await sessions.append_turns("t", "s", [t, turn("next")], 60, T0 + 0.1)
    assert stored.turns[0].at == T0 - 0.123456789 and stored.turns[0].metadata == {"call": [1, 2.5, None]}
    assert stored.turns[0].content == '{"x": "é\\n"}' and stored.turns[1].at == T0 + 0.1
    assert stored.created_at == T0 + 0.1 and stored.expires_at == T0 + 60.1


async def test_tenant_isolation(sessions: RedisSessionStore) -> None:
    await sessions.append_turns("t1", "s", [turn("one")], 60, T0)
    await sessions.append_turns("t2", "s", [turn("two")], 60, T0)
    # ids that would collide if keys were joined naively with ':'
    await sessions.append_turns("a:b", "c", [turn("ab/c")], 60, T0)
    await sessions.append_turns("a", "b:c", [turn("a/bc")], 60, T0)
    for tenant, sid, content in (("t1", "s", "one"), ("t2", "s", "two"), ("a:b", "c", "ab/c"), ("a", "b:c", "a/bc")):
        got = await sessions.get_session(tenant, sid, T0 + 1)
        assert got is not None and got.tenant == tenant and [t.content for t in got.turns] == [content]
    assert await sessions.get_session("t3", "s", T0 + 1) is None
    assert await sessions.delete_session("t1", "s")
    assert not await sessions.delete_session("t1", "s")
    assert await sessions.get_session("t1", "s", T0 + 1) is None
    assert await sessions.get_session("t2", "s", T0 + 1) is not None


async def test_concurrent_appends_keep_every_turn_once(redis_url: str, prefix: str) -> None:
    replicas = [RedisSessionStore(redis_url, prefix=prefix) for _ in range(3)]
    try:
        await asyncio.gather(
            *(
                replicas[i % 3].append_turns("t", "s", [turn(f"q{i}"), turn(f"a{i}", "assistant")], 60, T0)
                for i in range(60)
            )
        )
        got = await replicas[0].get_session("t", "s", T0 + 1)
    finally:
        for r in replicas:
            await r.aclose()
    assert got is not None
    assert [t.seq for t in got.turns] == list(range(1, 121))
    contents = [t.content for t in got.turns]
    assert sorted(contents) == sorted([f"q{i}" for i in range(60)] + [f"a{i}" for i in range(60)])
    for q, a in zip(contents[::2], contents[1::2], strict=True):  # each call's turns stay together, in order
        assert q.startswith("q") and a == "a" + q[1:]


async def test_redis_expires_sessions_itself(sessions: RedisSessionStore, raw: redis.Redis, prefix: str) -> None:
    now = time.time()
    await sessions.append_turns("t", "short", [turn("x")], 0.2, now)
    await sessions.set_session_context("t", "short", {"k": 1}, 0.2, now)
    await sessions.append_turns("t", "long", [turn("y")], 60, now)
    assert len(await raw.keys(f"{prefix}:session:*")) == 4
    await asyncio.sleep(0.5)
    assert sorted(await raw.keys(f"{prefix}:session:*")) == [
        f"{prefix}:session:t:long",
        f"{prefix}:session:t:long:turns",
    ]
    # Gone from Redis, even for a caller whose clock says the TTL has not run out yet.
    assert await sessions.get_session("t", "short", now) is None
    fresh = await sessions.append_turns("t", "short", [turn("z")], 60, time.time())
    assert [t.seq for t in fresh.turns] == [1] and fresh.context == {}


async def test_sliding_ttl_in_redis(sessions: RedisSessionStore, raw: redis.Redis, prefix: str) -> None:
    await sessions.append_turns("t", "s", [turn("x")], 0.6, time.time())
    await asyncio.sleep(0.35)
    await sessions.append_turns("t", "s", [turn("y")], 0.6, time.time())  # pushes the expiry on
    await asyncio.sleep(0.35)  # past the first expiry
    got = await sessions.get_session("t", "s", time.time())
    assert got is not None and [t.content for t in got.turns] == ["x", "y"]
    assert 0 < await raw.pttl(f"{prefix}:session:t:s:turns") <= 600


async def test_sweep(sessions: RedisSessionStore, raw: redis.Redis, prefix: str) -> None:
    await asyncio.gather(*(sessions.append_turns("t", f"old{i}", [turn("x")], 10, T0) for i in range(1100)))
    await sessions.append_turns("t", "live", [turn("x")], 100, T0)
    await sessions.append_turns("t", "refreshed", [turn("x")], 10, T0)
    await sessions.append_turns("t", "refreshed", [turn("y")], 100, T0 + 5)
    now = time.time()
    await sessions.append_turns("t", "redis-expired", [turn("x")], 0.05, now)
    await asyncio.sleep(0.2)  # Redis drops it by itself: the sweep only unlists it
    assert await sessions.sweep_sessions(T0 + 50) == 1100
    assert await sessions.sweep_sessions(T0 + 50) == 0
    assert await sessions.get_session("t", "live", T0 + 50) is not None
    assert await sessions.get_session("t", "refreshed", T0 + 50) is not None
    assert sorted(await raw.zrange(f"{prefix}:sessions:expiry", 0, -1)) == ["t:live", "t:redis-expired", "t:refreshed"]
    assert await sessions.sweep_sessions(now + 1) == 2  # live and refreshed (logically expired by then)
    assert await raw.zcard(f"{prefix}:sessions:expiry") == 0
    assert await raw.keys(f"{prefix}:*") == []


# -- the notifier ------------------------------------------------------------------------------------------


async def _eventually(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _wake_time(waiter: RedisNotifier, notifier: RedisNotifier, task_id: str, timeout: float = 10.0) -> float:
    """Seconds between ``notifier.notify`` and the end of ``waiter.wait`` (started first)."""
    waiting = asyncio.create_task(waiter.wait(task_id, timeout))
    await asyncio.sleep(0.02)  # let the wait register
    start = time.monotonic()
    notifier.notify(task_id)
    await waiting
    return time.monotonic() - start


@pytest.fixture
async def replicas(redis_url: str, prefix: str) -> AsyncIterator[tuple[RedisNotifier, RedisNotifier]]:
    a = RedisNotifier(redis_url, channel=f"{prefix}:events", max_backoff_s=0.5)
    b = RedisNotifier(redis_url, channel=f"{prefix}:events", max_backoff_s=0.5)
    await a.start()
    await b.start()
    await asyncio.wait_for(asyncio.gather(a.connected.wait(), b.connected.wait()), 10)
    yield a, b
    await a.stop()
    await b.stop()


async def test_notify_on_one_replica_wakes_the_other(replicas: tuple[RedisNotifier, RedisNotifier]) -> None:
    a, b = replicas
    # A wait of 10 s ends in well under one: the wake-up came over Redis, not by timeout (typically ~1 ms).
    assert await _wake_time(b, a, "task-1") < 1.0
    assert await _wake_time(a, b, "task-2") < 1.0
    assert await _wake_time(a, a, "task-3") < 1.0  # in-process, as the plain Notifier


async def test_wait_without_notify_times_out_on_time(replicas: tuple[RedisNotifier, RedisNotifier]) -> None:
    a, b = replicas
    a.notify("another-task")
    start = time.monotonic()
    await b.wait("quiet-task", 0.3)
    assert 0.29 <= time.monotonic() - start < 1.5


async def test_notifier_resubscribes_after_client_kill(
    replicas: tuple[RedisNotifier, RedisNotifier], raw: redis.Redis
) -> None:
    a, b = replicas
    before = b.subscriptions
    assert await raw.client_kill_filter(_type="pubsub") >= 2
    start = time.monotonic()
    await b.wait("t", 0.3)  # a wait still ends by its timeout while the subscriber reconnects
    assert time.monotonic() - start < 1.5
    await _eventually(lambda: b.subscriptions > before and b.connected.is_set())
    assert await _wake_time(b, a, "after-kill") < 1.0


async def test_notifier_survives_a_redis_restart(tmp_path: Path) -> None:
    if os.environ.get("KEEL_TEST_REDIS_URL"):
        pytest.skip("restarts a server of its own: only with scripts/redis.sh")
    server = RedisServer(tmp_path / "redis")
    server.start()
    a = RedisNotifier(server.url, channel="keel:events", max_backoff_s=0.3)
    b = RedisNotifier(server.url, channel="keel:events", max_backoff_s=0.3)
    try:
        await a.start()
        await b.start()
        await asyncio.wait_for(asyncio.gather(a.connected.wait(), b.connected.wait()), 10)
        assert await _wake_time(b, a, "before") < 1.0

        server.stop()
        await _eventually(lambda: not b.connected.is_set())
        start = time.monotonic()
        waiting = asyncio.create_task(b.wait("during", 0.3))
        a.notify("during")  # never blocks nor raises; the wake-up is lost and the wait ends by its timeout
        assert time.monotonic() - start < 0.05
        await waiting
        assert 0.29 <= time.monotonic() - start < 1.5

        before = b.subscriptions
        server.start()  # the same port again (kept in its directory)
        await _eventually(lambda: b.subscriptions > before and a.connected.is_set() and b.connected.is_set())
        assert await _wake_time(b, a, "after") < 1.0
    finally:
        await a.stop()
        await b.stop()
        server.stop()


class FreezableProxy:
    """A TCP relay to Redis that can go silent without closing anything, as a dead network path does."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_notifier_detects_a_silent_connection(
    replicas: tuple[RedisNotifier, RedisNotifier], redis_url: str, prefix: str
) -> None:
    a, _ = replicas
    proxy = FreezableProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    port = await proxy.start()
    b = RedisNotifier(f"redis://127.0.0.1:{port}/0", channel=a.channel, max_backoff_s=0.2, health_check_s=0.2)
    try:
        await b.start()
        await asyncio.wait_for(b.connected.wait(), 10)
        assert await _wake_time(b, a, "before") < 1.0
        proxy.flowing.clear()  # nothing passes, nothing is closed
        await _eventually(lambda: not b.connected.is_set())  # its PINGs went unanswered
        start = time.monotonic()
        await b.wait("during", 0.3)
        assert time.monotonic() - start < 1.5
        proxy.flowing.set()
        await _eventually(lambda: b.connected.is_set())
        assert await _wake_time(b, a, "after") < 1.0
    finally:
        await b.stop()
        await proxy.stop()


async def test_stop_publishes_what_was_queued(replicas: tuple[RedisNotifier, RedisNotifier]) -> None:
    a, b = replicas
    waiting = asyncio.create_task(b.wait("last-words", 10))
    await asyncio.sleep(0.02)
    a.notify("last-words")
    await a.stop()  # at shutdown, right after a worker's final event
    start = time.monotonic()
    await waiting
    assert time.monotonic() - start < 1.0
    a.notify("after-stop")  # local only, no error


def test_the_app_keeps_chat_sessions_in_redis(redis_url: str, tmp_path: Path) -> None:
    """KEEL_REDIS_URL wires the app: a /v1/chat session is written to Redis, not to SQLite."""
    import httpx

    from conftest import free_port, make_key, start_server
    from keel.settings import Settings

    settings = Settings(
        data_dir=tmp_path / "keel", port=free_port(), poll_interval_s=0.05, default_model="test", redis_url=redis_url
    )
    settings.data_dir.mkdir(parents=True)
    key = make_key(settings.data_dir, "acme", frozenset({"tasks:read", "tasks:write"}))
    server, thread = start_server(settings)
    try:
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", headers=auth) as c:
            r = c.post("/v1/chat", json={"message": "hello redis", "session": "ses_redis_1"}, timeout=30)
            assert r.status_code == 200, r.text
            session = c.get("/v1/sessions/ses_redis_1").json()
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    assert [t["content"] for t in session["turns"]][:1] == ["hello redis"]

    async def lookup() -> tuple[object, object]:
        from keel.backends.redis import RedisSessionStore

        in_redis = RedisSessionStore(redis_url)
        in_sqlite = SQLiteStore(settings.data_dir / "keel.db")
        try:
            return (
                await in_redis.get_session("acme", "ses_redis_1", time.time()),
                await in_sqlite.get_session("acme", "ses_redis_1", time.time()),
            )
        finally:
            await in_redis.aclose()
            await in_sqlite.aclose()

    from_redis, from_sqlite = asyncio.run(lookup())
    assert from_redis is not None and from_sqlite is None
