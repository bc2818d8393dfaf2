"""Event-sourced consumption offset tracker: an append-only event log, Redis snapshots."""

from tracker.errors import (
    CheckpointConflictError,
    ConfigError,
    InvalidInputError,
    LogCorruptError,
    LogError,
    LogLockedError,
    SessionExistsError,
    SessionNotFoundError,
    SnapshotStoreError,
    SnapshotUnavailableError,
    TrackerError,
)
from tracker.events import Position
from tracker.model import SessionDTO
from tracker.service import Tracker
from tracker.settings import Settings

__all__ = [
    "CheckpointConflictError",
    "ConfigError",
    "InvalidInputError",
    "LogCorruptError",
    "LogError",
    "LogLockedError",
    "Position",
    "SessionDTO",
    "SessionExistsError",
    "SessionNotFoundError",
    "Settings",
    "SnapshotStoreError",
    "SnapshotUnavailableError",
    "Tracker",
    "TrackerError",
]
