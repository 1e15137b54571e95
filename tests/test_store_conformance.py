"""Every store backend passes the same conformance suite (STYLE.md pattern 2)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from keel.backends import open_store
from keel.backends.sqlite import SQLiteStore
from keel.memory.stores import Store
from keel.testing.conformance import SUITES
from keel.testing.inmemory import InMemoryStore

ROOT = Path(__file__).resolve().parents[1]

# -- a real Postgres for the session ----------------------------------------------------------------------------
# Started once through scripts/postgres.sh (or taken from KEEL_TEST_POSTGRES_URL), shared by every module that
# imports these fixtures, and stopped when the last of them is torn down. No server: the Postgres tests skip, with
# the reason, never pass silently.

_server: dict[str, object] = {"users": 0}


def _start_postgres() -> str:
    if url := os.environ.get("KEEL_TEST_POSTGRES_URL"):
        return url
    pytest.importorskip("psycopg", reason="the postgres extra is not installed: pip install -e '.[postgres]'")
    pg_dir = tempfile.mkdtemp(prefix="keel-test-pg-")
    _server["dir"] = pg_dir
    env = {**os.environ, "KEEL_PG_DIR": pg_dir, "KEEL_PG_EPHEMERAL": "1"}
    env.pop("KEEL_PG_PORT", None)
    try:
        out = subprocess.run(
            ["bash", str(ROOT / "scripts/postgres.sh"), "start"],
            env=env, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        _server["env"] = env
        _stop_postgres()  # whatever got started
        _server["failed"] = f"no Postgres server: scripts/postgres.sh start failed: {exc} {detail.strip()[-500:]}"
        pytest.skip(str(_server["failed"]))
    _server["env"] = env
    return out.stdout.strip().splitlines()[-1]


def _stop_postgres() -> None:
    env = _server.pop("env", None)
    if isinstance(env, dict):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["bash", str(ROOT / "scripts/postgres.sh"), "stop"], env=env, capture_output=True, timeout=120
            )
    pg_dir = _server.pop("dir", None)
    if isinstance(pg_dir, str):
        shutil.rmtree(pg_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a database that the tests may wipe."""
    if "failed" in _server:
        pytest.skip(str(_server["failed"]))
    if "url" not in _server:
        _server["url"] = _start_postgres()
    _server["users"] = int(str(_server["users"])) + 1
    try:
        yield str(_server["url"])
    finally:
        _server["users"] = int(str(_server["users"])) - 1
        if _server["users"] == 0:
            _server.pop("url", None)
            _stop_postgres()


async def wipe_postgres(url: str) -> None:
    """Empty every keel table (the schema and its migrations stay) and drop the per-space HNSW indexes."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            """
            DO $$
            DECLARE r record;
            BEGIN
                FOR r IN SELECT indexname FROM pg_indexes
                         WHERE schemaname = current_schema() AND left(indexname, 12) = 'chunks_hnsw_' LOOP
                    EXECUTE format('DROP INDEX %I', r.indexname);
                END LOOP;
                -- DELETE, not TRUNCATE: on tables this small it is faster, and makes no new files to sync.
                FOR r IN SELECT tablename FROM pg_tables
                         WHERE schemaname = current_schema() AND tablename <> 'keel_schema_migrations' LOOP
                    EXECUTE format('DELETE FROM %I', r.tablename);
                END LOOP;
            END $$
            """
        )


async def fresh_postgres_store(url: str) -> Store:
    """A Postgres store over an emptied database."""
    from keel.backends.postgres import migrate

    await migrate(url)
    await wipe_postgres(url)
    return open_store(url)


@pytest.fixture
async def pg_store(postgres_url: str) -> AsyncIterator[Store]:
    store = await fresh_postgres_store(postgres_url)
    yield store
    await store.aclose()


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


async def test_sqlite_replaced_state_blobs_are_collected_and_shared_ones_kept(tmp_path: Path) -> None:
    """Overwriting a large partial result must not leave the old payload behind (the DB would grow with every
    write); a blob still referenced by a step of the same content survives."""
    import sqlite3

    from keel.memory.blobs import INLINE_LIMIT
    from keel.memory.types import StepCheckpoint
    from keel.testing.conformance import _new

    path = tmp_path / "k.db"
    store = SQLiteStore(path)
    res = await store.create_task(_new(), None, 1.0)
    assert res.task
    lease = await store.lease_next("w", 1.0, 30, 5)
    assert lease
    big = ["x" * (INLINE_LIMIT + i) for i in range(5)]
    await store.record_step(lease, StepCheckpoint(key="s", seq=1, fn="f", result=big[0]), [], 2.0)
    for i, value in enumerate(big):
        await store.set_state(lease, "partial:doc", value, None, 2.0 + i)
    with sqlite3.connect(path) as conn:
        sizes = sorted(r[0] for r in conn.execute("SELECT size FROM blobs"))
    # big[0] is still the step's result; big[1..3] were replaced; big[4] is the current state.
    assert sizes == sorted({len(big[0]) + 2, len(big[4]) + 2})
    assert (await store.load_state(res.task.id))["partial:doc"] == big[4]
    await store.aclose()


def test_postgres_url_without_the_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from keel.errors import ConfigError

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "keel.backends.postgres", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'keel\[postgres\]'"):
        open_store("postgresql://localhost/keel")
