"""Where dead-lettering happens: :class:`DeadLetterMixin` forwards every terminal failure, as an
envelope (:mod:`resilient_tasks.envelope`), to a dead-letter queue on the same broker.

The forwarding runs in the worker's main process, in the task's ``Request.on_failure``
(:mod:`resilient_tasks.request`), where the message exactly as the broker delivered it is at
hand, and *before* Celery acknowledges it:

1. the envelope is published persistent to the dead-letter queue (declared durable), through
   Kombu's producer pool with publisher confirms on RabbitMQ, retried by Kombu's retry policy on
   connection errors;
2. only then does Celery go on: it records FAILURE, fires ``link_error`` and acknowledges.

If the envelope cannot be published (a nack, a lost connection, retries spent), nothing is lost:
with ``acks_late`` (the default) the message is rejected with requeue and comes back, and the
envelope is logged at error level. With ``acks_late=False`` the message was acknowledged before
it ran, so the log line is all that remains.
"""

from __future__ import annotations

import logging
import os
import string
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from amqp.exceptions import PreconditionFailed
from celery import Celery, Task
from kombu.connection import ConnectionPool
from kombu.entity import Queue
from kombu.messaging import Producer
from kombu.pools import ProducerPool

from ._expiry import publishing
from .options import check_before, check_bool, invalid

if TYPE_CHECKING:
    from celery import Task as _TaskBase
else:
    _TaskBase = object

__all__ = [
    "DEAD_LETTER_TEMPLATE_FIELDS",
    "DeadLetterMixin",
    "confirmed_producer",
    "dead_letter_queue_for",
    "dead_letter_queue_name",
    "publish_envelope",
]

logger = logging.getLogger(__name__)

#: The fields a ``dead_letter_queue`` template may use.
DEAD_LETTER_TEMPLATE_FIELDS = frozenset({"queue", "task"})
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


def dead_letter_queue_name(template: str, *, queue: str, task: str) -> str:
    """The dead-letter queue for a task that came from ``queue``.

    Example::

        >>> dead_letter_queue_name("{queue}.dlq", queue="billing", task="billing.sync")
        'billing.dlq'
        >>> dead_letter_queue_name("dead-letters", queue="billing", task="billing.sync")
        'dead-letters'
    """
    return template.format(queue=queue or "celery", task=task)


def _template_fields(template: str) -> set[str]:
    """The fields ``template`` names; a conversion or format spec (``{queue!r}``,
    ``{queue:>10}``) raises ``ValueError``: either would put quotes or padding in a queue name."""
    fields = set()
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if spec or conversion:
            written = (
                f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
            )
            raise ValueError(
                f"{written} formats the name; a field is written plain, as {{{field}}}"
            )
        fields.add(field)
    return fields


class DeadLetterMixin(_TaskBase):  # type: ignore[misc]
    """Forward every terminal failure, with its whole story, to a dead-letter queue.

    Combine it with ``celery.Task`` (mixins first), or use
    :class:`~resilient_tasks.ResilientTask`, which includes it.

    Options (class attributes or ``@app.task`` keywords):
        dead_letter: ``True`` (default) forwards terminal failures; ``False`` does not (the task
            then fails exactly as on a plain ``celery.Task``).
        dead_letter_queue: the queue name, or a template of it with ``{queue}`` (the queue the
            task came from, i.e. its routing key) and ``{task}`` (the task name). Default
            ``"{queue}.dlq"``.

    A terminal failure is one that will not be retried: the retry policy gave up (reason
    ``retries_exhausted``, ``deadline_exceeded``, ``permanent`` or ``exception``), Celery's own
    ``autoretry_for`` ran out, or the task raised without any retry. Retries, ``Ignore`` and
    ``Reject`` are not failures.

    The publishing happens in the worker's main process, through this mixin's ``Request`` class;
    a task that sets its own ``Request`` must subclass
    :class:`resilient_tasks.request.ResilientRequest`. A message the worker cannot read at all
    (a corrupt body, a content type it does not accept) is dead-lettered too, by this mixin's
    ``Strategy`` (:mod:`resilient_tasks.strategy`), where Celery would drop it.

    Its messages go without the broker TTL (AMQP ``expiration``) that Celery derives from
    ``expires``: RabbitMQ would drop an expired one unseen, its result ``PENDING`` for ever; the
    worker that receives it marks it ``REVOKED`` instead (:mod:`resilient_tasks._expiry`).

    Example::

        from celery import Celery, Task
        from resilient_tasks import DeadLetterMixin

        app = Celery("proj")

        class DeadLettering(DeadLetterMixin, Task):
            dead_letter_queue = "{queue}.failed"

        @app.task(base=DeadLettering, acks_late=True)
        def export(report_id): ...
    """

    dead_letter: bool = True
    dead_letter_queue: str = "{queue}.dlq"
    Request = "resilient_tasks.request:ResilientRequest"
    Strategy = "resilient_tasks.strategy:dead_lettering"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_before(cls, DeadLetterMixin, Task, "celery.Task's Request would replace its own")
        check_bool(cls, "dead_letter", allow_none=False)
        template = getattr(cls, "dead_letter_queue", None)
        if not isinstance(template, str) or not template.strip():
            raise invalid(
                cls, "dead_letter_queue", template, 'expected a queue name such as "{queue}.dlq"'
            )
        try:
            fields = _template_fields(template)
        except ValueError as exc:
            raise invalid(
                cls, "dead_letter_queue", template, f"not a valid template: {exc}"
            ) from None
        unknown = fields - DEAD_LETTER_TEMPLATE_FIELDS
        if unknown:
            raise invalid(
                cls,
                "dead_letter_queue",
                template,
                f"unknown template field {{{sorted(unknown)[0]}}}; the fields are "
                + ", ".join(f"{{{f}}}" for f in sorted(DEAD_LETTER_TEMPLATE_FIELDS)),
            )
        try:  # a format spec or conversion that only fails on a real name, e.g. {queue:d}
            dead_letter_queue_name(template, queue="billing", task="billing.sync")
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise invalid(
                cls, "dead_letter_queue", template, f"not a valid template: {exc}"
            ) from None

    def dead_letter_queue_for(self, queue: str) -> str:
        """The dead-letter queue for a message of this task that came from ``queue``."""
        return dead_letter_queue_name(self.dead_letter_queue, queue=queue, task=self.name)

    def apply_async(self, *args: Any, **options: Any) -> Any:
        """Celery's ``apply_async``, without the broker TTL Celery derives from ``expires``: an
        expired message reaches a worker, which marks the task ``REVOKED``, instead of being
        dropped unseen by RabbitMQ (:mod:`resilient_tasks._expiry`). An ``expiration`` passed
        here is kept."""
        with publishing(self.name, options):
            return super().apply_async(*args, **options)


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
