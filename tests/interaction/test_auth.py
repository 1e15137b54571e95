"""API keys at the edge: a revoked or expired key is refused on the very next request, on every replica, because
every request verifies against the store (issue 21)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from datetime import UTC, datetime
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
            _, future = await Keys(store=store).create("acme", frozenset({"tasks:read"}), expires_at=now + 3600)
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


EXPIRES = datetime(2099, 1, 31, tzinfo=UTC).timestamp()


def test_a_tenants_admin_manages_its_keys_over_http(live: LiveServer) -> None:
    admin = live.new_key("acme", "admin")
    other = live.new_key("beta", "admin")
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {admin}"}) as c:
        assert httpx.get(f"{live.url}/v1/keys", headers={"Authorization": f"Bearer {live.key}"}).status_code == 403
        made = c.post("/v1/keys", json={"scopes": ["tasks:read"], "expires_at": "2099-01-31T00:00:00Z"})
        assert made.status_code == 201, made.text
        body = made.json()
        assert body["state"] == "active" and body["scopes"] == ["tasks:read"] and body["expires_at"] == EXPIRES
        new = body["key"]
        assert status(live.url, new) == 200
        listed = c.get("/v1/keys").json()
        assert {k["id"] for k in listed} == {key_id(live.key), key_id(admin), body["id"]}  # acme's only
        assert all("key" not in k and "secret_hash" not in k for k in listed)
        # Bad input is a 422 problem, never a key: unknown scopes, an expiry in the past or without a zone.
        for bad in (
            {"scopes": ["root"]},
            {"scopes": []},
            {"scopes": ["tasks:read"], "expires_at": "2001-01-01T00:00:00Z"},
            {"scopes": ["tasks:read"], "expires_at": "2099-01-01T00:00:00"},
            {"scopes": "tasks:read"},
        ):
            r = c.post("/v1/keys", json=bad)
            assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), bad
        # Another tenant's key does not exist here.
        assert c.post(f"/v1/keys/{key_id(other)}/revoke").status_code == 404
        assert c.post(f"/v1/keys/{key_id(other)}/rotate").status_code == 404
        assert status(live.url, other) == 200
        rotated = c.post(f"/v1/keys/{body['id']}/rotate", json={"grace_s": 3600})
        assert rotated.status_code == 201 and rotated.json()["expires_at"] == EXPIRES
        assert status(live.url, new) == 200 and status(live.url, rotated.json()["key"]) == 200  # in its grace
        revoked = c.post(f"/v1/keys/{body['id']}/revoke")
        assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
        assert status(live.url, new) == 401
        assert c.post(f"/v1/keys/{body['id']}/rotate").status_code == 422  # revoked: make a new one instead


def test_admin_holds_every_scope_of_its_tenant_but_not_those_past_it() -> None:
    from keel.scopes import ADMIN, OPERATOR, SCOPES, holds

    assert all(holds({ADMIN}, s) for s in SCOPES - {OPERATOR, "metrics"})
    assert not holds({ADMIN}, OPERATOR) and holds({OPERATOR}, OPERATOR) and not holds({ADMIN}, "metrics")
    assert not holds({"tasks:read"}, "tasks:write") and not holds({OPERATOR}, ADMIN)
