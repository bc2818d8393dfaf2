"""Scoped API tokens: a JSON file of token hashes, and the look-up the HTTP API does per request.

A token is ``trk_`` followed by 43 URL-safe characters (``secrets.token_urlsafe(32)``,
256 random bits). It is shown once, when created; the file keeps only its SHA-256 hex, with
the token's name, scope, user and creation time::

    {"version": 1, "tokens": [{"name": "ci", "scope": "write", "user_id": null,
                               "sha256": "9f86...", "created_at": "2025-01-25T22:41:41Z"}]}

Scopes are ordered: ``read`` reads; ``write`` also creates sessions and commits offsets;
``admin`` also resets offsets and deletes sessions. A token bound to a user (``user_id``)
sees only that user's sessions.

Changes (``create``, ``revoke``) take an exclusive ``flock`` on ``<file>.lock``, re-read the
file, and replace it atomically (a temporary file, ``fsync``, ``os.replace``, mode 0600), so
two commands at once lose neither's change and a reader never sees half a file. A running
:class:`TokenFile` notices a change made elsewhere at its next ``lookup`` after at most
``stat_interval`` seconds: it stats the file at most that often and re-reads it when the
inode, size or modification time changed.

Secrets never reach a log or a repr: :class:`Grant` holds no secret and no hash.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, get_args

import msgspec
from msgspec import Meta

from tracker.errors import InvalidInputError, TokenNotFoundError, TrackerError
from tracker.events import utcnow
from tracker.model import Timestamp, UserId, checked
from tracker.settings import Settings

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
"""The scopes, weakest first: each allows everything the ones before it allow."""
_RANK: dict[str, int] = {scope: rank for rank, scope in enumerate(SCOPES)}

PREFIX = "trk_"
"""Every token starts with this, so a leaked one is recognizable (secret scanners, greps)."""
_MAX_TOKEN = 256
"""Longer strings are not tokens (ours have 47 characters); they are refused unhashed."""

TokenName = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}\Z", description="1..64 chars of [A-Za-z0-9_.-]")
]
_Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]


class Grant(msgspec.Struct, frozen=True):
    """What a token allows: its ``scope``, limited to ``user_id``'s sessions if that is set."""

    name: str
    scope: Scope
    user_id: str | None


def grants(grant: Grant, needed: Scope) -> bool:
    """Whether ``grant`` allows an operation that needs ``needed`` (admin > write > read)."""
    return _RANK[grant.scope] >= _RANK[needed]


class TokenEntry(msgspec.Struct, frozen=True):
    """One token as ``tokens list`` shows it: the grant and when it was created (no hash)."""

    grant: Grant
    created_at: datetime


class _Record(msgspec.Struct, frozen=True):
    """One token in the file."""

    name: TokenName
    scope: Scope
    user_id: UserId | None
    sha256: _Sha256
    created_at: Timestamp

    def grant(self) -> Grant:
        return Grant(name=self.name, scope=self.scope, user_id=self.user_id)


class _File(msgspec.Struct):
    version: Literal[1]
    tokens: list[_Record]


_Signature = tuple[int, int, int, int]
"""Device, inode, size and modification time (ns) of the file; ``os.replace`` changes the inode."""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_File)


def token_file_path(settings: Settings) -> Path:
    """``TRACKER_API_TOKENS_FILE`` if set, else ``tokens.json`` in the data dir."""
    if settings.api_tokens_file is not None:
        return settings.api_tokens_file
    return settings.data_dir / "tokens.json"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


