"""Dead-letter tools: list, show, replay and purge what failed for good.

:class:`DeadLetters` reads the dead-letter queues of an app: the envelopes
:class:`~resilient_tasks.DeadLetterMixin` publishes, and task messages the broker dead-lettered
itself (RabbitMQ's ``x-death``: expired, rejected, delivery limit), presented in the same shape.
The ``celery dlq`` command (:mod:`resilient_tasks.cli`) is a thin layer over it.

Nothing is lost, whatever happens mid-way:

* **Reading consumes nothing.** ``list`` and ``get`` take messages without acknowledging them
  and put every one back (on RabbitMQ with one ``basic.nack`` with requeue, then the channel is
  closed: the broker requeues them in their places); on Redis and on the filesystem transport
  the messages are read where they lie, so they never leave the queue at all.
* **Replay publishes first, removes second.** Each message is published to its original exchange
  and routing key with publisher confirms (on RabbitMQ, ``mandatory``: a message no queue would
  receive is an error, not a silent drop), and only once the broker has it is the dead letter
  removed. A crash in between leaves the message in both places, never in neither; a crash
  before it leaves it in the dead-letter queue (unacknowledged messages return when the
  connection dies). On RabbitMQ the messages stream in (``basic_consume``) and the publishes
  are pipelined: up to 200 go out before their confirms are awaited together, so a crash may
  leave that many in both places.
* **Only what matches is touched.** Filters (task name, task id, reason, a limit) select; every
  other message stays as it was. Each operation works on the messages the queue held when it
  started, so a replayed task that fails again is not replayed twice in one run.
* **A mistake is an error, never an empty answer.** A named queue that does not exist
  (:class:`QueueNotFound`), an ``id`` that replay or purge finds nowhere
  (:class:`DeadLetterNotFound`) and an unknown ``reason`` (:class:`UnknownReason`) raise, and
  nothing is changed. Replay and purge refuse a queue that holds anything but dead
  letters (:class:`NotADeadLetterQueue`: a live task queue named by mistake): they read every
  queue through first and change nothing if one does, and check each message again as they go.
"""

from __future__ import annotations

import binascii
import builtins
import fnmatch
import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from amqp import spec
from amqp.exceptions import MessageNacked
from kombu.entity import Queue
from kombu.messaging import Consumer, Producer
from kombu.transport.virtual import Channel as VirtualChannel

from .deadletter import PUBLISH_RETRY_POLICY, confirmed_producer
from .envelope import (
    DEFAULT_REDACT_PATTERNS,
    REDACTED,
    SCHEMA,
    body_field,
    is_envelope,
    jsonable,
    original_body,
    redact,
    redact_patterns,
)
from .history import HEADER as HISTORY_HEADER
from .history import History
from .policy import Reason
from .request import REDELIVERIES, redeliveries

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "BROKER_REASONS",
    "PICKLE_CONTENT_TYPE",
    "REASONS",
    "REPLAY_HEADER",
    "DeadLetter",
    "DeadLetterNotFound",
    "DeadLetterToolError",
    "DeadLetters",
    "NotADeadLetterQueue",
    "Outcome",
    "PurgeReport",
    "QueueNotFound",
    "ReplayError",
    "ReplayReport",
    "UnknownReason",
    "dead_letter_queues",
]

#: The header a replayed message carries: how often it has been replayed.
REPLAY_HEADER = "resilient_replays"
#: Pickle-serialised messages are replayed only with ``allow_pickle=True``.
PICKLE_CONTENT_TYPE = "application/x-python-serialize"
#: What the progress callback of :meth:`DeadLetters.replay` is told about each dead letter:
#: ``replayed`` (published and removed), ``would_replay`` (a dry run), ``refused`` (left in
#: place: pickle without ``allow_pickle``, nowhere to send it, or an undecodable body) or
#: ``skipped`` (did not match).
Outcome = Literal["replayed", "would_replay", "refused", "skipped"]
#: The reasons RabbitMQ gives in ``x-death`` for a message it dead-lettered.
BROKER_REASONS: tuple[str, ...] = ("expired", "rejected", "maxlen", "delivery_limit")
#: Every reason the ``reason`` filter accepts: the envelope schema's (the library's give-up
#: reasons, :data:`resilient_tasks.policy.Reason`, and ``retry_budget_exhausted``, which the
#: schema names for retry budgets) and the broker's.
REASONS: tuple[str, ...] = tuple(
    dict.fromkeys((*get_args(Reason), "retry_budget_exhausted", *BROKER_REASONS))
)

# Headers that belong to the first run's timeline or to the broker's bookkeeping, dropped on replay
# (the lost-worker count too: a worker_lost dead letter has spent its max_redeliveries).
_DROPPED_HEADERS = frozenset(
    {HISTORY_HEADER, REDELIVERIES, "eta", "expires", "x-delivery-count", "redelivered"}
)
_DROPPED_HEADER_PREFIXES = ("x-death", "x-first-death", "x-last-death")
# Message properties a replay carries over (besides content type, encoding and headers).
_REPLAYED_PROPERTIES = ("correlation_id", "reply_to", "message_id", "type", "app_id")
_PERSISTENT = 2
# AMQP's prefetch count is a short; 0 is no limit.
_MAX_PREFETCH = 0xFFFF
# Queues a delayed message waits in until it is due, and dies in ("expired") on its way to the
# queue it is meant for: Celery's and Kombu's native delayed delivery. A task message whose last
# death was there is a live task on its way, not a dead letter.
_DELAY_QUEUES = re.compile(r"celery_delayed_\d+")


