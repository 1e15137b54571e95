"""`keel keys`: create with an expiry, list, revoke, rotate, and a key for KEEL_SECRET_KEY (issue 21)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from typer.testing import CliRunner

from keel.cli import app

runner = CliRunner()


def keys(data: Path, *args: str) -> Any:
    r = runner.invoke(app, ["keys", *args, "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    return r


def listed(data: Path) -> dict[str, dict[str, Any]]:
    return {k["id"]: k for k in json.loads(keys(data, "list", "--json").stdout)}


def key_id(key: str) -> str:
    return key.split("_")[1]


def test_expires_takes_a_duration_or_a_date(tmp_path: Path) -> None:
    before = time.time()
    soon = keys(tmp_path, "create", "--tenant", "acme", "--expires", "2h").stdout.strip()
    dated = keys(tmp_path, "create", "--tenant", "acme", "--expires", "2031-01-31").stdout.strip()
    zoned = keys(tmp_path, "create", "--tenant", "acme", "--expires", "2031-01-31T12:00:00+02:00").stdout.strip()
    forever = keys(tmp_path, "create", "--tenant", "beta", "--scopes", "tasks:read").stdout.strip()
    found = listed(tmp_path)
    assert before + 7200 <= found[key_id(soon)]["expires_at"] <= time.time() + 7200
    assert found[key_id(dated)]["expires_at"] == datetime(2031, 1, 31, tzinfo=UTC).timestamp()
    assert found[key_id(zoned)]["expires_at"] == datetime(2031, 1, 31, 10, tzinfo=UTC).timestamp()
    assert found[key_id(forever)] | {"created_at": 0} == {
        "id": key_id(forever), "tenant": "beta", "scopes": ["tasks:read"], "state": "active", "created_at": 0,
        "expires_at": None, "revoked_at": None, "last_used_at": None,
    }  # fmt: skip
    assert list(listed(tmp_path)) == [key_id(soon), key_id(dated), key_id(zoned), key_id(forever)]  # oldest first
    assert set(json.loads(keys(tmp_path, "list", "--json", "--tenant", "beta").stdout)[0]) >= {"state"}
    for bad in ("tomorrow", "-3d", "2001-01-01"):
        r = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--expires", bad, "--data-dir", str(tmp_path)])
        assert r.exit_code == 2 and "expir" in r.output, (bad, r.output)
    assert len(listed(tmp_path)) == 4  # nothing was made by the refused ones


def test_revoke_and_rotate_by_id_or_whole_key(tmp_path: Path) -> None:
    a = keys(tmp_path, "create", "--tenant", "acme", "--expires", "30d").stdout.strip()
    b = keys(tmp_path, "create", "--tenant", "acme").stdout.strip()
    rotated = keys(tmp_path, "rotate", a, "--grace", "1h")
    new = rotated.stdout.strip()
    assert new.startswith("keel_") and new != a and "works until" in rotated.stderr
    found = listed(tmp_path)
    # The new key keeps the original 30 days; the old one still works, for the hour of grace only.
    assert found[key_id(new)]["expires_at"] > time.time() + 29 * 86400
    assert found[key_id(a)]["state"] == "active" and found[key_id(a)]["expires_at"] <= time.time() + 3601
    keys(tmp_path, "revoke", key_id(b))
    assert listed(tmp_path)[key_id(b)]["state"] == "revoked"
    keys(tmp_path, "revoke", b)  # again, pasted whole: repeatable
    r = runner.invoke(app, ["keys", "rotate", key_id(b), "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and "revoked" in r.output
    r = runner.invoke(app, ["keys", "rotate", key_id(new), "--grace", "2031-01-01", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and "--grace" in r.output
    r = runner.invoke(app, ["keys", "revoke", "nope", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and "no key nope" in r.output


def test_secret_key_prints_a_fernet_key() -> None:
    r = runner.invoke(app, ["keys", "secret-key"])
    assert r.exit_code == 0
    Fernet(r.stdout.strip())
