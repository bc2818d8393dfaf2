"""Settings: read once from the environment, overridden by CLI flags, frozen. No I/O here.

A bad value is reported under the name the user gave it: the variable for a value read
by :meth:`Settings.from_env`, the flag (or any label the caller passes) for an override,
the field for a value passed to the constructor.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tracker.connection import CLUSTER_SCHEMES, SERVER_SCHEMES, cluster_nodes
from tracker.errors import ConfigError

_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_TOPIC = re.compile(r"[A-Za-z0-9_.-]{1,249}")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

ENV = {
    "data_dir": "TRACKER_DATA_DIR",
    "redis_url": "TRACKER_REDIS_URL",
    "kafka_bootstrap": "TRACKER_KAFKA_BOOTSTRAP",
    "event_topic": "TRACKER_EVENT_TOPIC",
    "partitions": "TRACKER_PARTITIONS",
    "kafka_timeout": "TRACKER_KAFKA_TIMEOUT",
    "prefix": "TRACKER_PREFIX",
    "fsync": "TRACKER_FSYNC",
    "lock_timeout": "TRACKER_LOCK_TIMEOUT",
    "wait_timeout": "TRACKER_WAIT_TIMEOUT",
    "api_tokens_file": "TRACKER_API_TOKENS_FILE",
}
"""The environment variable of each setting."""


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"{name}: expected 1/0, true/false, yes/no or on/off, got {raw!r}")


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < 86_400:
        raise ConfigError(f"{name}: expected seconds (a number from 0 to 86400), got {raw!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    try:
        return default if raw is None or raw == "" else int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None


def mask_url(url: str | None) -> str | None:
    """The URL with its password replaced by ``***``, for logs and reprs."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _problem(name: str, value: object) -> str | None:
    """What is wrong with one setting's value, or ``None``."""
    if name == "prefix" and not (isinstance(value, str) and _PREFIX.fullmatch(value)):
        return (
            f"{value!r} must be 1..32 chars of [A-Za-z0-9_.-] "
            "(no braces: they would change Redis Cluster hash slots)"
        )
    if name == "redis_url" and value is not None:
        url = mask_url(value) if isinstance(value, str) else value
        if not (isinstance(url, str) and isinstance(value, str)):
            return f"{url!r} is not a URL"
        scheme = urlsplit(url).scheme
        if scheme in CLUSTER_SCHEMES:
            try:
                cluster_nodes(value)
            except ValueError as error:
                return f"{url!r}: {error}"
        elif scheme not in SERVER_SCHEMES:
            return (
                f"{url!r} is not a redis://, rediss:// or unix:// URL, nor a Redis Cluster's "
                "redis+cluster://host:port[,host:port...]"
            )
    if name == "event_topic" and not (
        isinstance(value, str) and _TOPIC.fullmatch(value) and value not in {".", ".."}
    ):
        return f"{value!r} is not a Kafka topic name (1..249 chars of [A-Za-z0-9._-])"
    if name == "partitions" and not (isinstance(value, int) and 1 <= value <= 10_000):
        return f"{value!r} must be a whole number from 1 to 10000"
    if name == "kafka_timeout" and not (isinstance(value, int | float) and 0 < value <= 3600):
        return f"{value!r} must be over 0 and at most 3600 seconds"
    return None


def _check(values: Mapping[str, object], names: Mapping[str, str]) -> None:
    """Raise :class:`ConfigError` for the first bad value, under its name in ``names``."""
    for name, value in values.items():
        if (problem := _problem(name, value)) is not None:
            raise ConfigError(f"{names.get(name, name)}: {problem}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Where the log and the snapshots live.

    No ``redis_url`` means an embedded Redis in the data dir; no ``kafka_bootstrap``
    means the file log in the data dir. ``partitions`` and ``kafka_timeout`` apply to the
    Kafka log only (the file log has one partition): the event topic is created with
    ``partitions`` and must have that many; a broker that does not answer within
    ``kafka_timeout`` seconds is reported as unavailable.
    """

    data_dir: Path = Path(".tracker")
    redis_url: str | None = field(default=None, repr=False)
    kafka_bootstrap: str | None = None
    event_topic: str = "tracker.session-events"
    partitions: int = 12
    kafka_timeout: float = 10.0
    prefix: str = "trk"
    fsync: bool = True
    lock_timeout: float = 30.0
    """Seconds an append waits for the log's lock before giving up (retriable)."""
    wait_timeout: float = 30.0
    """Seconds a command waits for its events to become visible (``wait=True``)."""
    api_tokens_file: Path | None = None
    """The HTTP API's token file; ``None``: ``tokens.json`` in the data dir."""

    def __post_init__(self) -> None:
        _check({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, {})

    def __repr__(self) -> str:
        return (
            f"Settings(data_dir={str(self.data_dir)!r}, redis_url={mask_url(self.redis_url)!r}, "
            f"kafka_bootstrap={self.kafka_bootstrap!r}, event_topic={self.event_topic!r}, "
            f"partitions={self.partitions!r}, prefix={self.prefix!r}, fsync={self.fsync!r})"
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``TRACKER_*`` variables (empty ones count as unset)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "data_dir": Path(env.get(ENV["data_dir"]) or ".tracker"),
            "redis_url": env.get(ENV["redis_url"]) or None,
            "kafka_bootstrap": env.get(ENV["kafka_bootstrap"]) or None,
            "event_topic": env.get(ENV["event_topic"]) or "tracker.session-events",
            "partitions": _int(env, ENV["partitions"], 12),
            "kafka_timeout": _seconds(env, ENV["kafka_timeout"], 10.0),
            "prefix": env.get(ENV["prefix"]) or "trk",
            "fsync": _flag(env, ENV["fsync"], True),
            "lock_timeout": _seconds(env, ENV["lock_timeout"], 30.0),
            "wait_timeout": _seconds(env, ENV["wait_timeout"], 30.0),
            "api_tokens_file": Path(tokens)
            if (tokens := env.get(ENV["api_tokens_file"]))
            else None,
        }
        _check(values, ENV)
        return cls(**values)

    def with_overrides(self, *, names: Mapping[str, str] | None = None, **changes: Any) -> Settings:
        """A copy with the given non-``None`` values replaced (CLI flags win over the env).

        ``names`` says what to call each setting in an error, e.g. ``{"prefix": "--prefix"}``
        for a flag; by default it is the field's name.
        """
        given = {name: value for name, value in changes.items() if value is not None}
        _check(given, names or {})
        return replace(self, **given)
