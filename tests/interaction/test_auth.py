"""API keys at the edge: a revoked or expired key is refused on the very next request, on every replica, because
every request verifies against the store (issue 21)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import httpx

from conftest import LiveServer, free_port
from keel.backends import open_store
from keel.memory.types import KeySecret
from keel.secretbox import SecretBox
from keel.service import Keys
from keel_processes import KEEL, Servers
from postgres_server import fresh_postgres_store


def keel_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real `keel` command, as an operator runs it next to a running server."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")} | (env or {})
    return subprocess.run([str(KEEL), *args], env=full, capture_output=True, text=True, timeout=60, check=False)


def status(url: str, key: str) -> int:
    return httpx.get(f"{url}/v1/tasks", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


def key_id(key: str) -> str:
    parsed = KeySecret.parse(key)
    assert parsed is not None
    return parsed.id


def test_revoked_key_gets_401_on_the_next_request(live: LiveServer) -> None:
    assert status(live.url, live.key) == 200
    done = keel_cli("keys", "revoke", live.key, "--data-dir", str(live.data_dir))  # pasted whole, as when leaked
    assert done.returncode == 0, done.stderr
    assert f"revoked key {key_id(live.key)}" in done.stderr
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {live.key}"}) as c:
        r = c.get("/v1/tasks")
        assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["detail"] == "invalid API key"
        assert c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {}}).status_code == 401
    listed = json.loads(keel_cli("keys", "list", "--json", "--data-dir", str(live.data_dir)).stdout)
    [row] = [k for k in listed if k["id"] == key_id(live.key)]
    assert row["state"] == "revoked" and row["last_used_at"] is not None  # the first request above was recorded


def test_expired_key_gets_401(live: LiveServer) -> None:
    async def make() -> tuple[str, str]:
        store = open_store(live.settings.resolved_store_url)
        try:
            now = time.time()
            past = await store.create_key("acme", frozenset({"tasks:read"}), now - 60, expires_at=now - 1)
            future = await Keys(store=store).create("acme", frozenset({"tasks:read"}), expires_at=now + 3600)
            return past, future
        finally:
            await store.aclose()

    expired, valid = asyncio.run(make())
    assert status(live.url, expired) == 401
    assert status(live.url, valid) == 200


def test_rotated_key_replaces_the_old_one(live: LiveServer) -> None:
    done = keel_cli("keys", "rotate", key_id(live.key), "--data-dir", str(live.data_dir))
    assert done.returncode == 0, done.stderr
    new = done.stdout.strip()
    assert KeySecret.parse(new) is not None and new != live.key
    assert status(live.url, live.key) == 401
    assert status(live.url, new) == 200
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {new}"}) as c:
        assert c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {}}).status_code == 202  # same scopes


def test_revocation_holds_on_another_replica(servers: Servers, postgres_url: str, tmp_path: Path) -> None:
    """Two `keel serve` processes on one Postgres store: a key revoked through the CLI is refused by both on their
    next request (neither caches a verified key)."""

    async def make() -> str:
        store = await fresh_postgres_store(postgres_url)
        try:
            return await store.create_key("acme", frozenset({"tasks:read"}), time.time())
        finally:
            await store.aclose()

    key = asyncio.run(make())
    env = {
        "KEEL_STORE_URL": postgres_url,
        "KEEL_SECRET_KEY": SecretBox.generate(),
        "KEEL_EMBEDDING_MODEL": "hash:64",
        "KEEL_WORKERS": "1",
    }
    replicas = [servers.start(free_port(), tmp_path / f"r{i}", env=env) for i in range(2)]
    assert [status(r.url, key) for r in replicas] == [200, 200]
    done = keel_cli("keys", "revoke", key_id(key), env={"KEEL_STORE_URL": postgres_url})
    assert done.returncode == 0, done.stderr
    assert [status(r.url, key) for r in replicas] == [401, 401]
