"""All the library's broker I/O for publishing: confirming producers, dead letters, and the
task messages the worker's main process publishes (retries, redeliveries).

Every publish goes through :func:`confirmed_producer`: a Kombu producer pool per app and
process with publisher confirms on RabbitMQ, which survives the worker forking its pool
children. A publish returns once the broker has the message, or raises. In the worker's main
process on RabbitMQ, retries and envelopes go through :class:`ConfirmPipeline` first, which
does not wait for each confirm in turn.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

from amqp.exceptions import PreconditionFailed
from celery import Celery, Signature, bootsteps
from kombu.connection import ConnectionPool
from kombu.entity import Queue
from kombu.exceptions import OperationalError
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
    app: Celery,
    queue: str,
    envelope: Mapping[str, Any],
    source: str | None = None,
    producer: Producer | None = None,
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
    if producer is not None:  # a pipelined producer: no retry, no second try here
        _publish_with(producer, queue, envelope, declare=[declared], retry=False)
        return
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
        _publish_with(producer, queue, envelope, declare, retry=True)


def _publish_with(
    producer: Producer, queue: str, envelope: Mapping[str, Any], declare: list[Any], retry: bool
) -> None:
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
        retry=retry,
        retry_policy=dict(PUBLISH_RETRY_POLICY),
    )


def publish_signature(app: Celery, signature: Signature, producer: Producer | None = None) -> None:
    """Publish the task message ``signature`` describes (a retry, a redelivery) with publisher
    confirms; raise if the broker did not take it. With ``producer`` (a pipelined one), publish
    on it once, without retrying."""
    if producer is not None:
        signature.apply_async(producer=producer, retry=False)
        return
    with confirmed_producer(app) as producer:
        signature.apply_async(producer=producer)


# -- pipelined confirms, in the worker's main process -------------------------------------------


class _Pending:
    """One submitted publish: the delivery tags it used (a task publish may also send Celery's
    ``task-sent`` event), and what follows its confirm."""

    __slots__ = ("comes_back", "done", "fallback", "nacked", "sealed", "since", "tags")

    def __init__(self, done: Any, fallback: Any, comes_back: bool) -> None:
        self.done, self.fallback, self.comes_back = done, fallback, comes_back
        self.tags: set[int] = set()
        self.nacked = False
        self.sealed = False  # its publish has returned: no further tags
        self.since = time.monotonic()


class ConfirmPipeline:
    """The worker's main process's publishes that do not wait for their confirm (RabbitMQ).

    A confirmed publish waits for RabbitMQ to write the message to disk: about 2 ms, during
    which the main process does nothing else, so it settles at most ~500 failures a second. Here
    a publish (a retry, an envelope) goes out on a channel in confirm mode and the caller's
    continuation (``done``: acknowledge the original, Celery's bookkeeping) runs when every
    message of it is confirmed, read by the worker's event loop; meanwhile the next one is
    published. It is used only from the event loop's thread.

    Nothing is decided here that the synchronous path does not decide: a nack, a lost
    connection, a confirm that does not come within :attr:`CONFIRM_TIMEOUT`, and whatever is
    pending when the worker stops hand the message to its ``fallback``, which publishes it
    again with a confirm it waits for, as before (so a message whose confirm was lost with the
    connection may be published twice, which the synchronous path's reconnect-and-retry does as
    well; none is lost). A publish that raises anything else goes to its own fallback alone.
    """

    #: How long the worker's stop waits for the confirms of what is pending.
    FLUSH_TIMEOUT = 10.0
    #: A confirm that has not come in this long: the connection is taken for dead.
    CONFIRM_TIMEOUT = 30.0
    #: After the connection could not be opened, publish synchronously this long.
    REOPEN_AFTER = 5.0

    def __init__(self, app: Celery, hub: Any) -> None:
        self.app = app
        self.hub = hub
        self.thread = threading.get_ident()
        self._connection: Any = None
        self._producer: Any = None
        self._fd: int | None = None
        self._tag = 0
        self._by_tag: dict[int, _Pending] = {}
        self._current: _Pending | None = None
        self._ready: list[Any] = []
        self._busy = False
        # Set when the channel may have lost count of its delivery tags (py-amqp reopened it,
        # without confirms, or a publish failed inside): the connection is replaced.
        self._suspect = False
        self._down_until = 0.0
        self.closed = False
        self._watchdog = (
            hub.call_repeatedly(self.CONFIRM_TIMEOUT / 3, self._watch) if hub is not None else None
        )

    def submit(self, publish: Any, done: Any, fallback: Any, comes_back: bool = True) -> None:
        """Run ``publish(producer)``; then ``done()`` once RabbitMQ confirms all it published,
        or ``fallback()`` if it cannot. ``comes_back``: the original message returns to its
        queue if the worker's consumer connection is lost (``acks_late``)."""
        if self.closed or time.monotonic() < self._down_until:
            fallback()
            return
        pending = _Pending(done, fallback, comes_back)
        self._busy = True
        try:
            producer = self._open()
            self._current = pending
            try:
                publish(producer)
            finally:
                self._current = None
            pending.sealed = True
            if self._suspect:
                raise ConnectionError("the confirming channel was reopened or failed mid-publish")
            if not pending.tags:  # nothing was published: nothing to confirm
                raise RuntimeError("the publish sent no message")
        except Exception as exc:
            self._forget(pending)  # before _broken: its fallback is queued here, once
            if self._suspect or self._is_connection_failure(exc):
                logger.warning("resilient_tasks: the publishing connection failed; publishing "
                               "what awaited its confirm again", exc_info=True)  # fmt: skip
                self._broken()
            else:
                logger.debug("resilient_tasks: a pipelined publish failed; publishing it again "
                             "and waiting for its confirm", exc_info=True)  # fmt: skip
            self._ready.append(fallback)
        finally:
            self._busy = False
        self._settle_if_confirmed(pending)
        if self._by_tag and self.hub is not None:
            # Acks a read of another kind pulled in (a TLS record holds several frames) would
            # not wake the loop: look once more.
            self.hub.call_soon(self._on_readable)
        self._run_ready()

    def _is_connection_failure(self, exc: BaseException) -> bool:
        connection = self._connection
        if connection is None:
            return True  # could not even open it
        # Celery wraps a publish's connection errors in Kombu's OperationalError.
        errors = (*connection.connection_errors, *connection.channel_errors, OSError,
                  OperationalError)  # fmt: skip
        return isinstance(exc, errors) or isinstance(exc.__cause__, errors)

    def _open(self) -> Any:
        if self._producer is not None:
            return self._producer
        # No heartbeats (the event loop reads this connection only when it has data; the
        # watchdog catches a connection that went silent), and confirms read by the event
        # loop rather than awaited in each publish, whatever the app's transport options say.
        options = {**(self.app.conf.broker_transport_options or {}), "confirm_publish": False}
        connection = self.app.connection_for_write(heartbeat=0, transport_options=options)
        try:
            connection.ensure_connection(max_retries=1)
            channel = connection.channel()
            channel.confirm_select()
        except Exception:
            self._down_until = time.monotonic() + self.REOPEN_AFTER
            with suppress(Exception):
                connection.collect()
            raise
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        publish = channel.basic_publish

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._count_one()
            try:
                return publish(*args, **kwargs)
            except BaseException:
                self._suspect = True
                raise

        revive = channel._do_revive

        def revived(*args: Any, **kwargs: Any) -> Any:
            self._suspect = True  # py-amqp reopens a channel a broker closed: without confirms
            return revive(*args, **kwargs)

        channel.basic_publish = counted
        channel._do_revive = revived
        raw = connection.connection
        raw.transport.raise_on_initial_eintr = True  # an empty read raises, as Kombu's loop does
        self._fd = raw.sock.fileno()
        self.hub.add_reader(self._fd, self._on_readable)
        self._connection = connection
        self._producer = Producer(channel)  # type: ignore[no-untyped-call]
        return self._producer

    def _count_one(self) -> None:
        """Each message published on the channel takes the next delivery tag: counted for the
        submit that is publishing."""
        self._tag += 1
        if self._current is not None:
            self._current.tags.add(self._tag)
            self._by_tag[self._tag] = self._current

    def _confirmed(self, tag: int, multiple: bool, nacked: bool) -> None:
        tags = [t for t in self._by_tag if t <= tag] if multiple else [tag]
        for confirmed in tags:
            pending = self._by_tag.pop(confirmed, None)
            if pending is None:
                continue
            pending.tags.discard(confirmed)
            pending.nacked = pending.nacked or nacked
            self._settle_if_confirmed(pending)
        if not self._busy:
            self._run_ready()

    def _settle_if_confirmed(self, pending: _Pending) -> None:
        if pending.sealed and not pending.tags and pending.done is not None:
            self._ready.append(pending.fallback if pending.nacked else pending.done)
            pending.done = None  # settled once

    def _forget(self, pending: _Pending) -> None:
        for tag in pending.tags:
            self._by_tag.pop(tag, None)
        pending.tags.clear()
        pending.done = None

    def _on_ack(self, tag: int, multiple: bool = False) -> None:
        self._confirmed(tag, multiple, nacked=False)

    def _on_nack(self, tag: int, multiple: bool = False) -> None:
        logger.warning("resilient_tasks: RabbitMQ refused a publish (nack); publishing it again")
        self._confirmed(tag, multiple, nacked=True)

    def _on_readable(self) -> None:
        if self._connection is None:  # scheduled before the connection was dropped
            return
        self._busy = True  # the continuations run once the frames are read, not amid them
        try:
            try:
                for _ in range(1000):  # what has arrived; the loop calls again for the rest
                    self._connection.drain_events(timeout=0)
                self.hub.call_soon(self._on_readable)
            except (TimeoutError, BlockingIOError, InterruptedError):
                pass
            if self._suspect:
                raise ConnectionError("the confirming channel was reopened")
        except Exception:
            logger.warning("resilient_tasks: the publishing connection failed; publishing "
                           "what awaited its confirm again", exc_info=True)  # fmt: skip
            self._broken()
        finally:
            self._busy = False
        self._run_ready()

    def _watch(self) -> None:
        oldest = min((p.since for p in self._by_tag.values()), default=None)
        if oldest is not None and time.monotonic() - oldest > self.CONFIRM_TIMEOUT:
            logger.warning("resilient_tasks: no confirm from RabbitMQ for %.0f s; publishing "
                           "what awaited it again", self.CONFIRM_TIMEOUT)  # fmt: skip
            self._broken()
            self._run_ready()

    def _broken(self) -> None:
        """Every pending publish to its fallback; a new connection for the next."""
        for pending in {id(p): p for p in self._by_tag.values()}.values():
            if pending.done is not None:
                self._ready.append(pending.fallback)
            self._forget(pending)
        self._by_tag.clear()
        if self._fd is not None:
            with suppress(Exception):
                self.hub.remove_reader(self._fd)
            self._fd = None
        if self._connection is not None:
            with suppress(Exception):
                self._connection.collect()
        self._connection = self._producer = None
        self._tag = 0  # a new channel counts its delivery tags from 1
        self._suspect = False

    def _run_ready(self) -> None:
        while self._ready:
            then = self._ready.pop(0)
            try:
                then()
            except Exception:
                logger.exception("resilient_tasks: settling a message after its publish failed")

    def close(self, consumer_lost: bool = False) -> None:
        """Wait for the confirms still to come (at most :attr:`FLUSH_TIMEOUT`), hand the rest
        to their fallback, and publish synchronously from now on. With ``consumer_lost`` (the
        consumer's connection is gone: nothing can be acknowledged), wait for none: an original
        that comes back to its queue is left to come back (its continuation runs, its publish
        is not made again); only the others are published again."""
        self.closed = True
        if self._watchdog is not None:
            with suppress(Exception):
                self._watchdog.cancel()
        deadline = time.monotonic() + (0 if consumer_lost else self.FLUSH_TIMEOUT)
        while self._by_tag and self._connection is not None and time.monotonic() < deadline:
            self._busy = True
            try:
                self._connection.drain_events(timeout=max(0.01, deadline - time.monotonic()))
            except (TimeoutError, BlockingIOError, InterruptedError):
                continue
            except Exception:
                break
            finally:
                self._busy = False
            self._run_ready()
        if consumer_lost:
            for pending in {id(p): p for p in self._by_tag.values()}.values():
                if pending.comes_back and pending.done is not None:
                    # Its original is redelivered and runs again: not published a second
                    # time, only settled here (Celery's acknowledgement fails, and logs it).
                    self._ready.append(pending.done)
                    self._forget(pending)
        self._broken()
        self._run_ready()


_pipelines: weakref.WeakKeyDictionary[Celery, ConfirmPipeline] = weakref.WeakKeyDictionary()


def pipeline_for(app: Celery) -> ConfirmPipeline | None:
    """The app's pipeline in this worker's main process while its consumer runs, called from
    the event loop's thread; ``None`` elsewhere (a pool child, a thread of the threads pool, a
    tool, a worker stopping): publish and wait for the confirm."""
    pipeline = _pipelines.get(app)
    if pipeline is None or pipeline.closed or pipeline.thread != threading.get_ident():
        return None
    return pipeline


class ConfirmPipelineStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """A step of the worker's consumer: the :class:`ConfirmPipeline` of the worker's main
    process on RabbitMQ, flushed when the consumer stops (before its connection closes)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        hub = getattr(parent, "hub", None)
        connection = parent.connection
        if hub is None or connection is None or connection.transport.driver_type != "amqp":
            return
        _pipelines[parent.app] = ConfirmPipeline(parent.app, hub)

    def stop(self, parent: Any) -> None:
        pipeline = _pipelines.pop(parent.app, None)
        if pipeline is not None:
            # A consumer restarted after its connection failed has none (Celery >= 5.6), or a
            # closed one: what it had unacknowledged comes back.
            connection = parent.connection
            pipeline.close(consumer_lost=connection is None or not connection.connected)

    shutdown = stop
