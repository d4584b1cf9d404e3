"""All the library's broker I/O for publishing: confirming producers, dead letters, and the
task messages the worker's main process publishes (retries, redeliveries).

Every publish goes through :func:`confirmed_producer`: a Kombu producer pool per app and
process with publisher confirms on RabbitMQ, which survives the worker forking its pool
children. A publish returns once the broker has the message, or raises.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

from amqp.exceptions import PreconditionFailed
from celery import Celery, Signature
from kombu.connection import ConnectionPool
from kombu.entity import Queue
from kombu.messaging import Producer
from kombu.pools import ProducerPool

__all__ = [
    "HEADER_REASON",
    "HEADER_TASK",
    "PUBLISH_RETRY_POLICY",
    "QUEUE_TYPE",
    "confirmed_producer",
    "dead_letter_queue_for",
    "publish_envelope",
    "publish_signature",
]

logger = logging.getLogger(__name__)

#: Kombu's retry policy for the dead-letter publish: about 3 s of reconnecting at the most.
PUBLISH_RETRY_POLICY: Mapping[str, Any] = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1.0,
}
#: Message headers on a published envelope, for tools that filter without decoding.
HEADER_REASON = "resilient_reason"
HEADER_TASK = "resilient_task"
QUEUE_TYPE = "x-queue-type"


def dead_letter_queue_for(name: str, source: Queue | None) -> Queue:
    """How the dead-letter queue ``name`` of the queue ``source`` is declared: durable, and of
    the same ``x-queue-type`` as its source, so that the library's publish,
    :func:`resilient_tasks.rabbitmq.declare_dead_letter_queues` and RabbitMQ's own
    dead-lettering all agree.

    Example::

        >>> from kombu import Queue
        >>> billing = Queue("billing", queue_arguments={"x-queue-type": "quorum"})
        >>> dlq = dead_letter_queue_for("billing.dlq", billing)
        >>> dlq.durable, dlq.queue_arguments
        (True, {'x-queue-type': 'quorum'})
    """
    source_arguments: Mapping[str, Any] = getattr(source, "queue_arguments", None) or {}
    arguments = {QUEUE_TYPE: source_arguments[QUEUE_TYPE]} if QUEUE_TYPE in source_arguments else {}
    return Queue(name, exchange="", routing_key=name, durable=True, queue_arguments=arguments)  # type: ignore[no-untyped-call]


class _ConnectionPool(ConnectionPool):
    # Kombu's pools close their connections in every process billiard forks, which is right
    # for a child that inherited them, but closing a py-amqp connection shuts its socket down
    # (``shutdown(SHUT_RDWR)``), and the socket is the parent's too: each pool child the worker
    # starts (a replacement for one that died, or ``max_tasks_per_child``) would cut the main
    # process's connection under a publish in flight, which Kombu's retry then publishes again
    # (a second dead letter). A child never uses these pools (see ``_write_pool``): it leaves
    # them alone.
    close_after_fork = False


class _ProducerPool(ProducerPool):
    close_after_fork = False


# The confirming producer pool per app, made once per process (Celery builds a new Connection
# object, URL parsing and transport lookup included, on every connection_for_write).
_write_pools: weakref.WeakKeyDictionary[Celery, tuple[int, ProducerPool]] = (
    weakref.WeakKeyDictionary()
)


def _write_pool(app: Celery) -> ProducerPool:
    cached = _write_pools.get(app)
    if cached is None or cached[0] != os.getpid():  # none yet, or the parent's: make our own
        connection = app.connection_for_write(transport_options={"confirm_publish": True})
        limit = app.conf.broker_pool_limit
        connections = _ConnectionPool(connection, limit=limit)  # type: ignore[no-untyped-call]
        pool = _ProducerPool(connections, limit=limit)  # type: ignore[no-untyped-call]
        _write_pools[app] = cached = (os.getpid(), pool)
    return cached[1]


@contextmanager
def confirmed_producer(app: Celery) -> Iterator[Producer]:
    """A producer from a Kombu producer pool on the app's broker, with publisher confirms on
    RabbitMQ.

    One pool (and so one set of connections, at most ``broker_pool_limit``) per app and
    process, shared by every dead-letter, retry and replay publish of the process. Unlike
    Kombu's global pools it survives the worker forking pool children (see ``_ConnectionPool``).

    Example::

        with confirmed_producer(app) as producer:
            producer.publish({"hello": "world"}, routing_key="audit", declare=[Queue("audit")])
    """
    with _write_pool(app).acquire(block=True, timeout=10) as producer:  # type: ignore[no-untyped-call]
        try:
            yield producer
        except BaseException:
            # A publish cut short may leave its channel mid-conversation (closed by the broker,
            # a confirm still to come): reconnect rather than hand it to the pool's next user.
            with suppress(Exception):
                producer.connection.close()
            raise


def publish_envelope(
    app: Celery, queue: str, envelope: Mapping[str, Any], source: str | None = None
) -> None:
    """Publish ``envelope`` persistent to the durable ``queue``; raise if the broker hasn't it.

    ``source`` is the queue the failed message came from: the dead-letter queue is declared as
    :func:`dead_letter_queue_for` declares it (same queue type). On
    RabbitMQ the publish waits for the broker's confirm: a nack raises. Connection errors are
    retried by Kombu's retry policy (:data:`PUBLISH_RETRY_POLICY`), then raise.
    """
    declared = app.amqp.queues.get(queue) or dead_letter_queue_for(
        queue, app.amqp.queues.get(source) if source else None
    )
    try:
        _publish(app, queue, envelope, declare=[declared])
    except PreconditionFailed:
        # The queue exists with other arguments (declared by hand, a policy, another version
        # of this app): it is there, so publish to it as it is rather than fail every time.
        logger.warning(
            "resilient_tasks: dead-letter queue %r exists with other arguments than %r; "
            "publishing to it as it is",
            queue,
            getattr(declared, "queue_arguments", None),
        )
        _publish(app, queue, envelope, declare=[])


def _publish(app: Celery, queue: str, envelope: Mapping[str, Any], declare: list[Any]) -> None:
    with confirmed_producer(app) as producer:
        producer.publish(  # type: ignore[no-untyped-call]
            dict(envelope),
            exchange="",
            routing_key=queue,
            serializer="json",
            delivery_mode=2,
            declare=declare,
            headers={
                HEADER_REASON: envelope.get("reason"),
                HEADER_TASK: envelope.get("task", {}).get("name"),
            },
            retry=True,
            retry_policy=dict(PUBLISH_RETRY_POLICY),
        )


def publish_signature(app: Celery, signature: Signature) -> None:
    """Publish the task message ``signature`` describes (a retry, a redelivery) with publisher
    confirms; raise if the broker did not take it."""
    with confirmed_producer(app) as producer:
        signature.apply_async(producer=producer)
