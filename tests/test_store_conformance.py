"""Every store backend passes the same conformance suite (STYLE.md pattern 2)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from keel.backends import open_store
from keel.backends.sqlite import SQLiteStore
from keel.memory.stores import Store
from keel.testing.conformance import CHECKS
from keel.testing.inmemory import InMemoryStore


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = InMemoryStore() if request.param == "memory" else open_store(f"sqlite:///{tmp_path / 'k.db'}")
    yield s
    await s.aclose()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_conformance(store: Store, check: Callable[[Store], Awaitable[None]]) -> None:
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
