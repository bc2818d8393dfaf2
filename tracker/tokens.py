"""API tokens: a JSON file of SHA-256 hashes with a scope, an optional bound user and a name.

The secret is shown once, by :meth:`TokenFile.create`; the file stores only its hash, so
reading the file does not give access. A running server notices changes to the file (at
most one ``stat`` per second) without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Literal

import msgspec

from tracker.errors import InvalidInputError
from tracker.settings import Settings

Scope = Literal["read", "write", "admin"]
_RANK: dict[str, int] = {"read": 0, "write": 1, "admin": 2}
TOKENS_ENV = "TRACKER_API_TOKENS_FILE"
STAT_EVERY = 1.0
"""Seconds between checks of whether the file changed."""


class Grant(msgspec.Struct, frozen=True):
    """What a token allows: a scope, and if ``user_id`` is set, only that user's sessions."""

    name: str
    scope: Scope
    user_id: str | None


class _Stored(msgspec.Struct, frozen=True):
    sha256: str
    grant: Grant


def grants(grant: Grant, needed: Scope) -> bool:
    """Whether ``grant`` allows ``needed`` (admin > write > read)."""
    return _RANK[grant.scope] >= _RANK[needed]


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_file_path(settings: Settings) -> Path:
    """``TRACKER_API_TOKENS_FILE`` if set, else ``tokens.json`` in the data dir."""
    return Path(os.environ.get(TOKENS_ENV) or settings.data_dir / "tokens.json")


class TokenFile:
    """The tokens file: create and list tokens, look a secret up (constant-time compare)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stored: list[_Stored] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")

    def _read(self) -> list[_Stored]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            return msgspec.json.decode(data, type=list[_Stored])
        except msgspec.DecodeError as exc:
            raise InvalidInputError(f"tokens file {self.path}: {exc}") from None

    def _write(self, stored: list[_Stored]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(msgspec.json.format(msgspec.json.encode(stored)) + b"\n")
        os.replace(temporary, self.path)

    def create(
        self, scope: Scope, *, user_id: str | None = None, name: str | None = None
    ) -> tuple[str, Grant]:
        """A new token: returns the secret (shown once) and its grant; names are unique."""
        if scope not in _RANK:
            raise InvalidInputError(f"scope: expected read, write or admin, got {scope!r}")
        with self._lock:
            stored = self._read()
            names = {item.grant.name for item in stored}
            if name is None:
                name = next(
                    f"token-{n}" for n in range(1, len(names) + 2) if f"token-{n}" not in names
                )
            elif name in names:
                raise InvalidInputError(f"name: a token named {name!r} exists")
            secret = secrets.token_urlsafe(32)
            grant = Grant(name, scope, user_id)
            self._write([*stored, _Stored(_hash(secret), grant)])
            self._checked = float("-inf")
            return secret, grant

    def list(self) -> list[Grant]:
        return [item.grant for item in self._read()]

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < STAT_EVERY:
            return
        self._checked = now
        try:
            info = self.path.stat()
            stamp: tuple[int, int, int] | None = (info.st_ino, info.st_size, info.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._stored = self._read()
            self._stamp = stamp

    def lookup(self, token: str) -> Grant | None:
        """The grant of a secret, or ``None``; compares hashes in constant time."""
        digest = _hash(token)
        with self._lock:
            self._refresh()
            stored = self._stored
        found: Grant | None = None
        for item in stored:
            if hmac.compare_digest(item.sha256, digest):
                found = item.grant
        return found