@dataclass(frozen=True)
class DeadLetter:
    """One message in a dead-letter queue, as an envelope.

    ``envelope`` is the ``resilient_tasks.dead_letter/1`` document the worker published, or,
    for a task message the broker dead-lettered (``from_broker``), one built from it: the reason
    is the broker's (``expired``, ``rejected``, ``maxlen``, ``delivery_limit``), the task's id,
    name and arguments come from the message, its queue, exchange and routing key from the first
    ``x-death`` entry, ``broker`` holds the ``x-death`` entries and ``original`` is the message
    itself.

    ``envelope["original"]`` holds the message exactly, secrets included, because replay
    republishes it; print :meth:`redacted` instead.

    Example::

        >>> letter = DeadLetter("billing.dlq", {
        ...     "schema": "resilient_tasks.dead_letter/1", "reason": "permanent",
        ...     "task": {"id": "f7c9", "name": "billing.sync", "exchange": "",
        ...              "routing_key": "billing"},
        ...     "exception": {"type": "KeyError"}, "attempts": [{"number": 1}],
        ...     "original": {"content_type": "application/json"}})
        >>> letter.id, letter.task_name, letter.reason, letter.attempts, letter.destination
        ('f7c9', 'billing.sync', 'permanent', 1, ('', 'billing'))
    """

    queue: str
    envelope: Mapping[str, Any]
    from_broker: bool = False

    @property
    def _task(self) -> Mapping[str, Any]:
        task = self.envelope.get("task")
        return task if isinstance(task, Mapping) else {}

    @property
    def _original(self) -> Mapping[str, Any]:
        original = self.envelope.get("original")
        return original if isinstance(original, Mapping) else {}

    @property
    def id(self) -> str | None:
        """The task id."""
        return _str_or_none(self._task.get("id"))

    @property
    def task_name(self) -> str | None:
        """The task name."""
        return _str_or_none(self._task.get("name"))

    @property
    def reason(self) -> str:
        """Why it was dead-lettered (the envelope's ``reason``)."""
        return str(self.envelope.get("reason") or "unknown")

    @property
    def exception_type(self) -> str | None:
        """``module.QualName`` of the final exception; ``None`` when the broker dead-lettered."""
        exception = self.envelope.get("exception")
        return _str_or_none(exception.get("type")) if isinstance(exception, Mapping) else None

    @property
    def dead_lettered_at(self) -> str | None:
        """When it was dead-lettered, ISO-8601."""
        return _str_or_none(self.envelope.get("dead_lettered_at"))

    @property
    def attempts(self) -> int:
        """How many attempts ran before it was dead-lettered (dropped ones included)."""
        attempts = self.envelope.get("attempts")
        dropped = self.envelope.get("attempts_dropped")
        return (len(attempts) if isinstance(attempts, list) else 0) + (
            dropped if isinstance(dropped, int) else 0
        )

    @property
    def redeliveries(self) -> int:
        """How often the message had come back after the worker running it was lost (its pool
        process killed) before it was dead-lettered: the original message's
        ``resilient_redeliveries`` header, or RabbitMQ's ``x-delivery-count`` if higher.

        Such a run ends without an attempt being recorded, so the task ran ``attempts +
        redeliveries`` times: a ``worker_lost`` dead letter of a task with
        ``max_redeliveries=3`` has 1 attempt and 3 redeliveries.

        Example::

            >>> DeadLetter("q.dlq", {"reason": "worker_lost", "attempts": [{"number": 1}],
            ...     "original": {"headers": {"resilient_redeliveries": 3}}}).redeliveries
            3
        """
        headers = self._original.get("headers")
        return redeliveries(headers if isinstance(headers, Mapping) else None)

    @property
    def content_type(self) -> str | None:
        """The content type of the original message (``application/json`` for Celery's default)."""
        return _str_or_none(self._original.get("content_type"))

    @property
    def pickled(self) -> bool:
        """Whether the original message is pickle-serialised (replayed only on request)."""
        return self.content_type == PICKLE_CONTENT_TYPE

    @property
    def destination(self) -> tuple[str, str] | None:
        """``(exchange, routing_key)`` the original message was published to; ``None`` if unknown.

        ``""`` is the default exchange, which routes by queue name.
        """
        task = self._task
        routing_key = task.get("routing_key") or task.get("queue")
        if not isinstance(routing_key, str) or not routing_key:
            return None
        exchange = task.get("exchange")
        return (exchange if isinstance(exchange, str) else "", routing_key)

    def redacted(self, patterns: Iterable[str] = DEFAULT_REDACT_PATTERNS) -> dict[str, Any]:
        """A copy of the envelope that is safe to print.

        Keyword arguments whose name matches a pattern are replaced by ``"[REDACTED]"`` at any
        depth: in ``task``, in the original JSON body (which is decoded, redacted and dumped
        again) and in the original headers. ``argsrepr`` and ``kwargsrepr`` are rebuilt from
        the redacted arguments. A body that is not JSON is shown as ``"<N bytes, content type>"``.

        Example::

            >>> letter = DeadLetter("q.dlq", {"task": {"kwargs": {"token": "[REDACTED]"}},
            ...     "original": {"body": '[[1], {"token": "s3cr3t"}, {}]', "body_encoding": "text",
            ...                  "content_type": "application/json",
            ...                  "headers": {"kwargsrepr": "{'token': 's3cr3t'}"}}})
            >>> shown = letter.redacted()
            >>> shown["original"]["body"], shown["original"]["headers"]["kwargsrepr"]
            ('[[1], {"token": "[REDACTED]"}, {}]', "{'token': '[REDACTED]'}")
        """
        patterns = tuple(patterns)
        envelope: dict[str, Any] = json.loads(json.dumps(dict(self.envelope), default=str))
        task = envelope.get("task")
        if isinstance(task, dict):
            for key in ("args", "kwargs"):
                if key in task:
                    task[key] = redact(task[key], patterns)
        original = envelope.get("original")
        if isinstance(original, dict):
            _redact_original(original, patterns)
        return envelope


def _redact_original(original: dict[str, Any], patterns: tuple[str, ...]) -> None:
    content_type = original.get("content_type")
    try:
        body = original_body(original)
    except (binascii.Error, ValueError):
        body = b""
    decoded = _json_body(body, content_type, original.get("content_encoding"))
    reprs = {"argsrepr": REDACTED, "kwargsrepr": REDACTED}
    if decoded is _NOT_JSON:
        original["body"] = f"<{len(body)} bytes, {content_type}>"
        original["body_encoding"] = "omitted"
    else:
        clean = redact(decoded, patterns)
        original["body"] = json.dumps(clean)
        original["body_encoding"] = "text"
        if isinstance(clean, list) and len(clean) == 3 and isinstance(clean[1], dict):
            reprs = {"argsrepr": repr(clean[0]), "kwargsrepr": repr(clean[1])}
    properties = original.get("properties")
    holders = (original, properties if isinstance(properties, dict) else {})
    for holder, key in ((holders[0], "headers"), (holders[1], "application_headers")):
        headers = holder.get(key)
        if isinstance(headers, dict):
            clean_headers = redact(headers, patterns)
            clean_headers.update({k: v for k, v in reprs.items() if k in clean_headers})
            holder[key] = clean_headers


