"""docker-compose.yml is valid for Debian's docker-compose 1.29, and its tracker services
run real ``tracker`` commands.

No Docker engine is needed: ``docker-compose config`` only reads and validates the file.
Its normalized YAML is turned into JSON by the Python that runs docker-compose (which
has PyYAML), so PyYAML stays out of the project's dependencies.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tracker.cli import main

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
TRACKER_SERVICES = ("project", "worker", "api")
TO_JSON = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail(
            "docker-compose is not on PATH: .ci/run installs it "
            "(apt-get install docker-compose, Debian's 1.29)"
        )
    return found


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose -f docker-compose.yml ARGS`` in the repository's root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    return subprocess.run(
        [docker_compose(), "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def yaml_python() -> list[str]:
    """The interpreter docker-compose runs on (its shebang): it has PyYAML."""
    with Path(docker_compose()).open("rb") as script:
        first = script.readline()
    if first.startswith(b"#!"):
        return shlex.split(first[2:].decode())
    return ["/usr/bin/python3"]


@functools.cache
def normalized_config() -> dict[str, Any]:
    """``docker-compose config`` (interpolated, anchors and merges resolved) as a dict."""
    done = compose("config")
    assert done.returncode == 0, done.stderr
    converted = subprocess.run(
        [*yaml_python(), "-c", TO_JSON],
        input=done.stdout, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert converted.returncode == 0, f"converting the YAML to JSON: {converted.stderr}"
    config: dict[str, Any] = json.loads(converted.stdout)
    return config


def service(name: str) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = normalized_config()["services"]
    return services[name]


def words(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_docker_compose_accepts_the_file() -> None:
    done = compose("config", "-q")
    assert done.returncode == 0, done.stderr


def test_the_services() -> None:
    done = compose("config", "--services")
    assert done.returncode == 0, done.stderr
    assert {"kafka", "redis", "project", "worker", "api"} <= set(done.stdout.split())


@pytest.mark.parametrize("name", TRACKER_SERVICES)
def test_a_tracker_service_runs_a_tracker_command(name: str) -> None:
    """The image's entrypoint is ``tracker``, so a service's command is a tracker command:
    its words followed by ``--help`` exit 0. (``worker`` needs the ``tracker worker``
    command, ``api`` the ``tracker serve`` command.)"""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["tracker"]' in dockerfile
    config = service(name)
    assert "build" in config
    environment = {key: str(value) for key, value in config["environment"].items()}
    assert environment["TRACKER_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert environment["TRACKER_REDIS_URL"] == "redis://redis:6379/0"
    assert {dep: spec["condition"] for dep, spec in config["depends_on"].items()} == {
        "kafka": "service_healthy",
        "redis": "service_healthy",
    }
    command = words(config["command"])
    result = CliRunner().invoke(main, [*command, "--help"], env=environment)
    assert result.exit_code == 0, f"tracker {shlex.join(command)} --help: {result.output}"


def mount(volume: str | dict[str, str]) -> tuple[str, str]:
    """A service's volume as (target, source): docker-compose 1.29 writes ``SOURCE:TARGET:MODE``."""
    if isinstance(volume, dict):
        return volume["target"], volume["source"]
    source, target, *_ = volume.split(":")
    return target, source


def test_the_api_keeps_its_tokens_in_a_volume_and_is_checked() -> None:
    """The API's tokens file is on a named volume (so ``docker compose run --rm api tokens
    create`` writes where the server reads), it listens on all interfaces on the published
    port, and its healthcheck is valid Python asking ``/healthz``."""
    config = service("api")
    tokens = config["environment"]["TRACKER_API_TOKENS_FILE"]
    mounts = dict(mount(volume) for volume in config["volumes"])
    assert mounts[str(Path(tokens).parent)] in normalized_config()["volumes"]
    assert words(config["command"])[:1] == ["serve"]
    assert "0.0.0.0" in words(config["command"])
    assert [(str(p["published"]), p["target"]) for p in config["ports"]] == [("8080", 8080)]
    kind, python, flag, code = words(config["healthcheck"]["test"])
    assert (kind, python, flag) == ("CMD", "python", "-c")
    compile(code, "healthcheck", "exec")
    assert "http://127.0.0.1:8080/healthz" in code


def test_redis_keeps_the_projection() -> None:
    command = " ".join(words(service("redis")["command"]))
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
