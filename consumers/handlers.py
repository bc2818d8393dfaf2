"""Handlers: the user's function called once per message, sync or async, with retries.

A handler takes a :class:`~consumers.messages.Message`. Returning means done; raising
:class:`Retry` asks to be called again after a backoff (a bounded number of times);
any other exception sends the message to the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import cast

from consumers.messages import Message, Undecodable
from tracker.errors import InvalidInputError

Handler = Callable[[Message], Awaitable[None] | None]


class Interrupted(Exception):
    """The worker is stopping while a handler waits to retry."""


class Retry(Exception):
    """Raised by a handler to be called again for the same message after ``after`` seconds
    (default: the worker's backoff, doubling per attempt)."""

    def __init__(self, reason: str = "retry requested", *, after: float | None = None) -> None:
        super().__init__(reason)
        self.after = after


def acknowledge(message: Message) -> None:
    """The default handler: nothing to do; the offset is recorded."""


def load_handler(spec: str) -> Handler:
    """The callable named ``package.module:function``; a clear error if there is none."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise InvalidInputError(f"--handler: expected package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInputError(f"--handler: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the module itself failed: its own bug, said on one line
        raise InvalidInputError(
            f"--handler: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    target: object = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise InvalidInputError(f"--handler: {module_name!r} has no {attribute!r}") from None
    if not callable(target):
        raise InvalidInputError(f"--handler: {spec} is not callable")
    return cast(Handler, target)


class Attempts:
    """Runs a handler with bounded retries and exponential backoff.

    A wait between attempts ends early when ``stopping`` is set (shutdown): the message is
    then left unhandled (:class:`Interrupted`), to be read again.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_attempts: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 10.0,
    ) -> None:
        self.handler = handler
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.retries = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.is_async = inspect.iscoroutinefunction(handler)

    def run(self, message: Message, stopping: threading.Event) -> str | None:
        """``None`` when the message is done, else why to dead-letter it."""
        attempt = 1
        while True:
            try:
                result = self.handler(message)
                if result is not None and inspect.isawaitable(result):
                    self._await(result)
                return None
            except Retry as request:
                if attempt >= self.max_attempts:
                    return f"gave up after {attempt} attempts: {request}"
                delay = request.after
                if delay is None:
                    delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
                self.retries += 1
                attempt += 1
                if stopping.wait(delay):
                    raise Interrupted from None
            except Undecodable as exc:  # message.event: the message's fault, not the handler's
                return str(exc)
            except (SystemExit, KeyboardInterrupt):
                raise  # the handler asks the worker to stop: not the message's fault
            except BaseException as exc:  # any other failure (CancelledError too): a dead letter
                return f"handler raised {type(exc).__name__}: {exc}"

    def _await(self, awaitable: Awaitable[None]) -> None:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(awaitable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None
