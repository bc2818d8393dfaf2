"""``tracker`` subprocesses of one test: started with an env, logged to files, stopped by PID.

:class:`Processes` is the part every multi-process test shares (the worker tests'
``Harness``, the fault suite's ``World``): start ``python -m tracker ...`` with its output
in a file, run a command to its end, wait for a condition while failing fast if a
process dies, and stop them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import pytest

from tests.services import stop_process
from tracker.errors import TrackerError


class Process:
    """A ``tracker`` subprocess; its stdout and stderr go to ``log``."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (by PID) and wait for the exit code."""
        os.kill(self.pid, signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit {timeout:g} s after SIGTERM:\n{self.tail()}")

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait()


P = TypeVar("P", bound=Process)


class Processes(Generic[P]):
    """The ``tracker`` processes of one test, sharing ``env``; ``stop_all`` at the end."""

    process_type: type[P]
    wait_timeout = 120.0

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.processes: list[P] = []

    def start(self, name: str, *args: str) -> P:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "tracker", *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self.process_type(name, popen, log)
        self.processes.append(process)
        return process

    def run_any(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a command to its end, whatever its exit code."""
        return subprocess.run(
            [sys.executable, "-m", "tracker", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop_all(self) -> None:
        for process in self.processes:
            stop_process(process.popen, grace=15)

    def tails(self) -> str:
        return "\n".join(
            f"--- {p.name} (pid {p.pid}, exit {p.popen.poll()}):\n{p.tail()}"
            for p in self.processes
        )

    def wait_for(
        self,
        condition: Callable[[], bool],
        what: str | Callable[[], str],
        *,
        running: Sequence[Process] = (),
        timeout: float | None = None,
    ) -> float:
        """Poll ``condition`` (a :class:`TrackerError` counts as not yet); fail after
        ``timeout`` or as soon as one of ``running`` exits. Returns the seconds it took."""
        limit = self.wait_timeout if timeout is None else timeout
        started = time.monotonic()
        while True:
            try:
                if condition():
                    return time.monotonic() - started
            except TrackerError:
                pass
            for process in running:
                if not process.alive:
                    pytest.fail(f"{process.name} exited while waiting for {_say(what)}\n"
                                f"{self.tails()}")  # fmt: skip
            if time.monotonic() - started > limit:
                pytest.fail(f"timed out after {limit:g} s: {_say(what)}\n{self.tails()}")
            time.sleep(0.1)


def _say(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()
