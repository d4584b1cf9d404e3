"""The broker-side record of the dead-letter queues an app's workers have published to.

The routes tell the tools most dead-letter queues (:func:`dead_letter_queues`), but not that of
a queue chosen when the task was sent (``apply_async(queue="bulk")`` dead-letters to
``bulk.dlq``). So the worker's main process records each dead-letter queue it publishes a dead
letter to, once per process and queue name, in a registry on the same broker, and the tools
read it back:

* **Redis**: a set (``SADD``; the transport's ``global_keyprefix`` applies), so a name is
  there once however often it is recorded.
* **RabbitMQ** (any AMQP transport): AMQP cannot list queues, so the registry is a durable
  queue holding one small persistent message per recording (``{"queue": "bulk.dlq"}``). The
  tools read it without consuming it, as they read a dead-letter queue, and remove the
  duplicates as they go (the first copy of each name stays), so it holds about one message per
  name. The management plugin's HTTP API could list queues, but it is an optional plugin, on
  another port, with credentials of its own.
* **filesystem** (Kombu's, for development): the same queue of messages, as files.

Other transports record nothing (the routes are all the tools know).

The registry is named by the app setting ``resilient_tasks_dead_letter_registry`` (default
``"resilient_tasks.dead_letter_queues"``): the Redis key or the queue. Apps sharing a broker
may share it; a test suite gives each test its own and deletes it afterwards.

Recording never costs a dead letter anything: it happens after the dead letter is published,
once per process and name (an in-process set remembers what was recorded); any error is logged
and ignored, and the name is recorded again at the next dead letter to it after
:data:`RETRY_AFTER` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from kombu.entity import Queue

from .readers import _reader

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "DEFAULT_REGISTRY",
    "REGISTRY_SETTING",
    "RETRY_AFTER",
    "forget_dead_letter_queues",
    "record_dead_letter_queue",
    "recorded_dead_letter_queues",
    "registry_name",
]

logger = logging.getLogger(__name__)

#: The app setting that names the registry (a Redis key, or a queue).
REGISTRY_SETTING = "resilient_tasks_dead_letter_registry"
#: Its default.
DEFAULT_REGISTRY = "resilient_tasks.dead_letter_queues"
#: After a recording failed, how long (seconds) until the same name is tried again.
RETRY_AFTER = 60.0
#: The transports with a registry; Kombu's ``driver_type``.
_QUEUE_REGISTRY = frozenset({"amqp", "filesystem"})
_SET_REGISTRY = frozenset({"redis"})


def registry_name(app: Celery) -> str:
    """The registry of ``app``: its ``resilient_tasks_dead_letter_registry`` setting, else
    :data:`DEFAULT_REGISTRY`.

    Example::

        app.conf.resilient_tasks_dead_letter_registry = "billing.dead_letter_queues"
        registry_name(app)  # 'billing.dead_letter_queues'
    """
    name = app.conf.get(REGISTRY_SETTING)
    if name is None:
        return DEFAULT_REGISTRY
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"{REGISTRY_SETTING} must be a non-empty string (a Redis key or a queue name), "
            f"not {name!r}"
        )
    return name


class _Recorded:
    """What this process has recorded (``(registry, queue)`` pairs) and when a failed one may be
    tried again; reset in a forked child."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.done: set[tuple[str, str]] = set()
        self.retry_at: dict[tuple[str, str], float] = {}


_recorded: weakref.WeakKeyDictionary[Celery, _Recorded] = weakref.WeakKeyDictionary()
_recorded_lock = threading.Lock()


def _state(app: Celery) -> _Recorded:
    with _recorded_lock:
        state = _recorded.get(app)
        if state is None or state.pid != os.getpid():
            state = _recorded[app] = _Recorded()
        return state


def record_dead_letter_queue(app: Celery, queue: str) -> None:
    """Record in ``app``'s registry that a dead letter was published to ``queue``; at most one
    broker write per process and name. Never raises: an error is logged (warning) and the name
    is tried again at the next call after :data:`RETRY_AFTER` seconds.

    The worker's main process calls it after every dead letter it publishes.

    Example::

        record_dead_letter_queue(app, "bulk.dlq")  # written once
        record_dead_letter_queue(app, "bulk.dlq")  # nothing to do
    """
    try:
        key = (registry_name(app), queue)
        state = _state(app)
        with state.lock:
            if key in state.done or time.monotonic() < state.retry_at.get(key, 0.0):
                return
            state.done.add(key)  # before writing: another thread does not write it again
    except Exception:
        logger.warning("resilient_tasks: could not record dead-letter queue %r", queue,
                       exc_info=True)  # fmt: skip
        return
    try:
        _write(app, key[0], queue)
    except Exception:
        logger.warning(
            "resilient_tasks: could not record dead-letter queue %r in the registry %r (the "
            "dead letter itself was published); trying again in %.0f s",
            queue,
            key[0],
            RETRY_AFTER,
            exc_info=True,
        )
        with state.lock:
            state.done.discard(key)
            state.retry_at[key] = time.monotonic() + RETRY_AFTER


