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
from kombu.exceptions import ContentDisallowed, DecodeError, SerializerNotInstalled

from resilient_tasks import FailureDetails, ResilientTask
from resilient_tasks import unreadable as strategy


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
    #: The body as Celery's strategy decodes it.
    payload: Any = field(default_factory=lambda: [[1], {}, {}])


class Consumer:
    hostname = "w1@host"
    connection_errors = (ConnectionError,)


@pytest.fixture
def app() -> Celery:
    app = Celery("unreadable", broker="memory://", set_as_current=False)
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


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The dead-letter queues recorded for the tools (``resilient_tasks.dlq.registry``)."""
    queues: list[str] = []
    monkeypatch.setattr(strategy, "record_dead_letter_queue", lambda app, q: queues.append(q))
    return queues


def handler(
    task: Any,
    raising: BaseException | None,
    monkeypatch: pytest.MonkeyPatch,
    handled: list[Any] | None = None,
) -> Any:
    """The library's handler around a stand-in for Celery's, which raises ``raising`` (and
    appends each message it is given to ``handled``)."""

    def celerys(_task: Any, _app: Any, _consumer: Any, **_: Any) -> Any:
        def handle(message: Any, *args: Any, **kwargs: Any) -> str:
            if handled is not None:
                handled.append(message)
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

    def ack(self, logger: Any, errors: Any, *rest: Any) -> None:
        assert (logger, errors) == (strategy.logger, Consumer.connection_errors)
        self.calls.append(("ack", rest))

    def reject(self, logger: Any, errors: Any, *rest: Any) -> None:
        assert (logger, errors) == (strategy.logger, Consumer.connection_errors)
        self.calls.append(("reject", rest))


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
        SerializerNotInstalled("No decoder installed for msgpack"),  # accepted, not installed
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_unreadable_message_is_dead_lettered_then_acknowledged(
    task: Any,
    published: list[tuple[str, dict[str, Any]]],
    given_up: list[FailureDetails],
    recorded: list[str],
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
) -> None:
    message = Message(headers(retries=2))

    returned, settled = deliver(handler(task, error, monkeypatch), message)

    assert returned is None
    assert settled.calls == [("ack", ())]
    ((queue, envelope),) = published
    assert queue == "billing.dlq"
    assert recorded == ["billing.dlq"]  # the tools find the queue
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


def test_a_message_settled_already_is_not_handed_back_to_celery(
    task: Any, published: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery's handlers would settle it a second time (``MessageStateError``), which stops the
    consumer: it is logged and left as it is."""
    handle = handler(task, DecodeError("corrupt"), monkeypatch)

    returned, settled = deliver(handle, Message(headers(), acknowledged=True))

    assert (returned, settled.calls, published) == (None, [], [])


