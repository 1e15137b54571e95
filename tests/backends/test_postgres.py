"""What the conformance suite cannot show on one connection: Postgres under several connections and processes'
worth of pools, migrations racing at open, and pgvector's search against SQLite's and against exact search."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from keel.errors import InputError, LeaseLost, StoreError
from keel.memory.blobs import INLINE_LIMIT
from keel.memory.stores import Store
from keel.memory.types import (
    BlobRef,
    ChunkRecord,
    DocumentRecord,
    EffectRecord,
    EffectSettlement,
    EffectStatus,
    StepCheckpoint,
    TaskStatus,
)
from keel.testing.conformance import T0, _new
from postgres_server import fresh_postgres_store

psycopg = pytest.importorskip("psycopg")
from keel.backends.postgres import MIGRATIONS, PostgresStore, migrate  # noqa: E402
from keel.backends.postgres_memory import hnsw_settings, search_sql  # noqa: E402
from keel.backends.sqlite import SQLiteStore  # noqa: E402


@pytest.fixture
async def pg(postgres_url: str) -> AsyncIterator[PostgresStore]:
    store = await fresh_postgres_store(postgres_url)
    assert isinstance(store, PostgresStore)
    yield store
    await store.aclose()


@pytest.fixture
async def pg2(pg: PostgresStore) -> AsyncIterator[PostgresStore]:
    """A second store on the same database: its own pool, as another process would have."""
    store = PostgresStore(pg.url)
    yield store
    await store.aclose()


@pytest.fixture
async def blank_database(postgres_url: str) -> AsyncIterator[str]:
    """A new, empty database on the server (not even the vector extension), dropped afterwards."""
    from psycopg.conninfo import make_conninfo

    name = f"keel_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as admin:
        try:
            await admin.execute(f"CREATE DATABASE {name}")
        except psycopg.Error as exc:
            pytest.skip(f"cannot create a database on the test server: {exc}")
    yield make_conninfo(postgres_url, dbname=name)
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as admin:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def _leased(store: Store, n: int = 1) -> list[str]:
    ids = []
    for _ in range(n):
        res = await store.create_task(_new(), None, T0)
        assert res.task
        ids.append(res.task.id)
    return ids


# -- migrations ---------------------------------------------------------------------------------------------------


async def test_migrations_are_idempotent_and_concurrent_opens_are_safe(blank_database: str) -> None:
    # Four processes opening a new database at once: exactly one applies each migration, nobody fails.
    applied = await asyncio.gather(*(migrate(blank_database) for _ in range(4)))
    assert sorted(applied, key=len) == [[], [], [], list(range(1, len(MIGRATIONS) + 1))]
    assert await migrate(blank_database) == []  # and again: nothing to do
    stores = [PostgresStore(blank_database) for _ in range(3)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        results = await asyncio.gather(*(s.create_task(_new(), None, T0) for s in stores))
        assert len({r.task.id for r in results if r.task}) == 3
        async with await psycopg.AsyncConnection.connect(blank_database) as conn:
            cur = await conn.execute("SELECT version FROM keel_schema_migrations ORDER BY version")
            assert [r[0] for r in await cur.fetchall()] == list(range(1, len(MIGRATIONS) + 1))
    finally:
        for s in stores:
            await s.aclose()


# -- leases and the event log under real concurrency --------------------------------------------------------------


async def test_lease_fencing_across_two_connections(pg: PostgresStore, pg2: PostgresStore) -> None:
    (task_id,) = await _leased(pg)
    old = await pg.lease_next("w1", T0, 10, 5)
    assert old is not None and await pg2.lease_next("w2", T0 + 1, 10, 5) is None  # held, seen from elsewhere
    new = await pg2.lease_next("w2", T0 + 11, 10, 5)  # expired: taken over by the other "process"
    assert new is not None and new.token > old.token
    # Each stale write, on its own connection, races a write of the new owner: the stale one never commits.
    for stale in (
        pg.append(old, "progress", {}, T0 + 12),
        pg.set_progress(old, 0.9, "x", T0 + 12),
        pg.record_step(old, StepCheckpoint(key="s", seq=1, fn="f"), [("step_completed", {})], T0 + 12),
        pg.finish(old, task_id, TaskStatus.succeeded, {"status": "success"}, T0 + 12),
    ):
        results = await asyncio.gather(stale, pg2.append(new, "progress", {"p": 1}, T0 + 12), return_exceptions=True)
        assert isinstance(results[0], LeaseLost), results[0]
    assert await pg.load_steps(task_id) == []
    events = await pg.read(task_id, 0)
    assert [e.data.get("p") for e in events if e.type == "progress"] == [1, 1, 1, 1]
    task = await pg.get_task(task_id)
    assert task is not None and task.status is TaskStatus.running and task.progress == 0


async def test_skip_locked_gives_each_task_to_one_worker(pg: PostgresStore, pg2: PostgresStore) -> None:
    ids = await _leased(pg, 20)
    leases = await asyncio.gather(*((pg if i % 2 else pg2).lease_next(f"w{i}", T0, 30, 5) for i in range(30)))
    got = [lease.task_id for lease in leases if lease is not None]
    assert sorted(got) == sorted(ids)  # every task once, no task twice, the extra workers get nothing


async def test_concurrent_appends_get_gapless_increasing_seqs(pg: PostgresStore, pg2: PostgresStore) -> None:
    (task_id,) = await _leased(pg)
    lease = await pg.lease_next("w", T0, 60, 5)
    assert lease is not None
    n = 200
    events = await asyncio.gather(
        *((pg if i % 2 else pg2).append(lease, "progress", {"i": i}, T0 + 1) for i in range(n))
    )
    read = await pg.read(task_id, 0, limit=1000)
    assert [e.seq for e in read] == list(range(1, n + 3))  # queued, running, then the n appends
    assert sorted(e.seq for e in events) == list(range(3, n + 3))
    # What each append was told is what was stored.
    assert {e.seq: e.data["i"] for e in events} == {e.seq: e.data["i"] for e in read[2:]}
    # A reader resuming from any point (SSE Last-Event-ID) sees the rest without a gap.
    assert [e.seq for e in await pg2.read(task_id, 100, limit=1000)] == list(range(101, n + 3))


async def test_append_nowait_commits_before_later_writes_of_the_task(pg: PostgresStore) -> None:
    (task_id,) = await _leased(pg)
    lease = await pg.lease_next("w", T0, 60, 5)
    assert lease is not None
    started = pg.append_nowait(lease, "step_started", {"step": "s"}, T0 + 1)
    await pg.record_step(lease, StepCheckpoint(key="s", seq=1, fn="f"), [("step_completed", {"step": "s"})], T0 + 2)
    assert (await started).seq == 3
    assert [e.type for e in await pg.read(task_id, 2)] == ["step_started", "step_completed"]


async def _count(store: PostgresStore, query: str, *args: object) -> int:
    async with await psycopg.AsyncConnection.connect(store.url) as conn:
        cur = await conn.execute(query, args)
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


def _statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement psycopg runs from now on, until ``monkeypatch.undo()``: counted at its public seam."""
    statements: list[str] = []
    execute = psycopg.AsyncCursor.execute

    async def counted(self: psycopg.AsyncCursor[object], query: object, *args: object, **kw: object) -> object:
        statements.append(str(query))
        return await execute(self, query, *args, **kw)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", counted)
    return statements


