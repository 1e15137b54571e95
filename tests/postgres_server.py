"""A real Postgres for the test session, started once through scripts/postgres.sh (or taken from
KEEL_TEST_POSTGRES_URL), shared by every test that uses its fixtures (registered in conftest.py) and stopped when the
last of them is torn down. No server: the Postgres tests skip, with the reason, never pass silently."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from keel.backends import open_store
from keel.memory.stores import Store

ROOT = Path(__file__).resolve().parents[1]


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