def test_a_task_with_dead_letter_false_leaves_it_to_celery(
    app: Celery, published: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.task(base=ResilientTask, name="billing.off", shared=False, dead_letter=False)
    def off() -> None:
        """A task body."""

    with pytest.raises(DecodeError):
        deliver(handler(off, DecodeError("corrupt"), monkeypatch), Message(headers()))
    assert published == []


@pytest.mark.parametrize(
    "body",
    [
        [[42], {"region": "eu"}, {"callbacks": None, "chain": None}],
        ((42,), {}, None),  # pickle's tuples, an empty embed
        {"args": [42], "kwargs": {}, "id": "f7c9", "task": "billing.sync"},  # protocol 1
    ],
    ids=["json", "pickle", "protocol-1"],
)
def test_a_body_of_celerys_shape_passes(body: Any) -> None:
    strategy.check_body(body)


@pytest.mark.parametrize(
    ("body", "shape"),
    [
        (None, "a NoneType"),
        ([1, 2], "a list of 2"),
        ("[[1], {}, {}]", "a str"),
        ({"kwargs": {}}, "a dict"),
        ([7, {}, {}], "[int, dict, dict]"),
        ([[7], [2], {}], "[list, list, dict]"),
        ([[7], {}, 5], "[list, dict, int]"),
    ],
)
def test_a_body_of_another_shape_is_refused_with_what_it_is(body: Any, shape: str) -> None:
    with pytest.raises(InvalidTaskError, match=r"not Celery's \[args, kwargs, embed\]: ") as info:
        strategy.check_body(body)
    assert str(info.value).endswith(shape)


@pytest.mark.parametrize(
    "given",
    [{}, {"timelimit": [None, None]}, {"timelimit": (30, 40.5)}, {"timelimit": None}],
    ids=["no-timelimit", "no-limits", "limits", "timelimit-none"],
)
def test_headers_of_celerys_types_pass(given: dict[str, Any]) -> None:
    strategy.check_headers({"id": "7f3c", "task": "billing.sync", **given})


@pytest.mark.parametrize(
    ("given", "what"),
    [
        ({"id": ["7f3c"]}, "the id header is not a task id: ['7f3c']"),
        ({"id": None}, "the id header is not a task id: None"),
        ({"id": ""}, "the id header is not a task id: ''"),
        ({"timelimit": [30]}, "the timelimit header is not [soft, hard] seconds: [30]"),
        ({"timelimit": ["30", 40]}, "the timelimit header is not [soft, hard] seconds: ['30', 40]"),
        ({"timelimit": 30}, "the timelimit header is not [soft, hard] seconds: 30"),
    ],
)
def test_headers_celery_would_stop_the_worker_on_are_refused(
    given: dict[str, Any], what: str
) -> None:
    with pytest.raises(InvalidTaskError) as info:
        strategy.check_headers({"id": "7f3c", "task": "billing.sync", **given})
    assert str(info.value) == what


def test_a_body_of_another_shape_is_dead_lettered_before_celery_builds_a_request(
    task: Any, published: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery would raise while building the request and stop the worker."""
    handled: list[Any] = []
    message = Message(headers(), body=b"[1, 2]", payload=[1, 2])

    _, settled = deliver(handler(task, None, monkeypatch, handled), message)

    assert handled == []
    assert settled.calls == [("ack", ())]
    ((_, envelope),) = published
    assert envelope["exception"]["type"] == "celery.exceptions.InvalidTaskError"
    assert envelope["exception"]["message"].endswith("a list of 2")


def test_the_hooks_run_once_the_dead_letter_is_on_the_broker_not_before(
    task: Any, given_up: list[FailureDetails], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the publish fails the message keeps coming back; ``on_give_up`` runs for the
    delivery that is dead-lettered, not for each one before it."""

    def refuse(*_: Any, **__: Any) -> None:
        raise ConnectionError("broker gone")

    monkeypatch.setattr(strategy, "publish_envelope", refuse)

    deliver(handler(task, DecodeError("corrupt"), monkeypatch), Message(headers()))

    assert given_up == []


def test_a_failure_before_the_publish_requeues_and_never_reaches_the_consumer(
    task: Any, published: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What escapes a strategy stops the worker, and the message would stop the next one."""

    def broken(_queue: str) -> str:
        raise ZeroDivisionError

    monkeypatch.setattr(task, "dead_letter_queue_for", broken)

    returned, settled = deliver(
        handler(task, DecodeError("corrupt"), monkeypatch), Message(headers())
    )

    assert (returned, settled.calls, published) == (None, [("reject", (True,))], [])


def test_a_failure_after_the_publish_still_acknowledges(
    task: Any, published: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dead letter is on the broker: requeueing now would dead-letter it twice."""

    def broken(*_: Any, **__: Any) -> None:
        raise ZeroDivisionError

    monkeypatch.setattr(strategy, "give_up", broken)

    returned, settled = deliver(
        handler(task, DecodeError("corrupt"), monkeypatch), Message(headers())
    )

    assert (returned, settled.calls, len(published)) == (None, [("ack", ())], 1)


def test_a_body_that_decoded_tells_its_workflow(
    task: Any, published: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An eta that is no date: the body decoded, so the chord it belongs to, the rest of its
    chain and its errbacks are known, and the failure reaches them as Celery's would."""
    embed = {"chord": {"task": "billing.total"}, "chain": [{"task": "billing.mail"}],
             "errbacks": [{"task": "billing.alert"}], "callbacks": None}  # fmt: skip
    seen: list[Any] = []
    monkeypatch.setattr(task.backend, "mark_as_failure", lambda task_id, exc, **kw: seen.append(kw))
    message = Message(headers(eta="next tuesday", ignore_result=True), payload=[[1], {}, embed])

    deliver(handler(task, InvalidTaskError("invalid ETA value"), monkeypatch), message)

    ((_, envelope),) = published
    assert envelope["canvas"]["chord"] is True
    assert envelope["canvas"]["chain_remaining"] == ["billing.mail"]
    ((options,),) = [seen]
    request = options["request"]
    assert (request.chord, request.chain, request.errbacks) == (
        embed["chord"], embed["chain"], embed["errbacks"],
    )  # fmt: skip
    assert options["store_result"] is False  # ignore_result=True on the call


def test_an_envelope_that_cannot_be_built_is_replaced_by_the_raw_messages_alone(
    task: Any,
    published: list[tuple[str, dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*_: Any, **__: Any) -> None:
        raise ZeroDivisionError

    monkeypatch.setattr(strategy, "build_envelope", broken)
    message = Message(headers())

    _, settled = deliver(handler(task, DecodeError("corrupt"), monkeypatch), message)

    ((_, envelope),) = published
    assert envelope["exception"]["type"] == "kombu.exceptions.DecodeError"
    assert envelope["attempts"] == []
    assert envelope["original"]["body"] == message.body.decode()
    assert settled.calls == [("ack", ())]
    assert "building the envelope of billing.sync" in caplog.text


def test_a_protocol_1_message_is_dead_lettered_under_the_id_its_body_carries(
    task: Any,
    published: list[tuple[str, dict[str, Any]]],
    given_up: list[FailureDetails],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Protocol 1 carries the id, the retries and the workflow in the body, which the consumer
    decodes before the strategy; its headers are empty."""
    task_id = str(uuid.uuid4())
    body = {"task": "billing.sync", "id": task_id, "args": [1], "kwargs": [2], "retries": 1,
            "errbacks": [{"task": "billing.alert"}]}  # fmt: skip
    seen: list[Any] = []
    monkeypatch.setattr(task.backend, "mark_as_failure", lambda task_id, exc, **kw: seen.append(
        (task_id, kw["request"].errbacks)))  # fmt: skip
    handle = handler(task, InvalidTaskError("kwargs must be a mapping"), monkeypatch)
    settled = Settled()

    handle(Message({}, payload=body), body, settled.ack, settled.reject, None)

    ((_, envelope),) = published
    assert envelope["task"]["id"] == task_id
    assert envelope["attempts"][-1]["number"] == 2
    assert given_up[0].task_id == task_id
    assert seen == [(task_id, body["errbacks"])]  # a caller waiting on it is not left waiting
    assert settled.calls == [("ack", ())]