async def test_a_lost_lease_writes_nothing_of_a_one_statement_checkpoint(pg: PostgresStore) -> None:
    # A checkpoint is one statement (fence, step row, blob, events, effect): with the lease lost, none of it lands.
    (task_id,) = await _leased(pg)
    old = await pg.lease_next("w1", T0, 10, 5)
    assert old is not None
    effect = EffectRecord(key="fx", task_id=task_id, step="s", tool="t", args={}, executions=1)
    await pg.begin_effect(old, effect, T0 + 1)
    new = await pg.lease_next("w2", T0 + 11, 10, 5)
    assert new is not None
    seq = await _count(pg, "SELECT last_seq FROM tasks WHERE id = %s", task_id)
    big = {"text": "lorem ipsum " * (INLINE_LIMIT // 6)}
    applied = EffectSettlement(key="fx", status=EffectStatus.applied, result={"ok": 1}, executions=1)
    with pytest.raises(LeaseLost):
        await pg.record_step(
            old, StepCheckpoint(key="s", seq=1, fn="f", result=big), [("x", {})], T0 + 12, effect=applied
        )
    with pytest.raises(LeaseLost):
        await pg.set_state(old, "partial", big, ("partial_result", {"key": "partial"}), T0 + 12)
    assert await pg.load_steps(task_id) == [] and await pg.load_state(task_id) == {}
    assert await _count(pg, "SELECT count(*) FROM blobs") == 0
    assert await _count(pg, "SELECT last_seq FROM tasks WHERE id = %s", task_id) == seq
    assert [e.seq for e in await pg.read(task_id, 0)] == list(range(1, seq + 1))
    stored = await pg.get_effect("fx")
    assert stored is not None and stored.status is EffectStatus.pending
    # The new owner's checkpoint settles the effect in the same statement.
    await pg.record_step(new, StepCheckpoint(key="s", seq=1, fn="f", result=big), [("x", {})], T0 + 13, effect=applied)
    stored = await pg.get_effect("fx")
    assert stored is not None and stored.status is EffectStatus.applied and stored.result == {"ok": 1}
    assert [e.seq for e in await pg.read(task_id, seq)] == [seq + 1]


async def test_a_step_checkpoint_is_one_statement_without_begin(
    pg: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The step path's writes are one round trip each (issue 20): a checkpoint with its events and its effect, a
    # token batch, state, progress, an effect settled on its own. Counted at psycopg's public seams: statements
    # run, transactions opened.
    (task_id,) = await _leased(pg)
    lease = await pg.lease_next("w", T0, 60, 5)
    assert lease is not None
    for key in ("fx", "fy"):
        await pg.begin_effect(lease, EffectRecord(key=key, task_id=task_id, step="s", tool="t", args={}), T0)
    statements = _statements(monkeypatch)

    def no_transaction(*args: object, **kw: object) -> object:
        raise AssertionError("the step path opened a transaction block")

    monkeypatch.setattr(psycopg.AsyncConnection, "transaction", no_transaction)
    settled = EffectSettlement(key="fx", status=EffectStatus.applied, executions=1)
    await pg.record_step(lease, StepCheckpoint(key="s", seq=1, fn="f"), [("a", {}), ("b", {})], T0 + 1, effect=settled)
    await pg.append_batch_nowait(lease, [("token", {"i": 0}), ("token", {"i": 1})], T0 + 2)
    await pg.append(lease, "progress", {}, T0 + 2)
    await pg.set_state(lease, "k", [1], ("partial_result", {"key": "k"}), T0 + 3)
    await pg.set_progress(lease, 0.5, "s", T0 + 3)
    await pg.settle_effect(lease, EffectSettlement(key="fy", status=EffectStatus.failed, executions=1), T0 + 3)
    assert len(statements) == 6, statements
    monkeypatch.undo()
    assert [e.type for e in await pg.read(task_id, 2)] == ["a", "b", "token", "token", "progress", "partial_result"]


async def test_appends_queued_behind_each_other_go_as_one_statement(
    pg: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    (task_id,) = await _leased(pg)
    lease = await pg.lease_next("w", T0, 60, 5)
    assert lease is not None
    statements = _statements(monkeypatch)
    # A step's held step_started, then the events it awaits: queued before any went out, so one commit.
    started = pg.append_batch_nowait(lease, [("step_started", {"step": "s"})], T0 + 1)
    token = pg.append_nowait(lease, "token", {"i": 0}, T0 + 2)
    more = pg.append_batch_nowait(lease, [("token", {"i": 1}), ("token", {"i": 2}, T0 + 2.5)], T0 + 3)
    assert [(e.seq, e.type) for e in await started] == [(3, "step_started")]
    assert ((await token).seq, (await token).data) == (4, {"i": 0})
    assert [(e.seq, e.data, e.created_at) for e in await more] == [(5, {"i": 1}, T0 + 3), (6, {"i": 2}, T0 + 2.5)]
    assert len(statements) == 1
    # A write of another kind queued in between keeps its place: the appends around it do not merge across it.
    before = pg.append_nowait(lease, "a", {}, T0 + 4)
    progress = asyncio.ensure_future(pg.set_progress(lease, 0.5, "s", T0 + 4))
    await asyncio.sleep(0)  # set_progress queues its write
    after = pg.append_nowait(lease, "b", {}, T0 + 4)
    await asyncio.gather(before, progress, after)
    assert len(statements) == 4
    monkeypatch.undo()
    assert [e.type for e in await pg.read(task_id, 2)] == ["step_started", "token", "token", "token", "a", "b"]
    # Under a lost lease every merged caller is told, and none of it is written.
    new = await pg.lease_next("w2", T0 + 61, 60, 5)
    assert new is not None
    stale = [pg.append_nowait(lease, "x", {}, T0 + 62), pg.append_batch_nowait(lease, [("y", {})], T0 + 62)]
    for result in await asyncio.gather(*stale, return_exceptions=True):
        assert isinstance(result, LeaseLost), result
    assert [e.type for e in await pg.read(task_id, 8)] == ["status"]  # only the new owner's running


async def test_a_replaced_blob_goes_once_no_row_holds_it(pg: PostgresStore) -> None:
    (task_id,) = await _leased(pg)
    lease = await pg.lease_next("w", T0, 60, 5)
    assert lease is not None
    big = {"text": "lorem ipsum " * (INLINE_LIMIT // 6)}
    await pg.record_step(lease, StepCheckpoint(key="a", seq=1, fn="f", result=big), [], T0 + 1)
    await pg.set_state(lease, "s", big, None, T0 + 1)  # the same content: the same blob, held by two rows
    (step,) = await pg.load_steps(task_id)
    assert isinstance(step.result, BlobRef)
    await pg.record_step(lease, StepCheckpoint(key="a", seq=1, fn="f", result=big), [], T0 + 2)  # same blob again
    await pg.record_step(lease, StepCheckpoint(key="a", seq=1, fn="f", result={"n": 1}), [], T0 + 3)
    assert await pg.load_blob(step.result) == big  # the state row still holds it
    await pg.set_state(lease, "s", 1, None, T0 + 4)
    with pytest.raises(StoreError, match="missing"):
        await pg.load_blob(step.result)
    assert await pg.load_state(task_id) == {"s": 1}
    assert [s.result for s in await pg.load_steps(task_id)] == [{"n": 1}]


async def test_a_connection_the_server_dropped_is_replaced_before_the_next_write(pg: PostgresStore) -> None:
    # The pool hands out a connection without a round trip to check it; one the server closed (a restart, or
    # here its backend terminated) is seen by its readable socket, probed and replaced, so no write fails.
    (task_id,) = await _leased(pg)
    lease = await pg.lease_next("w", T0, 60, 5)
    assert lease is not None
    async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as admin:
        cur = await admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        row = await cur.fetchone()
        assert row is not None and row[0] >= 1
    await asyncio.sleep(0.2)  # the FATAL reaches the pooled sockets
    await pg.record_step(lease, StepCheckpoint(key="s", seq=1, fn="f"), [("step_completed", {})], T0 + 1)
    assert [s.key for s in await pg.load_steps(task_id)] == ["s"]


# -- vectors --------------------------------------------------------------------------------------------------------


def _doc(doc_id: str, tenant: str) -> DocumentRecord:
    return DocumentRecord(id=doc_id, tenant=tenant, sha256="0" * 64, source="upload:x", media_type="text/plain")


def _clustered(rng: np.random.Generator, n: int, centers: np.ndarray) -> np.ndarray:
    """``n`` unit vectors around ``centers`` (queries drawn the same way have near neighbours, as real ones do)."""
    clusters, dim = centers.shape
    points = centers[rng.integers(0, clusters, size=n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def _chunks(
    vectors: np.ndarray, space: str, docs: list[tuple[str, str]], *, expiring: int = 0, first: int = 0
) -> list[ChunkRecord]:
    out = []
    for i, v in enumerate(vectors, start=first):
        doc, tenant = docs[i % len(docs)]
        out.append(
            ChunkRecord(
                document_id=doc,
                tenant=tenant,
                page=1 + i // 1000,
                start=i,
                end=i + 1,
                text=f"c{i}",
                content_hash=f"h{i}",
                space=space,
                vector=v,
                expires_at=T0 + 50 if i < expiring else None,
            )  # fmt: skip
        )
    return out


async def test_exact_search_matches_sqlite(pg: PostgresStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(30, 48)).astype(np.float32)
    vectors = _clustered(rng, 3000, centers)
    docs = [("doc_a", "t1"), ("doc_b", "t1"), ("doc_c", "t2")]
    lite = SQLiteStore(tmp_path / "k.db")
    try:
        for store in (lite, pg):
            for doc, tenant in docs:
                await store.save_document(_doc(doc, tenant), T0)
            await store.add_chunks(_chunks(vectors, "m@1", docs, expiring=300), T0)
        queries = _clustered(rng, 25, centers)
        compared = 0
        for q in queries:
            for kw in ({}, {"documents": ["doc_b"]}, {"documents": ["doc_a", "doc_c"]}):
                for now in (T0, T0 + 100):  # before and after the first 300 chunks expire
                    want = await lite.search_chunks("m@1", q, 10, tenant="t1", now=now, **kw)  # type: ignore[arg-type]
                    got = await pg.search_chunks("m@1", q, 10, tenant="t1", now=now, **kw)  # type: ignore[arg-type]
                    assert [h.chunk.text for h in got] == [h.chunk.text for h in want]
                    assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
                    compared += 1
        assert compared == 150
    finally:
        await lite.aclose()


async def test_hnsw_recall_against_exact(pg: PostgresStore) -> None:
    n, dim, k = 20_000, 64, 10
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(100, dim)).astype(np.float32)
    vectors = _clustered(rng, n, centers)
    await pg.save_document(_doc("doc_big", "t1"), T0)
    started = time.perf_counter()
    for i in range(0, n, 2000):
        await pg.add_chunks(_chunks(vectors[i : i + 2000], "big@1", [("doc_big", "t1")], first=i), T0)
    loaded = time.perf_counter() - started

    queries = _clustered(rng, 100, centers)
    exact = [await pg.search_chunks("big@1", q, k, tenant="t1", now=T0) for q in queries]  # under the threshold
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
    assert [[h.chunk.text for h in hits] for hits in exact] == [[f"c{i}" for i in row] for row in truth]

    pg.hnsw_threshold = 1_000
    pg.space_stats_ttl_s = 0.0
    async with await psycopg.AsyncConnection.connect(pg.url) as conn:  # the search really uses the index
        from pgvector.psycopg import register_vector_async

        await register_vector_async(conn)
        for setting in hnsw_settings(100):
            await conn.execute(setting)
        query = search_sql("big@1", dim, hnsw=True, documents=False)
        args = {"q": queries[0], "tenant": "t1", "now": T0, "k": k}
        cur = await conn.execute(psycopg.sql.SQL("EXPLAIN ") + query, args)
        plan = "\n".join(r[0] for r in await cur.fetchall())
        assert "chunks_hnsw_" in plan, plan
    started = time.perf_counter()
    approx = [await pg.search_chunks("big@1", q, k, tenant="t1", now=T0) for q in queries]
    searched = time.perf_counter() - started
    recall = np.mean(
        [len({h.chunk.id for h in a} & {h.chunk.id for h in e}) / k for a, e in zip(approx, exact, strict=True)]
    )
    print(f"pgvector HNSW recall@{k} = {recall:.4f} over {len(queries)} queries on {n} x {dim}; "
          f"load {loaded:.1f} s, {1000 * searched / len(queries):.1f} ms/query")  # fmt: skip
    assert recall >= 0.95
    assert all(len(a) == k for a in approx)
    assert all(a[0].score >= a[-1].score for a in approx)


async def test_wide_spaces_are_searched_exactly_and_dimensions_are_checked(pg: PostgresStore) -> None:
    """pgvector's HNSW takes at most 2000 dimensions: a wider space (3072-d embeddings) has no index and is always
    searched exactly, whatever its size; a vector of another dimension than its space's is refused."""
    rng = np.random.default_rng(3)
    wide = rng.normal(size=(30, 3072)).astype(np.float32)
    await pg.save_document(_doc("doc_w", "t1"), T0)
    await pg.add_chunks(_chunks(wide, "wide@1", [("doc_w", "t1")]), T0)
    pg.hnsw_threshold = 10
    hits = await pg.search_chunks("wide@1", wide[7], 3, tenant="t1", now=T0)
    assert hits[0].chunk.text == "c7" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InputError, match="3072"):
        await pg.add_chunks(_chunks(wide[:1, :64], "wide@1", [("doc_w", "t1")], first=100), T0)
    assert await pg.chunk_count("wide@1") == 30
    assert await pg.drop_space("wide@1") == 30
    await pg.add_chunks(_chunks(wide[:2, :64], "wide@1", [("doc_w", "t1")]), T0)  # a new space, a new dimension
    assert [h.chunk.text for h in await pg.search_chunks("wide@1", wide[1, :64], 1, tenant="t1", now=T0)] == ["c1"]


async def test_model_stats_and_tenant_usage_match_sqlite(pg: PostgresStore, tmp_path: Path) -> None:
    from keel.memory.types import ModelCallRecord

    calls = [
        ModelCallRecord(provider="openai", requested_model="m", model_id="m-1", at=T0 + 60 * i, latency_ms=10.0 + i,
                        input_tokens=100 + i, output_tokens=5, cost_usd=0.001 * i, json_valid=i % 3 == 0 or None,
                        schema_valid=i % 2 == 0, refusal=i == 4, truncated=i == 5, error=i == 6)
        for i in range(90)
    ]  # fmt: skip
    calls.append(ModelCallRecord(provider="local", requested_model="s", model_id="s-2", at=T0 + 90_000, latency_ms=3))
    lite = SQLiteStore(tmp_path / "k.db")
    try:
        for store in (lite, pg):
            await asyncio.gather(
                *(store.record_model_call("acme" if i % 4 else "beta", c) for i, c in enumerate(calls))
            )
        for model, since in ((None, 0.0), ("m-1", T0 + 3600), ("s-2", 0.0), ("nope", 0.0)):
            want, got = await lite.model_stats(model, since), await pg.model_stats(model, since)
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                assert dataclasses.asdict(g) == pytest.approx(dataclasses.asdict(w))
        for since in (0.0, T0 + 1800, T0 + 90_000):  # the SLO window: the same sums and latency bins
            want_w, got_w = await lite.model_window(since), await pg.model_window(since)
            assert [dataclasses.asdict(w) for w in got_w] == [dataclasses.asdict(w) for w in want_w] and want_w
        for tenant, since in (("acme", 0.0), ("beta", T0 + 86_400), ("nobody", 0.0)):
            want_u, got_u = await lite.tenant_usage(tenant, since), await pg.tenant_usage(tenant, since)
            assert dataclasses.asdict(got_u) == pytest.approx(dataclasses.asdict(want_u))
    finally:
        await lite.aclose()
