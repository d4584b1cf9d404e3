"""Where a delayed message waits: on the broker, not in a worker's memory.

Celery's own delayed message (a retry with a countdown, ``apply_async(countdown=...)``) is an
ETA message: the worker that receives it holds it, unacknowledged, until it is due. A storm of
retries fills that memory, starves new work behind messages that are not due, and on Redis runs
a retry again whenever its delay is longer than the visibility timeout.

:class:`DelayedDeliveryMixin` sends every delayed publish of a task whose ``delayed_delivery``
is ``"broker"`` to the broker's own waiting room instead:

* **Redis**: a sorted set per queue, ``resilient_tasks.delayed.<queue>``, scored by the due time
  on the Redis server's clock. Kombu builds the message exactly as it would (routing, priority,
  encoding); only its last step, the push onto the queue's list, becomes an add to the set.
  :class:`DelayedMover`, a step of every worker's consumer, moves what is due onto the queue's
  list in one Lua script per batch: a mover killed halfway loses or repeats nothing.
* **RabbitMQ**: durable queues whose TTL dead-letters the message onward, the topology of
  Kombu's (and Celery's) native delayed delivery, and from its last exchange straight into the
  one queue the message is for (:mod:`resilient_tasks._delayed_rabbitmq`), after the library's
  own levels below a second. Delays are rounded up to 64 ms steps.
* **Other transports** (the embedded filesystem broker): the worker holds the message, as
  Celery does; ``delayed_delivery="broker"`` logs that once.

The app setting ``resilient_tasks_delayed_delivery`` sets the default for every task of the app;
without it, Redis and RabbitMQ delay on the broker and every other transport in the worker.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from celery import Celery, bootsteps
from kombu.connection import Connection
from kombu.messaging import Producer
from kombu.utils.json import dumps

from ._delayed_rabbitmq import delaying_producer, level_counts
from ._steps import StepsMixin
from .options import invalid

if TYPE_CHECKING:
    from celery import Task as _TaskBase
else:
    _TaskBase = object

__all__ = [
    "DELAYED_DELIVERY_SETTING",
    "DelayedDeliveryMixin",
    "DelayedMover",
    "DelayedQueue",
    "delayed_delivery_of",
    "delayed_stats",
    "move_due",
]

logger = logging.getLogger(__name__)

#: The app setting with the default ``delayed_delivery`` of every task of the app.
DELAYED_DELIVERY_SETTING = "resilient_tasks_delayed_delivery"
Mode = Literal["broker", "worker"]
MODES: tuple[Mode, ...] = ("broker", "worker")
#: The transports (Kombu driver types) where a delayed message can wait on the broker.
WAITING_ROOMS = ("redis", "amqp")
#: The sorted set of a queue's delayed messages: this, then the queue's name.
ZSET_PREFIX = "resilient_tasks.delayed."
#: How many due messages one run of the move script takes.
MOVE_BATCH = 100
#: The longest and shortest a mover waits between two looks at the queues it serves.
MAX_WAIT = 0.5
MIN_WAIT = 0.01

# Adds ARGV[2] to the set due ARGV[1] ms from now on the Redis server's clock; returns the score.
_ADD = """
local now = redis.call('TIME')
local due = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], due, ARGV[2])
return due
"""
# Moves up to ARGV[1] due members of KEYS[1] onto the list each names; a member is
# "<length of the list key>:<list key><message>". Returns how many it moved and how many
# milliseconds until the next one is due (-1: none waits).
_MOVE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms, 'LIMIT', 0, tonumber(ARGV[1]))
local moved = 0
for _, member in ipairs(due) do
  if redis.call('ZREM', KEYS[1], member) == 1 then
    local colon = string.find(member, ':', 1, true)
    local length = tonumber(string.sub(member, 1, colon - 1))
    local key = string.sub(member, colon + 1, colon + length)
    redis.call('LPUSH', key, string.sub(member, colon + length + 1))
    moved = moved + 1
  end
end
local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if next[2] == nil then
  return {moved, -1}
end
return {moved, math.max(0, tonumber(next[2]) - ms)}
"""


