"""Scoped API tokens: the token file, its look-up and ``tracker tokens``.

No Redis or log is involved: the commands touch the token file only. Most CLI tests run
in-process with ``CliRunner``; the concurrency tests run ``python -m tracker`` processes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tracker.cli import main
from tracker.errors import InvalidInputError, TokenNotFoundError, TrackerError
from tracker.settings import Settings
from tracker.tokens import PREFIX, SCOPES, Grant, Scope, TokenFile, grants, token_file_path

ROOT = Path(__file__).resolve().parent.parent


def env_for(data_dir: Path, **extra: str) -> dict[str, str | None]:
    """Only this data dir (and ``extra``): every outer ``TRACKER_*`` variable unset."""
    env: dict[str, str | None] = {name: None for name in os.environ if name.startswith("TRACKER_")}
    env["TRACKER_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def run(data_dir: Path, *args: str, env: Mapping[str, str] | None = None) -> Result:
    result = CliRunner().invoke(main, ["tokens", *args], env=env_for(data_dir, **(env or {})))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"tracker tokens {args} raised: {result.stderr}") from (
            result.exception
        )
    return result


def ok(data_dir: Path, *args: str) -> Result:
    result = run(data_dir, *args)
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result


def fails(data_dir: Path, code: int, *args: str) -> str:
    """The one line on stderr of a command that exits with ``code``."""
    result = run(data_dir, *args)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def subprocess_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env["TRACKER_DATA_DIR"] = str(data_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# -- the command line ------------------------------------------------------------------


def test_create_list_revoke_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "data"
    created = ok(data, "create", "--scope", "write", "--user-id", "v9pg5Zv3h4", "--name", "ci")
    token = created.stdout.strip()
    assert created.stdout == token + "\n"
    assert token.startswith(PREFIX) and len(token) == len(PREFIX) + 43
    assert "store it now: it is shown only once" in created.stderr
    assert token not in created.stderr

    as_json = json.loads(ok(data, "create", "--scope", "admin", "--json").stdout)
    assert set(as_json) == {"token", "name", "scope", "user_id"}
    assert (as_json["scope"], as_json["user_id"]) == ("admin", None)
    assert as_json["name"].startswith("admin-")

    listed = [json.loads(line) for line in ok(data, "list", "--json").stdout.splitlines()]
    assert [(t["name"], t["scope"], t["user_id"]) for t in listed] == [
        ("ci", "write", "v9pg5Zv3h4"),
        (as_json["name"], "admin", None),
    ]
    assert all(set(t) == {"name", "scope", "user_id", "created_at"} for t in listed)
    table = ok(data, "list")
    assert "ci" in table.stdout and "v9pg5Zv3h4" in table.stdout
    stored = (data / "tokens.json").read_text()
    for text in (table.stdout, table.stderr, json.dumps(listed)):
        assert token not in text and as_json["token"] not in text
        assert not any(record["sha256"] in text for record in json.loads(stored)["tokens"])

    file = TokenFile(data / "tokens.json")
    assert file.lookup(token) == Grant(name="ci", scope="write", user_id="v9pg5Zv3h4")
    assert file.lookup(as_json["token"]) == Grant(name=as_json["name"], scope="admin", user_id=None)

    assert "revoked token ci" in ok(data, "revoke", "ci").stdout
    assert [t.name for t in TokenFile(data / "tokens.json").list()] == [as_json["name"]]
    assert TokenFile(data / "tokens.json").lookup(token) is None


def test_the_file_holds_no_secret_and_has_mode_0600(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = ok(data, "create", "--scope", "read").stdout.strip()
    path = data / "tokens.json"
    assert token not in path.read_text()
    assert token[len(PREFIX) :] not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ok(data, "revoke", TokenFile(path).list()[0].name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"version": 1, "tokens": []}
    assert [p.name for p in data.iterdir() if p.name.endswith(".tmp")] == []


def test_the_file_can_be_elsewhere(tmp_path: Path) -> None:
    elsewhere = tmp_path / "secrets" / "api-tokens.json"
    result = run(tmp_path / "data", "create", "--scope", "read", "--name", "x",
                 env={"TRACKER_API_TOKENS_FILE": str(elsewhere)})  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert [g.name for g in TokenFile(elsewhere).list()] == ["x"]
    assert not (tmp_path / "data" / "tokens.json").exists()
    assert token_file_path(Settings.from_env({"TRACKER_API_TOKENS_FILE": str(elsewhere)})) == (
        elsewhere
    )
    assert token_file_path(Settings(data_dir=tmp_path)) == tmp_path / "tokens.json"


BAD = [
    (["create", "--scope", "root"], "--scope"),
    (["create"], "--scope"),
    (["create", "--scope", "read", "--user-id", "no spaces"], "--user-id"),
    (["create", "--scope", "read", "--user-id", ""], "--user-id"),
    (["create", "--scope", "read", "--name", "x" * 65], "--name"),
    (["create", "--scope", "read", "--name", "a/b"], "--name"),
    (["revoke"], "NAME"),
]


@pytest.mark.parametrize(("args", "named"), BAD, ids=str)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], named: str) -> None:
    assert named in fails(tmp_path / "data", 2, *args)
    assert not (tmp_path / "data" / "tokens.json").exists()


def test_a_taken_name_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ok(data, "create", "--scope", "read", "--name", "ci")
    before = (data / "tokens.json").read_bytes()
    assert "'ci'" in fails(data, 2, "create", "--scope", "admin", "--name", "ci")
    assert (data / "tokens.json").read_bytes() == before


def test_revoking_an_unknown_name_exits_1(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert "'nope'" in fails(data, 1, "revoke", "nope")
    ok(data, "create", "--scope", "read", "--name", "ci")
    assert "'nope'" in fails(data, 1, "revoke", "nope")
    ok(data, "revoke", "ci")
    assert "'ci'" in fails(data, 1, "revoke", "ci")


CORRUPT = {
    "truncated": '{"version": 1, "tokens": [',
    "not json": "hello",
    "other version": '{"version": 2, "tokens": []}',
    "bad scope": '{"version": 1, "tokens": [{"name": "a", "scope": "root", "user_id": null, '
    '"sha256": "' + "0" * 64 + '", "created_at": "2025-01-25T22:41:41Z"}]}',
    "twice": '{"version": 1, "tokens": ['
    + ", ".join(
        '{"name": "a", "scope": "read", "user_id": null, '
        f'"sha256": "{c * 64}", "created_at": "2025-01-25T22:41:41Z"}}'
        for c in "01"
    )
    + "]}",
}


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_a_corrupt_file_is_one_line_naming_it(tmp_path: Path, content: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = data / "tokens.json"
    path.write_text(content)
    for args in (["list"], ["create", "--scope", "read"], ["revoke", "a"]):
        assert str(path) in fails(data, 1, *args)
    assert path.read_text() == content
    with pytest.raises(TrackerError, match="not a valid tokens file"):
        TokenFile(path).lookup(PREFIX + "x" * 43)


def test_an_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.mkdir()  # a directory where the file should be: unreadable as a file, even for root
    with pytest.raises(TrackerError, match=f"^{path}: cannot read the tokens file"):
        TokenFile(path).lookup(PREFIX + "x" * 43)
    with pytest.raises(TrackerError, match=f"^{path}: cannot read"):
        TokenFile(path).list()


def test_help_says_where_the_file_is_and_what_scopes_allow(tmp_path: Path) -> None:
    text = " ".join(ok(tmp_path / "data", "--help").stdout.split())
    for words in (
        "TRACKER_API_TOKENS_FILE",
        "DATA_DIR/tokens.json",
        "read read sessions",
        "write also create sessions and commit offsets",
        "admin also reset offsets and delete sessions",
        "sees only that user's sessions",
    ):
        assert words in text, words
    assert not (tmp_path / "data").exists()


# -- the token file --------------------------------------------------------------------


def test_scopes_are_ordered() -> None:
    allowed = {
        (have, need)
        for have in SCOPES
        for need in SCOPES
        if grants(Grant(name="t", scope=have, user_id=None), need)
    }
    assert allowed == {
        ("read", "read"),
        ("write", "read"),
        ("write", "write"),
        ("admin", "read"),
        ("admin", "write"),
        ("admin", "admin"),
    }


def test_lookup_finds_a_token_and_nothing_else(tmp_path: Path) -> None:
    file = TokenFile(tmp_path / "tokens.json")
    assert file.lookup(PREFIX + "x" * 43) is None  # no file: no tokens
    assert file.list() == []
    token, grant = file.create("read", user_id="u1", name="reader")
    assert grant == Grant(name="reader", scope="read", user_id="u1")
    assert file.lookup(token) == grant
    for wrong in (
        token[:-1],
        token + "x",
        token[len(PREFIX) :],
        token.upper(),
        "",
        PREFIX,
        token + "\u00e9",
        token[:-1] + "\udc80",
        PREFIX + "x" * 10_000,
    ):
        assert file.lookup(wrong) is None, wrong
    assert token not in repr(grant) and token not in repr(file)
    assert file.revoke("reader") == grant
    assert file.lookup(token) is None
    with pytest.raises(TokenNotFoundError, match="'reader'"):
        file.revoke("reader")


@pytest.mark.parametrize(
    ("scope", "kwargs", "field"),
    [
        ("root", {}, "scope"),
        ("read", {"user_id": "a b"}, "user_id"),
        ("read", {"name": ""}, "name"),
        ("read", {"name": "é"}, "name"),
    ],
)
def test_create_validates_its_arguments(
    tmp_path: Path, scope: str, kwargs: dict[str, Any], field: str
) -> None:
    file = TokenFile(tmp_path / "tokens.json")
    bad_scope: Scope = scope  # type: ignore[assignment]
    with pytest.raises(InvalidInputError, match=f"^{field}: "):
        file.create(bad_scope, **kwargs)
    assert not file.path.exists()


def test_a_running_instance_sees_changes_made_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "data" / "tokens.json"
    server = TokenFile(path, stat_interval=0)
    cached = TokenFile(path, stat_interval=3600)
    assert server.lookup(PREFIX + "x" * 43) is None
    assert cached.lookup(PREFIX + "x" * 43) is None

    token, grant = TokenFile(path).create("write", name="w")
    assert server.lookup(token) == grant
    assert cached.lookup(token) is None  # not stat'ed again within its interval

    # another process revokes it and creates one
    result = subprocess.run(
        [sys.executable, "-m", "tracker", "tokens", "revoke", "w"],
        env=subprocess_env(path.parent), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert server.lookup(token) is None
    result = subprocess.run(
        [sys.executable, "-m", "tracker", "tokens", "create", "--scope", "admin", "--json"],
        env=subprocess_env(path.parent), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert server.lookup(created["token"]) == Grant(created["name"], "admin", None)


def test_concurrent_creates_keep_every_token(tmp_path: Path) -> None:
    data = tmp_path / "data"
    command = [sys.executable, "-m", "tracker", "tokens", "create", "--scope", "read", "--json"]
    env = subprocess_env(data)
    processes = [
        subprocess.Popen(
            [*command, "--name", f"t{i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for i in range(8)
    ]
    outputs: list[dict[str, Any]] = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr.decode()
            outputs.append(json.loads(stdout))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    file = TokenFile(data / "tokens.json")
    assert sorted(g.name for g in file.list()) == sorted(f"t{i}" for i in range(8))
    for created in outputs:
        assert file.lookup(created["token"]) == Grant(created["name"], "read", None)
