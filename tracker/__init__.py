"""Event-sourced consumption offset tracker: an append-only event log, Redis snapshots."""

from tracker.errors import (
    CheckpointConflictError,
    ClosedError,
    ConfigError,
    GenerationRetiredError,
    InvalidInputError,
    LogCorruptError,
    LogError,
    LogFullError,
    LogLockedError,
    LogNotFoundError,
    NotYetVisibleError,
    SessionExistsError,
    SessionNotFoundError,
    SnapshotStoreError,
    SnapshotUnavailableError,
    TrackerError,
)
from tracker.events import Position
from tracker.model import SessionDTO
from tracker.reader import Reader
from tracker.service import Tracker
from tracker.settings import Settings

__all__ = [
    "CheckpointConflictError",
    "ClosedError",
    "ConfigError",
    "GenerationRetiredError",
    "InvalidInputError",
    "LogCorruptError",
    "LogError",
    "LogFullError",
    "LogLockedError",
    "LogNotFoundError",
    "NotYetVisibleError",
    "Position",
    "Reader",
    "SessionDTO",
    "SessionExistsError",
    "SessionNotFoundError",
    "Settings",
    "SnapshotStoreError",
    "SnapshotUnavailableError",
    "Tracker",
    "TrackerError",
]
