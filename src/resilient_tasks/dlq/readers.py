"""Reading a queue without consuming it, one reader per kind of transport.

Every reader yields what its queue holds when reading begins, oldest first, and takes a message
for good only when told to (:meth:`_Reader.remove`): on AMQP the messages are taken
unacknowledged and handed back when reading ends; on Redis and on the filesystem transport they
are read where they lie and never leave the queue until removed. :func:`_reader` picks the
reader for a connection's transport.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqp import spec
from kombu.entity import Queue
from kombu.messaging import Consumer

# AMQP's prefetch count is a short; 0 is no limit.
_MAX_PREFETCH = 0xFFFF


@dataclass
class _Message:
    """A message as a reader found it; ``token`` is the reader's handle for removing it."""

    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]
    content_type: str | None
    content_encoding: str | None
    exchange: str
    routing_key: str
    token: Any = field(repr=False)


def _from_kombu(message: Any, token: Any) -> _Message:
    delivery = message.delivery_info or {}
    body = message.body
    return _Message(
        body=body.encode("utf-8") if isinstance(body, str) else bytes(body or b""),
        headers=dict(message.headers or {}),
        properties=dict(message.properties or {}),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        exchange=delivery.get("exchange") or "",
        routing_key=delivery.get("routing_key") or "",
        token=token,
    )


class _Reader(ABC):
    """Reads one queue: ``messages()`` yields what the queue holds when it is called, oldest
    first; ``remove()`` takes one for good; ``close()`` leaves every other one in the queue."""

    #: The queue it reads.
    queue: str

    @abstractmethod
    def count(self) -> int:
        """How many messages the queue holds now (0 if it does not exist)."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether the broker has the queue (see :meth:`DeadLetters.exists`)."""

    @abstractmethod
    def messages(self) -> Iterator[_Message]:
        """The messages the queue holds now, oldest first, without taking them."""

    @abstractmethod
    def remove(self, message: _Message) -> None:
        """Take ``message`` off the queue for good."""

    @abstractmethod
    def close(self) -> None:
        """Put back what was taken and not removed."""


class _BasicGetReader(_Reader):
    """AMQP and any other Kombu transport: ``basic_get`` without acknowledging. When reading
    ends, what was taken and not removed goes back: on RabbitMQ with one ``basic.nack``
    (requeue) for all of it, which RabbitMQ 4 does not count as a delivery toward a quorum
    queue's delivery limit (a ``basic.reject``, and RabbitMQ 3, do count); then closing the
    channel puts back anything left, as the broker does when the connection dies."""

    def __init__(self, connection: Any, queue: str) -> None:
        self.connection = connection
        self.queue = queue
        self.channel = connection.channel()
        self.taken = False

    def _declared(self) -> int | None:
        """How many messages a passive ``queue.declare`` says the queue holds; ``None`` when
        the broker has no such queue. On a channel of its own: a 404 closes the channel it
        happens on."""
        probe = self.connection.channel()
        try:
            _, count, _ = probe.queue_declare(queue=self.queue, passive=True)
        except self.connection.channel_errors:
            return None
        finally:
            with suppress(Exception):
                probe.close()
        return int(count or 0)

    def count(self) -> int:
        return self._declared() or 0  # no such queue: nothing was dead-lettered there yet

    def exists(self) -> bool:
        return self._declared() is not None

    def messages(self) -> Iterator[_Message]:
        for _ in range(self.count()):
            raw = self.channel.basic_get(queue=self.queue, no_ack=False)
            if raw is None:
                return
            self.taken = True
            message = self.channel.message_to_python(raw)
            yield _from_kombu(message, message)

    def remove(self, message: _Message) -> None:
        message.token.ack()

    def close(self) -> None:
        errors = (*self.connection.connection_errors, *self.connection.channel_errors)
        if self.taken:
            with suppress(*errors):
                self.hand_back()
        with suppress(*errors):
            self.channel.close()

    def hand_back(self) -> None:
        """Requeue every message taken and not removed, in its place (py-amqp's channel)."""
        send = getattr(self.channel, "send_method", None)
        if send is not None:  # delivery tag 0 with ``multiple``: all that are unacknowledged
            send(spec.Basic.Nack, "Lbb", (0, True, True))


class _ConsumingReader(_BasicGetReader):
    """AMQP, for replay: the same, but the broker streams the messages (``basic_consume``)
    instead of handing them out one round-trip at a time (``basic_get``).

    The prefetch is the number of messages the queue held when reading began (unlimited above
    AMQP's 65535), so the messages left in place unacknowledged (skipped, refused, waiting for a
    confirm) never stop the broker from delivering the rest. If nothing arrives for
    ``IDLE`` seconds and the queue holds no ready message, another consumer took the rest:
    reading ends, as ``basic_get`` finding the queue empty would end it. The consumer is
    cancelled before the rest is handed back, so the broker does not deliver it again here.
    """

    IDLE = 1.0
    consumer: Any = None

    def messages(self) -> Iterator[_Message]:
        count = self.count()
        if not count:
            return
        arrived: deque[Any] = deque()
        self.consumer = Consumer(
            self.channel,
            [Queue(self.queue, no_declare=True)],  # type: ignore[no-untyped-call]
            on_message=arrived.append,
            prefetch_count=count if count <= _MAX_PREFETCH else 0,
        )
        self.consumer.consume()
        self.taken = True
        for _ in range(count):
            while not arrived:
                try:
                    self.connection.drain_events(timeout=self.IDLE)
                except TimeoutError:
                    if not self.count():
                        return
            message = arrived.popleft()
            yield _from_kombu(message, message)

    def hand_back(self) -> None:
        if self.consumer is not None:
            self.consumer.cancel()
        super().hand_back()