@dataclass(frozen=True)
class ReplayReport:
    """What :meth:`DeadLetters.replay` did.

    ``examined`` messages were looked at; ``matched`` of them matched the filters;
    ``replayed`` were published and removed from the dead-letter queue (in a ``dry_run``: would
    have been; nothing was published or removed); ``refused`` stayed where they were (pickle
    without ``allow_pickle``, no known destination and no ``to_queue``, or an original body
    that cannot be decoded).

    Example::

        >>> report = ReplayReport(examined=5, matched=3, replayed=2, refused=1)
        >>> report.complete
        False
    """

    examined: int = 0
    matched: int = 0
    replayed: int = 0
    refused: int = 0
    dry_run: bool = False

    @property
    def complete(self) -> bool:
        """Whether every matching dead letter was replayed (or would have been)."""
        return self.refused == 0


@dataclass(frozen=True)
class PurgeReport:
    """What :meth:`DeadLetters.purge` did: ``purged`` dead letters were removed for good.

    Example::

        >>> PurgeReport(examined=10, purged=4).purged
        4
    """

    examined: int = 0
    purged: int = 0


class DeadLetterToolError(Exception):
    """What the dead-letter tools raise for a mistake in what they were asked: the base of
    :class:`QueueNotFound`, :class:`DeadLetterNotFound`, :class:`UnknownReason`,
    :class:`NotADeadLetterQueue` and :class:`ReplayError`."""


class QueueNotFound(DeadLetterToolError, LookupError):
    """A queue named explicitly does not exist on the broker (a typo, another vhost or Redis
    database): nothing was read or changed.

    A dead-letter queue the app's task routes imply is never "not found": one that does not
    exist yet is empty (nothing failed there yet). How each broker tells whether a queue
    exists: see :meth:`DeadLetters.exists`.
    """

    def __init__(self, queue: str, known: Iterable[str] = ()) -> None:
        self.queue = queue
        known = tuple(known)
        hint = f" (the app's dead-letter queues: {', '.join(known)})" if known else ""
        super().__init__(f"no queue {queue!r} on the broker{hint}; nothing was read or changed")


class DeadLetterNotFound(DeadLetterToolError, LookupError):
    """:meth:`DeadLetters.replay` or :meth:`DeadLetters.purge` was given an ``id`` that no
    dead letter (with the other filters given) has: nothing was changed."""

    def __init__(self, id: str, queues: Iterable[str], filters: str = "") -> None:
        self.id = id
        self.queues = tuple(queues)
        matching = f" matching {filters}" if filters else ""
        super().__init__(
            f"no dead letter of task {id}{matching} in {', '.join(self.queues)}; "
            "nothing was changed"
        )


class UnknownReason(DeadLetterToolError, ValueError):
    """A ``reason`` filter that is none of :data:`REASONS` (a typo would match nothing)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"unknown reason {reason!r}: expected one of {', '.join(REASONS)}")


class NotADeadLetterQueue(DeadLetterToolError):
    """A queue holds a message that is not a dead letter (neither an envelope nor a task
    message the broker dead-lettered): most likely a live task queue named by mistake.

    :meth:`DeadLetters.replay` and :meth:`DeadLetters.purge` read every queue through before
    they change anything, so normally nothing was replayed or removed (``report`` counts
    nothing). A message that is not a dead letter found later (one that arrived meanwhile)
    stops them there: it and everything after it stay where they are, and ``report`` says what
    was done before. ``queue`` is the queue, ``found`` describes the message.
    """

    def __init__(
        self,
        queue: str,
        found: str,
        report: ReplayReport | PurgeReport | None = None,
    ) -> None:
        self.queue = queue
        self.found = found
        self.report = report
        super().__init__(
            f"{queue} holds {found}, which is not a dead letter: is it a live task queue? "
            "Refusing to replay or purge it"
        )


class ReplayError(DeadLetterToolError):
    """A replay stopped because a message could not be published.

    The dead letter being published stays in its queue, and so does everything not published
    yet; ``report`` says what was replayed, ``letter`` is the one that failed. The cause (a
    nack, an unroutable destination, a lost connection) is ``__cause__``. On RabbitMQ, where
    publishes go out in batches, the others of its batch the broker confirmed are replayed
    (and counted in ``report``); any it did not confirm stay too.

    Example::

        try:
            DeadLetters(app).replay(task="billing.sync_invoice")
        except ReplayError as exc:
            print(f"replayed {exc.report.replayed}, then {exc.letter.id} failed: {exc}")
    """

    def __init__(self, message: str, report: ReplayReport, letter: DeadLetter) -> None:
        super().__init__(message)
        self.report = report
        self.letter = letter


class _Unroutable(Exception):
    pass


# --- which queues ---------------------------------------------------------------------------


def dead_letter_queues(app: Celery) -> tuple[str, ...]:
    """Every dead-letter queue the app's tasks and routes imply, in task-name order.

    For each registered task with ``dead_letter`` true (built on
    :class:`~resilient_tasks.DeadLetterMixin`), the queue its route sends it to (the task's own
    ``queue`` option, else ``task_routes``, else ``task_default_queue``) is put through the
    task's ``dead_letter_queue`` template. Where the route's routing key differs from the queue
    name, the queue named after the routing key is included too (the worker names dead-letter
    queues after the routing key a message arrived with).

    Tasks sent to a queue their route does not name (``apply_async(queue=...)``) are not seen
    here; name those dead-letter queues explicitly.

    Example::

        app = Celery("billing")
        app.conf.task_default_queue = "billing"

        @app.task(base=ResilientTask)
        def sync_invoice(invoice_id): ...

        dead_letter_queues(app)  # ('billing.dlq',)
    """
    found: dict[str, None] = {}
    for name in sorted(app.tasks):
        task = app.tasks[name]
        if not getattr(task, "dead_letter", False) or not callable(
            getattr(task, "dead_letter_queue_for", None)
        ):
            continue
        for source in _source_queues(app, name, getattr(task, "queue", None)):
            found.setdefault(task.dead_letter_queue_for(source), None)
    return tuple(found)


def _source_queues(app: Celery, name: str, own_queue: object) -> list[str]:
    try:
        route = app.amqp.router.route({"queue": own_queue} if own_queue else {}, name)
        queue = route["queue"]
        names = [queue.name, route.get("routing_key") or queue.routing_key]
    except Exception:
        names = []
    names = [n for n in names if isinstance(n, str) and n]
    return list(dict.fromkeys(names)) or [app.conf.task_default_queue]


# --- reading a queue without consuming it ---------------------------------------------------


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


# --- decoding -------------------------------------------------------------------------------

_NOT_JSON = object()


def _json_body(body: bytes, content_type: object, content_encoding: object) -> Any:
    """The decoded JSON body, or ``_NOT_JSON``. Nothing else is ever deserialised here: a
    pickle body is never unpickled."""
    if content_type != "application/json":
        return _NOT_JSON
    try:
        encoding = content_encoding if isinstance(content_encoding, str) else "utf-8"
        return json.loads(body.decode(encoding if encoding not in ("binary", "") else "utf-8"))
    except (ValueError, LookupError):
        return _NOT_JSON


def _letter(queue: str, message: _Message, patterns: tuple[str, ...]) -> DeadLetter | None:
    """``message`` as a dead letter; ``None`` when it is not one.

    A dead letter is an envelope (schema ``resilient_tasks.dead_letter/1``) or a task message
    the broker dead-lettered: a protocol-2 task message whose last ``x-death`` is a failure.
    A task message without ``x-death`` is a live task; so is one whose last death was its
    expiry in a delay queue (it waited there until due, and is on its way to its queue)."""
    decoded = _json_body(message.body, message.content_type, message.content_encoding)
    if is_envelope(decoded):
        return DeadLetter(queue, decoded)
    if _is_task(message) and _last_death(message) is not None:
        return DeadLetter(queue, _broker_envelope(message, decoded, patterns), from_broker=True)
    return None


def _is_task(message: _Message) -> bool:
    return "task" in message.headers and "id" in message.headers  # Celery's protocol 2


def _last_death(message: _Message) -> Mapping[str, Any] | None:
    """The newest ``x-death`` entry of a message the broker dead-lettered for a failure;
    ``None`` for any other message (a delayed message's expiry in a delay queue included)."""
    deaths = message.headers.get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], Mapping):
        return None
    death = deaths[0]
    delayed = death.get("reason") == "expired" and any(
        isinstance(name, str) and _DELAY_QUEUES.fullmatch(name)
        for name in (death.get("queue"), death.get("exchange"))
    )
    return None if delayed else death


