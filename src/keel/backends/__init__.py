"""Drivers live here and only here. ``open_store(url)`` picks one from a URL and imports it lazily;
``open_stores(url, redis_url=…)`` gives the app one handle per seam, each served by the backend that serves it."""

from __future__ import annotations

from keel.errors import ConfigError
from keel.memory.stores import Store, Stores


def open_store(url: str) -> Store:
    """One backend serving every seam: SQLite (``sqlite:///PATH``) or Postgres (``postgresql://…``)."""
    if url.startswith("sqlite:///"):
        from keel.backends.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from keel.backends.postgres import PostgresStore
        except ImportError as exc:  # the driver is an extra
            raise ConfigError(
                f"the Postgres backend needs its driver ({exc.name or exc}): pip install 'keel-runtime[postgres]'"
            ) from exc
        return PostgresStore(url)
    raise ConfigError(f"unknown store URL {url!r}: expected sqlite:///PATH or postgresql://…")


def open_stores(url: str, *, redis_url: str | None = None) -> Stores:
    """Every seam on the store at ``url``; with ``redis_url``, session memory and the request-rate buckets in Redis
    instead, shared by every API replica (the other seams commit together, so they stay on one backend)."""
    store = open_store(url)
    if redis_url is None:
        return Stores.over(store)
    from keel.backends.redis import RedisRateBuckets, RedisSessionStore

    return Stores.over(store, sessions=RedisSessionStore(redis_url), buckets=RedisRateBuckets(redis_url))