class TokenFile:
    """The token file at ``path``: create, list and revoke tokens; look a presented one up.

    ``lookup`` is meant for every request of a server: it works on a cached copy of the file
    (a dict from hash to grant) and stats the file at most once per ``stat_interval`` seconds.
    It is safe to call from several threads.
    """

    def __init__(self, path: Path, *, stat_interval: float = 1.0) -> None:
        self.path = path
        self.stat_interval = stat_interval
        self._lock = threading.Lock()
        self._index: dict[str, tuple[str, Grant]] = {}
        self._signature: _Signature | None = None
        self._checked = float("-inf")

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r})"

    # -- changes -------------------------------------------------------------------------

    def create(
        self, scope: Scope, *, user_id: str | None = None, name: str | None = None
    ) -> tuple[str, Grant]:
        """A new token: the secret (returned here only) and its grant; the file keeps its hash.

        Raises :class:`InvalidInputError` for a bad scope, user id or name, or a name that
        is taken. Without ``name``, one like ``write-3f9a0c`` is made up.
        """
        if scope not in _RANK:
            raise InvalidInputError(f"scope: expected one of {', '.join(SCOPES)}, got {scope!r}")
        if user_id is not None:
            checked(user_id, UserId, "user_id")
        if name is not None:
            checked(name, TokenName, "name")
        token = PREFIX + secrets.token_urlsafe(32)
        with self._locked():
            records = self._read_records()
            taken = {record.name for record in records}
            if name is None:
                name = f"{scope}-{secrets.token_hex(3)}"
                while name in taken:
                    name = f"{scope}-{secrets.token_hex(3)}"
            elif name in taken:
                raise InvalidInputError(f"name: a token named {name!r} exists already")
            record = _Record(
                name=name, scope=scope, user_id=user_id, sha256=_digest(token), created_at=utcnow()
            )
            self._write_records([*records, record])
        return token, record.grant()

    def revoke(self, name: str) -> Grant:
        """Remove the token named ``name``; :class:`TokenNotFoundError` if there is none."""
        with self._locked():
            records = self._read_records()
            kept = [record for record in records if record.name != name]
            if len(kept) == len(records):
                raise TokenNotFoundError(f"no token named {name!r} in {self.path}")
            self._write_records(kept)
        (removed,) = (record for record in records if record.name == name)
        return removed.grant()

    # -- reading -------------------------------------------------------------------------

    def entries(self) -> builtins.list[TokenEntry]:
        """Every token's grant and creation time, in creation order (empty without a file)."""
        return [
            TokenEntry(grant=record.grant(), created_at=record.created_at)
            for record in self._read_records()
        ]

    def list(self) -> builtins.list[Grant]:
        """Every token's grant, in creation order (empty without a file)."""
        return [entry.grant for entry in self.entries()]

    def lookup(self, token: str) -> Grant | None:
        """The grant of ``token``, or ``None`` if it is unknown, revoked, or not a token.

        A missing file means no tokens (``None``); an unreadable or corrupt one raises
        :class:`TrackerError` (fail closed: a damaged file must not keep revoked tokens alive).

        The hash is looked up in a dict, whose timing depends on the SHA-256 of the
        *presented* string only: learning that a guess's hash shares a prefix (or a dict
        bucket) with a stored hash does not help to find a string with the stored hash
        (SHA-256 is preimage resistant), so comparing hashes rather than secrets is what
        makes the comparison safe. ``hmac.compare_digest`` on the hit keeps the final check
        constant-time regardless of how the dict compares keys.
        """
        if not (token.startswith(PREFIX) and len(token) <= _MAX_TOKEN and token.isascii()):
            return None
        digest = _digest(token)
        found = self._current_index().get(digest)
        if found is None:
            return None
        stored, grant = found
        return grant if hmac.compare_digest(stored, digest) else None

    def _current_index(self) -> dict[str, tuple[str, Grant]]:
        """The cached dict, re-read if the file changed (stat at most every ``stat_interval``)."""
        if time.monotonic() - self._checked < self.stat_interval:
            return self._index
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self.stat_interval:
                return self._index
            try:
                stat = os.stat(self.path)
                signature: _Signature | None = (
                    stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns
                )  # fmt: skip
            except FileNotFoundError:
                signature = None
            except OSError as error:
                raise self._unreadable(error) from None
            if signature != self._signature:
                signature, records = self._read_file()
                self._index = {r.sha256: (r.sha256, r.grant()) for r in records}
                self._signature = signature
            self._checked = now
            return self._index

    def _read_records(self) -> builtins.list[_Record]:
        return self._read_file()[1]

    def _read_file(self) -> tuple[_Signature | None, builtins.list[_Record]]:
        """The file's signature and records, read from one open file (so they match)."""
        try:
            with open(self.path, "rb") as file:
                stat = os.fstat(file.fileno())
                data = file.read()
        except FileNotFoundError:
            return None, []
        except OSError as error:
            raise self._unreadable(error) from None
        try:
            content = _decoder.decode(data)
        except msgspec.DecodeError as error:
            raise TrackerError(f"{self.path}: not a valid tokens file ({error})") from None
        names = [record.name for record in content.tokens]
        if len(set(names)) != len(names):
            raise TrackerError(f"{self.path}: not a valid tokens file (a name appears twice)")
        signature = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        return signature, content.tokens

    def _unreadable(self, error: OSError) -> TrackerError:
        return TrackerError(f"{self.path}: cannot read the tokens file ({error.strerror})")

    # -- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive ``flock`` on ``<file>.lock`` (the file itself is replaced, not locked)."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise TrackerError(
                f"{lock_path}: cannot lock the tokens file ({error.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
        self._checked = float("-inf")  # this instance sees its own change at once

    def _write_records(self, records: builtins.list[_Record]) -> None:
        """Replace the file atomically: a 0600 temporary file, ``fsync``, ``os.replace``."""
        data = msgspec.json.format(_encoder.encode(_File(version=1, tokens=records)), indent=2)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as file:
                os.fchmod(fd, 0o600)  # a leftover temporary file may have had another mode
                file.write(data + b"\n")
                file.flush()
                os.fsync(fd)
            os.replace(temporary, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as error:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise TrackerError(
                f"{self.path}: cannot write the tokens file ({error.strerror})"
            ) from None
