"""RabbitMQ's own dead-lettering, pointed at the same dead-letter queues as the library's.

Some messages never reach a worker's ``on_failure``: a message whose TTL expired in the queue,
one rejected without requeue, one redelivered more often than a quorum queue's
``x-delivery-limit``. RabbitMQ dead-letters those itself when the queue was declared with
``x-dead-letter-exchange``. :func:`with_dead_lettering` declares your task queues that way, with
the dead-letter queue the library uses for the same queue (``{queue}.dlq`` by default), so one
queue holds every failure, envelopes and broker-dead-lettered messages (with their ``x-death``
header) alike, and the ``celery dlq`` tools read both.

RabbitMQ drops a message it dead-letters to a queue that does not exist, so declare the
dead-letter queues before the first message can expire: :func:`declare_dead_letter_queues` does,
idempotently (call it at deploy time or from a ``worker_init`` handler).

Example::

    from kombu import Queue
    from resilient_tasks.rabbitmq import declare_dead_letter_queues, with_dead_lettering

    app.conf.task_queues = with_dead_lettering(
        [Queue("billing"), Queue("emails")], queue_type="quorum", delivery_limit=5
    )
    declare_dead_letter_queues(app)  # billing.dlq and emails.dlq, quorum and durable
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from kombu.entity import Queue

from .deadletter import dead_letter_queue_name
from .exceptions import ConfigurationError
from .publish import QUEUE_TYPE, dead_letter_queue_for

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["declare_dead_letter_queues", "with_dead_lettering"]

DLX = "x-dead-letter-exchange"
DLX_ROUTING_KEY = "x-dead-letter-routing-key"
DELIVERY_LIMIT = "x-delivery-limit"


def with_dead_lettering(
    queues: Iterable[Queue],
    *,
    template: str = "{queue}.dlq",
    queue_type: Literal["classic", "quorum"] | None = None,
    delivery_limit: int | None = None,
) -> list[Queue]:
    """Copies of ``queues`` that RabbitMQ dead-letters into ``template.format(queue=name)``.

    Arguments:
        queues: kombu ``Queue`` objects, as for Celery's ``task_queues``.
        template: the dead-letter queue's name; only ``{queue}`` may appear (RabbitMQ routes
            per queue, not per task). Use the same template as the tasks'
            ``dead_letter_queue`` so both kinds of failure land together.
        queue_type: ``"quorum"`` or ``"classic"`` for every queue (and its dead-letter queue);
            ``None`` keeps each queue's own ``x-queue-type`` argument, if any.
        delivery_limit: quorum queues only: dead-letter a message after it has been delivered
            this many times (poison messages that kill their worker). ``None``: no limit.

    Example::

        >>> from kombu import Queue
        >>> (billing,) = with_dead_lettering([Queue("billing")], queue_type="quorum",
        ...                                  delivery_limit=5)
        >>> sorted(billing.queue_arguments.items())  # doctest: +NORMALIZE_WHITESPACE
        [('x-dead-letter-exchange', ''), ('x-dead-letter-routing-key', 'billing.dlq'),
         ('x-delivery-limit', 5), ('x-queue-type', 'quorum')]
    """
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if fields - {"queue"}:
        raise ConfigurationError(
            f"with_dead_lettering: template={template!r} may only use {{queue}}: RabbitMQ "
            "dead-letters per queue, not per task"
        )
    if queue_type not in (None, "classic", "quorum"):
        raise ConfigurationError(
            f"with_dead_lettering: queue_type must be 'classic', 'quorum' or None; got "
            f"{queue_type!r}"
        )
    if delivery_limit is not None and (
        isinstance(delivery_limit, bool)
        or not isinstance(delivery_limit, int)
        or delivery_limit < 1
    ):
        raise ConfigurationError(
            f"with_dead_lettering: delivery_limit must be a whole number >= 1 or None; got "
            f"{delivery_limit!r}"
        )
    result = []
    for queue in queues:
        arguments: dict[str, Any] = dict(_arguments(queue))
        arguments[DLX] = ""
        arguments[DLX_ROUTING_KEY] = dead_letter_queue_name(template, queue=queue.name, task="")
        if queue_type is not None:
            arguments[QUEUE_TYPE] = queue_type
        if delivery_limit is not None:
            if arguments.get(QUEUE_TYPE) != "quorum":
                raise ConfigurationError(
                    f"with_dead_lettering: delivery_limit needs a quorum queue; queue "
                    f"{queue.name!r} is not one (pass queue_type='quorum')"
                )
            arguments[DELIVERY_LIMIT] = delivery_limit
        result.append(
            Queue(  # type: ignore[no-untyped-call]
                queue.name,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                durable=True,
                queue_arguments=arguments,
                consumer_arguments=getattr(queue, "consumer_arguments", None),
            )
        )
    return result


def declare_dead_letter_queues(app: Celery) -> list[str]:
    """Declare the dead-letter queue of every task queue that has ``x-dead-letter-routing-key``.

    Idempotent; returns the names declared.

    Example::

        @worker_init.connect
        def _declare(sender, **_):
            declare_dead_letter_queues(sender.app)
    """
    declared = []
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for source in app.amqp.queues.values():
            name = _arguments(source).get(DLX_ROUTING_KEY)
            if name:
                dead_letter_queue_for(name, source).bind(channel).declare()  # type: ignore[no-untyped-call]
                declared.append(name)
    return declared


def _arguments(queue: Queue) -> Mapping[str, Any]:
    return getattr(queue, "queue_arguments", None) or {}
