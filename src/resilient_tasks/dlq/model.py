"""The dead letter as the tools present it, what they report, and the mistakes they raise.

:class:`DeadLetter` wraps one envelope (the library's own, or one made from a message the
broker dead-lettered: ``broker.py``); :class:`ReplayReport` and :class:`PurgeReport` say what
an operation did; :class:`DeadLetterToolError` and its subclasses name what was asked wrongly.
Nothing here talks to a broker.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

from resilient_tasks.decide import Reason
from resilient_tasks.envelope import (
    DEFAULT_REDACT_PATTERNS,
    REDACTED,
    original_body,
    redact,
    str_or_none,
)
from resilient_tasks.timelimit import redeliveries

__all__ = [
    "BROKER_REASONS",
    "PICKLE_CONTENT_TYPE",
    "REASONS",
    "DeadLetter",
    "DeadLetterNotFound",
    "DeadLetterToolError",
    "NotADeadLetterQueue",
    "PurgeReport",
    "QueueNotFound",
    "ReplayError",
    "ReplayReport",
    "UnknownReason",
]

#: Pickle-serialised messages are replayed only with ``allow_pickle=True``.
PICKLE_CONTENT_TYPE = "application/x-python-serialize"
#: The reasons RabbitMQ gives in ``x-death`` for a message it dead-lettered.
BROKER_REASONS: tuple[str, ...] = ("expired", "rejected", "maxlen", "delivery_limit")
#: Every reason the ``reason`` filter accepts: the envelope schema's (the library's give-up
#: reasons, :data:`resilient_tasks.policy.Reason`, and ``retry_budget_exhausted``, which the
#: schema names for retry budgets) and the broker's.
REASONS: tuple[str, ...] = tuple(
    dict.fromkeys((*get_args(Reason), "retry_budget_exhausted", *BROKER_REASONS))
)
# Message properties an envelope's original message keeps and a replay carries over (besides
# content type, encoding and headers).


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
        return str_or_none(self._task.get("id"))

    @property
    def task_name(self) -> str | None:
        """The task name."""
        return str_or_none(self._task.get("name"))

    @property
    def reason(self) -> str:
        """Why it was dead-lettered (the envelope's ``reason``)."""
        return str(self.envelope.get("reason") or "unknown")

    @property
    def exception_type(self) -> str | None:
        """``module.QualName`` of the final exception; ``None`` when the broker dead-lettered."""
        exception = self.envelope.get("exception")
        return str_or_none(exception.get("type")) if isinstance(exception, Mapping) else None

    @property
    def dead_lettered_at(self) -> str | None:
        """When it was dead-lettered, ISO-8601."""
        return str_or_none(self.envelope.get("dead_lettered_at"))

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
        return str_or_none(self._original.get("content_type"))

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
