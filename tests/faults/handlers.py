"""Handlers that the fault tests' ``tracker worker`` subprocesses load with ``--handler``."""

from __future__ import annotations

import itertools
import time

from consumers import Message

EVERY = 10
PAUSE = 0.001
"""Every ``EVERY``th message costs ``PAUSE`` seconds: about 0.1 ms a message, so a worker
handles several thousand a second, and a kill at a random moment finds it with messages
in hand and a flush in flight."""

_calls = itertools.count(1)


def busy(message: Message) -> None:
    """Stands for a real handler's work (a call, a write): a short pause now and then."""
    if next(_calls) % EVERY == 0:
        time.sleep(PAUSE)