def _described(message: _Message) -> str:
    """What a message that is not a dead letter is, for an error that names it."""
    if _is_task(message):
        what = f"a task message {message.headers.get('task')}[{message.headers.get('id')}]"
        return what if "x-death" not in message.headers else f"{what} on its way from a delay"
    return f"a message of {len(message.body)} bytes ({message.content_type or 'no content type'})"


def _broker_envelope(message: _Message, decoded: Any, patterns: tuple[str, ...]) -> dict[str, Any]:
    """An envelope for a task message the broker dead-lettered, from its first ``x-death``."""
    headers = message.headers
    deaths = headers.get("x-death")
    deaths = deaths if isinstance(deaths, list) else []
    death = deaths[0] if deaths and isinstance(deaths[0], Mapping) else {}
    routing_keys = death.get("routing-keys")
    args: Any = []
    kwargs: Any = {}
    if isinstance(decoded, list) and len(decoded) == 3:
        args, kwargs = decoded[0], decoded[1]
    history = History.from_headers(headers)
    properties = {
        key: value
        for key, value in message.properties.items()
        if key in (*_REPLAYED_PROPERTIES, "priority", "delivery_mode")
    }
    reason = str(death.get("reason") or "unknown")
    return {
        "schema": SCHEMA,
        "reason": reason,
        "task": {
            "id": _str_or_none(headers.get("id")),
            "name": _str_or_none(headers.get("task")),
            "args": jsonable(args),
            "kwargs": jsonable(redact(kwargs, patterns)),
            "queue": _str_or_none(death.get("queue")),
            "exchange": _str_or_none(death.get("exchange")) if death else None,
            "routing_key": _str_or_none(routing_keys[0])
            if isinstance(routing_keys, list) and routing_keys
            else None,
            "priority": properties.get("priority"),
        },
        "exception": {
            "type": None,
            "message": f"dead-lettered by the broker ({reason})",
            "traceback": "",
        },
        "attempts": [attempt.as_dict() for attempt in history.attempts],
        "attempts_dropped": history.dropped,
        "first_attempt_at": history.first_attempt_at,
        "dead_lettered_at": _plain(death.get("time")),
        "canvas": {},
        "broker": {"x-death": _plain(deaths)},
        "original": {
            "headers": _plain(headers),
            "properties": _plain(properties),
            **body_field(message.body, message.content_encoding),
            "content_type": message.content_type,
            "content_encoding": message.content_encoding,
        },
    }


