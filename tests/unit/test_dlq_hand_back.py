"""How ``celery dlq list`` / ``show`` / ``replay`` hand back the AMQP messages they only looked at.

RabbitMQ 4 counts a ``basic.reject`` (requeue) toward a quorum queue's delivery limit, 20 by
default, but not a ``basic.nack``: a dead-letter queue read often enough must never have RabbitMQ
drop a letter, so what is handed back goes back with one ``basic.nack`` before the channel
closes. (RabbitMQ 3.10 on the test machine counts every return, so this is checked on the wire,
here, and the real-broker tests check that listing still consumes nothing.)
"""

from __future__ import annotations

from typing import Any

from amqp import spec

from resilient_tasks.dlq.readers import _BasicGetReader, _ConsumingReader


class _Channel:
    def __init__(self, ready: int) -> None:
        self.log: list[Any] = []
        self.ready = ready

    def queue_declare(self, queue: str, passive: bool) -> tuple[str, int, int]:
        return queue, self.ready, 0

    def basic_get(self, queue: str, no_ack: bool) -> Any:
        self.log.append(("get", no_ack))
        return object()

    def message_to_python(self, raw: Any) -> Any:
        return _Delivered(self.log)

    def send_method(self, method: Any, fmt: str, args: tuple[Any, ...]) -> None:
        self.log.append(("method", method, fmt, args))

    def close(self) -> None:
        self.log.append(("close",))


class _Delivered:
    body = b"{}"
    content_type = "application/json"
    content_encoding = "utf-8"

    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.delivery_info = {"exchange": "", "routing_key": "billing.dlq"}
        self.headers: dict[str, Any] = {}
        self.properties: dict[str, Any] = {}

    def ack(self) -> None:
        self.log.append(("ack",))


class _Connection:
    connection_errors = (ConnectionError,)
    channel_errors = (LookupError,)

    def __init__(self, ready: int) -> None:
        self.ready = ready
        self.channels: list[_Channel] = []

    def channel(self) -> _Channel:
        self.channels.append(_Channel(self.ready))
        return self.channels[-1]

    @property
    def log(self) -> list[Any]:
        """What happened on the reading channel (the first; the others are count probes)."""
        return self.channels[0].log


def test_what_was_looked_at_goes_back_with_one_nack_before_the_channel_closes() -> None:
    connection = _Connection(ready=2)
    reader = _BasicGetReader(connection, "billing.dlq")
    first, _ = list(reader.messages())
    reader.remove(first)
    reader.close()

    nack = ("method", spec.Basic.Nack, "Lbb", (0, True, True))  # all unacked, requeued
    assert connection.log == [("get", False), ("get", False), ("ack",), nack, ("close",)]


def test_nothing_is_nacked_when_nothing_was_taken() -> None:
    connection = _Connection(ready=0)
    reader = _BasicGetReader(connection, "billing.dlq")
    assert list(reader.messages()) == []
    reader.close()

    assert connection.log == [("close",)]


def test_replay_cancels_its_consumer_before_handing_back() -> None:
    connection = _Connection(ready=1)
    reader = _ConsumingReader(connection, "billing.dlq")
    order: list[str] = []

    class _Consumer:
        def cancel(self) -> None:
            order.append("cancel")

    reader.consumer = _Consumer()
    reader.taken = True
    reader.close()

    assert order == ["cancel"]
    assert connection.log[-2:] == [("method", spec.Basic.Nack, "Lbb", (0, True, True)), ("close",)]