def _write(app: Celery, registry: str, queue: str) -> None:
    # The library's confirming producer pool (publish.py): no connection of its own per write.
    from resilient_tasks.publish import confirmed_producer

    with confirmed_producer(app) as producer:
        channel = producer.channel
        driver = producer.connection.transport.driver_type
        if driver in _SET_REGISTRY:
            client = channel.client
            client.sadd(_redis_key(channel, client, "SADD", registry), queue)
        elif driver in _QUEUE_REGISTRY:
            producer.publish(  # type: ignore[no-untyped-call]
                {"queue": queue},
                exchange="",
                routing_key=registry,
                serializer="json",
                delivery_mode=2,
                declare=[_registry_queue(registry)],
                retry=False,
            )
        else:
            logger.debug("resilient_tasks: no dead-letter queue registry on %s", driver)


def _registry_queue(name: str) -> Queue:
    return Queue(name, exchange="", routing_key=name, durable=True)  # type: ignore[no-untyped-call]


def _redis_key(channel: Any, client: Any, command: str, key: str) -> str:
    """``key`` as ``command`` must be given it: Kombu's client adds ``global_keyprefix`` to some
    commands itself (``SADD`` and ``SMEMBERS`` among them)."""
    prefixed = getattr(client, "PREFIXED_SIMPLE_COMMANDS", None)
    if prefixed is None or command in prefixed:
        return key
    return f"{getattr(channel, 'global_keyprefix', '') or ''}{key}"


def recorded_dead_letter_queues(app: Celery) -> tuple[str, ...]:
    """The dead-letter queues ``app``'s registry names, sorted; ``()`` on a transport without
    one (no connection is made) or when nothing was recorded. Whether each queue still exists
    is not checked here.

    On RabbitMQ and the filesystem transport the registry queue is read without consuming it,
    and the duplicate recordings found are removed (the first of each name stays). A registry
    being read by another tool at the same moment may show fewer names.

    Example::

        recorded_dead_letter_queues(app)  # ('bulk.dlq', 'billing.dlq')
    """
    registry = registry_name(app)
    with app.connection_for_read() as connection:
        driver = connection.transport.driver_type
        if driver in _SET_REGISTRY:
            channel = connection.default_channel
            client = channel.client
            members = client.smembers(_redis_key(channel, client, "SMEMBERS", registry))
            return tuple(sorted(_text(member) for member in members))
        if driver in _QUEUE_REGISTRY:
            return tuple(sorted(_read_compacting(connection, registry)))
    return ()


def forget_dead_letter_queues(app: Celery, match: Callable[[str], bool]) -> int:
    """Remove the names ``match`` accepts from ``app``'s registry (a dead-letter queue deleted
    for good, or what a test recorded); return how many recordings were removed.

    A worker process that recorded one of them does not record it again until it restarts.

    Example::

        forget_dead_letter_queues(app, lambda queue: queue == "legacy.dlq")
    """
    registry = registry_name(app)
    removed = 0
    with app.connection_for_read() as connection:
        driver = connection.transport.driver_type
        if driver in _SET_REGISTRY:
            channel = connection.default_channel
            client = channel.client
            key = _redis_key(channel, client, "SMEMBERS", registry)
            names = [_text(m) for m in client.smembers(key)]
            gone = [name for name in names if match(name)]
            if gone:
                removed = int(client.srem(_redis_key(channel, client, "SREM", registry), *gone))
        elif driver in _QUEUE_REGISTRY:
            reader = _reader(connection, registry, stream=True)
            try:
                for message in reader.messages():
                    name = _recorded_name(message.body)
                    if name is not None and match(name):
                        reader.remove(message)
                        removed += 1
            finally:
                reader.close()
    return removed


def _read_compacting(connection: Any, registry: str) -> list[str]:
    names: dict[str, None] = {}
    reader = _reader(connection, registry, stream=True)
    try:
        for message in reader.messages():
            name = _recorded_name(message.body)
            if name is None:
                continue  # not a recording: left alone
            if name in names:
                with suppress(Exception):  # compaction is a courtesy; the name is known
                    reader.remove(message)
                continue
            names[name] = None
    finally:
        reader.close()
    return list(names)


def _recorded_name(body: bytes) -> str | None:
    try:
        name = json.loads(body).get("queue")
    except Exception:
        return None
    return name if isinstance(name, str) and name else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