def _plain(value: Any) -> Any:
    """``value`` as JSON carries it, exactly (no truncation): times as ISO-8601."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return moment.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


# --- replaying ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outgoing:
    body: bytes
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    content_type: str
    content_encoding: str
    priority: int | None
    delivery_mode: int
    properties: dict[str, Any]


def _outgoing(letter: DeadLetter, to_queue: str | None) -> _Outgoing | None:
    """The message replay publishes for ``letter``; ``None`` when it has nowhere to go or its
    body cannot be decoded."""
    destination = ("", to_queue) if to_queue else letter.destination
    original = letter._original
    try:
        body = original_body(original)
    except (binascii.Error, ValueError):
        return None
    if destination is None:
        return None
    headers = {
        key: value
        for key, value in dict(original.get("headers") or {}).items()
        if key not in _DROPPED_HEADERS and not key.startswith(_DROPPED_HEADER_PREFIXES)
    }
    if "task" in headers or "retries" in headers:  # Celery's protocol 2: the attempt count
        headers["retries"] = 0
    previous = headers.get(REPLAY_HEADER)
    headers[REPLAY_HEADER] = (previous if isinstance(previous, int) else 0) + 1
    properties = original.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    priority = properties.get("priority", letter._task.get("priority"))
    delivery_mode = properties.get("delivery_mode")
    return _Outgoing(
        body=body,
        exchange=destination[0],
        routing_key=destination[1],
        headers=headers,
        content_type=_str_or_none(original.get("content_type")) or "application/data",
        content_encoding=_str_or_none(original.get("content_encoding")) or "binary",
        priority=priority if isinstance(priority, int) else None,
        delivery_mode=delivery_mode if delivery_mode in (1, 2) else _PERSISTENT,
        properties={
            key: properties[key] for key in _REPLAYED_PROPERTIES if properties.get(key) is not None
        },
    )


def _publish_arguments(message: _Outgoing) -> dict[str, Any]:
    """What :meth:`kombu.Producer.publish` is given for ``message``: ``mandatory`` makes an AMQP
    broker return a message no queue would receive (before its confirm)."""
    return {
        "body": message.body,
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "headers": message.headers,
        "delivery_mode": message.delivery_mode,
        "mandatory": True,
        **({"priority": message.priority} if message.priority is not None else {}),
        **message.properties,
    }


def _unroutable(message: _Outgoing, returned: BaseException) -> _Unroutable:
    error = _Unroutable(
        f"the broker returned it: no queue is bound to exchange {message.exchange!r} "
        f"with routing key {message.routing_key!r} ({returned})"
    )
    error.__cause__ = returned
    return error


def _publish(producer: Any, message: _Outgoing) -> None:
    """Publish and wait for the broker's confirm; raise if no queue would receive it."""
    channel = producer.channel
    # Kombu's virtual transports drop a message no binding matches, silently.
    if (
        isinstance(channel, VirtualChannel)
        and message.exchange
        and not channel._lookup(message.exchange, message.routing_key)  # type: ignore[no-untyped-call]
    ):
        raise _Unroutable(
            f"no queue is bound to exchange {message.exchange!r} "
            f"with routing key {message.routing_key!r}"
        )
    returned: list[BaseException] = []

    def on_return(exc: BaseException, *_: Any) -> None:
        returned.append(exc)

    events = getattr(channel, "events", None)
    if events is not None:
        events["basic_return"].add(on_return)
    try:
        producer.publish(
            **_publish_arguments(message), retry=True, retry_policy=dict(PUBLISH_RETRY_POLICY)
        )
    finally:
        if events is not None:
            events["basic_return"].discard(on_return)
    if returned:
        raise _unroutable(message, returned[0])


