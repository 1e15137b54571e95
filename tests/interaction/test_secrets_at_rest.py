"""Secrets at rest, against a real `keel serve`: webhook secrets sealed in the database (an older keel's plain-text
rows sealed at start-up, rotation to a new key), the data dir and database private, and no secret in the JSON
logs or in any API response (issue 21)."""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import httpx

from conftest import free_port, make_key, wait_terminal
from keel.backends.sqlite import SQLiteStore
from keel.memory.types import KeySecret, NewTask
from keel.secretbox import KEY_FILE, SEALED, SecretBox
from keel_processes import KEEL, Servers
from webhook_receiver import Receiver, new_secret, verify, wait_for

ENV = {"KEEL_LOG_FORMAT": "json", "KEEL_LOG_LEVEL": "DEBUG", "KEEL_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"}


def stored_secrets(db: Path) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        tasks = [r[0] for r in conn.execute("SELECT webhook_secret FROM tasks WHERE webhook_secret IS NOT NULL")]
        return tasks + [r[0] for r in conn.execute("SELECT secret FROM outbox")]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_webhook_secrets_are_sealed_and_never_shown(servers: Servers, receiver: Receiver, tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = make_key(data, "acme", frozenset({"tasks:read", "tasks:write"}))
    server = servers.start(free_port(), data, env=ENV)
    secret = new_secret()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
        r = c.post(
            "/v1/tasks",
            json={"workflow": "diagnostic", "input": {"steps": 1}, "webhook": {"url": receiver.url, "secret": secret}},
        )
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        wait_terminal(c, task_id)
        [hit] = wait_for(lambda: receiver.snapshot() or None, 10, "the webhook")
        verify(secret, hit)  # signed with the secret as given, although the store only holds it sealed
        shown = [r.text, c.get(f"/v1/tasks/{task_id}").text, c.get("/v1/tasks").text]
        short = "whsec_" + base64.b64encode(b"tooshort").decode()  # a refused secret is not echoed either
        refused = c.post(
            "/v1/tasks", json={"workflow": "diagnostic", "webhook": {"url": receiver.url, "secret": short}}
        )
        assert refused.status_code == 422 and short not in refused.text
        shown.append(c.get(f"/v1/tasks/{task_id}/events", headers={"accept": "text/event-stream"}).text)
    db = data / "keel.db"
    assert [s.startswith(SEALED) and secret not in s for s in stored_secrets(db)] == [True, True]
    assert mode(data) == 0o700 and mode(db) == 0o600 and mode(data / KEY_FILE) == 0o600
    assert all(mode(p) == 0o600 for p in data.iterdir() if p.name.startswith("keel.db"))
    server.proc.terminate()
    server.proc.wait(timeout=15)
    logs = server.log.read_text()
    assert '"task_id"' in logs  # the JSON log lines were written, at DEBUG
    parsed = KeySecret.parse(key)
    assert parsed is not None
    file_key = (data / KEY_FILE).read_text().strip()
    for text in [logs, *shown]:
        for leaked in (secret, secret.removeprefix("whsec_"), parsed.secret, file_key):
            assert leaked not in text


def test_plaintext_rows_are_sealed_at_start_up_and_the_key_rotates(
    servers: Servers, receiver: Receiver, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    db = data / "keel.db"
    secret = new_secret()

    async def as_an_older_keel() -> str:
        store = SQLiteStore(db)
        try:
            new = NewTask(tenant="acme", workflow="diagnostic", input={"steps": 1}, webhook_url=receiver.url)
            new.webhook_secret = secret  # stored as given: in plain text
            created = await store.create_task(new, None, time.time())
            assert created.task is not None
            return created.task.id
        finally:
            await store.aclose()

    task_id = asyncio.run(as_an_older_keel())
    assert stored_secrets(db) == [secret]
    first = SecretBox.generate()
    server = servers.start(free_port(), data, env=ENV | {"KEEL_SECRET_KEY": first})
    # Sealed before serving (the task may have ended meanwhile, adding its outbox row: sealed too).
    assert {SecretBox([first]).open(s) for s in stored_secrets(db)} == {secret}
    [hit] = wait_for(lambda: receiver.snapshot() or None, 15, "the old task's webhook")
    assert verify(secret, hit)["data"]["task_id"] == task_id
    server.kill9()

    # A key that opens none of the stored secrets stops start-up with one line naming the setting.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    wrong = subprocess.run(
        [str(KEEL), "serve", "--port", str(free_port()), "--data-dir", str(data)],
        env=env | {"KEEL_SECRET_KEY": SecretBox.generate(), "KEEL_DEFAULT_MODEL": "test"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert wrong.returncode == 1
    [line] = wrong.stderr.strip().splitlines()[-1:]
    assert "KEEL_SECRET_KEY" in line and "Traceback" not in wrong.stderr

    # Rotation: the new key first, the old one after it; start-up re-seals everything with the new one.
    second = SecretBox.generate()
    server = servers.start(free_port(), data, env=ENV | {"KEEL_SECRET_KEY": f"{second},{first}"})
    assert [SecretBox([second]).open(s) for s in stored_secrets(db)] == [secret, secret]
    server.kill9()
    servers.start(free_port(), data, env=ENV | {"KEEL_SECRET_KEY": second})  # the old key can go now
