"""Webhook secrets sealed at rest (keel.secretbox), and keel's files kept private (keel.files)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from keel.backends.sqlite import SQLiteStore
from keel.errors import ConfigError
from keel.files import private_dir, private_file
from keel.secretbox import KEY_FILE, SEALED, SecretBox


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_seal_and_open_round_trip_without_the_plaintext_at_rest() -> None:
    box = SecretBox([SecretBox.generate()])
    sealed = box.seal("whsec_abc")
    assert sealed.startswith(SEALED) and "whsec_abc" not in sealed
    assert box.open(sealed) == "whsec_abc"
    assert box.seal("whsec_abc") != sealed  # a fresh IV each time
    assert box.open("whsec_legacy") == "whsec_legacy"  # a plain-text row of an older keel still opens


def test_rotation_old_keys_open_new_writes_use_the_first() -> None:
    old, new = SecretBox.generate(), SecretBox.generate()
    before = SecretBox([old]).seal("s1")
    rotated = SecretBox([new, old])
    assert rotated.open(before) == "s1"
    resealed = rotated.reseal(before)
    assert resealed is not None and SecretBox([new]).open(resealed) == "s1"
    assert rotated.reseal(resealed) is None  # already under the newest key: left alone
    plain = rotated.reseal("plain")  # the migration of an older keel's plain-text rows
    assert plain is not None and plain.startswith(SEALED) and SecretBox([new]).open(plain) == "plain"
    with pytest.raises(ConfigError, match="KEEL_SECRET_KEY"):
        SecretBox([new]).open(before)  # the old key was dropped too soon
    with pytest.raises(ConfigError, match="KEEL_SECRET_KEY"):
        SecretBox([new]).reseal(before)


def test_a_bad_key_is_a_config_error_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="Fernet keys"):
        SecretBox(["not-a-key"])
    with pytest.raises(ConfigError):
        SecretBox.configured(" , ", Path("/nonexistent"))


def test_the_key_file_is_made_once_and_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = SecretBox.configured(None, data)
    assert mode(data) == 0o700 and mode(data / KEY_FILE) == 0o600
    Fernet((data / KEY_FILE).read_bytes().strip())  # a valid key
    assert SecretBox.configured(None, data).open(first.seal("x")) == "x"  # the same key next start
    env_key = SecretBox.generate()
    assert SecretBox.configured(env_key, data).open(SecretBox([env_key]).seal("y")) == "y"  # the setting wins
    assert [p.name for p in data.iterdir()] == [KEY_FILE]  # nothing left aside
    (data / KEY_FILE).write_text("garbage")
    with pytest.raises(ConfigError, match="secret.key holds no Fernet key"):
        SecretBox.configured(None, data)


async def test_sqlite_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    import os

    previous = os.umask(0o022)
    try:
        data = tmp_path / "fresh" / "keel"
        store = SQLiteStore(data / "keel.db")
        await store.create_key("acme", frozenset({"tasks:read"}), 1.0)  # a write: the -wal file exists now
        assert mode(data) == 0o700
        files = [p for p in data.iterdir() if p.name.startswith("keel.db")]
        assert {p.name for p in files} >= {"keel.db", "keel.db-wal", "keel.db-shm"}
        assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
        await store.aclose()
    finally:
        os.umask(previous)


def test_files_an_older_keel_left_readable_are_narrowed(tmp_path: Path) -> None:
    old = tmp_path / "keel.db"
    old.write_bytes(b"")
    old.chmod(0o644)
    private_file(old)
    assert mode(old) == 0o600
    mine = tmp_path / "shared-folder"
    mine.mkdir(mode=0o755)
    mine.chmod(0o755)
    private_dir(mine)  # a folder the user made keeps its mode
    assert mode(mine) == 0o755