def delayed_delivery_of(task: Any) -> Mode:
    """Where a delayed message of ``task`` waits: its ``delayed_delivery``, else the app's
    ``resilient_tasks_delayed_delivery``, else ``"broker"`` on Redis and RabbitMQ and
    ``"worker"`` on every other transport; ``"worker"`` where the broker has no waiting room
    of the library's.

    Example::

        >>> from celery import Celery
        >>> from resilient_tasks import ResilientTask
        >>> app = Celery(broker="redis://127.0.0.1:6379/0", set_as_current=False)
        >>> @app.task(base=ResilientTask, shared=False)
        ... def sync(): ...
        >>> delayed_delivery_of(sync)
        'broker'
    """
    app = task.app
    wanted: Mode | None = getattr(task, "delayed_delivery", None) or app.conf.get(
        DELAYED_DELIVERY_SETTING
    )
    driver = _driver_type(app)
    if wanted is None:
        return "broker" if driver in WAITING_ROOMS else "worker"
    if wanted == "broker" and driver not in WAITING_ROOMS:
        _warn_once(
            f"resilient_tasks: delayed_delivery='broker' is not available on the {driver} "
            f"transport yet; the worker holds delayed messages of {task.name}, as Celery does"
        )
        return "worker"
    return wanted


def waits_in_delay_queues(task: Any) -> bool:
    """Whether ``task``'s delayed messages wait in RabbitMQ's delay queues, which count in
    steps: a retry's wait is rounded up before it is judged against ``max_elapsed``."""
    if not isinstance(task, DelayedDeliveryMixin) or task.app.conf.task_always_eager:
        return False
    return _driver_type(task.app) == "amqp" and delayed_delivery_of(task) == "broker"


class DelayedDeliveryMixin(StepsMixin):
    """Delayed publishes of the task (retries with a countdown, ``apply_async(countdown=...)``
    and ``eta=``) wait on the broker, not in a worker's memory (see the module docstring).

    Options (class attributes or ``@app.task`` keywords):
        delayed_delivery: ``"broker"``, ``"worker"`` (Celery's ETA message, held by the
            worker), or ``None`` (the default) for the app's
            ``resilient_tasks_delayed_delivery``, else ``"broker"`` on Redis.

    Example::

        from celery import Celery, Task
        from resilient_tasks import DelayedDeliveryMixin

        app = Celery("proj", broker="redis://127.0.0.1:6379/0")

        class Delayed(DelayedDeliveryMixin, Task):
            delayed_delivery = "broker"

        @app.task(base=Delayed)
        def remind(user_id): ...

        remind.apply_async((7,), countdown=3600)  # waits an hour in Redis, not in a worker
    """

    delayed_delivery: Mode | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        value = getattr(cls, "delayed_delivery", None)
        if value is not None and value not in MODES:
            raise invalid(
                cls,
                "delayed_delivery",
                value,
                'expected "broker" (wait on the broker), "worker" (Celery\'s ETA message), '
                "or None for the app's resilient_tasks_delayed_delivery",
            )

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        super().on_bound(app)
        # The app's default is checked here, when the task is bound to the app (at the latest
        # when the app is finalized), like the task's own option: never at the first publish.
        setting = app.conf.get(DELAYED_DELIVERY_SETTING)
        if setting is not None and setting not in MODES:
            raise invalid(
                cls,
                DELAYED_DELIVERY_SETTING,
                setting,
                'the app setting expects "broker" or "worker", or no value for the default',
            )
        app.steps["consumer"].add(DelayedMover)
        _quiet_celery_direct_exchange_warning()

    def apply_async(self, *args: Any, **options: Any) -> Any:
        """Celery's ``apply_async``; a delayed publish waits on the broker where the task's
        ``delayed_delivery`` says so."""
        delayed = options.get("countdown") is not None or options.get("eta") is not None
        if (
            delayed
            and not self.app.conf.task_always_eager
            and delayed_delivery_of(self) == "broker"
        ):
            if _driver_type(self.app) == "redis":
                with _redis_waiting_room(self.app) as producer:
                    options["producer"] = producer
                    options.pop("connection", None)
                    return super().apply_async(*args, **options)
            given = options.get("producer")
            connection = options.pop("connection", None)
            if given is None and connection is not None:  # what Celery makes of connection=
                given = self.app.amqp.Producer(connection, auto_declare=False)
            token = _through_topology.set(True)
            try:
                with self.app.producer_or_acquire(given) as producer:
                    options["producer"] = delaying_producer(producer, self.app)
                    return super().apply_async(*args, **options)
            finally:
                _through_topology.reset(token)
        return super().apply_async(*args, **options)