class _RedisReader(_Reader):
    """Kombu's Redis transport: the queue is a list (one per priority step), read in place with
    ``LRANGE`` from the consuming end and removed by value with ``LREM``, so a message never
    leaves the list until it is removed for good."""

    PAGE = 200

    def __init__(self, connection: Any, queue: str) -> None:
        self.queue = queue
        self.channel = connection.default_channel
        self.client = self.channel.client
        keys = (self.channel._q_for_pri(queue, step) for step in self.channel.priority_steps)
        self.keys = list(dict.fromkeys(keys))
        self.removed = dict.fromkeys(self.keys, 0)
        # Kombu's prefixing client adds ``global_keyprefix`` to some commands only.
        self.prefixed = getattr(self.client, "PREFIXED_SIMPLE_COMMANDS", None)

    def _key(self, command: str, key: str) -> str:
        if self.prefixed is None or command in self.prefixed:
            return key
        return f"{self.channel.global_keyprefix}{key}"

    def count(self) -> int:
        return sum(int(self.client.llen(self._key("LLEN", key))) for key in self.keys)

    def exists(self) -> bool:
        """A queue is a list (one per priority step), which Redis deletes when it is empty, and
        its bindings, one member ``routing key, pattern, queue`` of a ``_kombu.binding.<exchange>``
        set per exchange it is bound to (a task queue is bound to its exchange; a queue
        published to through the default exchange, as dead-letter queues are, has none). So: a
        queue exists if it holds a message or is bound to an exchange."""
        return bool(self.count()) or self._bound()

    def _bound(self) -> bool:
        prefix = self.channel.global_keyprefix or ""
        tables = f"{prefix}{self.channel.keyprefix_queue % ('',)}"
        wanted = self.queue.encode()
        separator = self.channel.sep.encode()
        for found in self.client.scan_iter(match=f"{_glob_escape(tables)}*", count=1000):
            key = found.decode() if isinstance(found, bytes) else str(found)
            key = key[len(prefix) :]  # SMEMBERS is prefixed again by Kombu's client
            for member in self.client.smembers(self._key("SMEMBERS", key)):
                raw = member if isinstance(member, bytes) else str(member).encode()
                if raw.rsplit(separator, 1)[-1] == wanted:
                    return True
        return False

    def messages(self) -> Iterator[_Message]:
        for key in self.keys:
            total = int(self.client.llen(self._key("LLEN", key)))
            seen = 0
            while seen < total:
                kept = seen - self.removed[key]  # still in the list, at the consuming end
                size = min(self.PAGE, total - seen)
                page = self.client.lrange(self._key("LRANGE", key), -(kept + size), -(kept + 1))
                if not page:
                    break
                for raw in reversed(page):  # the consuming end (the oldest) first
                    seen += 1
                    message = _parse_payload(self.channel, raw, (key, raw))
                    if message is not None:
                        yield message

    def remove(self, message: _Message) -> None:
        key, raw = message.token
        self.removed[key] += int(self.client.lrem(self._key("LREM", key), -1, raw))

    def close(self) -> None:
        """Nothing was taken."""


class _FolderReader(_Reader):
    """Kombu's filesystem transport: one file per message, read in place and deleted (or moved
    to the processed folder, as Kombu does) when removed. A file still being written is
    skipped."""

    def __init__(self, connection: Any, queue: str) -> None:
        self.queue = queue
        self.channel = connection.default_channel
        self.folder = Path(self.channel.data_folder_in)
        self.suffix = f"{queue}.msg"

    def _names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.folder) if n.partition(".")[2] == self.suffix)

    def count(self) -> int:
        return len(self._names())

    def exists(self) -> bool:
        """A queue is its message files and its bindings, which Kombu keeps as one table file
        per exchange (``<exchange>.exchange`` in the control folder; a queue published to
        through the default exchange, as dead-letter queues are, is in none). So: a queue
        exists if it holds a message or is bound to an exchange."""
        return bool(self.count()) or self._bound()

    def _bound(self) -> bool:
        control = Path(self.channel.control_folder)
        try:
            tables = sorted(n for n in os.listdir(control) if n.endswith(".exchange"))
        except FileNotFoundError:
            return False
        for name in tables:
            with suppress(Exception):  # a name Kombu refuses, a table being written
                table = self.channel.get_table(name[: -len(".exchange")])
                if any(binding[2] == self.queue for binding in table):
                    return True
        return False

    def messages(self) -> Iterator[_Message]:
        for name in self._names():
            path = self.folder / name
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue  # taken meanwhile
            message = _parse_payload(self.channel, raw, path)
            if message is not None:
                yield message

    def remove(self, message: _Message) -> None:
        path: Path = message.token
        with suppress(FileNotFoundError):
            if self.channel.store_processed:
                shutil.move(path, self.channel.processed_folder)
            else:
                path.unlink()

    def close(self) -> None:
        """Nothing was taken."""


def _glob_escape(text: str) -> str:
    """``text`` as a Redis ``SCAN MATCH`` pattern that matches it literally."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _parse_payload(channel: Any, raw: bytes | str, token: Any) -> _Message | None:
    """A virtual transport's stored message; ``None`` for one half-written or not Kombu's."""
    try:
        payload = json.loads(raw)
        return _from_kombu(channel.message_to_python(payload), token)
    except Exception:
        return None


def _reader(connection: Any, queue: str, *, stream: bool = False) -> _Reader:
    """The reader of ``queue``; ``stream``: to read it all through (replay), not to look."""
    driver = connection.transport.driver_type
    if driver == "redis":
        return _RedisReader(connection, queue)
    if driver == "filesystem":
        return _FolderReader(connection, queue)
    if stream and driver == "amqp":
        return _ConsumingReader(connection, queue)
    return _BasicGetReader(connection, queue)
