"""A library task's message carries its ``expires`` but no broker TTL: the worker expires it.

Celery gives a task sent with ``expires`` two expiries: the ``expires`` header, which the worker
checks when it receives the message (and marks the task ``REVOKED``, sends ``task_revoked``,
acknowledges the message), and, in ``Celery.send_task`` on every version from 5.3 to 5.7, the
AMQP ``expiration`` property (the seconds left), with which RabbitMQ discards the message
unseen once it expires in the queue. With ``acks_late`` (``ResilientTask``'s default) a
worker's prefetch window stays full while its tasks run, so a queued message waits on the
broker, not in the worker; there it expired, RabbitMQ dropped it (or dead-lettered it, where
the queue has ``x-dead-letter-exchange``), and its result stayed ``PENDING`` forever. A retry
and a redelivery republish ``expires`` with the time that is left, and got the same TTL.

:func:`publishing` marks the publish of a library task (``DeadLetterMixin.apply_async``, which
every publish of the task goes through: ``delay``, signatures, chains and groups, Celery's
retries, and the retries and redeliveries the worker's main process publishes), and
:func:`drop_broker_expiry`, a ``before_task_publish`` receiver, removes the ``expiration`` that
Celery derived from ``expires`` from that message only. Every other message is left as it is:
other tasks, a message published by name (``app.send_task``) from code that does not go
through the task class, and a library task whose caller passed ``expiration=`` itself (a broker
TTL asked for on purpose).

Example::

    >>> headers, properties = {"expires": "2030-01-01T00:00:00+00:00"}, {"expiration": 1.0}
    >>> with publishing("billing.sync", {"expires": 1.0}):
    ...     drop_broker_expiry(sender="billing.sync", headers=headers, properties=properties)
    >>> properties
    {}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from celery import signals

__all__ = ["drop_broker_expiry", "publishing"]

#: The name of the library task whose message this context is publishing, if any.
_publishing: ContextVar[str | None] = ContextVar("resilient_tasks_publishing", default=None)


@contextmanager
def publishing(name: str, options: Mapping[str, Any]) -> Iterator[None]:
    """Mark what runs inside as the publish of a message of the library task ``name`` sent with
    ``options`` (``apply_async``'s), unless the options ask for a broker TTL (``expiration``)."""
    if options.get("expiration") is not None:
        yield
        return
    token = _publishing.set(name)
    try:
        yield
    finally:
        _publishing.reset(token)


def drop_broker_expiry(
    sender: Any = None,
    body: Any = None,
    headers: Mapping[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """``before_task_publish``: remove the ``expiration`` property from a library task's
    message that has an expiry (``expires``), within :func:`publishing` of that task.

    Celery publishes the ``properties`` it hands its receivers, so the message goes without it.
    """
    if properties is None or _publishing.get() != sender:
        return
    expires = (headers or {}).get("expires")  # protocol 2
    if expires is None and isinstance(body, Mapping):  # protocol 1: in the body
        expires = body.get("expires")
    if expires is not None:
        properties.pop("expiration", None)


signals.before_task_publish.connect(
    drop_broker_expiry, weak=False, dispatch_uid="resilient_tasks.drop_broker_expiry"
)