# Set while a library task publishes a delayed message through the RabbitMQ topology.
_through_topology: ContextVar[bool] = ContextVar("resilient_tasks_through_topology", default=False)
_CELERY_DIRECT_WARNING = "Direct exchanges are not supported with native delayed delivery"


class _DirectExchangeWarning(logging.Filter):
    """Drops Celery 5.5+'s warning that a delayed message to a direct exchange on quorum queues
    will be held by the worker, for the publishes the library delays on the broker itself
    (where it is untrue); Celery's own publishes keep it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_through_topology.get() and str(record.msg).startswith(_CELERY_DIRECT_WARNING))


@functools.cache
def _quiet_celery_direct_exchange_warning() -> None:
    logging.getLogger("celery.app.base").addFilter(_DirectExchangeWarning())


# -- Redis: the waiting room -------------------------------------------------------------------


class _WaitingRoom:
    """One process's producer for the waiting room of one app's Redis broker: a connection
    whose channels add a delayed message to its queue's sorted set, where Kombu's push it onto
    the queue's list (on every channel: Kombu opens a new one when it reconnects)."""

    def __init__(self, app: Celery) -> None:
        plain: Any = type(app.connection_for_write().transport)
        self.connection: Connection = app.connection_for_write(transport=_delaying(plain))
        self.lock = threading.Lock()
        # On the connection, not a channel: the channel opens inside the publish, so a broker
        # that cannot be reached is retried by the publish's retry policy, as any publish is.
        self.producer = Producer(self.connection)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.connection.close()  # type: ignore[no-untyped-call]


@functools.cache
def _delaying(transport: Any) -> type:
    """``transport`` (Kombu's Redis or Sentinel transport) with channels whose push onto a
    queue's list adds a message that is not due yet to the queue's waiting room instead."""
    channel = type(f"Delaying{transport.Channel.__name__}", (transport.Channel,), {"_put": _put})
    return type(f"Delaying{transport.__name__}", (transport,), {"Channel": channel})


# Per app: the process and broker setting it was made for, and the room.
_rooms: weakref.WeakKeyDictionary[Celery, tuple[int, object, _WaitingRoom]] = (
    weakref.WeakKeyDictionary()
)
_rooms_lock = threading.Lock()


@contextmanager
def _redis_waiting_room(app: Celery) -> Iterator[Producer]:
    made_for = (os.getpid(), _broker_setting(app))  # a pool child makes its own socket
    with _rooms_lock:
        known = _rooms.get(app)
        if known is None or (known[0], known[1]) != made_for:
            known = _rooms[app] = (*made_for, _WaitingRoom(app))
    room = known[2]
    with room.lock:
        try:
            yield room.producer
        except BaseException:
            # A publish cut short may leave the connection mid-conversation: the next one
            # starts afresh.
            with _rooms_lock:
                if _rooms.get(app) is known:
                    del _rooms[app]
            room.close()
            raise


