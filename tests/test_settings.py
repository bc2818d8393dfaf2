"""Settings: read from the environment, overridden by flags, and errors that name the source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tracker.errors import ConfigError
from tracker.settings import Settings

BAD = [("prefix", "trk{0}"), ("prefix", "trk\n"), ("prefix", ""), ("redis_url", "http://x")]
VARIABLE = {"prefix": "TRACKER_PREFIX", "redis_url": "TRACKER_REDIS_URL"}


@pytest.mark.parametrize(("field", "value"), BAD[:2] + BAD[3:])
def test_a_bad_variable_is_named(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{VARIABLE[field]}: "):
        Settings.from_env({VARIABLE[field]: value})


@pytest.mark.parametrize(("field", "value"), BAD)
def test_a_bad_override_is_named_as_the_caller_names_it(field: str, value: str) -> None:
    base = Settings.from_env({})
    flag = "--" + field.replace("_", "-")
    change: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError, match=f"^{flag}: "):
        base.with_overrides(names={field: flag}, **change)
    with pytest.raises(ConfigError, match=f"^{field}: "):
        base.with_overrides(**change)


@pytest.mark.parametrize(("field", "value"), BAD)
def test_a_bad_argument_is_named_by_its_field(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: "):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_overrides_replace_given_values_only() -> None:
    env = {"TRACKER_PREFIX": "from-env", "TRACKER_DATA_DIR": "/env/dir", "TRACKER_FSYNC": "0"}
    base = Settings.from_env(env)
    assert (base.prefix, base.data_dir, base.fsync) == ("from-env", Path("/env/dir"), False)
    merged = base.with_overrides(prefix="from-flag", data_dir=None, redis_url=None)
    assert (merged.prefix, merged.data_dir, merged.redis_url, merged.fsync) == (
        "from-flag",
        Path("/env/dir"),
        None,
        False,
    )


def test_a_password_in_the_url_is_masked_in_errors_and_repr() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TRACKER_REDIS_URL": "http://user:s3cret@host/0"})
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in repr(Settings(redis_url="redis://user:s3cret@host/0"))
