"""RabbitMQ: a delayed message waits in queues whose TTL dead-letters it onward.

The topology is the one of Kombu's native delayed delivery (``kombu.transport.
native_delayed_delivery``, which Celery >= 5.5 declares for quorum queues): 28 durable queues
``celery_delayed_{L}``, each with a TTL of 2**L seconds, behind topic exchanges of the same name
that route on one binary digit of the delay each, and ``celery_delayed_delivery``, where a
message arrives when its delay has run out. Declared here with the same names and arguments
(and so shared with Celery's own when both are used), on every Kombu version.

What differs is how a message leaves ``celery_delayed_delivery``. Celery binds the destination's
exchange with ``#.<routing key>``, which cannot work for a direct exchange (Celery's default)
and matches any routing key ending the same way. Here the message's routing key is the 28 digits
then the destination *queue's* name, and that queue is bound to the delivery exchange with the
28 digits as ``*`` words then its name: exactly that queue gets the message. The exchange and
routing key the message was published with travel in a header and are given back to the worker
(:func:`restore_route`), so a retry of it, its dead letter and its envelope see its own route.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from contextlib import suppress
from typing import Any

from amqp.exceptions import ChannelError
from celery import Celery
from kombu.common import maybe_declare
from kombu.entity import Exchange, Queue

__all__ = [
    "BITS",
    "ROUTE_HEADER",
    "Topology",
    "delaying_producer",
    "level_counts",
    "restore_route",
]

logger = logging.getLogger(__name__)

#: Binary digits of a delay in seconds: the longest delay is 2**28 - 1 s (about 8.5 years).
BITS = 28
#: The exchange name and routing key a delayed message was published with.
ROUTE_HEADER = "resilient_tasks_route"
#: The app setting naming the topology: ``None`` for Celery's (and Kombu's) own names, else a
#: prefix (``{prefix}_celery_delayed_{L}``) that keeps one app's topology apart.
PREFIX_SETTING = "resilient_tasks_delayed_prefix"
#: Celery's setting (5.5+) for the type of the delay queues; the same default here.
QUEUE_TYPE_SETTING = "broker_native_delayed_delivery_queue_type"
_WILDCARDS = frozenset("*#")
#: The last word of the library's routing keys and bindings in the topology: Celery binds the
#: delivery exchange with ``#.<routing key>`` (a suffix match), which then matches neither a
#: library message nor a library binding.
SENTINEL = "resilient_tasks"
#: An exchange of a delay topology (any prefix).
TOPOLOGY_EXCHANGE = re.compile(
    r"(?:.+_)?(?:celery_delayed_(?:\d+|delivery)|resilient_tasks_delayed_(?:\d+ms|levels))"
)
#: The library's own levels below a second, in milliseconds, longest first: a message whose
#: delay is not a whole number of seconds goes through those its remainder needs (in steps of
#: the shortest) before the whole-second levels, so it is late by less than that step, not by
#: up to a second. Each level's queue has one TTL, so what waits in it leaves in order.
FRACTION_LEVELS = (512, 256, 128, 64)
#: The header that routes a message through (``"1"``) or past (``"0"``) a level below a second.
FRACTION_HEADER = "resilient_tasks_delay_{}ms"
#: The header naming the whole-second level a message goes on to after the levels below a
#: second (its delay's highest binary digit), or ``"none"`` for the delivery exchange.
LEVEL_HEADER = "resilient_tasks_delay_level"
_FRACTION_HEADERS = (*(FRACTION_HEADER.format(ms) for ms in FRACTION_LEVELS), LEVEL_HEADER)


class Topology:
    """The names of one delay topology (``prefix`` as Kombu's ``level_name`` takes it)."""

    def __init__(self, prefix: str | None = None, queue_type: str = "quorum") -> None:
        self.prefix = prefix or None
        self.queue_type = queue_type

    @classmethod
    def of(cls, app: Celery) -> Topology:
        return cls(app.conf.get(PREFIX_SETTING), app.conf.get(QUEUE_TYPE_SETTING) or "quorum")

    def _named(self, name: str) -> str:
        """``name`` with the topology's prefix, as Kombu's ``level_name`` prefixes it."""
        return f"{self.prefix}_{name}" if self.prefix else name

    def level(self, level: int) -> str:
        return self._named(f"celery_delayed_{level}")

    @property
    def delivery(self) -> str:
        return self._named("celery_delayed_delivery")

    @property
    def entry(self) -> str:
        """Where a delayed message is published: the exchange of the longest level."""
        return self.level(BITS - 1)

    def names(self) -> list[str]:
        return [self.level(level) for level in range(BITS)]

    def queues(self) -> list[str]:
        """Every queue a delayed message waits in: the whole-second levels, then the library's
        levels below a second (declared after them)."""
        return [*self.names(), *map(self.fraction, FRACTION_LEVELS)]

    def declare(self, channel: Any) -> None:
        """Declare the levels and the delivery exchange as Kombu's
        ``declare_native_delayed_delivery_exchanges_and_queues`` does (idempotent)."""
        for level in range(BITS - 1, -1, -1):
            name = self.level(level)
            channel.exchange_declare(name, "topic", durable=True, auto_delete=False)
            arguments: dict[str, Any] = {
                "x-queue-type": self.queue_type,
                "x-overflow": "reject-publish",
                "x-message-ttl": 2**level * 1000,
                "x-dead-letter-exchange": self.level(level - 1) if level else self.delivery,
            }
            if self.queue_type == "quorum":
                # Without it a quorum queue drops what it dead-letters if the broker fails
                # in between (at-most-once).
                arguments["x-dead-letter-strategy"] = "at-least-once"
            channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
            # The digit of this level (2**level s) is the (BITS - level)-th word.
            words = "*." * (BITS - 1 - level)
            channel.queue_bind(name, name, words + "1.#")
        for level in range(BITS - 1, 0, -1):  # once every level's exchange exists
            words = "*." * (BITS - 1 - level)
            channel.exchange_bind(self.level(level - 1), self.level(level), words + "0.#")
        channel.exchange_declare(self.delivery, "topic", durable=True, auto_delete=False)
        channel.exchange_bind(self.delivery, self.level(0), "*." * (BITS - 1) + "0.#")

    def fraction(self, ms: int) -> str:
        """The exchange and queue of the library's level of ``ms`` milliseconds."""
        return self._named(f"resilient_tasks_delayed_{ms}ms")

    @property
    def fraction_entry(self) -> str:
        """Where a message is published whose delay is not a whole number of seconds."""
        return self.fraction(FRACTION_LEVELS[0])

    @property
    def levels(self) -> str:
        """The exchange that hands a message from the levels below a second to the first
        whole-second level it waits in (:data:`LEVEL_HEADER`)."""
        return self._named("resilient_tasks_delayed_levels")

    def start(self, seconds: int) -> str:
        """The exchange a message delayed by ``seconds`` whole seconds is published to: that
        of the level of its highest binary digit. Kombu publishes to the longest level's, whose
        message then passes every level above its digits (an exchange hop each, which costs
        RabbitMQ more than the rest of the delay); the levels route it the same either way."""
        return self.level(seconds.bit_length() - 1) if seconds else self.delivery

    def declare_fractions(self, channel: Any) -> None:
        """Declare the levels below a second: headers exchanges (the routing key is left for
        the whole-second levels), each with a queue of that TTL and a way past it, and the
        exchange after the last, which hands the message to its first whole-second level
        (idempotent; the whole-second levels are declared first)."""
        onward = [self.fraction(ms) for ms in FRACTION_LEVELS[1:]] + [self.levels]
        for name in [*map(self.fraction, FRACTION_LEVELS), self.levels]:
            channel.exchange_declare(name, "headers", durable=True, auto_delete=False)
        for level in range(BITS):
            to_level = {"x-match": "all", LEVEL_HEADER: str(level)}
            channel.exchange_bind(self.level(level), self.levels, "", arguments=to_level)
        channel.exchange_bind(
            self.delivery, self.levels, "", arguments={"x-match": "all", LEVEL_HEADER: "none"}
        )
        for ms, after in zip(FRACTION_LEVELS, onward, strict=True):
            name, header = self.fraction(ms), FRACTION_HEADER.format(ms)
            arguments: dict[str, Any] = {
                "x-queue-type": self.queue_type,
                "x-overflow": "reject-publish",
                "x-message-ttl": ms,
                "x-dead-letter-exchange": after,
            }
            if self.queue_type == "quorum":
                arguments["x-dead-letter-strategy"] = "at-least-once"
            channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
            channel.queue_bind(name, name, "", arguments={"x-match": "all", header: "1"})
            channel.exchange_bind(after, name, "", arguments={"x-match": "all", header: "0"})

    def bind(self, channel: Any, queue: str) -> None:
        """Bind ``queue`` to the delivery exchange: it gets the messages delayed for it."""
        channel.queue_bind(queue, self.delivery, "*." * BITS + queue + "." + SENTINEL)

    def delete(self, channel: Any) -> None:
        """Delete the topology and every message waiting in it (for tests and teardown)."""
        fractions = [*map(self.fraction, FRACTION_LEVELS), self.levels]
        for name in [*self.names(), self.delivery, *fractions]:
            channel.queue_delete(name)
            channel.exchange_delete(name)


def routing_key(seconds: int, queue: str) -> str:
    """``queue``'s routing key through the topology for a delay of ``seconds``."""
    return ".".join(format(seconds, f"0{BITS}b")) + "." + queue + "." + SENTINEL


def split(delay_ms: int) -> tuple[int, int]:
    """A delay as the topology waits it: whole seconds and steps of the shortest level below a
    second (``FRACTION_LEVELS[-1]`` ms), rounded up, never early.

        >>> split(4300)  # 4 s, then 5 steps of 64 ms: 320 ms
        (4, 5)
        >>> split(2990)  # 990 ms is more than 15 steps: a whole second
        (3, 0)
    """
    step = FRACTION_LEVELS[-1]
    seconds, rest = divmod(max(0, delay_ms), 1000)
    steps = -(-rest // step)
    if steps * step >= 1000:
        return seconds + 1, 0
    return seconds, steps


def waits(delay: float) -> float:
    """The seconds a message delayed by ``delay`` seconds waits in the topology."""
    seconds, steps = split(math.ceil(delay * 1000 - 1e-3))
    return seconds + steps * FRACTION_LEVELS[-1] / 1000


def fraction_headers(seconds: int, steps: int) -> dict[str, str]:
    """The headers that take a message through the levels below a second ``steps`` needs,
    then to the first whole-second level of ``seconds``."""
    bits = format(steps, f"0{len(FRACTION_LEVELS)}b")
    through = {
        FRACTION_HEADER.format(ms): bit for ms, bit in zip(FRACTION_LEVELS, bits, strict=True)
    }
    return {**through, LEVEL_HEADER: str(seconds.bit_length() - 1) if seconds else "none"}


def bindable(queue: str) -> bool:
    """Whether ``queue`` can be named in a topic binding (no ``*`` or ``#`` words)."""
    return bool(queue) and not any(word in _WILDCARDS for word in queue.split("."))


def restore_route(message: Any) -> bool:
    """Give a message that arrived through the topology the exchange and routing key it was
    published with (its ``delivery_info``): Celery reads them for a retry's route. Whether it
    arrived through the topology."""
    headers = getattr(message, "headers", None) or {}
    for header in _FRACTION_HEADERS:
        headers.pop(header, None)
    route: Any = headers.get(ROUTE_HEADER)
    info = getattr(message, "delivery_info", None)
    if not _is_route(route) or not isinstance(info, dict):
        return False
    # The exchange RabbitMQ names is the last it dead-lettered the message to: a level's.
    if not TOPOLOGY_EXCHANGE.fullmatch(str(info.get("exchange") or "")):
        return False
    info["exchange"], info["routing_key"] = route
    return True


class Arrivals:
    """The delayed messages this worker received lately, to tell a second copy of one.

    A quorum delay queue dead-letters *at least once*: if a RabbitMQ node fails while it hands a
    message on, the message can reach its queue twice. Both copies are the same message (same
    id, retry number and due time); the first to reach this worker runs and a later one is
    acknowledged and dropped. A copy that reaches another worker is not seen here.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._seen: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(message: Any) -> tuple[Any, ...] | None:
        """What identifies one delayed copy; ``None`` for a message the broker redelivered
        (a copy this worker, or another, did not acknowledge: it must run)."""
        if (getattr(message, "delivery_info", None) or {}).get("redelivered"):
            return None
        headers = getattr(message, "headers", None) or {}
        return (headers.get("id"), headers.get("retries"), headers.get("eta"))

    def is_copy(self, key: tuple[Any, ...], token: int) -> bool:
        """Whether ``key`` arrived before as another request than ``token``; records it."""
        with self._lock:
            first = self._seen.setdefault(key, token)
            self._seen.move_to_end(key)
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)
        return first != token


arrivals = Arrivals()


def _routes(queue: Queue, exchange: str, key: str) -> bool:
    """Whether a message published to ``exchange`` with ``key`` is for ``queue``: the default
    exchange and the queue's name, or the queue's own direct exchange and routing key. (A
    topic or fanout exchange may copy a message to several queues: Celery's own delay, held
    by the worker, keeps that.)"""
    if exchange == "":
        return queue.name == key
    own = queue.exchange
    return (
        own is not None
        and own.name == exchange
        and own.type == "direct"
        and queue.routing_key == key
    )


def destination(app: Celery, exchange: str, key: str, declare: Iterable[Any]) -> Queue | None:
    """The one queue a message published to ``exchange`` with ``key`` is for: a queue Celery
    declares with it, else the app's queue with that route; ``None`` when there is not one."""
    for entity in declare:
        if isinstance(entity, Queue) and entity.name and _routes(entity, exchange, key):
            return entity
    found: list[Queue] = [q for q in app.amqp.queues.values() if _routes(q, exchange, key)]
    if len(found) == 1:
        return found[0]
    if exchange == "" and not found:
        return Queue(key, exchange=Exchange(""), routing_key=key, no_declare=True)  # type: ignore[no-untyped-call]
    return None


class _Delaying:
    """A producer that publishes a message with an ``eta`` still to come into the delay
    topology, for the one queue it is for; everything else as the producer it wraps."""

    def __init__(self, producer: Any, app: Celery) -> None:
        self._producer = producer
        self._app = app

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def publish(self, body: Any, **options: Any) -> Any:
        from .delayed import _delay_ms, _warn_once

        headers: Mapping[str, Any] = options.get("headers") or {}
        exchange = options.get("exchange")
        exchange_name = str(getattr(exchange, "name", exchange) or "")
        key = str(options.get("routing_key") or "")
        route: Any = headers.get(ROUTE_HEADER)
        if TOPOLOGY_EXCHANGE.fullmatch(exchange_name) and _is_route(route):
            # Published again from a message that came through the topology (a retry, by a
            # worker whose Request did not give it its route back): its own route.
            exchange_name, key = str(route[0]), str(route[1])
            options.update(exchange=exchange_name, routing_key=key)
        if any(header in headers for header in _FRACTION_HEADERS):
            headers = {k: v for k, v in headers.items() if k not in _FRACTION_HEADERS}
            options["headers"] = headers
        delay_ms = _delay_ms(headers)
        if delay_ms <= 0 or "celery_delayed_" in exchange_name:  # not delayed, or by Celery
            return self._producer.publish(body, **options)
        seconds, steps = split(delay_ms)
        queue = destination(self._app, exchange_name, key, options.get("declare") or ())
        if queue is None or not bindable(queue.name) or seconds >= 2**BITS:
            _warn_once(
                f"resilient_tasks: a delayed message to exchange {exchange_name!r} with routing "
                f"key {key!r} is not for exactly one queue the app knows through the default "
                "or a direct exchange (or its delay or queue name cannot go through the delay "
                "queues): the worker holds it, as Celery does"
            )
            return self._producer.publish(body, **options)
        topology = Topology.of(self._app)
        if not self._prepared(topology, queue, options):
            return self._producer.publish(body, **options)
        options.update(
            exchange=topology.fraction_entry if steps else topology.start(seconds),
            routing_key=routing_key(seconds, queue.name),
            declare=[],
            headers={
                **headers,
                **(fraction_headers(seconds, steps) if steps else {}),
                ROUTE_HEADER: [exchange_name, key],
            },
        )
        return self._producer.publish(body, **options)

    def _prepared(self, topology: Topology, queue: Queue, options: Mapping[str, Any]) -> bool:
        """Declare the topology and bind ``queue``, once per connection: Kombu's own cache of
        what a connection declared (``declared_entities``), emptied when it reconnects, so a
        broker that lost them (reset, or the topology deleted) gets them again. Each on a
        channel of its own: a refusal closes that one, not the producer's. False if RabbitMQ
        refused the topology (remembered by the process for a while) or the binding."""
        from .delayed import _warn_once

        connection = self._producer.connection
        declared = connection.declared_entities
        levels = ("resilient_tasks.delay_topology", topology.prefix, topology.queue_type)
        bound = ("resilient_tasks.delay_binding", topology.prefix, queue.name)
        refusal = (connection.as_uri(), topology.prefix, topology.queue_type)
        if time.monotonic() < _refused.get(refusal, 0.0):
            return False
        if levels in declared and bound in declared:
            return True

        def prepare() -> str | None:
            """What RabbitMQ refused, if anything."""
            if levels not in declared:
                try:
                    _on_a_channel(connection, topology.declare)
                    _on_a_channel(connection, topology.declare_fractions)
                except ChannelError as exc:
                    _refused[refusal] = time.monotonic() + REFUSAL_REMEMBERED
                    _warn_once(
                        f"resilient_tasks: RabbitMQ refused the delay queues ({exc}); the "
                        "worker holds delayed messages, as Celery does. Declared by hand or "
                        "by another version with other arguments? Set "
                        f"{QUEUE_TYPE_SETTING} to their queue type, or {PREFIX_SETTING} to "
                        "give this app its own"
                    )
                    return "the delay queues"
                declared.add(levels)
            if not getattr(queue, "no_declare", False):
                # A queue that exists with other arguments is there all the same: bound below.
                with suppress(ChannelError):
                    _on_a_channel(connection, lambda channel: _declare(queue, channel))
            try:
                _on_a_channel(connection, lambda channel: topology.bind(channel, queue.name))
            except ChannelError as exc:
                _warn_once(
                    f"resilient_tasks: RabbitMQ refused to bind {queue.name!r} to the delay "
                    f"queues ({exc}); the worker holds its delayed messages"
                )
                return "the binding"
            declared.add(bound)
            return None

        if options.get("retry"):
            policy = options.get("retry_policy") or {}
            refused = connection.ensure(self._producer, prepare, **policy)()
        else:
            refused = prepare()
        return refused is None


#: How long a process publishes delayed messages as Celery does after RabbitMQ refused its
#: delay queues, before it tries them again.
REFUSAL_REMEMBERED = 300.0
_refused: dict[tuple[Any, ...], float] = {}


def _declare(queue: Queue, channel: Any) -> None:
    maybe_declare(queue, channel)  # type: ignore[no-untyped-call]


def _on_a_channel(connection: Any, declare: Any) -> None:
    """``declare(channel)`` on a new channel of ``connection``, closed after."""
    channel = connection.channel()
    try:
        declare(channel)
    finally:
        with suppress(Exception):
            channel.close()


def _is_route(route: Any) -> bool:
    return isinstance(route, (list, tuple)) and len(route) == 2


def delaying_producer(producer: Any, app: Celery) -> Any:
    """``producer``, publishing what is delayed into the app's delay topology."""
    return _Delaying(producer, app)


def level_counts(app: Celery, channel: Any) -> dict[str, int]:
    """How many messages wait in each queue of the app's topology, the levels below a second
    included (none: not declared)."""
    from amqp.exceptions import NotFound

    counts: dict[str, int] = {}
    for name in Topology.of(app).queues():
        try:
            counts[name] = channel.queue_declare(name, passive=True).message_count
        except NotFound:
            # What is missing was declared with the rest of its kind, or after it: nothing more
            # to count (and RabbitMQ has closed the channel).
            break
    return counts