def _put(channel: Any, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
    delay_ms = _delay_ms(message.get("headers") or {})
    if delay_ms <= 0:  # due already: onto the list, as Kombu would
        super(type(channel), channel)._put(queue, message, **kwargs)
        return
    prefix = getattr(channel, "global_keyprefix", "") or ""
    key = prefix + channel._q_for_pri(queue, channel._get_message_priority(message, reverse=False))
    # The key's length in bytes, as the script's string.sub counts: a queue name may be UTF-8.
    member = f"{len(key.encode())}:{key}{dumps(message)}"  # type: ignore[no-untyped-call]
    _scripts(channel)[0](keys=[prefix + ZSET_PREFIX + queue], args=[delay_ms, member])


def _delay_ms(headers: Mapping[str, Any]) -> int:
    eta = headers.get("eta")
    if not isinstance(eta, str):
        return 0
    try:
        due = datetime.fromisoformat(eta)
    except ValueError:
        return 0
    if due.tzinfo is None:
        due = due.replace(tzinfo=timezone.utc)
    return int((due - datetime.now(timezone.utc)).total_seconds() * 1000)


def _raw(channel: Any) -> Any:
    """A client on the channel's connection pool that adds no key prefix of its own (Kombu's
    prefixing client prefixes only some of a script's keys; these name their keys in full)."""
    client = channel.__dict__.get("_resilient_raw")
    if client is None:
        import redis

        client = channel.__dict__["_resilient_raw"] = redis.Redis(connection_pool=channel.pool)
    return client


def _scripts(channel: Any) -> tuple[Any, Any]:
    """The add and move scripts, registered on the channel's client (run by their SHA)."""
    scripts: tuple[Any, Any] | None = channel.__dict__.get("_resilient_scripts")
    if scripts is None:
        client = _raw(channel)
        scripts = (client.register_script(_ADD), client.register_script(_MOVE))
        channel.__dict__["_resilient_scripts"] = scripts
    return scripts


def move_due(channel: Any, queue: str, batch: int = MOVE_BATCH) -> tuple[int, int | None]:
    """Move the messages of ``queue`` that are due onto its list, at most ``batch``. Atomic:
    one Lua script, on the Redis server's clock. Returns how many it moved, and in how many
    milliseconds the next is due (``None``: nothing waits)."""
    prefix = getattr(channel, "global_keyprefix", "") or ""
    moved, next_ms = _scripts(channel)[1](keys=[prefix + ZSET_PREFIX + queue], args=[batch])
    return int(moved), None if int(next_ms) < 0 else int(next_ms)


# -- the mover, in every worker's main process ------------------------------------------------


class DelayedMover(bootsteps.StartStopStep):  # type: ignore[misc]
    """A step of the worker's consumer: a thread that moves the due messages of the queues the
    worker consumes from their waiting room onto their lists when they are due (it looks at
    least twice a second), at once again while a batch comes back full. Added to every app
    with a :class:`DelayedDeliveryMixin` task; idle on transports other than Redis."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop: threading.Event | None = None

    def start(self, parent: Any) -> None:
        if parent.connection is None or parent.connection.transport.driver_type != "redis":
            return
        # A new event for each thread: one that outlives its stop (stuck on a broker that does
        # not answer) still sees its own event set, and ends.
        self._stop = stop = threading.Event()
        threading.Thread(
            target=self._run,
            args=(parent.app, parent.task_consumer, stop),
            name="resilient_tasks.delayed",
            daemon=True,
        ).start()

    def stop(self, parent: Any) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    shutdown = stop

    def _run(self, app: Celery, consumer: Any, stop: threading.Event) -> None:
        failing = False
        # The queues are read at every pass: add_consumer can add one while the worker runs.
        # Written through the app's write connection, so moved through it too.
        options = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
        with app.connection_for_write(transport_options=options) as connection:
            while not stop.is_set():
                try:
                    queues = [queue.name for queue in consumer.queues]
                    wait = self._move(connection.default_channel, queues)
                    if failing:
                        logger.warning("resilient_tasks: moving delayed messages again")
                        failing = False
                except Exception:
                    if not failing:
                        logger.warning(
                            "resilient_tasks: cannot move delayed messages; they wait on the "
                            "broker and are moved once it answers",
                            exc_info=True,
                        )
                    failing = True
                    wait = 2.0
                    connection.close()
                stop.wait(wait)

    @staticmethod
    def _move(channel: Any, queues: list[str]) -> float:
        """Move what is due; return how long to wait: until the next is due, at most half a
        second (a message added meanwhile may be due sooner), with jitter so that many
        workers spread their calls."""
        soonest = MAX_WAIT
        for queue in queues:
            moved, next_ms = move_due(channel, queue)
            while moved == MOVE_BATCH:
                moved, next_ms = move_due(channel, queue)
            if next_ms is not None:
                soonest = min(soonest, next_ms / 1000)
        return max(MIN_WAIT, soonest) * random.uniform(0.8, 1.0)


# -- what waits ---------------------------------------------------------------------------------


@dataclass
class DelayedQueue:
    """What waits for one queue: how many messages, when the next is due, and per task."""

    queue: str
    waiting: int
    next_due: str | None
    tasks: dict[str, int] = field(default_factory=dict)


def delayed_stats(app: Celery) -> list[DelayedQueue]:
    """The delayed messages waiting on the app's broker: on Redis per destination queue, with
    the next due time and the count per task; on RabbitMQ per delay queue of the app's topology
    (``celery_delayed_{L}`` holds what still waits 2**L seconds or more, and
    ``resilient_tasks_delayed_{ms}ms`` what waits out its delay below a second), without due
    times or tasks, which RabbitMQ cannot show without taking the messages. An empty list on other
    transports, whose worker holds them.

    Example::

        for waiting in delayed_stats(app):
            print(waiting.queue, waiting.waiting, waiting.next_due, waiting.tasks)
    """
    with app.connection_for_write() as connection:  # where the messages were written
        driver = connection.transport.driver_type
        if driver == "amqp":
            counts = level_counts(app, connection.default_channel)
            return [DelayedQueue(name, count, None) for name, count in counts.items() if count]
        if driver != "redis":
            return []
        channel = connection.default_channel
        prefix = getattr(channel, "global_keyprefix", "") or ""
        client = _raw(channel)
        found = []
        for raw in client.scan_iter(match=prefix + ZSET_PREFIX + "*", count=1000):
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            found.append(_waiting(client, name, name[len(prefix + ZSET_PREFIX) :]))
    return sorted((w for w in found if w.waiting), key=lambda w: w.queue)


def _waiting(client: Any, key: str, queue: str) -> DelayedQueue:
    first = client.zrange(key, 0, 0, withscores=True)
    next_due = (
        datetime.fromtimestamp(first[0][1] / 1000, timezone.utc).isoformat() if first else None
    )
    tasks: dict[str, int] = {}
    for member, _ in client.zscan_iter(key, count=1000):
        name = _task_of(member)
        tasks[name] = tasks.get(name, 0) + 1
    return DelayedQueue(queue, int(client.zcard(key)), next_due, tasks)


def _task_of(member: bytes | str) -> str:
    text = member.decode() if isinstance(member, bytes) else member
    length, _, rest = text.partition(":")
    try:
        message = json.loads(rest[int(length) :])
        return str(message["headers"]["task"])
    except (ValueError, KeyError, TypeError):
        return "?"


_drivers: weakref.WeakKeyDictionary[Celery, tuple[object, str]] = weakref.WeakKeyDictionary()


def _broker_setting(app: Celery) -> object:
    return (app.conf.broker_write_url or app.conf.broker_url, app.conf.broker_transport)


def _driver_type(app: Celery) -> str:
    """The app's transport (``"redis"``, ``"amqp"``, ...), looked up once per broker setting."""
    setting = _broker_setting(app)
    known = _drivers.get(app)
    if known is None or known[0] != setting:
        known = _drivers[app] = (setting, app.connection_for_write().transport.driver_type)
    return known[1]


_warned: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _warned:
        _warned.add(text)
        logger.warning(text)
