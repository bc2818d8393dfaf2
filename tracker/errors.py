"""The tracker's errors: one root, so callers can catch everything with ``TrackerError``.

::

    TrackerError
    ├── ConfigError                  bad settings or flags, raised before any I/O
    ├── InvalidInputError            a field, event or file line fails validation
    ├── SessionNotFoundError         no such session (or it was deleted)
    ├── SessionExistsError           an id that is already taken
    ├── LogError
    │   ├── LogCorruptError          damage in the log that cannot be repaired silently
    │   └── LogLockedError           another process is writing to the log
    └── SnapshotStoreError           Redis refused, or holds another log's projection
        ├── SnapshotUnavailableError Redis cannot be reached (retriable)
        └── CheckpointConflictError  another projector moved the checkpoint

``retriable`` tells a worker whether trying again later can succeed.
"""

from __future__ import annotations

from typing import ClassVar


class TrackerError(Exception):
    """Base of every error the tracker raises on purpose."""

    retriable: ClassVar[bool] = False


class ConfigError(TrackerError):
    """A setting or flag is malformed; fix the named variable or flag."""


class InvalidInputError(TrackerError):
    """Input failed validation; the message names the field (and line), nothing was written."""


class SessionNotFoundError(TrackerError):
    """The session does not exist, was deleted, or has offsets but was never created."""


class SessionExistsError(TrackerError):
    """The session id is taken (ids of deleted sessions are never reused)."""


class LogError(TrackerError):
    """The event log could not be read or written."""


class LogCorruptError(LogError):
    """The log holds damage other than a torn tail; restore the named segment from a backup."""


class LogLockedError(LogError):
    """Another process holds the log's writer lock; stop it or wait, then retry."""

    retriable = True


class SnapshotStoreError(TrackerError):
    """Redis refused a command or is configured so that the projection cannot be trusted."""


class SnapshotUnavailableError(SnapshotStoreError):
    """Redis did not answer; nothing is lost (the log has every event), retry when it is back."""

    retriable = True


class CheckpointConflictError(SnapshotStoreError):
    """Another projector advanced the partition checkpoint; re-read from the checkpoint."""

    retriable = True