class _NotReplayed(Exception):
    """The publish of ``letter`` failed (``cause`` says how); it stays in its queue."""

    def __init__(self, letter: DeadLetter, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.letter = letter
        self.cause = cause


class _Publisher(ABC):
    """Replay's publishing: ``publish()`` sends a message and calls ``done`` once the broker has
    it (there and then, or at a later ``publish()`` or ``flush()``); ``flush()`` returns once
    every message sent has been settled. A publish that fails raises :class:`_NotReplayed` for
    it; every other message the broker confirmed meanwhile has had its ``done`` called."""

    @abstractmethod
    def publish(self, letter: DeadLetter, message: _Outgoing, done: Callable[[], None]) -> None:
        """Publish ``message`` (the replay of ``letter``); ``done`` once the broker has it."""

    @abstractmethod
    def flush(self) -> None:
        """Wait until every message published is confirmed or has failed."""


class _OneByOne(_Publisher):
    """Kombu's producer with publisher confirms where the broker has them: each publish waits
    for its own confirm. For Kombu's virtual transports (Redis, filesystem), where a publish is
    complete when it returns."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer

    def publish(self, letter: DeadLetter, message: _Outgoing, done: Callable[[], None]) -> None:
        try:
            _publish(self.producer, message)
        except Exception as exc:
            raise _NotReplayed(letter, exc) from exc
        done()

    def flush(self) -> None:
        """Nothing is in flight."""


@dataclass(eq=False)
class _InFlight:
    letter: DeadLetter
    message: _Outgoing
    done: Callable[[], None]
    #: Why the broker does not have it: returned, nacked, or the channel broke first.
    failure: BaseException | None = None


class _Pipelined(_Publisher):
    """py-amqp: a channel in confirm mode, published to without waiting; the confirms of up to
    ``BATCH`` messages are then awaited together.

    The broker numbers the publishes of a confirm-mode channel 1, 2, ... and acks or nacks each
    (``multiple``: every one up to that number); an unroutable ``mandatory`` message comes back
    (``basic.return``) before its ack. A message counts as published once acked and not
    returned; a nack, a return, or a channel or connection that breaks before the confirm
    leaves it in its queue.

    Publishing to an exchange that does not exist would close the channel, and the confirms of
    every message in flight would be lost with it: each exchange is looked up once, first.
    """

    BATCH = 200
    #: Seconds without a frame from the broker before the batch counts as unconfirmed.
    CONFIRM_TIMEOUT = 30.0

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        channel = connection.channel()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        self.producer = Producer(channel)  # type: ignore[no-untyped-call]
        self.sent = 0  # the number the broker gives the next publish, less one
        self.batch: dict[int, _InFlight] = {}  # the unsettled ones, by number
        self.unconfirmed: dict[int, _InFlight] = {}
        self.exchanges = {""}  # the default exchange is always there

    def publish(self, letter: DeadLetter, message: _Outgoing, done: Callable[[], None]) -> None:
        if message.exchange not in self.exchanges:
            self._look_up(letter, message.exchange)
        self.sent += 1
        self.batch[self.sent] = self.unconfirmed[self.sent] = _InFlight(letter, message, done)
        try:
            self.producer.publish(**_publish_arguments(message))  # type: ignore[no-untyped-call]
        except Exception as exc:
            self._settle(exc)  # raises: this one, at least, the broker has not
        if len(self.batch) >= self.BATCH:
            self.flush()

    def _look_up(self, letter: DeadLetter, exchange: str) -> None:
        probe = self.connection.channel()  # a 404 closes the channel it happens on
        try:
            probe.exchange_declare(exchange, "direct", passive=True)
        except self.connection.channel_errors as exc:
            self.flush()  # what was published before it stands
            raise _NotReplayed(letter, exc) from exc
        finally:
            with suppress(Exception):
                probe.close()
        self.exchanges.add(exchange)

    def flush(self) -> None:
        try:
            while self.unconfirmed:  # a broker that stops answering fails the batch
                self.connection.drain_events(timeout=self.CONFIRM_TIMEOUT)
        except Exception as exc:  # the channel or the connection broke
            self._settle(exc)  # raises: some were never confirmed
        self._settle(None)

    def _settle(self, broken: BaseException | None) -> None:
        """Call ``done`` for every message the broker has, in order; then raise for the first
        one it has not. ``broken``: why the unconfirmed ones never will be."""
        for flight in self.unconfirmed.values():
            flight.failure = flight.failure or broken
        batch, self.batch, self.unconfirmed = self.batch, {}, {}
        failed = [(f.letter, cause) for f in batch.values() if (cause := f.failure) is not None]
        for flight in batch.values():
            if flight.failure is None:
                flight.done()
        if failed:
            letter, cause = failed[0]
            raise _NotReplayed(letter, cause) from cause

    def _confirmed(self, number: int, multiple: bool) -> list[_InFlight]:
        numbers = [n for n in self.unconfirmed if n <= number] if multiple else [number]
        return [self.unconfirmed.pop(n) for n in numbers if n in self.unconfirmed]

    def _on_ack(self, number: int, multiple: bool) -> None:
        self._confirmed(number, multiple)

    def _on_nack(self, number: int, multiple: bool) -> None:
        for flight in self._confirmed(number, multiple):
            flight.failure = flight.failure or MessageNacked("the broker nacked the publish")

    def _on_return(self, exc: BaseException, exchange: str, routing_key: str, raw: Any) -> None:
        # Which publish it was is told by its contents alone: every unconfirmed one it could be
        # stays in its queue (identical messages to one destination route alike anyway).
        body = raw.body
        if isinstance(body, str):  # py-amqp decodes a body with its content encoding
            body = body.encode(raw.properties.get("content_encoding") or "utf-8")
        returned = (exchange, routing_key, body)
        for flight in self.unconfirmed.values():
            message = flight.message
            if (message.exchange, message.routing_key, message.body) == returned:
                flight.failure = _unroutable(message, exc)


# --- the API --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Filter:
    task: str | None = None
    id: str | None = None
    reason: str | None = None

    def __call__(self, letter: DeadLetter) -> bool:
        return (
            (self.task is None or fnmatch.fnmatchcase(letter.task_name or "", self.task))
            and (self.id is None or letter.id == self.id)
            and (self.reason is None or letter.reason == self.reason)
        )


def _identity(letter: DeadLetter) -> tuple[Any, ...]:
    """What tells one dead letter from another from one read of its queue to the next: the
    envelope itself, or, for one the broker dead-lettered (whose envelope is made from the
    message, headers and all, and a quorum queue's ``x-delivery-count`` rises with every read),
    its death and its body."""
    envelope = letter.envelope
    if not letter.from_broker:
        return (letter.queue, envelope)
    original = envelope.get("original") or {}
    return (
        letter.queue,
        letter.id,
        envelope.get("dead_lettered_at"),
        original.get("body"),
    )


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None (no limit), not {limit!r}")


def _check_reason(reason: str | None) -> None:
    if reason is not None and reason not in REASONS:
        raise UnknownReason(reason)


def _filters_text(task: str | None, reason: str | None) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (("task", task), ("reason", reason)) if v is not None)


class _Stranger(Exception):
    """A message that is not a dead letter, met in ``queue`` while changing things."""

    def __init__(self, queue: str, found: str) -> None:
        super().__init__(found)
        self.queue = queue
        self.found = found


class DeadLetters:
    """The dead-letter queues of ``app``: list, get, replay and purge what is in them.

    ``queues`` names the dead-letter queues; ``None`` (the default) means every one the app's
    tasks and routes imply (:func:`dead_letter_queues`), and ``ValueError`` if there is none.

    The filters every operation takes: ``task`` is a task name, or a shell-style pattern of
    one (``"billing.*"``); ``id`` a task id; ``reason`` the envelope's reason, one of
    :data:`REASONS` (``permanent``, ``retries_exhausted``, ..., or the broker's: ``expired``,
    ``rejected``, ``maxlen``, ``delivery_limit``; any other raises :class:`UnknownReason`);
    ``limit`` the most dead letters to act on (``None``: all). ``None`` filters nothing.

    Every operation raises :class:`QueueNotFound` for a named queue the broker does not have
    (one the app's routes imply is empty until something fails there). :meth:`replay` and
    :meth:`purge` raise :class:`DeadLetterNotFound` for an ``id`` that matches nothing and
    :class:`NotADeadLetterQueue` for a queue that holds anything but dead letters, and then
    change nothing.

    Example::

        from resilient_tasks.dlq import DeadLetters

        letters = DeadLetters(app)                    # every dead-letter queue of the app
        for letter in letters.list(task="billing.sync_invoice", limit=20):
            print(letter.id, letter.reason, letter.exception_type, letter.attempts)

        letters.get("f7c9...")                        # one, or None
        letters.replay(reason="retries_exhausted", dry_run=True)
        report = letters.replay(reason="retries_exhausted")
        print(report.replayed, "replayed,", report.refused, "refused")
        letters.purge(task="reports.legacy_export")
    """

    def __init__(self, app: Celery, queues: Iterable[str] | str | None = None) -> None:
        self.app = app
        if isinstance(queues, str):
            queues = (queues,)
        implied = dead_letter_queues(app)
        self.queues: tuple[str, ...] = implied if queues is None else tuple(dict.fromkeys(queues))
        if not self.queues:
            raise ValueError(
                "no dead-letter queues: the app has no task with dead_letter=True "
                "(is the module that defines them imported?); name the queues explicitly"
            )
        #: The dead-letter queues the app's tasks and routes imply: never "not found".
        self.implied: tuple[str, ...] = implied
        #: The redaction patterns :meth:`DeadLetter.redacted` should be given for this app.
        self.redact_patterns: tuple[str, ...] = redact_patterns(app)

    def exists(self, queue: str) -> bool:
        """Whether the broker has ``queue``, or the app's routes imply it as a dead-letter queue.

        * RabbitMQ (any AMQP transport): a passive ``queue.declare`` (on a channel of its own,
          since a failed one closes its channel). A declared queue exists until it is deleted,
          empty or not.
        * Redis: Kombu keeps a queue as a list, which Redis deletes once it is empty, and its
          bindings in the ``_kombu.binding.<exchange>`` sets. A queue exists if its list holds a
          message or it is bound to an exchange (a Celery task queue is bound to its exchange
          as soon as anything declares it).
        * filesystem: the same, with the message files and the exchange tables Kombu keeps in
          the control folder.

        A dead-letter queue is published to through the default exchange, which binds nothing:
        on Redis and the filesystem transport one that is empty leaves no trace. So every
        dead-letter queue the app's tasks and routes imply (:attr:`implied`) counts as existing,
        empty until something fails there; name another one only while it holds something.

        Example::

            DeadLetters(app, ["billing.dlq"]).exists("billing.dql")  # False: a typo
        """
        if queue in self.implied:
            return True
        with self._reading(queue) as reader:
            return reader.exists()

    def _check_queues(self) -> None:
        for queue in self.queues:
            if not self.exists(queue):
                raise QueueNotFound(queue, self.implied)

    def count(self) -> int:
        """How many messages the queues hold now (dead letters or not).

        Example::

            DeadLetters(app, ["billing.dlq"]).count()  # 3
        """
        self._check_queues()
        total = 0
        for queue in self.queues:
            with self._reading(queue) as reader:
                total += reader.count()
        return total

    def check(self) -> int:
        """Make sure every queue exists and holds nothing but dead letters; return how many
        dead letters they hold. Consumes nothing.

        Raises :class:`QueueNotFound` or :class:`NotADeadLetterQueue` (at the first message
        that is not a dead letter; the rest is not read).

        Example::

            DeadLetters(app, ["billing"]).check()  # NotADeadLetterQueue: a live task queue
        """
        self._check_queues()
        return self._survey(lambda letter: True)

    def _survey(self, match: Callable[[DeadLetter], bool]) -> int:
        """Read every queue through (nothing is taken); raise :class:`NotADeadLetterQueue` at
        the first message that is not a dead letter; return how many match."""
        matched = 0
        for queue in self.queues:
            with self._reading(queue, stream=True) as reader:
                for message, letter in self._messages(queue, reader):
                    if letter is None:
                        raise NotADeadLetterQueue(queue, _described(message))
                    matched += bool(match(letter))
        return matched

    @contextmanager
    def _reading(self, queue: str, *, stream: bool = False) -> Iterator[_Reader]:
        with self.app.connection_for_read() as connection:
            reader = _reader(connection, queue, stream=stream)
            try:
                yield reader
            finally:
                reader.close()

    def _messages(
        self, queue: str, reader: _Reader
    ) -> Iterator[tuple[_Message, DeadLetter | None]]:
        """Every message of the queue, with its dead letter (``None``: it is not one)."""
        for message in reader.messages():
            yield message, _letter(queue, message, self.redact_patterns)

    def _walk(self) -> Generator[tuple[_Reader, _Message, DeadLetter | None], None, None]:
        for queue in self.queues:
            with self._reading(queue) as reader:
                for message, letter in self._messages(queue, reader):
                    yield reader, message, letter

    def list(
        self,
        *,
        task: str | None = None,
        id: str | None = None,
        reason: str | None = None,
        limit: int | None = None,
        others: Callable[[str, str], None] | None = None,
    ) -> builtins.list[DeadLetter]:
        """The dead letters that match, oldest first, queue by queue. Consumes nothing.

        A message that is not a dead letter is left where it is and not listed; ``others``, if
        given, is called with its queue and a description of it (a queue full of them is a
        live task queue, named by mistake). No match is an empty list, an unknown ``id``
        included (:meth:`replay` and :meth:`purge` raise for that).

        Example::

            for letter in DeadLetters(app).list(reason="permanent", limit=10):
                print(letter.id, letter.task_name, letter.exception_type)
        """
        _check_limit(limit)
        _check_reason(reason)
        self._check_queues()
        match = _Filter(task, id, reason)
        found: builtins.list[DeadLetter] = []
        with closing(self._walk()) as walk:
            for reader, message, letter in walk:
                if letter is None:
                    if others is not None:
                        others(reader.queue, _described(message))
                    continue
                if match(letter):
                    found.append(letter)
                    if limit is not None and len(found) >= limit:
                        break
        return found

    def get(self, id: str) -> DeadLetter | None:
        """The dead letter of task ``id`` (the oldest, if there are several), or ``None``.

        Consumes nothing.

        Example::

            letter = DeadLetters(app).get("f7c9e2d0-...")
            if letter is not None:
                print(letter.redacted(DeadLetters(app).redact_patterns))
        """
        found = self.list(id=id, limit=1)
        return found[0] if found else None

    def replay(
        self,
        *,
        task: str | None = None,
        id: str | None = None,
        reason: str | None = None,
        limit: int | None = None,
        dry_run: bool = False,
        to_queue: str | None = None,
        allow_pickle: bool = False,
        progress: Callable[[DeadLetter, Outcome], None] | None = None,
    ) -> ReplayReport:
        """Republish the matching dead letters, then remove them from their queue.

        Each original message is published as it was (body, content type and encoding,
        headers, priority, persistence) to its original exchange and routing key, or with
        ``to_queue`` to that queue (through the default exchange), with these changes:

        * the attempt count starts again: Celery's ``retries`` header is 0 and the attempt
          history (``resilient_history``) is removed;
        * ``eta`` and ``expires`` are removed: they belong to the first run's timeline, and a
          replay runs now (a task that expired before it ran would otherwise be revoked again);
        * the broker's ``x-death``, ``x-first-death-*`` and ``x-last-death-*`` headers are
          removed;
        * ``resilient_replays`` counts the replays: the previous value plus one.

        The dead letter is removed only once the broker has confirmed the publish. A
        destination no queue is bound to is an error (:class:`ReplayError`): the message stays.
        On RabbitMQ up to 200 publishes go out before their confirms are awaited together, so
        ``progress`` hears of replayed dead letters a batch at a time.

        Before anything is published, every queue is read through: a queue that does not exist
        (:class:`QueueNotFound`), one that holds a message that is not a dead letter
        (:class:`NotADeadLetterQueue`) or an ``id`` that matches nothing
        (:class:`DeadLetterNotFound`) raises, and nothing is replayed. A message that is not a
        dead letter found while replaying (it arrived meanwhile) stops the replay there.

        ``dry_run``: publish nothing, remove nothing; the report counts what would be replayed.
        ``allow_pickle``: pickle-serialised messages are refused (left in place, counted in
        ``refused``) unless this is true, since unpickling runs code chosen by whoever could
        write to the queue. ``progress`` is called for every dead letter examined, with its
        :data:`Outcome`.

        Example::

            report = DeadLetters(app).replay(task="billing.*", reason="retries_exhausted")
            print(f"{report.replayed} replayed, {report.refused} refused")
        """
        _check_limit(limit)
        _check_reason(reason)
        if to_queue is not None and to_queue in self.queues:
            raise ValueError(f"to_queue {to_queue!r} is one of the dead-letter queues replayed")
        match = _Filter(task, id, reason)
        self._check_queues()
        if not self._survey(match) and id is not None:
            raise DeadLetterNotFound(id, self.queues, _filters_text(task, reason))
        counts = dict.fromkeys(("examined", "matched", "replayed", "refused"), 0)

        def report() -> ReplayReport:
            return ReplayReport(**counts, dry_run=dry_run)

        def tell(letter: DeadLetter, outcome: Outcome) -> None:
            if progress is not None:
                progress(letter, outcome)

        def limited() -> bool:
            return limit is not None and counts["matched"] >= limit

        def replayed(reader: _Reader, message: _Message, letter: DeadLetter) -> Callable[[], None]:
            def done() -> None:  # the broker has it: the dead letter goes
                reader.remove(message)
                counts["replayed"] += 1
                tell(letter, "replayed")

            return done

        try:
            with self._publisher(dry_run) as publisher:
                for queue in self.queues:
                    if limited():
                        break
                    with self._reading(queue, stream=True) as reader:
                        for message, letter in self._messages(queue, reader):
                            if letter is None:  # arrived since the survey: stop, touch nothing
                                if publisher is not None:
                                    publisher.flush()  # what is in flight are dead letters
                                raise _Stranger(queue, _described(message))
                            counts["examined"] += 1
                            if not match(letter):
                                tell(letter, "skipped")
                                continue
                            counts["matched"] += 1
                            outgoing = _outgoing(letter, to_queue)
                            if outgoing is None or (letter.pickled and not allow_pickle):
                                counts["refused"] += 1
                                tell(letter, "refused")
                            elif publisher is None:
                                counts["replayed"] += 1
                                tell(letter, "would_replay")
                            else:
                                publisher.publish(
                                    letter, outgoing, replayed(reader, message, letter)
                                )
                            if limited():
                                break
                        if publisher is not None:
                            publisher.flush()  # while the reader can still remove them
        except _NotReplayed as failure:
            letter = failure.letter
            raise ReplayError(
                f"could not replay {letter.task_name}[{letter.id}] from {letter.queue}: {failure}",
                report(),
                letter,
            ) from failure.cause
        except _Stranger as stranger:
            raise NotADeadLetterQueue(stranger.queue, stranger.found, report()) from None
        return report()

    @contextmanager
    def _publisher(self, dry_run: bool) -> Iterator[_Publisher | None]:
        """Nothing for a dry run; on py-amqp, a connection of its own publishing in batches
        (confirms are then the replay's own, whatever ``broker_transport_options`` say);
        elsewhere the shared confirmed producer, one publish at a time."""
        if dry_run:
            yield None
            return
        with self.app.connection_for_write(transport_options={"confirm_publish": False}) as conn:
            if conn.transport.driver_name == "py-amqp":
                yield _Pipelined(conn)
                return
        with confirmed_producer(self.app) as producer:
            yield _OneByOne(producer)

    def purge(
        self,
        *,
        task: str | None = None,
        id: str | None = None,
        reason: str | None = None,
        limit: int | None = None,
        only: Iterable[DeadLetter] | None = None,
    ) -> PurgeReport:
        """Remove the matching dead letters for good; every other message stays.

        With no filter at all, every dead letter in the queues is removed. ``only`` removes
        exactly those dead letters (as :meth:`list` returned them, each once) that are still
        there, and nothing that arrived since: what to purge after asking someone about a list.

        Before anything is removed, every queue is read through: a queue that does not exist
        (:class:`QueueNotFound`), one that holds a message that is not a dead letter
        (:class:`NotADeadLetterQueue`: a live task queue named by mistake) or an ``id`` that
        matches nothing (:class:`DeadLetterNotFound`) raises, and nothing is removed. A message
        that is not a dead letter found while purging (it arrived meanwhile) stops the purge
        there; it is never removed.

        Example::

            report = DeadLetters(app).purge(task="reports.legacy_export")
            print(report.purged, "removed")

            shown = DeadLetters(app).list(reason="permanent")
            if input(f"remove {len(shown)}? ") == "y":
                DeadLetters(app).purge(only=shown)
        """
        _check_limit(limit)
        _check_reason(reason)
        match = _Filter(task, id, reason)
        wanted = None if only is None else [_identity(letter) for letter in only]
        self._check_queues()
        if not self._survey(match) and id is not None:
            raise DeadLetterNotFound(id, self.queues, _filters_text(task, reason))
        examined = purged = 0
        with closing(self._walk()) as walk:
            for reader, message, letter in walk:
                if wanted is not None and not wanted:
                    break
                if letter is None:  # arrived since the survey: stop, touch nothing
                    report = PurgeReport(examined=examined, purged=purged)
                    raise NotADeadLetterQueue(reader.queue, _described(message), report)
                examined += 1
                if not match(letter):
                    continue
                if wanted is not None:
                    key = _identity(letter)
                    if key not in wanted:
                        continue
                    wanted.remove(key)
                reader.remove(message)
                purged += 1
                if limit is not None and purged >= limit:
                    break
        return PurgeReport(examined=examined, purged=purged)
