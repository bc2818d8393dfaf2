"""Background workers: read a message stream, call a handler, record offsets per session.

Run one with ``tracker worker``; embed one with :class:`Worker` and a stream
(:class:`~consumers.filestream.FileStream` or :class:`~consumers.kafkastream.KafkaStream`).
A handler takes a :class:`Message` and may raise :class:`Retry`.
"""

from consumers.handlers import Handler, Retry, acknowledge, load_handler
from consumers.messages import Message
from consumers.worker import Stats, Worker

__all__ = ["Handler", "Message", "Retry", "Stats", "Worker", "acknowledge", "load_handler"]
