"""The tracker's errors: one root, so callers can catch everything with ``TrackerError``.

::

    TrackerError
    ├── ConfigError                  bad settings or flags, raised before any I/O
    ├── InvalidInputError            a field, event or file line fails validation
    ├── SessionNotFoundError         no such session (or it was deleted)
    ├── SessionExistsError           an id that is already taken
    ├── ClosedError                  the tracker was closed; open a new one
    ├── TokenNotFoundError           no API token of that name (``tokens revoke``)
    ├── LogError
    │   ├── LogNotFoundError         no event log where one was expected (a mistyped data dir)
    │   ├── LogCorruptError          damage in the log that cannot be repaired silently
    │   ├── PartialAppendError       some partitions of an append were written (retriable)
    │   ├── LogLockedError           an append waited too long for the log's lock (retriable)
    │   ├── LogFullError             no room for an append: disk full or file size limit (retriable)
    │   └── LogUnavailableError      the Kafka brokers did not answer in time (retriable)
    ├── SnapshotStoreError           Redis refused, or holds another log's projection
    │   ├── SnapshotUnavailableError Redis cannot be reached (retriable)
    │   └── CheckpointConflictError  another projector moved the checkpoint (retriable)
    │       └── GenerationRetiredError   a replay replaced the generation (retriable)
    └── NotYetVisibleError           appended (durable), but not projected in time (retriable)

``retriable`` tells a worker whether trying again later can succeed. The CLI maps
retriable errors to exit code 75 ("unavailable, try again").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from tracker.events import Position


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


class ClosedError(TrackerError):
    """The tracker (or one of its parts) was closed; calls after ``close()`` raise this."""


class TokenNotFoundError(TrackerError):
    """No API token has that name (it was never created, or was revoked already)."""


class LogError(TrackerError):
    """The event log could not be read or written."""


class LogNotFoundError(LogError):
    """No event log where one was expected; check the data dir."""


class LogCorruptError(LogError):
    """The log holds damage other than a torn tail; restore the named segment from a backup."""


class LogLockedError(LogError):
    """An append waited too long for the log's lock (another process is appending)."""

    retriable = True


class LogFullError(LogError):
    """The disk is full (or a quota or file size limit is reached): nothing was appended.

    Retriable: the same append succeeds once there is room, so workers back off and
    retry, the API answers 503 and the CLI exits 75.
    """

    retriable = True


class LogUnavailableError(LogError):
    """The Kafka brokers did not answer within the timeout; retry when they are back.

    From an append it means the outcome is unknown: the records may still be written
    (once: the producer is idempotent), so check with a read before appending them again.
    """

    retriable = True


class SnapshotStoreError(TrackerError):
    """Redis refused a command or is configured so that the projection cannot be trusted."""


class SnapshotUnavailableError(SnapshotStoreError):
    """Redis did not answer; nothing is lost (the log has every event), retry when it is back."""

    retriable = True


class CheckpointConflictError(SnapshotStoreError):
    """Another projector advanced the partition checkpoint; re-read from the checkpoint."""

    retriable = True


class GenerationRetiredError(CheckpointConflictError):
    """A replay replaced the generation this process was bound to; rebind and retry."""


class NotYetVisibleError(TrackerError):
    """Events were appended (they are durable) but not projected before the deadline.

    ``positions`` are the appended events' last positions, one per partition: do not
    append them again; wait for them (``wait_for``) or read later.
    """

    retriable = True

    def __init__(self, message: str, positions: list[Position]) -> None:
        super().__init__(message)
        self.positions = positions


class PartialAppendError(LogError):
    """An append over several partitions failed after some were written (Kafka has no
    transaction across partitions). ``positions`` are the written ones; appending the
    whole batch again is safe, since applying an event twice in a row changes nothing."""

    retriable = True

    def __init__(self, message: str, positions: list[Position]) -> None:
        super().__init__(message)
        self.positions = positions
