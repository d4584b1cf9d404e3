"""Publishing replayed messages, each kept in its dead-letter queue until the broker has it.

:class:`_Outgoing` is a message to publish. :func:`_publisher` opens the publisher for the
app's broker: :class:`_Pipelined` on py-amqp (a confirm-mode channel of its own, published to
without waiting and confirmed in batches), :class:`_OneByOne` elsewhere (the shared confirmed
producer, one publish at a time). Either calls each message's ``done`` once the broker has it,
and raises :class:`_NotReplayed` for one it does not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amqp.exceptions import MessageNacked
from kombu.messaging import Producer
from kombu.transport.virtual import Channel as VirtualChannel

from resilient_tasks.publish import PUBLISH_RETRY_POLICY, confirmed_producer

if TYPE_CHECKING:
    from celery import Celery

    from .model import DeadLetter


@dataclass(frozen=True)
class _Outgoing:
    """A message to publish: what :meth:`kombu.Producer.publish` is given for it."""

    body: bytes
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    content_type: str
    content_encoding: str
    priority: int | None
    delivery_mode: int
    properties: dict[str, Any]


class _Unroutable(Exception):
    """No queue would receive the message: the broker returned it, or no binding matches."""


def _publish_arguments(message: _Outgoing) -> dict[str, Any]:
    """What :meth:`kombu.Producer.publish` is given for ``message``: ``mandatory`` makes an AMQP
    broker return a message no queue would receive (before its confirm)."""
    return {
        "body": message.body,
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "headers": message.headers,
        "delivery_mode": message.delivery_mode,
        "mandatory": True,
        **({"priority": message.priority} if message.priority is not None else {}),
        **message.properties,
    }


def _unroutable(message: _Outgoing, returned: BaseException) -> _Unroutable:
    error = _Unroutable(
        f"the broker returned it: no queue is bound to exchange {message.exchange!r} "
        f"with routing key {message.routing_key!r} ({returned})"
    )
    error.__cause__ = returned
    return error


def _publish(producer: Any, message: _Outgoing) -> None:
    """Publish and wait for the broker's confirm; raise if no queue would receive it."""
    channel = producer.channel
    # Kombu's virtual transports drop a message no binding matches, silently.
    if (
        isinstance(channel, VirtualChannel)
        and message.exchange
        and not channel._lookup(message.exchange, message.routing_key)  # type: ignore[no-untyped-call]
    ):
        raise _Unroutable(
            f"no queue is bound to exchange {message.exchange!r} "
            f"with routing key {message.routing_key!r}"
        )
    returned: list[BaseException] = []

    def on_return(exc: BaseException, *_: Any) -> None:
        returned.append(exc)

    events = getattr(channel, "events", None)
    if events is not None:
        events["basic_return"].add(on_return)
    try:
        producer.publish(
            **_publish_arguments(message), retry=True, retry_policy=dict(PUBLISH_RETRY_POLICY)
        )
    finally:
        if events is not None:
            events["basic_return"].discard(on_return)
    if returned:
        raise _unroutable(message, returned[0])


