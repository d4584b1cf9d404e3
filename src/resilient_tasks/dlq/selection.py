"""What an operation works on: the app's dead-letter queues, and the dead letters in them that
its filters (task, id, reason, limit) select."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .model import REASONS, DeadLetter, UnknownReason
from .readers import _Reader, _reader
from .registry import recorded_dead_letter_queues

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["dead_letter_queues", "queue_depths", "routed_dead_letter_queues"]

_T = TypeVar("_T")


def dead_letter_queues(app: Celery) -> tuple[str, ...]:
    """Every dead-letter queue of the app: those its tasks and routes imply
    (:func:`routed_dead_letter_queues`), in task-name order, then those its workers have
    published dead letters to (:func:`~resilient_tasks.dlq.registry.recorded_dead_letter_queues`)
    that the broker still has, sorted.

    The recorded ones add the dead-letter queues of queues chosen when a task was sent
    (``apply_async(queue="bulk")``, whose dead letters go to ``bulk.dlq``). A recorded queue
    that no longer exists (deleted; on Redis, also one that is empty) is left out. On a
    transport without a registry (``memory://``, ...) no connection is made.

    Example::

        app = Celery("billing")
        app.conf.task_default_queue = "billing"

        @app.task(base=ResilientTask)
        def sync_invoice(invoice_id): ...

        sync_invoice.apply_async((1,), queue="bulk")  # fails for good on a worker
        dead_letter_queues(app)  # ('billing.dlq', 'bulk.dlq')
    """
    routed = routed_dead_letter_queues(app)
    found = dict.fromkeys(routed)
    recorded = [q for q in recorded_dead_letter_queues(app) if q not in found]
    if recorded:
        with app.connection_for_read() as connection:
            for queue in recorded:
                if _exists(connection, queue):
                    found[queue] = None
    return tuple(found)


def _exists(connection: Any, queue: str) -> bool:
    return _ask(connection, queue, lambda reader: reader.exists())


def queue_depths(app: Celery, queues: Iterable[str]) -> dict[str, int]:
    """How many messages each of ``queues`` holds now (0: none, or no such queue), asked on one
    connection; no other broker read (the registry is not read again).

    Example::

        queue_depths(app, dead_letter_queues(app))  # {'billing.dlq': 3, 'bulk.dlq': 0}
    """
    with app.connection_for_read() as connection:
        return {queue: _ask(connection, queue, lambda reader: reader.count()) for queue in queues}


def _ask(connection: Any, queue: str, question: Callable[[_Reader], _T]) -> _T:
    """``question(reader)`` of ``queue``'s reader, closed after."""
    reader = _reader(connection, queue)
    try:
        return question(reader)
    finally:
        reader.close()


def routed_dead_letter_queues(app: Celery) -> tuple[str, ...]:
    """The dead-letter queues the app's tasks and routes imply, in task-name order; no broker
    is asked.

    For each registered task with ``dead_letter`` true (built on
    :class:`~resilient_tasks.DeadLetterMixin`), the queue its route sends it to (the task's own
    ``queue`` option, else ``task_routes``, else ``task_default_queue``) is put through the
    task's ``dead_letter_queue`` template. Where the route's routing key differs from the queue
    name, the queue named after the routing key is included too (the worker names dead-letter
    queues after the routing key a message arrived with).

    Example::

        app = Celery("billing")
        app.conf.task_default_queue = "billing"

        @app.task(base=ResilientTask)
        def sync_invoice(invoice_id): ...

        routed_dead_letter_queues(app)  # ('billing.dlq',)
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
