"""Settings: read once from the environment, overridden by CLI flags, frozen. No I/O here."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tracker.errors import ConfigError

_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_TOPIC = re.compile(r"^[A-Za-z0-9_.-]{1,249}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"{name}: expected 1/0, true/false, yes/no or on/off, got {raw!r}")


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    try:
        return default if raw is None or raw == "" else int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    try:
        return default if raw is None or raw == "" else float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number of seconds, got {raw!r}") from None


def mask_url(url: str | None) -> str | None:
    """The URL with its password replaced by ``***``, for logs and reprs."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


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
    wait_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise ConfigError(
                f"TRACKER_PREFIX: {self.prefix!r} must be 1..32 chars of [A-Za-z0-9_.-] "
                "(no braces: they would change Redis Cluster hash slots)"
            )
        if self.redis_url is not None and urlsplit(self.redis_url).scheme not in {
            "redis",
            "rediss",
            "unix",
        }:
            raise ConfigError(
                f"TRACKER_REDIS_URL: {mask_url(self.redis_url)!r} is not a redis://, rediss:// "
                "or unix:// URL"
            )
        if not _TOPIC.match(self.event_topic) or self.event_topic in {".", ".."}:
            raise ConfigError(
                f"TRACKER_EVENT_TOPIC: {self.event_topic!r} is not a Kafka topic name "
                "(1..249 chars of [A-Za-z0-9._-])"
            )
        if not 1 <= self.partitions <= 10_000:
            raise ConfigError(f"TRACKER_PARTITIONS: {self.partitions} must be between 1 and 10000")
        if not 0 < self.kafka_timeout <= 3600:
            raise ConfigError(
                f"TRACKER_KAFKA_TIMEOUT: {self.kafka_timeout:g} must be over 0 and at most 3600 s"
            )

    def __repr__(self) -> str:
        return (
            f"Settings(data_dir={str(self.data_dir)!r}, redis_url={mask_url(self.redis_url)!r}, "
            f"kafka_bootstrap={self.kafka_bootstrap!r}, event_topic={self.event_topic!r}, "
            f"partitions={self.partitions!r}, prefix={self.prefix!r}, fsync={self.fsync!r})"
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            data_dir=Path(env.get("TRACKER_DATA_DIR") or ".tracker"),
            redis_url=env.get("TRACKER_REDIS_URL") or None,
            kafka_bootstrap=env.get("TRACKER_KAFKA_BOOTSTRAP") or None,
            event_topic=env.get("TRACKER_EVENT_TOPIC") or "tracker.session-events",
            partitions=_int(env, "TRACKER_PARTITIONS", 12),
            kafka_timeout=_seconds(env, "TRACKER_KAFKA_TIMEOUT", 10.0),
            prefix=env.get("TRACKER_PREFIX") or "trk",
            fsync=_flag(env, "TRACKER_FSYNC", True),
        )

    def with_overrides(self, **changes: object) -> Settings:
        """A copy with the given non-``None`` values replaced (CLI flags win over the env)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]