class _NotReplayed(Exception):
    """The publish of ``letter`` failed (``cause`` says how); it stays in its queue."""

    def __init__(self, letter: DeadLetter, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.letter = letter
        self.cause = cause


class _Publisher(ABC):
    """Replay's publishing: ``publish()`` sends a message and calls ``done`` once the broker has
    it (there and then, or at a later ``publish()`` or ``flush()``); ``flush()`` returns once
    every message sent has been settled. A publish that fails raises :class:`_NotReplayed` for
    it; every other message the broker confirmed meanwhile has had its ``done`` called."""

    @abstractmethod
    def publish(self, letter: DeadLetter, message: _Outgoing, done: Callable[[], None]) -> None:
        """Publish ``message`` (the replay of ``letter``); ``done`` once the broker has it."""

    @abstractmethod
    def flush(self) -> None:
        """Wait until every message published is confirmed or has failed."""


class _OneByOne(_Publisher):
    """Kombu's producer with publisher confirms where the broker has them: each publish waits
    for its own confirm. For Kombu's virtual transports (Redis, filesystem), where a publish is
    complete when it returns."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer

    def publish(self, letter: DeadLetter, message: _Outgoing, done: Callable[[], None]) -> None:
        try:
            _publish(self.producer, message)
        except Exception as exc:
            raise _NotReplayed(letter, exc) from exc
        done()

    def flush(self) -> None:
        """Nothing is in flight."""


@dataclass(eq=False)
class _InFlight:
    letter: DeadLetter
    message: _Outgoing
    done: Callable[[], None]
    #: Why the broker does not have it: returned, nacked, or the channel broke first.
    failure: BaseException | None = None


class _Pipelined(_Publisher):
    """py-amqp: a channel in confirm mode, published to without waiting; the confirms of up to
    ``BATCH`` messages are then awaited together.

    The broker numbers the publishes of a confirm-mode channel 1, 2, ... and acks or nacks each
    (``multiple``: every one up to that number); an unroutable ``mandatory`` message comes back
    (``basic.return``) before its ack. A message counts as published once acked and not
    returned; a nack, a return, or a channel or connection that breaks before the confirm
    leaves it in its queue.

    Publishing to an exchange that does not exist would close the channel, and the confirms of
    every message in flight would be lost with it: each exchange is looked up once, first.
    """

    BATCH = 200
    #: Seconds without a frame from the broker before the batch counts as unconfirmed.
    CONFIRM_TIMEOUT = 30.0

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        channel = connection.channel()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        self.producer = Producer(channel)  # type: ignore[no-untyped-call]
        self.sent = 0  # the number the broker gives the next publish, less one
        self.batch: dict[int, _InFlight] = {}  # the unsettled ones, by number
        self.unconfirmed: dict[int, _InFlight] = {}
        self.exchanges = {""}  # the default exchange is always there

    def publish(self, letter: DeadLetter, message: _Outgoing, done: Callable[[], None]) -> None:
        if message.exchange not in self.exchanges:
            self._look_up(letter, message.exchange)
        self.sent += 1
        self.batch[self.sent] = self.unconfirmed[self.sent] = _InFlight(letter, message, done)
        try:
            self.producer.publish(**_publish_arguments(message))  # type: ignore[no-untyped-call]
        except Exception as exc:
            self._settle(exc)  # raises: this one, at least, the broker has not
        if len(self.batch) >= self.BATCH:
            self.flush()

    def _look_up(self, letter: DeadLetter, exchange: str) -> None:
        probe = self.connection.channel()  # a 404 closes the channel it happens on
        try:
            probe.exchange_declare(exchange, "direct", passive=True)
        except self.connection.channel_errors as exc:
            self.flush()  # what was published before it stands
            raise _NotReplayed(letter, exc) from exc
        finally:
            with suppress(Exception):
                probe.close()
        self.exchanges.add(exchange)

    def flush(self) -> None:
        try:
            while self.unconfirmed:  # a broker that stops answering fails the batch
                self.connection.drain_events(timeout=self.CONFIRM_TIMEOUT)
        except Exception as exc:  # the channel or the connection broke
            self._settle(exc)  # raises: some were never confirmed
        self._settle(None)

    def _settle(self, broken: BaseException | None) -> None:
        """Call ``done`` for every message the broker has, in order; then raise for the first
        one it has not. ``broken``: why the unconfirmed ones never will be."""
        for flight in self.unconfirmed.values():
            flight.failure = flight.failure or broken
        batch, self.batch, self.unconfirmed = self.batch, {}, {}
        failed = [(f.letter, cause) for f in batch.values() if (cause := f.failure) is not None]
        for flight in batch.values():
            if flight.failure is None:
                flight.done()
        if failed:
            letter, cause = failed[0]
            raise _NotReplayed(letter, cause) from cause

    def _confirmed(self, number: int, multiple: bool) -> list[_InFlight]:
        numbers = [n for n in self.unconfirmed if n <= number] if multiple else [number]
        return [self.unconfirmed.pop(n) for n in numbers if n in self.unconfirmed]

    def _on_ack(self, number: int, multiple: bool) -> None:
        self._confirmed(number, multiple)

    def _on_nack(self, number: int, multiple: bool) -> None:
        for flight in self._confirmed(number, multiple):
            flight.failure = flight.failure or MessageNacked("the broker nacked the publish")

    def _on_return(self, exc: BaseException, exchange: str, routing_key: str, raw: Any) -> None:
        # Which publish it was is told by its contents alone: every unconfirmed one it could be
        # stays in its queue (identical messages to one destination route alike anyway).
        body = raw.body
        if isinstance(body, str):  # py-amqp decodes a body with its content encoding
            body = body.encode(raw.properties.get("content_encoding") or "utf-8")
        returned = (exchange, routing_key, body)
        for flight in self.unconfirmed.values():
            message = flight.message
            if (message.exchange, message.routing_key, message.body) == returned:
                flight.failure = _unroutable(message, exc)


@contextmanager
def _publisher(app: Celery, dry_run: bool) -> Iterator[_Publisher | None]:
    """Nothing for a dry run; on py-amqp, a connection of its own publishing in batches
    (confirms are then the replay's own, whatever ``broker_transport_options`` say);
    elsewhere the shared confirmed producer, one publish at a time."""
    if dry_run:
        yield None
        return
    with app.connection_for_write(transport_options={"confirm_publish": False}) as conn:
        if conn.transport.driver_name == "py-amqp":
            yield _Pipelined(conn)
            return
    with confirmed_producer(app) as producer:
        yield _OneByOne(producer)
