"""Drivers live here and only here. ``open_store(url)`` picks one from a URL and imports it lazily."""

from __future__ import annotations

from keel.errors import ConfigError
from keel.memory.stores import Store


def open_store(url: str) -> Store:
    if url.startswith("sqlite:///"):
        from keel.backends.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from keel.backends.postgres import PostgresStore
        except ImportError as exc:  # the driver is an extra
            raise ConfigError(
                f"the Postgres backend needs its driver ({exc.name or exc}): pip install 'keel[postgres]'"
            ) from exc
        return PostgresStore(url)
    raise ConfigError(f"unknown store URL {url!r}: expected sqlite:///PATH or postgresql://…")
