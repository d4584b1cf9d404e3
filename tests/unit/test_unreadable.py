"""A message the worker cannot read: dead-lettered, then acknowledged; requeued when the dead
letter cannot be published; left to Celery when it is not the library's to settle.

The worker-tier tests (``tests/worker/test_dead_letters.py``) send such messages to a real
worker; these drive the strategy's handler with a stand-in for Celery's own, to reach what a
real worker only does when the broker misbehaves.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import InvalidTaskError
from kombu.exceptions import ContentDisallowed, DecodeError

from resilient_tasks import FailureDetails, ResilientTask, strategy


@dataclass
class Message:
    """What the consumer hands the strategy: a kombu message's attributes."""

    headers: dict[str, Any]
    body: bytes = b'[[1], {"token": "s3cr3t"'
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    properties: dict[str, Any] = field(default_factory=dict)
    delivery_info: dict[str, Any] = field(
        default_factory=lambda: {"exchange": "", "routing_key": "billing"}
    )
    acknowledged: bool = False


class Consumer:
    hostname = "w1@host"
    connection_errors = (ConnectionError,)


@pytest.fixture
def app() -> Celery:
    app = Celery("unreadable", set_as_current=False)
    app.conf.result_backend = "cache+memory://"
    app.finalize()
    return app


@pytest.fixture
def given_up(app: Celery) -> list[FailureDetails]:
    return []


@pytest.fixture
def task(app: Celery, given_up: list[FailureDetails]) -> Any:
    class Recording(ResilientTask):
        def on_give_up(self, details: FailureDetails) -> None:
            given_up.append(details)

    @app.task(base=Recording, name="billing.sync", shared=False)
    def sync(invoice: int) -> None:
        """A task body."""

    return sync


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    sent: list[tuple[str, dict[str, Any]]] = []

    def publish(app: Any, queue: str, envelope: dict[str, Any], source: Any = None) -> None:
        sent.append((queue, envelope))

    monkeypatch.setattr(strategy, "publish_envelope", publish)
    return sent


def handler(task: Any, raising: BaseException | None, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The library's handler around a stand-in for Celery's, which raises ``raising``."""

    def celerys(_task: Any, _app: Any, _consumer: Any, **_: Any) -> Any:
        def handle(message: Any, *args: Any, **kwargs: Any) -> str:
            if raising is not None:
                raise raising
            return "handled by Celery"

        return handle

    monkeypatch.setattr(strategy, "default", celerys)
    return strategy.dead_lettering(task, task.app, Consumer())


class Settled:
    """The ack and reject promises the consumer passes, recording how they were called."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def ack(self, *args: Any) -> None:
        self.calls.append(("ack", args[2:]))

    def reject(self, *args: Any) -> None:
        self.calls.append(("reject", args[2:]))


def deliver(handle: Any, message: Message) -> tuple[Any, Settled]:
    settled = Settled()
    return handle(message, None, settled.ack, settled.reject, None), settled


def headers(**extra: Any) -> dict[str, Any]:
    """A task message's headers, with an id of its own (the memory result backend is shared
    by the whole process)."""
    task_id = str(uuid.uuid4())
    return {"id": task_id, "task": "billing.sync", "retries": 0, "root_id": task_id, **extra}


@pytest.mark.parametrize(
    "error",
    [
        DecodeError("Expecting ',' delimiter"),
        ContentDisallowed("Refusing to deserialize untrusted content of type pickle"),
        InvalidTaskError("invalid ETA value 'next tuesday'"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_unreadable_message_is_dead_lettered_then_acknowledged(
    task: Any,
    published: list[tuple[str, dict[str, Any]]],
    given_up: list[FailureDetails],
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
) -> None:
    message = Message(headers(retries=2))

    returned, settled = deliver(handler(task, error, monkeypatch), message)

    assert returned is None
    assert settled.calls == [("ack", ())]
    ((queue, envelope),) = published
    assert queue == "billing.dlq"
    assert envelope["reason"] == "exception"
    assert envelope["exception"]["type"] == f"{type(error).__module__}.{type(error).__name__}"
    assert envelope["task"]["id"] == message.headers["id"]
    assert envelope["task"]["args"] == []
    assert envelope["attempts"][-1]["number"] == 3
    assert envelope["original"]["body"] == message.body.decode()
    ((details),) = given_up
    assert (details.reason, details.task_id) == ("exception", message.headers["id"])
    assert details.exception is error
    result = task.AsyncResult(message.headers["id"])
    assert result.state == "FAILURE"
    assert isinstance(result.result, type(error))


def test_when_the_dead_letter_cannot_be_published_the_message_is_requeued(
    task: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: Any, **__: Any) -> None:
        raise ConnectionError("broker gone")

    monkeypatch.setattr(strategy, "publish_envelope", refuse)

    message = Message(headers())

    _, settled = deliver(handler(task, DecodeError("corrupt"), monkeypatch), message)

    assert settled.calls == [("reject", (True,))]
    assert task.AsyncResult(message.headers["id"]).state == "PENDING"  # it comes back


def test_a_readable_message_goes_through_celerys_strategy_untouched(
    task: Any, published: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    returned, settled = deliver(handler(task, None, monkeypatch), Message(headers()))

    assert returned == "handled by Celery"
    assert settled.calls == []
    assert published == []


def test_a_message_already_acknowledged_is_left_to_celery(
    task: Any, published: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = handler(task, DecodeError("corrupt"), monkeypatch)

    with pytest.raises(DecodeError):
        deliver(handle, Message(headers(), acknowledged=True))
    assert published == []


def test_a_task_with_dead_letter_false_leaves_it_to_celery(
    app: Celery, published: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.task(base=ResilientTask, name="billing.off", shared=False, dead_letter=False)
    def off() -> None:
        """A task body."""

    with pytest.raises(DecodeError):
        deliver(handler(off, DecodeError("corrupt"), monkeypatch), Message(headers()))
    assert published == []


def test_the_envelopes_kwargs_keep_no_secret_from_the_unread_body(
    task: Any, published: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body could not be read, so nothing from it reaches ``task``: only ``original``
    (which replay republishes) keeps it, as for every dead letter."""
    deliver(handler(task, DecodeError("corrupt"), monkeypatch), Message(headers()))

    ((_, envelope),) = published
    assert envelope["task"]["kwargs"] == {}
    assert "s3cr3t" not in repr({k: v for k, v in envelope.items() if k != "original"})
