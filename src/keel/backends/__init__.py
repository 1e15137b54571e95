"""Drivers live here and only here. ``open_store(url)`` picks one from a URL and imports it lazily."""

from __future__ import annotations

from keel.errors import ConfigError
from keel.memory.stores import Store


def open_store(url: str) -> Store:
    if url.startswith("sqlite:///"):
        from keel.backends.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("the Postgres backend is not available yet: pip install 'keel[postgres]' (issue 8)")
    raise ConfigError(f"unknown store URL {url!r}: expected sqlite:///PATH")
