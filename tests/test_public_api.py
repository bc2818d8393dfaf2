"""The package's public surface is deliberate: adding or removing a name is a visible change."""

from __future__ import annotations

import tracker
from tracker.errors import TrackerError


def test_public_names_are_pinned() -> None:
    assert sorted(tracker.__all__) == [
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
    for name in tracker.__all__:
        assert getattr(tracker, name).__name__ == name, f"{name} is an alias"


def test_every_error_is_a_tracker_error() -> None:
    errors = [getattr(tracker, name) for name in tracker.__all__ if name.endswith("Error")]
    assert all(issubclass(error, TrackerError) for error in errors)
    retriable = {error.__name__ for error in errors if error.retriable}
    assert retriable == {
        "LogFullError",
        "LogLockedError",
        "SnapshotUnavailableError",
        "CheckpointConflictError",
        "GenerationRetiredError",
        "NotYetVisibleError",
    }
