"""The ``tracker`` command line: every command, its output formats and its exit codes.

Most tests drive ``tracker.cli:main`` in-process with click's ``CliRunner`` (stdout and
stderr kept apart) against the shared real Redis with a key prefix of their own and a
data dir in ``tmp_path``. A few run the installed console script in a subprocess, one of
them with the embedded default (no ``TRACKER_REDIS_URL``).
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
from click.testing import CliRunner, Result

from tests.services import free_port
from tracker.cli import EXIT_UNAVAILABLE, default_actor, exit_code, main
from tracker.embedded import EmbeddedRedis
from tracker.errors import (
    CheckpointConflictError,
    ConfigError,
    InvalidInputError,
    LogCorruptError,
    LogLockedError,
    SessionExistsError,
    SessionNotFoundError,
    SnapshotStoreError,
    SnapshotUnavailableError,
    TrackerError,
)

SCRIPT = Path(sys.executable).parent / "tracker"
SCHEMAS = Path(__file__).parent / "flux0" / "session-schemas.json"
CREATED_AT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
GENERATED_ID = re.compile(r"^[A-Za-z0-9]{10}$")
MAX_OFFSET = 2**63 - 1

# flux0-shaped ids: exactly 10 characters, as its schema requires.
FLUX_SESSION, FLUX_AGENT, FLUX_USER = "zv3h4j5Fjv", "vUfk4PgjTm", "v9pg5Zv3h4"


def describe(result: Result) -> str:
    return f"exit {result.exit_code}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"


def clean_env() -> dict[str, str | None]:
    """Unset every outer ``TRACKER_*`` variable (``None`` unsets it in CliRunner)."""
    return {name: None for name in os.environ if name.startswith("TRACKER_")}


class Cli:
    """Runs ``tracker`` in-process against one data dir and one Redis key prefix."""

    def __init__(self, data_dir: Path, redis_url: str, prefix: str) -> None:
        self.data_dir = data_dir
        self.redis_url = redis_url
        self.prefix = prefix

    def env(self, overrides: Mapping[str, str | None] | None = None) -> dict[str, str | None]:
        env = clean_env()
        env.update(
            TRACKER_DATA_DIR=str(self.data_dir),
            TRACKER_REDIS_URL=self.redis_url,
            TRACKER_PREFIX=self.prefix,
        )
        env.update(overrides or {})
        return env

    def run(
        self,
        *args: str,
        stdin: str | bytes | None = None,
        env: Mapping[str, str | None] | None = None,
    ) -> Result:
        result = CliRunner().invoke(main, list(args), input=stdin, env=self.env(env))
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(
                f"tracker {' '.join(args)} raised instead of exiting:\n{describe(result)}"
            ) from result.exception
        return result

    def ok(self, *args: str, stdin: str | bytes | None = None) -> Result:
        result = self.run(*args, stdin=stdin)
        assert result.exit_code == 0, describe(result)
        return result

    def fails(self, code: int, *args: str, stdin: str | bytes | None = None) -> Result:
        result = self.run(*args, stdin=stdin)
        assert result.exit_code == code, describe(result)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def json(self, *args: str) -> Any:
        """The single JSON object a ``--json`` command prints."""
        lines = self.ok(*args, "--json").stdout.splitlines()
        assert len(lines) == 1, lines
        return json.loads(lines[0])

    def json_lines(self, *args: str) -> list[Any]:
        return [json.loads(line) for line in self.ok(*args).stdout.splitlines()]

    def export(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.json_lines("events", "export")
        return events

    def log_files(self) -> dict[str, bytes]:
        """The bytes of every file of the event log (the writer's LOCK file holds a PID only)."""
        root = self.data_dir / "log"
        return {
            str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*"))
            if path.is_file() and path.name != "LOCK"
        }

    def create(self, session_id: str, agent: str = "agent-1", user: str = "user-1") -> None:
        self.ok("sessions", "create", "--agent-id", agent, "--user-id", user, "--id", session_id)


@pytest.fixture
def cli(tmp_path: Path, redis_url: str, prefix: str) -> Cli:
    return Cli(tmp_path / "data", redis_url, prefix)


def one_line_error(result: Result, *words: str) -> str:
    """The single line on stderr; it must contain every one of ``words``."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def session_schema() -> dict[str, Any]:
    schemas: dict[str, Any] = json.loads(SCHEMAS.read_text())
    schema: dict[str, Any] = schemas["SessionDTO"]
    return schema


def assert_flux0_session(value: Any) -> None:
    """Valid against flux0's own SessionDTO schema, with flux0's exact key set."""
    jsonschema.validate(value, session_schema())
    keys = {"id", "agent_id", "user_id", "consumption_offsets", "created_at"}
    assert set(value) in (keys, keys | {"title"}), sorted(value)
    assert value.get("title", "") is not None
    assert CREATED_AT.match(value["created_at"]), value["created_at"]


# -- help and usage ------------------------------------------------------------------

HELP = {
    (): ["sessions", "offsets", "events", "replay", "verify", "demo", "--data-dir"],
    ("sessions",): ["create", "show", "list", "rename", "delete", "history"],
    ("sessions", "create"): ["--agent-id", "--user-id", "--id", "--title", "--json"],
    ("sessions", "show"): ["SESSION_ID", "--json", "--as-of", "--min-position", "--timeout"],
    ("sessions", "history"): ["SESSION_ID", "--json"],
    ("sessions", "list"): ["--user-id", "--agent-id", "--json"],
    ("sessions", "rename"): ["SESSION_ID", "[TITLE]", "--clear", "--json"],
    ("sessions", "delete"): ["SESSION_ID"],
    ("offsets",): ["commit", "show", "reset"],
    ("offsets", "commit"): ["SESSION_ID", "CONSUMER", "OFFSET", "--allow-unknown", "--json"],
    ("offsets", "show"): ["SESSION_ID", "--json"],
    ("offsets", "reset"): ["SESSION_ID", "CONSUMER", "--to-offset", "--execute", "--json"],
    ("events",): ["import", "export"],
    ("events", "import"): ["SOURCE"],
    ("events", "export"): ["Usage:"],
    ("replay",): ["--json"],
    ("verify",): ["--json"],
    ("demo",): ["--sessions", "--messages", "--seed", "--kafka"],
}


@pytest.mark.parametrize("command", list(HELP), ids=lambda c: " ".join(c) or "tracker")
def test_help_of_every_command(cli: Cli, command: tuple[str, ...]) -> None:
    result = cli.ok(*command, "--help")
    assert result.stdout.startswith("Usage: "), result.stdout
    assert " ".join(("main", *command)) in result.stdout.splitlines()[0]
    for word in HELP[command]:
        assert word in result.stdout, word
    assert result.stderr == ""
    assert not cli.data_dir.exists(), "--help must not open the log"


USAGE_ERRORS = [
    (["sessions", "show"], "sessions show", "Missing argument 'SESSION_ID'"),
    (["sessions", "frobnicate"], "sessions", "No such command 'frobnicate'"),
    (["offsets", "commit", "s1", "client"], "offsets commit", "Missing argument 'OFFSET'"),
    (["offsets", "reset", "s1", "client"], "offsets reset", "Missing option '--to-offset'"),
    (["sessions", "create", "--user-id", "U"], "sessions create", "Missing option '--agent-id'"),
    (["verify", "--no-such-option"], "verify", "No such option '--no-such-option'"),
    (["events", "import", "/no/such/file.jsonl"], "events import", "No such file or directory"),
    (["--bogus"], "", "No such option '--bogus'"),
]


@pytest.mark.parametrize(
    ("args", "command", "message"), USAGE_ERRORS, ids=[" ".join(c[0]) for c in USAGE_ERRORS]
)
def test_usage_errors_exit_2_with_one_line(
    cli: Cli, args: list[str], command: str, message: str
) -> None:
    result = cli.fails(2, *args)
    line = one_line_error(result, message)
    assert line.startswith("error: "), line
    assert line.endswith(f" (see 'main{' ' if command else ''}{command} --help')"), line
    assert result.stdout == ""


@pytest.mark.parametrize("group", [[], ["sessions"], ["offsets"], ["events"]], ids=repr)
def test_a_group_without_a_command_shows_its_help(cli: Cli, group: list[str]) -> None:
    result = cli.run(*group)
    output = result.stdout + result.stderr
    assert output.startswith(f"Usage: {' '.join(['main', *group])} [OPTIONS] COMMAND"), output
    assert "Commands:" in output
    assert result.exit_code in (0, 2), describe(result)


def test_version(cli: Cli) -> None:
    assert "0.1.0" in cli.ok("--version").stdout


# -- sessions --------------------------------------------------------------------------


def test_create_and_show_as_flux0_session_dto(cli: Cli) -> None:
    created = cli.json(
        "sessions", "create", "--agent-id", FLUX_AGENT, "--user-id", FLUX_USER,
        "--id", FLUX_SESSION, "--title", "The weather in SF",
    )  # fmt: skip
    assert_flux0_session(created)
    assert created["id"] == FLUX_SESSION
    assert created["agent_id"] == FLUX_AGENT
    assert created["user_id"] == FLUX_USER
    assert created["title"] == "The weather in SF"
    assert created["consumption_offsets"] == {}

    cli.ok("offsets", "commit", FLUX_SESSION, "client", "37")
    shown = cli.json("sessions", "show", FLUX_SESSION)
    assert_flux0_session(shown)
    assert shown == {**created, "consumption_offsets": {"client": 37}}


def test_json_session_without_title_omits_it(cli: Cli) -> None:
    created = cli.json("sessions", "create", "--agent-id", FLUX_AGENT, "--user-id", FLUX_USER)
    assert_flux0_session(created)
    assert "title" not in created
    assert GENERATED_ID.match(created["id"]), created["id"]
    shown = cli.json("sessions", "show", created["id"])
    assert shown == created
    assert set(shown) == {"id", "agent_id", "user_id", "consumption_offsets", "created_at"}


def test_generated_ids_differ(cli: Cli) -> None:
    ids = {
        cli.json("sessions", "create", "--agent-id", "A", "--user-id", "U")["id"] for _ in range(3)
    }
    assert len(ids) == 3
    assert all(GENERATED_ID.match(sid) for sid in ids)


def test_show_as_table(cli: Cli) -> None:
    cli.ok("sessions", "create", "--agent-id", "ag-1", "--user-id", "us-1", "--id", "tbl-1",
           "--title", "hello")  # fmt: skip
    cli.ok("offsets", "commit", "tbl-1", "notifier", "12")
    result = cli.ok("sessions", "show", "tbl-1")
    rows = {" ".join(line.split()) for line in result.stdout.splitlines()}
    assert "id tbl-1" in rows
    assert "agent_id ag-1" in rows
    assert "user_id us-1" in rows
    assert "title hello" in rows
    assert "offset notifier 12" in rows
    assert result.stderr == ""


MARKUP_TITLES = ["[/]", "[bold]x[/bold]", "[link=http://x]y[/link]", ":thumbs_up: [red]", "a\\[b]"]


@pytest.mark.parametrize("title", MARKUP_TITLES)
def test_user_text_is_printed_literally_not_as_rich_markup(cli: Cli, title: str) -> None:
    wide = {"COLUMNS": "200"}
    created = cli.run("sessions", "create", "--agent-id", "A", "--user-id", "U", "--id", "mk-1",
                      "--title", title, env=wide)  # fmt: skip
    assert created.exit_code == 0, describe(created)
    shown = cli.run("sessions", "show", "mk-1", env=wide)
    assert shown.exit_code == 0, describe(shown)
    for output in (created.stdout, shown.stdout):
        rows = [line.split(None, 1) for line in output.splitlines() if line.strip()]
        assert ["title", title] in [[cell.strip() for cell in row] for row in rows], output
    listed = cli.run("sessions", "list", env=wide)
    assert listed.exit_code == 0, describe(listed)
    (row,) = [line for line in listed.stdout.splitlines() if "mk-1" in line]
    assert [cell.strip() for cell in row.split("│")[1:-1]] == ["mk-1", "A", "U",
        cli.json("sessions", "show", "mk-1")["created_at"], title, ""]  # fmt: skip
    renamed = cli.run("sessions", "rename", "mk-1", title + "!", env=wide)
    assert renamed.exit_code == 0, describe(renamed)
    assert f" {title}! " in renamed.stdout


def test_list_filters_and_json_lines(cli: Cli) -> None:
    sessions = {
        "aaaaaaaaa1": (FLUX_AGENT, FLUX_USER),
        "aaaaaaaaa2": (FLUX_AGENT, "otherUser1"),
        "aaaaaaaaa3": ("otherAgent", FLUX_USER),
    }
    for sid, (agent, user) in sessions.items():
        cli.create(sid, agent=agent, user=user)
    cli.ok("offsets", "commit", "aaaaaaaaa2", "client", "4")

    everything = cli.json_lines("sessions", "list", "--json")
    assert [s["id"] for s in everything] == list(sessions)  # oldest first
    for session in everything:
        assert_flux0_session(session)
    assert everything[1]["consumption_offsets"] == {"client": 4}

    def listed(*args: str) -> list[str]:
        return [s["id"] for s in cli.json_lines("sessions", "list", "--json", *args)]

    assert listed("--user-id", FLUX_USER) == ["aaaaaaaaa1", "aaaaaaaaa3"]
    assert listed("--agent-id", FLUX_AGENT) == ["aaaaaaaaa1", "aaaaaaaaa2"]
    assert listed("--user-id", FLUX_USER, "--agent-id", FLUX_AGENT) == ["aaaaaaaaa1"]
    assert listed("--user-id", "nobody") == []

    table = cli.ok("sessions", "list", "--user-id", FLUX_USER)
    assert "aaaaaaaaa1" in table.stdout
    assert "aaaaaaaaa3" in table.stdout
    assert "aaaaaaaaa2" not in table.stdout
    assert "2 sessions" in table.stderr


def test_rename(cli: Cli) -> None:
    cli.create("ren-1")
    renamed = cli.json("sessions", "rename", "ren-1", "New title")
    assert renamed["title"] == "New title"
    assert cli.json("sessions", "show", "ren-1")["title"] == "New title"
    cli.ok("sessions", "rename", "ren-1", "Second")
    assert cli.json("sessions", "show", "ren-1")["title"] == "Second"
    assert cli.export()[-1]["type"] == "title_changed"


def test_rename_clear_removes_the_title(cli: Cli) -> None:
    cli.ok("sessions", "create", "--agent-id", "A", "--user-id", "U", "--id", "clr-1",
           "--title", "old")  # fmt: skip
    cleared = cli.json("sessions", "rename", "clr-1", "--clear")
    assert "title" not in cleared
    assert cli.json("sessions", "show", "clr-1") == cleared
    last = cli.export()[-1]
    assert (last["type"], last["session_id"], "title" in last) == ("title_changed", "clr-1", False)
    rows = cli.ok("sessions", "show", "clr-1").stdout.splitlines()
    assert [" ".join(row.split()) for row in rows if row.split()[:1] == ["title"]] == ["title"]


@pytest.mark.parametrize("args", [["clr-2"], ["clr-2", "New", "--clear"]], ids=["neither", "both"])
def test_rename_needs_exactly_one_of_title_and_clear(cli: Cli, args: list[str]) -> None:
    cli.ok("sessions", "create", "--agent-id", "A", "--user-id", "U", "--id", "clr-2",
           "--title", "kept")  # fmt: skip
    before = cli.log_files()
    result = cli.fails(2, "sessions", "rename", *args)
    assert "exactly one of TITLE or --clear" in result.stderr
    assert result.stdout == ""
    assert cli.log_files() == before
    assert cli.json("sessions", "show", "clr-2")["title"] == "kept"


def test_rename_unknown_session_exits_1(cli: Cli) -> None:
    cli.create("other")
    before = cli.log_files()
    one_line_error(cli.fails(1, "sessions", "rename", "nope", "T"), "nope")
    assert cli.log_files() == before


def test_delete(cli: Cli) -> None:
    cli.create("del-1")
    cli.create("keep-1")
    result = cli.ok("sessions", "delete", "del-1")
    assert "deleted session del-1" in result.stdout
    one_line_error(cli.fails(1, "sessions", "show", "del-1"), "del-1", "deleted")
    assert [s["id"] for s in cli.json_lines("sessions", "list", "--json")] == ["keep-1"]
    one_line_error(cli.fails(1, "offsets", "show", "del-1"), "del-1")

    before = cli.log_files()
    one_line_error(cli.fails(1, "sessions", "delete", "del-1"), "del-1")
    one_line_error(cli.fails(1, "sessions", "delete", "never-seen"), "never-seen")
    assert cli.log_files() == before


def test_show_unknown_session_exits_1(cli: Cli) -> None:
    cli.create("known")
    result = cli.fails(1, "sessions", "show", "unknown-1")
    one_line_error(result, "unknown-1", "not found")
    assert result.stdout == ""
    cli.fails(1, "sessions", "show", "unknown-1", "--json")


def test_creating_an_existing_id_is_refused(cli: Cli) -> None:
    cli.create("dup-1")
    cli.create("gone-1")
    cli.ok("sessions", "delete", "gone-1")
    before, events = cli.log_files(), len(cli.export())

    result = cli.run("sessions", "create", "--agent-id", "X", "--user-id", "Y", "--id", "dup-1")
    assert result.exit_code != 0, describe(result)
    one_line_error(result, "dup-1", "already exists")

    result = cli.run("sessions", "create", "--agent-id", "X", "--user-id", "Y", "--id", "gone-1")
    assert result.exit_code != 0, describe(result)
    one_line_error(result, "gone-1")

    assert cli.log_files() == before
    assert len(cli.export()) == events
    assert cli.json("sessions", "show", "dup-1")["agent_id"] == "agent-1"


# -- offsets ---------------------------------------------------------------------------


def test_commit_and_show_offsets(cli: Cli) -> None:
    cli.create("off-1")
    result = cli.ok("offsets", "commit", "off-1", "client", "5")
    assert re.fullmatch(r"off-1 client = 5 \(position \d+:\d+:\d+\)\n", result.stdout), result
    cli.ok("offsets", "commit", "off-1", "notifier", "2")
    committed = cli.json("offsets", "commit", "off-1", "client", "9")
    assert committed["current"] == 9
    assert committed["previous"] == 5
    assert committed["changed"] is True
    assert committed["stale"] is False
    assert cli.json("offsets", "show", "off-1") == {"client": 9, "notifier": 2}
    assert cli.json("sessions", "show", "off-1")["consumption_offsets"] == {
        "client": 9,
        "notifier": 2,
    }
    table = cli.ok("offsets", "show", "off-1").stdout
    assert table_rows(table) == [["consumer", "offset"], ["client", "9"], ["notifier", "2"]]


def test_stale_commit_is_reported_and_changes_nothing(cli: Cli) -> None:
    cli.create("stale-1")
    cli.ok("offsets", "commit", "stale-1", "client", "10")
    events = len(cli.export())

    result = cli.ok("offsets", "commit", "stale-1", "client", "3")
    assert result.stdout == (
        "stale: client is already at 10 for session stale-1; offset 3 recorded, nothing changed\n"
    )
    assert cli.json("offsets", "show", "stale-1") == {"client": 10}

    as_json = cli.json("offsets", "commit", "stale-1", "client", "4")
    assert as_json["stale"] is True
    assert as_json["changed"] is False
    assert as_json["current"] == 10
    assert cli.json("offsets", "show", "stale-1") == {"client": 10}
    # A stale commit is still recorded in the log (it is an event), it just changes nothing.
    assert len(cli.export()) == events + 2


def test_commit_to_never_created_session(cli: Cli) -> None:
    cli.create("exists-1")
    before, events = cli.log_files(), len(cli.export())
    result = cli.fails(1, "offsets", "commit", "early-1", "client", "4")
    one_line_error(result, "early-1")
    assert cli.log_files() == before
    assert len(cli.export()) == events

    cli.ok("offsets", "commit", "early-1", "client", "4", "--allow-unknown")
    assert cli.json("offsets", "show", "early-1") == {"client": 4}
    result = cli.fails(1, "sessions", "show", "early-1")
    one_line_error(result, "early-1", "has offsets but was never created")
    assert "early-1" not in cli.ok("sessions", "list").stdout

    # The create that was in flight arrives: the session appears with its offsets.
    cli.create("early-1")
    assert cli.json("sessions", "show", "early-1")["consumption_offsets"] == {"client": 4}


def test_commit_to_deleted_session_is_refused(cli: Cli) -> None:
    cli.create("dead-1")
    cli.ok("sessions", "delete", "dead-1")
    before = cli.log_files()
    one_line_error(cli.fails(1, "offsets", "commit", "dead-1", "client", "4"), "dead-1")
    assert cli.log_files() == before


def test_offsets_of_unknown_session_exit_1(cli: Cli) -> None:
    cli.create("there")
    one_line_error(cli.fails(1, "offsets", "show", "not-there"), "not-there")


def test_reset_is_a_dry_run_unless_executed(cli: Cli) -> None:
    cli.create("rst-1")
    cli.ok("offsets", "commit", "rst-1", "client", "10")
    before, events = cli.log_files(), len(cli.export())

    dry = cli.ok("offsets", "reset", "rst-1", "client", "--to-offset", "3")
    assert table_rows(dry.stdout)[1:] == [["rst-1", "client", "10", "3"]]
    assert dry.stdout.splitlines()[-1].startswith("dry run: nothing changed")
    plan = cli.json("offsets", "reset", "rst-1", "client", "--to-offset", "3")
    assert plan["applied"] is False
    assert plan["current"] == 10
    assert plan["target"] == 3
    assert cli.log_files() == before
    assert len(cli.export()) == events
    assert cli.json("offsets", "show", "rst-1") == {"client": 10}

    applied = cli.json(
        "offsets", "reset", "rst-1", "client", "--to-offset", "3", "--execute",
        "--reason", "reprocess", "--actor", "ops",
    )  # fmt: skip
    assert applied["applied"] is True
    assert cli.json("offsets", "show", "rst-1") == {"client": 3}
    last = cli.export()[-1]
    assert applied["position"] == last["position"]
    assert last["type"] == "offset_reset"
    assert (last["offset"], last["actor"], last["reason"]) == (3, "ops", "reprocess")

    # Moving backwards was an operator's act; commits move forward again from there.
    committed = cli.json("offsets", "commit", "rst-1", "client", "5")
    assert committed["stale"] is False
    assert cli.json("offsets", "show", "rst-1") == {"client": 5}


def table_rows(output: str) -> list[list[str]]:
    """The header and rows of a Rich table with borders, as lists of stripped cells."""
    return [
        [cell.strip() for cell in re.split("[│┃]", line)[1:-1]]
        for line in output.splitlines()
        if line.startswith(("│", "┃"))
    ]


def test_reset_table_output_when_executed(cli: Cli) -> None:
    cli.create("rst-2")
    cli.ok("offsets", "commit", "rst-2", "indexer", "8")
    result = cli.ok("offsets", "reset", "rst-2", "indexer", "--to-offset", "0", "--execute")
    assert table_rows(result.stdout) == [
        ["session", "consumer", "previous", "now"],
        ["rst-2", "indexer", "8", "0"],
    ]
    assert result.stdout.splitlines()[-1].startswith("reset applied (position ")
    assert "dry run" not in result.stdout
    assert cli.json("offsets", "show", "rst-2") == {"indexer": 0}

    first = cli.ok("offsets", "reset", "rst-2", "parser", "--to-offset", "5", "--execute")
    assert table_rows(first.stdout)[1] == ["rst-2", "parser", "-", "5"]


def test_reset_dry_run_table_shows_current_and_target(cli: Cli) -> None:
    cli.create("rst-3")
    cli.ok("offsets", "commit", "rst-3", "indexer", "8")
    result = cli.ok("offsets", "reset", "rst-3", "indexer", "--to-offset", "2")
    assert table_rows(result.stdout) == [
        ["session", "consumer", "current", "target"],
        ["rst-3", "indexer", "8", "2"],
    ]
    assert result.stdout.splitlines()[-1] == (
        "dry run: nothing changed; add --execute to apply this plan"
    )


def uid_without_passwd_entry() -> int:
    """A uid that no passwd entry names, as a container run with a random --user has."""
    for uid in range(54321, 64000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise AssertionError("every uid tried has a passwd entry")


def test_default_actor_never_raises() -> None:
    uid = uid_without_passwd_entry()
    assert default_actor({"USER": "alice", "LOGNAME": "bob"}, uid) == "alice"
    assert default_actor({"LOGNAME": "bob"}, uid) == "bob"
    assert default_actor({"USER": ""}, uid) == f"uid:{uid}"
    assert default_actor({}, 0) == pwd.getpwuid(0).pw_name


def test_reset_records_the_user_from_the_environment_by_default(cli: Cli) -> None:
    cli.create("act-1")
    args = ["offsets", "reset", "act-1", "client", "--to-offset", "0", "--execute"]
    result = cli.run(*args, env={"USER": "carol", "LOGNAME": "dave"})
    assert result.exit_code == 0, describe(result)
    assert cli.export()[-1]["actor"] == "carol"
    unset = {name: None for name in ("USER", "LOGNAME", "LNAME", "USERNAME")}
    result = cli.run(*args, env=unset)
    assert result.exit_code == 0, describe(result)
    try:
        expected = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        expected = f"uid:{os.getuid()}"
    assert cli.export()[-1]["actor"] == expected


def test_reset_of_unknown_session_exits_1(cli: Cli) -> None:
    cli.create("there")
    before = cli.log_files()
    one_line_error(
        cli.fails(1, "offsets", "reset", "nobody", "client", "--to-offset", "1", "--execute"),
        "nobody",
    )
    assert cli.log_files() == before


def test_boundary_values_are_accepted(cli: Cli) -> None:
    sid = "s" * 64
    consumer = "c." * 32
    title = "t" * 200
    cli.ok("sessions", "create", "--agent-id", "a" * 64, "--user-id", "u" * 64, "--id", sid,
           "--title", title)  # fmt: skip
    cli.ok("offsets", "commit", sid, consumer, str(MAX_OFFSET))
    cli.ok("offsets", "commit", sid, "client", "0")
    shown = cli.json("sessions", "show", sid)
    assert shown["title"] == title
    assert shown["consumption_offsets"] == {consumer: MAX_OFFSET, "client": 0}


# -- bad input: exit 2, one line naming the field, nothing written ---------------------

LONG_ID = "x" * 65
BAD_INPUT: list[tuple[str, list[str], str]] = [
    ("id-space", ["sessions", "create", "--agent-id", "A", "--user-id", "U", "--id", "a b"],
     "session_id"),
    ("id-65-chars", ["offsets", "commit", LONG_ID, "client", "1"], "session_id"),
    ("id-empty-show", ["sessions", "show", ""], "session_id"),
    ("id-empty-commit", ["offsets", "commit", "", "client", "1", "--allow-unknown"], "session_id"),
    ("id-space-rename", ["sessions", "rename", "a b", "T"], "session_id"),
    ("id-65-delete", ["sessions", "delete", LONG_ID], "session_id"),
    ("id-space-offsets-show", ["offsets", "show", "a b"], "session_id"),
    ("id-empty-reset", ["offsets", "reset", "", "client", "--to-offset", "1", "--execute"],
     "session_id"),
    ("agent-id-space", ["sessions", "create", "--agent-id", "a b", "--user-id", "U"], "agent_id"),
    ("user-id-65-chars", ["sessions", "create", "--agent-id", "A", "--user-id", LONG_ID],
     "user_id"),
    ("list-user-id", ["sessions", "list", "--user-id", "a b"], "user_id"),
    ("list-agent-id", ["sessions", "list", "--agent-id", LONG_ID], "agent_id"),
    ("consumer-bad-char", ["offsets", "commit", "s1", "b@d", "1"], "consumer"),
    ("consumer-65-chars", ["offsets", "commit", "s1", "c" * 65, "1"], "consumer"),
    ("consumer-bad-char-reset", ["offsets", "reset", "s1", "a/b", "--to-offset", "1", "--execute"],
     "consumer"),
    ("offset-negative", ["offsets", "commit", "s1", "client", "-1"], "offset"),
    ("offset-abc", ["offsets", "commit", "s1", "client", "abc"], "offset"),
    ("offset-float", ["offsets", "commit", "s1", "client", "1.5"], "offset"),
    ("offset-2-63", ["offsets", "commit", "s1", "client", "9223372036854775808"], "offset"),
    ("offset-newline", ["offsets", "commit", "s1", "client", "6\n"], "offset"),
    ("offset-plus", ["offsets", "commit", "s1", "client", "+6"], "offset"),
    ("offset-space", ["offsets", "commit", "s1", "client", " 6"], "offset"),
    ("offset-trailing-space", ["offsets", "commit", "s1", "client", "6 "], "offset"),
    ("offset-underscore", ["offsets", "commit", "s1", "client", "6_0"], "offset"),
    ("offset-empty", ["offsets", "commit", "s1", "client", ""], "offset"),
    ("reset-newline", ["offsets", "reset", "s1", "client", "--to-offset", "3\n", "--execute"],
     "offset"),
    ("reset-plus-dry-run", ["offsets", "reset", "s1", "client", "--to-offset", "+3"], "offset"),
    ("offset-negative-unknown", ["offsets", "commit", "new-1", "client", "-1", "--allow-unknown"],
     "offset"),
    ("reset-negative", ["offsets", "reset", "s1", "client", "--to-offset", "-1", "--execute"],
     "offset"),
    ("reset-abc", ["offsets", "reset", "s1", "client", "--to-offset", "abc", "--execute"],
     "offset"),
    ("reset-float-dry-run", ["offsets", "reset", "s1", "client", "--to-offset", "1.5"], "offset"),
    ("reset-2-63", ["offsets", "reset", "s1", "client", "--to-offset", "9223372036854775808",
                    "--execute"], "offset"),
    ("title-201-create", ["sessions", "create", "--agent-id", "A", "--user-id", "U",
                          "--title", "t" * 201], "title"),
    ("title-201-rename", ["sessions", "rename", "s1", "t" * 201], "title"),
    ("actor-201", ["offsets", "reset", "s1", "client", "--to-offset", "1", "--execute",
                   "--actor", "a" * 201], "actor"),
    ("reason-1001", ["offsets", "reset", "s1", "client", "--to-offset", "1", "--execute",
                     "--reason", "r" * 1001], "reason"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "field"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    cli: Cli, args: list[str], field: str
) -> None:
    cli.create("s1")
    cli.ok("offsets", "commit", "s1", "client", "7")
    before, events = cli.log_files(), len(cli.export())
    session = cli.json("sessions", "show", "s1")
    assert before, "the log should have files by now"

    result = cli.fails(2, *args)
    one_line_error(result, field)
    assert result.stdout == ""

    assert cli.log_files() == before
    assert len(cli.export()) == events
    assert cli.json("offsets", "show", "s1") == {"client": 7}
    assert cli.json("sessions", "show", "s1") == session
    assert [s["id"] for s in cli.json_lines("sessions", "list", "--json")] == ["s1"]


# -- events import / export ------------------------------------------------------------


def populate(cli: Cli) -> None:
    """A little of everything, through the CLI."""
    cli.ok("sessions", "create", "--agent-id", "ag-1", "--user-id", "us-1", "--id", "pop-a",
           "--title", "first")  # fmt: skip
    cli.create("pop-b", agent="ag-2", user="us-2")
    cli.create("pop-c")
    cli.ok("offsets", "commit", "pop-a", "client", "5")
    cli.ok("offsets", "commit", "pop-a", "client", "3")  # stale
    cli.ok("offsets", "commit", "pop-a", "notifier", "2")
    cli.ok("offsets", "commit", "pop-b", "client", "9")
    cli.ok("offsets", "commit", "pop-early", "client", "4", "--allow-unknown")
    cli.ok("offsets", "reset", "pop-b", "client", "--to-offset", "1", "--execute")
    cli.ok("sessions", "rename", "pop-a", "renamed")
    cli.ok("sessions", "delete", "pop-c")


def visible_state(cli: Cli) -> tuple[list[Any], dict[str, Any]]:
    offsets = {sid: cli.json("offsets", "show", sid) for sid in ("pop-a", "pop-b", "pop-early")}
    return cli.json_lines("sessions", "list", "--json"), offsets


def test_export_import_export_round_trip(
    cli: Cli, tmp_path: Path, redis_url: str, make_prefix: Callable[[], str]
) -> None:
    populate(cli)
    exported = cli.ok("events", "export").stdout
    first = [json.loads(line) for line in exported.splitlines()]
    assert len(first) == 11
    assert [e["type"] for e in first[:3]] == ["session_created"] * 3
    for event in first:
        assert set(event["position"]) >= {"partition", "offset"}
        assert event["event_id"]
        assert event["recorded_at"]
    positions = [(e["position"]["partition"], e["position"]["offset"],
                  e["position"].get("index", 0)) for e in first]  # fmt: skip
    assert positions == sorted(set(positions))

    dump = tmp_path / "events.jsonl"
    dump.write_text(exported)
    copy = Cli(tmp_path / "copy", redis_url, make_prefix())
    imported = copy.ok("events", "import", str(dump))
    assert "imported 11 events" in imported.stderr
    second = copy.export()

    # Positions are where the events sit in each log, so they may differ; everything
    # else (type, ids, event_id, recorded_at, payload) must survive the round trip.
    def content(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "position"} for e in events]

    assert content(second) == content(first)
    assert all("position" in e for e in second)
    assert visible_state(copy) == visible_state(cli)
    copy.fails(1, "sessions", "show", "pop-c")
    assert copy.ok("verify").stdout.splitlines()[-1] == "verify: 0 differences"


def event_line(**fields: Any) -> str:
    return json.dumps(fields)


def test_import_from_stdin_ignores_blank_lines(cli: Cli) -> None:
    cli.create("imp-1")
    lines = [
        "",
        event_line(type="offset_committed", session_id="imp-1", consumer="client", offset=6),
        "   ",
        event_line(type="title_changed", session_id="imp-1", title="from stdin"),
        "",
    ]
    result = cli.ok("events", "import", "-", stdin="\n".join(lines) + "\n")
    assert "imported 2 events" in result.stderr
    shown = cli.json("sessions", "show", "imp-1")
    assert shown["consumption_offsets"] == {"client": 6}
    assert shown["title"] == "from stdin"
    assert [e["type"] for e in cli.export()] == [
        "session_created",
        "offset_committed",
        "title_changed",
    ]


@pytest.mark.parametrize(
    ("bad", "number"),
    [
        ('{"type": "offset_committed", "session_id": "imp-1", "consumer": "client"}', 3),
        ("not json at all", 3),
        (
            '{"type": "offset_committed", "session_id": "imp-1", "consumer": "client", '
            '"offset": -5}',
            3,
        ),
        ('{"type": "offset_committed", "session_id": "a b", "consumer": "client", "offset": 1}', 3),
        ('{"type": "no_such_event", "session_id": "imp-1"}', 3),
        (
            '{"type": "offset_committed", "session_id": "imp-1", "consumer": "client", '
            '"offset": 9223372036854775808}',
            3,
        ),
    ],
    ids=["missing-field", "not-json", "negative-offset", "bad-id", "unknown-type", "offset-2-63"],
)
def test_import_rejects_whole_file_naming_first_bad_line(
    cli: Cli, tmp_path: Path, bad: str, number: int
) -> None:
    cli.create("imp-1")
    before, events = cli.log_files(), len(cli.export())
    good = event_line(type="offset_committed", session_id="imp-1", consumer="client", offset=1)
    later_bad = '{"type": "session_deleted"}'
    source = tmp_path / "bad.jsonl"
    # line 1 good, line 2 blank, line `number` bad, then another good and another bad line.
    source.write_text("\n".join([good, "", bad, good, later_bad]) + "\n")

    result = cli.fails(2, "events", "import", str(source))
    line = one_line_error(result, f"line {number}")
    assert "line 5" not in line
    assert cli.log_files() == before
    assert len(cli.export()) == events
    assert cli.json("offsets", "show", "imp-1") == {}

    stdin = cli.fails(2, "events", "import", "-", stdin=source.read_bytes())
    one_line_error(stdin, f"line {number}")
    assert cli.log_files() == before


@pytest.mark.parametrize("field", ["created_at", "recorded_at"])
def test_import_refuses_a_time_without_a_zone(cli: Cli, field: str) -> None:
    """A naive time once got in and then broke `sessions list` with a TypeError for good."""
    cli.create("tz-1")
    before = cli.log_files()
    fields = {"created_at": "2025-01-25T22:41:41Z", field: "2025-01-25T22:41:41"}
    good = event_line(type="offset_committed", session_id="tz-1", consumer="client", offset=1)
    naive = event_line(type="session_created", session_id="tz-2", agent_id="A", user_id="U",
                       **fields)  # fmt: skip
    result = cli.fails(2, "events", "import", "-", stdin=f"{good}\n{naive}\n")
    one_line_error(result, "line 2", field, "timezone")
    assert cli.log_files() == before
    assert [s["id"] for s in cli.json_lines("sessions", "list", "--json")] == ["tz-1"]
    assert "tz-1" in cli.ok("sessions", "list").stdout


def test_import_accepts_a_utf8_bom(cli: Cli, tmp_path: Path) -> None:
    """Editors on Windows start UTF-8 files with a byte order mark; it is not part of line 1."""
    cli.create("bom-1")
    lines = [
        event_line(type="title_changed", session_id="bom-1", title="Café"),
        event_line(type="offset_committed", session_id="bom-1", consumer="client", offset=4),
    ]
    source = tmp_path / "bom.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    assert "imported 2 events" in cli.ok("events", "import", str(source)).stderr
    assert cli.ok("events", "import", "-", stdin=source.read_bytes()).stderr.endswith(
        "imported 2 events\n"
    )
    shown = cli.json("sessions", "show", "bom-1")
    assert (shown["title"], shown["consumption_offsets"]) == ("Café", {"client": 4})
    assert len(cli.export()) == 5


def test_import_refuses_a_bom_after_line_1(cli: Cli) -> None:
    cli.create("bom-2")
    good = event_line(type="offset_committed", session_id="bom-2", consumer="client", offset=1)
    result = cli.fails(2, "events", "import", "-", stdin=f"{good}\n\ufeff{good}\n".encode())
    one_line_error(result, "line 2", "not valid JSON")


IMPORT_FIELD_ERRORS = [
    ("unknown-field", {"type": "offset_committed", "session_id": "imp-1", "consumer": "client",
                       "offset": 2, "ofset": 3}, "ofset: unknown field"),
    ("unknown-in-position", {"type": "session_deleted", "session_id": "imp-1",
                             "position": {"partition": 0, "offset": 1, "idx": 0}},
     "position.idx: unknown field"),
    ("event-id-10-mb", {"type": "offset_committed", "session_id": "imp-1", "consumer": "client",
                        "offset": 2, "event_id": "e" * 10**7}, "event_id: "),
    ("actor-201", {"type": "offset_reset", "session_id": "imp-1", "consumer": "client",
                   "offset": 0, "actor": "a" * 201}, "actor: "),
    ("reason-1001", {"type": "offset_reset", "session_id": "imp-1", "consumer": "client",
                     "offset": 0, "reason": "r" * 1001}, "reason: "),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "message"),
    [case[1:] for case in IMPORT_FIELD_ERRORS],
    ids=[case[0] for case in IMPORT_FIELD_ERRORS],
)
def test_import_names_the_line_and_field_of_a_refused_value(
    cli: Cli, fields: dict[str, Any], message: str
) -> None:
    cli.create("imp-1")
    before = cli.log_files()
    good = event_line(type="offset_committed", session_id="imp-1", consumer="client", offset=1)
    result = cli.fails(2, "events", "import", "-", stdin=f"{good}\n{event_line(**fields)}\n")
    error = one_line_error(result, f"line 2: {message}")
    assert len(error) < 200, error[:300]
    assert cli.log_files() == before


def test_events_after_delete_do_not_revive_the_session(cli: Cli) -> None:
    cli.create("zombie")
    cli.ok("offsets", "commit", "zombie", "client", "3")
    cli.ok("sessions", "delete", "zombie")
    later = [
        event_line(type="offset_committed", session_id="zombie", consumer="client", offset=50),
        event_line(type="offset_reset", session_id="zombie", consumer="client", offset=1),
        event_line(type="title_changed", session_id="zombie", title="back?"),
        event_line(type="session_created", session_id="zombie", agent_id="A", user_id="U",
                   created_at="2025-01-25T22:41:41Z"),
    ]  # fmt: skip
    result = cli.ok("events", "import", "-", stdin="\n".join(later) + "\n")
    assert "imported 4 events" in result.stderr

    one_line_error(cli.fails(1, "sessions", "show", "zombie"), "zombie", "deleted")
    cli.fails(1, "offsets", "show", "zombie")
    assert cli.json_lines("sessions", "list", "--json") == []
    assert cli.ok("verify").stdout.splitlines()[-1] == "verify: 0 differences"
    cli.ok("replay")
    cli.fails(1, "sessions", "show", "zombie")
    assert cli.json_lines("sessions", "list", "--json") == []


# -- replay and verify -----------------------------------------------------------------


def snapshot_key(client: redis.Redis, prefix: str, session_id: str) -> str:
    keys = [str(k) for k in client.scan_iter(match=f"{prefix}:*:s:{session_id}", count=1000)]
    assert len(keys) == 1, keys
    return keys[0]


def test_verify_finds_drift_and_replay_repairs_it(
    cli: Cli, redis_client: redis.Redis, prefix: str
) -> None:
    cli.create("vfy-a")
    cli.create("vfy-b")
    cli.create("vfy-c")
    cli.ok("offsets", "commit", "vfy-a", "client", "5")
    cli.ok("offsets", "commit", "vfy-b", "client", "8")
    clean = cli.ok("verify")
    assert clean.stdout.splitlines()[-1] == "verify: 0 differences"

    redis_client.delete(snapshot_key(redis_client, prefix, "vfy-a"))
    result = cli.fails(1, "verify")
    lines = result.stdout.splitlines()
    assert lines[-1] == "verify: 1 differences"
    assert any(line.startswith("vfy-a") for line in lines[:-1]), lines
    assert not any("vfy-b" in line or "vfy-c" in line for line in lines), lines

    redis_client.hset(snapshot_key(redis_client, prefix, "vfy-b"), "oclient", "999")
    report = cli.run("verify", "--json")
    assert report.exit_code == 1, describe(report)
    parsed = json.loads(report.stdout)
    assert sorted(d["session_id"] for d in parsed["differences"]) == ["vfy-a", "vfy-b"]

    replayed = cli.ok("replay")
    assert replayed.stdout.startswith("replayed 5 events into 3 sessions"), replayed.stdout
    repaired = cli.ok("verify")
    assert repaired.stdout.splitlines() == ["verify: 0 differences"]
    assert cli.json("offsets", "show", "vfy-a") == {"client": 5}
    assert cli.json("offsets", "show", "vfy-b") == {"client": 8}


def test_verify_prints_titles_in_differences_literally(
    cli: Cli, redis_client: redis.Redis, prefix: str
) -> None:
    cli.ok("sessions", "create", "--agent-id", "A", "--user-id", "U", "--id", "vfy-t",
           "--title", ":smile: [/]")  # fmt: skip
    redis_client.hset(snapshot_key(redis_client, prefix, "vfy-t"), "t", "[bold]x[/bold] :x:")
    result = cli.fails(1, "verify")
    assert result.stdout.splitlines() == [
        "vfy-t: title '[bold]x[/bold] :x:' in Redis, ':smile: [/]' in the log",
        "verify: 1 differences",
    ]


def test_replay_after_losing_redis_keys(cli: Cli, redis_client: redis.Redis, prefix: str) -> None:
    cli.create("rpl-1")
    cli.ok("offsets", "commit", "rpl-1", "client", "11")
    before = cli.json("sessions", "show", "rpl-1")
    for key in list(redis_client.scan_iter(match=f"{prefix}:*:s:*")):
        redis_client.delete(key)
    cli.fails(1, "sessions", "show", "rpl-1")
    report = cli.json("replay")
    assert report["events"] == 2
    assert report["sessions"] == 1
    assert cli.json("sessions", "show", "rpl-1") == before


def test_verify_on_an_empty_log(cli: Cli) -> None:
    cli.ok("sessions", "create", "--agent-id", FLUX_AGENT, "--user-id", FLUX_USER, "--id", "gone")
    cli.ok("sessions", "delete", "gone")
    assert cli.ok("verify").stdout.splitlines() == ["verify: 0 differences"]


def test_read_commands_refuse_a_data_dir_without_a_log(cli: Cli) -> None:
    """A mistyped --data-dir is not taken for an empty log (and nothing is created there)."""
    for command in (
        ["verify"],
        ["replay"],
        ["sessions", "list"],
        ["events", "export"],
        ["sessions", "show", "abc"],
        ["offsets", "show", "abc"],
    ):
        result = cli.run(*command)
        assert result.exit_code == 1, (command, describe(result))
        assert "no event log" in result.stderr
    assert not (cli.data_dir / "log").exists()


def test_demo(cli: Cli) -> None:
    result = cli.ok("demo", "--sessions", "50", "--messages", "2000")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[-1] == "verify: 0 differences", result.stdout
    assert any(line.startswith("created 50 sessions") for line in lines), lines
    assert any(line.startswith("2 workers processed them") for line in lines), lines
    assert result.stdout.count("dead letter of ") == 4, result.stdout
    assert "exit codes notifier 0, indexer 0" in result.stdout
    assert any(line.startswith("replay: ") for line in lines), lines
    assert not cli.data_dir.exists(), "demo uses a data dir of its own"


def test_demo_with_one_session_and_one_message(cli: Cli) -> None:
    result = cli.ok("demo", "--sessions", "1", "--messages", "1", "--seed", "0")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert any(line.startswith("created 1 sessions") for line in lines), lines
    # a create and one offset per worker; the malformed messages are dead letters
    assert any(line.startswith("replay: 3 events, 1 sessions") for line in lines), lines
    assert lines[-1] == "verify: 0 differences", result.stdout


@pytest.mark.parametrize(
    ("option", "value"),
    [("--sessions", "0"), ("--sessions", "-3"), ("--messages", "0"), ("--messages", "-1"),
     ("--sessions", "many"), ("--seed", "1.5")],
)  # fmt: skip
def test_demo_refuses_bad_options(cli: Cli, option: str, value: str) -> None:
    result = cli.fails(2, "demo", option, value)
    one_line_error(result, f"Invalid value for '{option}'", value)
    assert result.stdout == ""


# -- environment -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TRACKER_PREFIX", "trk{0}"),
        ("TRACKER_PREFIX", "a}b"),
        ("TRACKER_PREFIX", "trk\n"),
        ("TRACKER_REDIS_URL", "http://x"),
    ],
)
def test_bad_environment_exits_2(cli: Cli, variable: str, value: str) -> None:
    result = cli.run("sessions", "list", env={variable: value})
    assert result.exit_code == 2, describe(result)
    one_line_error(result, variable)
    assert result.stdout == ""
    assert not cli.data_dir.exists(), "configuration is checked before any I/O"


@pytest.mark.parametrize(
    ("flag", "value", "variable"),
    [
        ("--prefix", "trk{0}", "TRACKER_PREFIX"),
        ("--prefix", "trk\n", "TRACKER_PREFIX"),
        ("--redis-url", "http://x", "TRACKER_REDIS_URL"),
    ],
)
def test_a_bad_flag_is_named_as_typed(cli: Cli, flag: str, value: str, variable: str) -> None:
    result = cli.run(flag, value, "sessions", "list")
    assert result.exit_code == 2, describe(result)
    line = one_line_error(result, f"error: {flag}: ")
    assert variable not in line
    assert result.stdout == ""
    assert not cli.data_dir.exists(), "configuration is checked before any I/O"


def test_flags_override_environment(
    cli: Cli, tmp_path: Path, redis_url: str, make_prefix: Callable[[], str]
) -> None:
    other_dir, other_prefix = tmp_path / "flagged", make_prefix()
    flags = ["--data-dir", str(other_dir), "--prefix", other_prefix, "--redis-url", redis_url]
    cli.ok(*flags, "sessions", "create", "--agent-id", "A", "--user-id", "U", "--id", "flag-1")
    assert (other_dir / "log").is_dir()
    assert not cli.data_dir.exists()
    cli.fails(1, "sessions", "list", "--json")
    flagged = Cli(other_dir, redis_url, other_prefix)
    assert [s["id"] for s in flagged.json_lines("sessions", "list", "--json")] == ["flag-1"]


@pytest.mark.parametrize(
    ("variable", "value", "flag"),
    [
        ("TRACKER_PREFIX", "bad{prefix}", "--prefix"),
        ("TRACKER_REDIS_URL", "http://x", "--redis-url"),
    ],
)
def test_valid_flag_wins_over_invalid_environment(
    cli: Cli, variable: str, value: str, flag: str
) -> None:
    """A flag replaces its variable, so a bad value in the environment must not matter."""
    good = cli.prefix if flag == "--prefix" else cli.redis_url
    cli.create("env-1")
    result = cli.run(flag, good, "verify", env={variable: value})
    assert result.exit_code == 0, describe(result)
    assert result.stdout.splitlines() == ["verify: 0 differences"]


# -- exit codes ----------------------------------------------------------------------

EXIT_CODES: list[tuple[TrackerError, int]] = [
    (InvalidInputError("x"), 2),
    (ConfigError("x"), 2),
    (SessionNotFoundError("x"), 1),
    (SessionExistsError("x"), 1),
    (LogCorruptError("x"), 1),
    (SnapshotStoreError("x"), 1),
    (LogLockedError("x"), 75),
    (SnapshotUnavailableError("x"), 75),
    (CheckpointConflictError("x"), 75),
]


@pytest.mark.parametrize(
    ("error", "code"), EXIT_CODES, ids=[type(error).__name__ for error, _ in EXIT_CODES]
)
def test_exit_code_of_each_error(error: TrackerError, code: int) -> None:
    assert exit_code(error) == code
    assert (code == EXIT_UNAVAILABLE) == error.retriable


def test_help_documents_the_exit_codes(cli: Cli) -> None:
    text = " ".join(cli.ok("--help").stdout.split())
    for line in [
        "0 ok",
        "1 not found, or a failed check",
        "2 bad input or usage",
        "75 unavailable, try again",
    ]:
        assert line in text, text


def test_a_log_locked_by_another_process_exits_75(cli: Cli) -> None:
    """The log's append lock is held for longer than TRACKER_LOCK_TIMEOUT."""
    cli.create("lck-1")
    fd = os.open(cli.data_dir / "log" / "LOCK", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = cli.run(
            "offsets", "commit", "lck-1", "client", "1", env={"TRACKER_LOCK_TIMEOUT": "0.3"}
        )
    finally:
        os.close(fd)
    assert result.exit_code == EXIT_UNAVAILABLE, describe(result)
    one_line_error(result, "another process", "try again")
    assert result.stdout == ""
    assert cli.json("offsets", "show", "lck-1") == {}


def test_an_unreachable_redis_exits_75(cli: Cli) -> None:
    cli.create("down-1")
    closed = f"redis://127.0.0.1:{free_port()}/0"
    result = cli.run("--redis-url", closed, "sessions", "list")
    assert result.exit_code == EXIT_UNAVAILABLE, describe(result)
    one_line_error(result, "Redis")
    assert result.stdout == ""


def test_two_logs_sharing_a_prefix(cli: Cli, tmp_path: Path, redis_url: str) -> None:
    """Redis holding another log's projection is refused; replay replaces it only if forced."""
    cli.create("log-a-1")
    other = Cli(tmp_path / "other", redis_url, cli.prefix)
    result = other.fails(1, "offsets", "commit", "x-1", "client", "3", "--allow-unknown")
    one_line_error(result, cli.prefix, "--prefix")
    assert other.ok("events", "export").stdout == "", "the refused commit appended nothing"
    result = other.fails(1, "replay")
    one_line_error(result, "another log", "--prefix", "--force")
    assert cli.json("sessions", "show", "log-a-1")["id"] == "log-a-1", "nothing was replaced"

    assert other.ok("replay", "--force").stdout.startswith("replayed 0 events into 0 sessions")
    assert other.json_lines("sessions", "list", "--json") == []
    one_line_error(cli.fails(1, "sessions", "show", "log-a-1"), "another log", "--force")
    cli.ok("replay", "--force")
    assert cli.json("sessions", "show", "log-a-1")["id"] == "log-a-1"


# -- the installed console script ------------------------------------------------------


def script_env(data_dir: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env["TRACKER_DATA_DIR"] = str(data_dir)
    env.update(values)
    return env


def run_script(
    args: Sequence[str], env: Mapping[str, str], stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        env=dict(env),
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_console_script(tmp_path: Path, redis_url: str, prefix: str) -> None:
    env = script_env(tmp_path / "data", TRACKER_REDIS_URL=redis_url, TRACKER_PREFIX=prefix)
    version = run_script(["--version"], env)
    assert version.returncode == 0
    assert "0.1.0" in version.stdout

    created = run_script(
        ["sessions", "create", "--agent-id", FLUX_AGENT, "--user-id", FLUX_USER,
         "--id", FLUX_SESSION, "--json"], env,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert_flux0_session(json.loads(created.stdout))

    lines = [
        event_line(type="offset_committed", session_id=FLUX_SESSION, consumer="client", offset=3),
        "",
        event_line(type="offset_committed", session_id=FLUX_SESSION, consumer="client", offset=8),
    ]
    imported = run_script(["events", "import", "-"], env, stdin="\n".join(lines).encode())
    assert imported.returncode == 0, imported.stderr
    assert "imported 2 events" in imported.stderr

    shown = run_script(["sessions", "show", FLUX_SESSION, "--json"], env)
    assert shown.returncode == 0, shown.stderr
    session = json.loads(shown.stdout)
    assert_flux0_session(session)
    assert session["consumption_offsets"] == {"client": 8}

    for args, field in [
        (["offsets", "commit", FLUX_SESSION, "client", "-1"], "offset"),
        (["offsets", "commit", FLUX_SESSION, "bad consumer", "1"], "consumer"),
        (["sessions", "show", "a b"], "session_id"),
    ]:
        bad = run_script(args, env)
        assert bad.returncode == 2, (args, bad.stderr)
        assert len(bad.stderr.splitlines()) == 1, bad.stderr
        assert field in bad.stderr
        assert "Traceback" not in bad.stderr

    missing = run_script(["sessions", "show", "nope"], env)
    assert missing.returncode == 1
    assert len(missing.stderr.splitlines()) == 1, missing.stderr

    bad_env = run_script(["sessions", "list"], {**env, "TRACKER_PREFIX": "x{y}"})
    assert bad_env.returncode == 2
    assert len(bad_env.stderr.splitlines()) == 1, bad_env.stderr
    assert "TRACKER_PREFIX" in bad_env.stderr


def redis_servers_for(directory: Path) -> list[int]:
    """PIDs of running redis-server processes serving ``directory`` (socket or working dir)."""
    target = directory.resolve()
    socket = str(EmbeddedRedis(directory).socket).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"redis-server" not in cmdline:
                continue
            if socket in cmdline or Path(os.readlink(entry / "cwd")) == target:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_process_finder_sees_an_embedded_redis(tmp_path: Path) -> None:
    """The check used below really finds a live embedded server (so its silence means something)."""
    directory = tmp_path / "probe" / "redis"
    server = EmbeddedRedis(directory)
    server.start()
    try:
        assert redis_servers_for(directory), "an embedded redis-server should be visible"
    finally:
        server.stop()
    assert redis_servers_for(directory) == []


def test_console_script_with_embedded_redis(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    redis_dir = data_dir / "redis"
    env = script_env(data_dir)
    assert "TRACKER_REDIS_URL" not in env

    runs = [
        ["sessions", "create", "--agent-id", "A", "--user-id", "U", "--id", "emb-1", "--json"],
        ["offsets", "commit", "emb-1", "client", "7"],
        ["sessions", "show", "emb-1", "--json"],
    ]
    outputs = []
    for args in runs:
        done = run_script(args, env)
        assert done.returncode == 0, (args, done.stderr)
        outputs.append(done.stdout)
        assert redis_servers_for(redis_dir) == [], f"redis-server left running after {args}"
    assert json.loads(outputs[2])["consumption_offsets"] == {"client": 7}

    log = (redis_dir / "redis.log").read_text()
    started = re.findall(r"pid=(\d+), just started", log)
    assert len(started) == len(runs), log[-2000:]
    assert log.count("ready to exit, bye bye") == len(runs), log[-2000:]
    assert not EmbeddedRedis(redis_dir).socket.exists()
    assert (redis_dir / "appendonlydir").is_dir(), "the embedded Redis persists (AOF)"


def test_a_commit_to_a_deleted_session_says_it_changed_nothing(cli: Cli) -> None:
    cli.create("del-1")
    cli.ok("sessions", "delete", "del-1")
    result = cli.ok("offsets", "commit", "del-1", "client", "4", "--allow-unknown")
    assert result.stdout.splitlines() == [
        "deleted: session del-1 was deleted; offset 4 recorded, nothing changed"
    ]
    shown = cli.json("offsets", "commit", "del-1", "client", "5", "--allow-unknown", "--json")
    assert (shown["changed"], shown["deleted"], shown["current"]) == (False, True, None)
    cli.fails(1, "offsets", "commit", "del-1", "client", "6")
