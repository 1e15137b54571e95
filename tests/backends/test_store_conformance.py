"""Every store backend passes the same conformance suite (STYLE.md pattern 2)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import psycopg
import pytest

from keel.backends import open_store
from keel.backends.postgres import PostgresStore
from keel.backends.sqlite import SQLiteStore
from keel.memory.blobs import INLINE_LIMIT
from keel.memory.stores import Store
from keel.memory.types import StepCheckpoint, TaskStatus
from keel.testing.conformance import SUITES, _new
from keel.testing.inmemory import InMemoryStore
from postgres_server import fresh_postgres_store

# -- a real Postgres for the session ----------------------------------------------------------------------------
# Started once through scripts/postgres.sh (or taken from KEEL_TEST_POSTGRES_URL), shared by every module that
# imports these fixtures, and stopped when the last of them is torn down. No server: the Postgres tests skip, with
# the reason, never pass silently.


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "postgres":
        s = await fresh_postgres_store(request.getfixturevalue("postgres_url"))
    else:
        s = InMemoryStore() if request.param == "memory" else open_store(f"sqlite:///{tmp_path / 'k.db'}")
    yield s
    await s.aclose()


@pytest.mark.parametrize(
    "check",
    [pytest.param(check, id=f"{seam}-{check.__name__.removeprefix('check_')}") for seam, checks in SUITES.items()
     for check in checks],
)  # fmt: skip
async def test_conformance(store: Store, check: Callable[[Store], Awaitable[None]]) -> None:
    """Every seam's suite: each of these backends serves every seam."""
    await check(store)


def test_sqlite_is_wal_with_synchronous_full(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "k.db")
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    from keel.testing.conformance import _new

    path = tmp_path / "k.db"
    first = SQLiteStore(path)
    res = await first.create_task(_new(), None, 1.0)
    await first.aclose()
    second = SQLiteStore(path)  # migrations are idempotent
    assert res.task and await second.get_task(res.task.id)
    await second.aclose()


@pytest.fixture(params=["sqlite", "postgres"])
async def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SQLiteStore | PostgresStore]:
    s = await fresh_postgres_store(request.getfixturevalue("postgres_url")) if request.param == "postgres" else None
    store = s if s is not None else SQLiteStore(tmp_path / "k.db")
    assert isinstance(store, SQLiteStore | PostgresStore)
    yield store
    await store.aclose()


async def _blob_sizes(store: SQLiteStore | PostgresStore) -> list[int]:
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            return sorted(r[0] for r in conn.execute("SELECT size FROM blobs"))
    async with await psycopg.AsyncConnection.connect(store.url) as pg:
        return sorted(r[0] for r in await (await pg.execute("SELECT size FROM blobs")).fetchall())


async def test_replaced_blobs_are_collected_and_shared_ones_kept(sql_store: SQLiteStore | PostgresStore) -> None:
    """Overwriting a large partial result or step must not leave the old payload behind (the DB would grow with
    every write), but a blob another row still refers to (by content) survives; a deleted task takes its blobs. One
    rule (``rows.blob_unused``), which SQLite applies after a write and Postgres inside the write's statement."""
    store = sql_store
    res = await store.create_task(_new(), None, 1.0)
    assert res.task
    lease = await store.lease_next("w", 1.0, 30, 5)
    assert lease
    big = ["x" * (INLINE_LIMIT + i) for i in range(6)]
    size = [len(b) + 2 for b in big]  # as JSON
    await store.record_step(lease, StepCheckpoint(key="s", seq=1, fn="f", result=big[0]), [], 2.0)
    for i, value in enumerate(big[:5]):
        await store.set_state(lease, "partial:doc", value, None, 2.0 + i)
    # big[0] is still the step's result; big[1..3] were replaced; big[4] is the current state.
    assert await _blob_sizes(store) == [size[0], size[4]]
    assert (await store.load_state(res.task.id))["partial:doc"] == big[4]
    await store.record_step(lease, StepCheckpoint(key="s", seq=1, fn="f", result=big[4]), [], 8.0)
    assert await _blob_sizes(store) == [size[4]]  # big[0] had no other holder; big[4] is now held twice
    await store.set_state(lease, "partial:doc", big[5], None, 9.0)
    assert await _blob_sizes(store) == [size[4], size[5]]  # the step still holds big[4]
    await store.finish(lease, res.task.id, TaskStatus.succeeded, {"status": "success"}, 10.0)
    assert await store.delete_task(res.task.id, res.task.tenant)
    assert await _blob_sizes(store) == []


def test_postgres_url_without_the_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from keel.errors import ConfigError

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "keel.backends.postgres", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'keel-runtime\[postgres\]'"):
        open_store("postgresql://localhost/keel")


async def test_the_sqlite_stats_migration_keeps_the_hour_buckets_and_keys_them_by_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database from before v9 (stats keyed by model id alone) migrates with its counters."""
    import sqlite3

    from keel.backends import sqlite as sqlite_backend

    path = tmp_path / "k.db"
    full = list(sqlite_backend.MIGRATIONS)
    before = next(i for i, step in enumerate(full) if "CREATE TABLE model_minutes" in step)
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", full[:before])
    await SQLiteStore(path).aclose()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO model_stats (model_id, bucket, provider, calls, errors) VALUES ('m-1', 3600, 'p', 5, 2)"
        )
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", full)
    store = SQLiteStore(path)
    try:
        [row] = await store.model_stats("m-1")
        assert (row.provider, row.bucket, row.calls, row.errors) == ("p", 3600, 5, 2)
        assert await store.model_window(0) == []
    finally:
        await store.aclose()
