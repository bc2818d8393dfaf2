"""The ``tracker`` command line: click groups for the nouns, one renderer for the output.

``app`` holds the group, the settings and the exit codes; ``output`` the renderer; each
other module a group of commands, registered on import.
"""

from tracker.cli import (
    admin,
    consumers,
    events,
    log,
    offsets,
    serve,
    sessions,
    tokens,
    workers,
)
from tracker.cli.app import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    default_actor,
    exit_code,
    load_settings,
    main,
    parse_offset,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "admin",
    "consumers",
    "default_actor",
    "events",
    "exit_code",
    "load_settings",
    "log",
    "main",
    "offsets",
    "parse_offset",
    "serve",
    "sessions",
    "tokens",
    "workers",
]
