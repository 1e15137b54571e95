"""Webhook secrets sealed at rest, with Fernet (``cryptography``: AES-128-CBC and HMAC-SHA256, authenticated).

The keys come from ``KEEL_SECRET_KEY``: one or more Fernet keys, comma-separated, newest first. New secrets are
sealed with the first; every one of them opens (``MultiFernet``). Rotating the key is: put a new key first, restart
(start-up re-encrypts every stored secret under it), then drop the old key. ``keel keys secret-key`` prints a new
key.

Without ``KEEL_SECRET_KEY``, keel makes a key file on first start, ``<data dir>/secret.key`` (0600, in the 0700
data dir), and uses it: right for the embedded default, one process on one data dir, which needs no setting.
Processes that share a Postgres store must share the key, so they should all be given ``KEEL_SECRET_KEY`` (start-up
warns when a shared store runs on a key file). A store holding secrets sealed with a key keel no longer has stops
start-up with one line saying which setting to fix, rather than webhooks failing one by one later.

A value without the ``fernet:`` prefix is a secret stored in plain text by an older keel: it still opens (as
itself), and start-up seals it (:meth:`SecretBox.reseal`, over :meth:`SecretStore.reseal_secrets
<keel.memory.stores.SecretStore.reseal_secrets>`).
"""

from __future__ import annotations

import binascii
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from keel.errors import ConfigError
from keel.files import private_dir, private_file

SEALED = "fernet:"
"""The prefix of a sealed value (anything else is a plain-text secret of an older keel)."""
KEY_FILE = "secret.key"


class SecretBox:
    """Seals and opens webhook secrets with the configured keys (the first seals; all open)."""

    def __init__(self, keys: Sequence[str | bytes]) -> None:
        if not keys:
            raise ConfigError("no secret key: KEEL_SECRET_KEY is empty")
        try:
            fernets = [Fernet(k.strip() if isinstance(k, str) else k) for k in keys]
        except (ValueError, binascii.Error):
            raise ConfigError(
                "KEEL_SECRET_KEY must be Fernet keys (32 bytes, url-safe base64), comma-separated, newest first: "
                "make one with `keel keys secret-key`"
            ) from None
        self._primary = fernets[0]
        self._all = MultiFernet(fernets)

    @classmethod
    def configured(cls, secret_key: str | None, data_dir: Path) -> SecretBox:
        """From ``KEEL_SECRET_KEY`` when set, else from the data dir's key file (made on first use)."""
        if secret_key:
            return cls([k for k in secret_key.split(",") if k.strip()])
        path = private_dir(data_dir) / KEY_FILE
        if not path.exists():
            # Written aside, then linked into place: two processes starting at once end up with the same key (the
            # first link wins), and nobody ever reads a half-written file.
            aside = private_file(data_dir / f".{KEY_FILE}.{os.getpid()}")
            try:
                aside.write_bytes(Fernet.generate_key() + b"\n")
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
            finally:
                aside.unlink()
        try:
            return cls([path.read_bytes().strip()])
        except ConfigError:
            raise ConfigError(
                f"{path} holds no Fernet key: restore it, or set KEEL_SECRET_KEY to the key it held"
            ) from None

    @staticmethod
    def generate() -> str:
        return Fernet.generate_key().decode()

    def seal(self, secret: str) -> str:
        return SEALED + self._primary.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        """The secret ``stored`` holds. Raises :class:`ConfigError` when no configured key opens it."""
        if not stored.startswith(SEALED):
            return stored
        try:
            return self._all.decrypt(stored.removeprefix(SEALED).encode()).decode()
        except InvalidToken:
            raise ConfigError(
                "a stored webhook secret was sealed with a key keel does not have: KEEL_SECRET_KEY (or the data "
                "dir's secret.key) changed; put the old key after the new one in KEEL_SECRET_KEY"
            ) from None

    def reseal(self, stored: str) -> str | None:
        """``stored`` sealed with the newest key, or None when it already is. Plain text gets sealed; a value
        sealed with an older key is re-encrypted. Raises :class:`ConfigError` when no configured key opens it."""
        if stored.startswith(SEALED):
            token = stored.removeprefix(SEALED).encode()
            try:
                self._primary.decrypt(token)
                return None
            except InvalidToken:
                pass
        return self.seal(self.open(stored))
