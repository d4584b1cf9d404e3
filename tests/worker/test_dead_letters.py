"""Terminal failures are dead-lettered with their whole story, on a real worker, every broker."""

from __future__ import annotations

import importlib.util
import json
import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import billiard
import pytest
from celery import Celery, chain, group
from celery.result import AsyncResult
from kombu import Queue

from resilient_tasks.envelope import REDACTED, SCHEMA, original_body
from resilient_tasks.publish import confirmed_producer
from support.brokers import Broker
from support.proxy import CuttableProxy
from support.worker import Worker, WorkerRunner

APP = "apps.deadletter_app"
DEFAULT_PORTS = {"amqp": 5672, "redis": 6379}
pytestmark = pytest.mark.worker


def fail(result: AsyncResult) -> Any:
    exc = result.get(timeout=30, interval=0.05, propagate=False)
    assert result.state == "FAILURE"
    return exc


def only_envelope(worker: Worker) -> dict[str, Any]:
    (envelope,) = worker.dead_letters(1)
    time.sleep(0.3)
    assert worker.drain(f"{worker.queue}.dlq") == [], "dead-lettered more than once"
    return envelope


def test_permanent_failure_is_dead_lettered_once_with_its_story(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    result = worker.send("dl.permanent", 42, priority=3, headers={"tenant": "acme"})

    fail(result)
    envelope = only_envelope(worker)

    assert envelope["schema"] == SCHEMA
    assert envelope["reason"] == "permanent"
    task = envelope["task"]
    assert (task["id"], task["name"], task["queue"]) == (result.id, "dl.permanent", worker.queue)
    assert task["args"][0] == 42
    assert task["priority"] == 3
    assert envelope["exception"]["type"] == "resilient_tasks.exceptions.Permanent"
    assert "invoice 42 was deleted" in envelope["exception"]["message"]
    assert "LookupError" in envelope["exception"]["traceback"]
    assert [a["number"] for a in envelope["attempts"]] == [1]
    assert envelope["first_attempt_at"] <= envelope["dead_lettered_at"]
    original = envelope["original"]
    assert original["headers"]["id"] == result.id
    assert original["headers"]["tenant"] == "acme"
    assert original["content_type"] == "application/json"
    assert original_body(original).startswith(b"[[42")
    # The main process got the traceback as text only; the pool child's own error line, written
    # before the result crossed the pipe, still shows every frame.
    worker.wait_for(lambda: "Traceback (most recent call last)" in worker.output_text())
    assert "in permanent" in worker.output_text()


def test_exhausted_retries_are_dead_lettered_with_every_attempt(workers: WorkerRunner) -> None:
    worker = workers.start(APP)

    fail(worker.send("dl.exhausted"))
    envelope = only_envelope(worker)

    assert envelope["reason"] == "retries_exhausted"
    attempts = envelope["attempts"]
    assert [a["number"] for a in attempts] == [1, 2, 3]
    assert [a["delay"] for a in attempts] == [0.1, 0.1, None]
    assert attempts[2]["message"] == "billing API down (attempt 3)"
    assert all(a["hostname"] and a["exception_type"] == "ConnectionError" for a in attempts)
    assert envelope["first_attempt_at"] == attempts[0]["at"]


def test_unretried_exception_is_dead_lettered_with_secrets_redacted(
    workers: WorkerRunner,
) -> None:
    worker = workers.start(APP)
    kwargs = {"password": "hunter2", "options": {"api_key": "k-123", "region": "eu"}}

    fail(worker.send("dl.unlisted", kwargs=kwargs))
    envelope = only_envelope(worker)

    assert envelope["reason"] == "exception"
    assert envelope["task"]["kwargs"] == {
        "password": REDACTED,
        "options": {"api_key": REDACTED, "region": "eu"},
    }
    assert envelope["exception"]["type"] == "KeyError"


def test_celery_autoretry_running_out_is_dead_lettered_as_exhausted(
    workers: WorkerRunner,
) -> None:
    worker = workers.start(APP)

    fail(worker.send("dl.autoretry"))
    envelope = only_envelope(worker)

    assert envelope["reason"] == "retries_exhausted"
    assert [a["number"] for a in envelope["attempts"]] == [1, 2]


def test_dead_letter_false_leaves_the_failure_as_celery_has_it(workers: WorkerRunner) -> None:
    worker = workers.start(APP)

    fail(worker.send("dl.off"))
    time.sleep(0.5)

    assert worker.drain(f"{worker.queue}.dlq") == []


def test_dead_letter_queue_template_names_the_queue(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    workers.queues.add(f"{worker.queue}.graveyard")

    fail(worker.send("dl.custom_queue"))

    (envelope,) = worker.dead_letters(1, queue=f"{worker.queue}.graveyard")
    assert envelope["task"]["name"] == "dl.custom_queue"


def test_failure_is_still_recorded_and_link_error_still_fires(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    result = worker.send("dl.unlisted", link_error=worker.signature("dl.errback"))

    exc = fail(result)
    worker.dead_letters(1)
    worker.wait_for(
        lambda: any(a["task"] == "dl.errback" for a in worker.attempts()), what="the errback"
    )

    assert isinstance(exc, KeyError)
    assert [a["failed_id"] for a in worker.attempts() if a["task"] == "dl.errback"] == [result.id]


@contextmanager
def publishing_through_a_cut_proxy(workers: WorkerRunner) -> Iterator[tuple[Worker, CuttableProxy]]:
    """A worker whose publishes (dead letters, retries) go through a proxy that starts cut."""
    url = urlsplit(workers.broker.url)
    proxy = CuttableProxy((url.hostname or "127.0.0.1", url.port or DEFAULT_PORTS[url.scheme]))
    try:
        proxy.cut()
        proxied = url._replace(netloc=url.netloc.replace(f":{url.port}", "") + f":{proxy.port}")
        yield workers.start(APP, worker_settings={"broker_write_url": proxied.geturl()}), proxy
    finally:
        proxy.close()


@pytest.mark.parametrize("broker", ["rabbitmq", "redis"], indirect=True)
def test_unpublishable_envelope_requeues_the_message_and_loses_nothing(
    workers: WorkerRunner,
) -> None:
    """The worker publishes dead letters through a proxy the test cuts: the message comes back
    until the envelope can be published, then is dead-lettered exactly once."""
    with publishing_through_a_cut_proxy(workers) as (worker, proxy):
        result = worker.send("dl.permanent", 7)

        worker.wait_for(
            lambda: len([a for a in worker.attempts() if a["id"] == result.id]) >= 2,
            what="the message to come back after the failed dead-letter publish",
        )
        assert "could not dead-letter dl.permanent" in worker.output_text()
        assert worker.drain(f"{worker.queue}.dlq") == []

        proxy.restore()
        (envelope,) = worker.dead_letters(1)
        time.sleep(0.5)

    assert envelope["task"]["id"] == result.id
    assert worker.drain(f"{worker.queue}.dlq") == []
    assert result.get(timeout=10, propagate=False) is not None
    assert result.state == "FAILURE"


def test_chain_stops_at_the_dead_lettered_step_and_the_envelope_says_what_was_left(
    workers: WorkerRunner,
) -> None:
    worker = workers.start(APP)
    workflow = chain(
        worker.signature("dl.step", 1),
        worker.signature("dl.permanent"),
        worker.signature("dl.step"),
        worker.signature("dl.step"),
    ).apply_async()

    envelope = only_envelope(worker)
    time.sleep(0.5)

    assert envelope["task"]["name"] == "dl.permanent"
    assert envelope["task"]["args"][0] == 2  # the first step's result
    assert envelope["canvas"]["chain_remaining"] == ["dl.step", "dl.step"]
    assert envelope["canvas"]["root_id"] == workflow.parent.parent.parent.id
    steps = [a for a in worker.attempts() if a["task"] == "dl.step"]
    assert [s["x"] for s in steps] == [1]  # nothing after the failed step ran


def test_in_a_group_only_the_failing_member_is_dead_lettered(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    members = group(
        worker.signature("dl.step", 1),
        worker.signature("dl.permanent", 5),
        worker.signature("dl.step", 3),
    ).apply_async()

    results = members.get(timeout=30, propagate=False, interval=0.05)
    envelope = only_envelope(worker)

    assert (results[0], results[2]) == (2, 4)
    assert envelope["task"]["name"] == "dl.permanent"
    assert envelope["task"]["id"] == members.results[1].id
    assert envelope["canvas"]["group_id"] == members.id
    assert envelope["canvas"]["group_index"] == 1


# -- messages the worker cannot read -------------------------------------------------------------


UNREADABLE = {
    "corrupt JSON": (b'[[7], {"log": "trunc', "application/json", {}, "DecodeError"),
    "a content type the worker refuses": (
        pickle.dumps(((7,), {}, {})),
        "application/x-python-serialize",
        {},
        "ContentDisallowed",
    ),
    "a body that is not [args, kwargs, embed]": (
        b"[[7], [2]]",
        "application/json",
        {},
        "InvalidTaskError",
    ),
    "JSON null": (b"null", "application/json", {}, "InvalidTaskError"),
    "kwargs that are not a mapping": (
        b'[[7], ["log"], {}]',
        "application/json",
        {},
        "InvalidTaskError",
    ),
    "a timelimit that is not a pair": (
        json.dumps([[7, "log"], {}, {}]).encode(),
        "application/json",
        {"timelimit": [30]},
        "InvalidTaskError",
    ),
    "an eta that is no date": (
        json.dumps([[7, "log"], {}, {}]).encode(),
        "application/json",
        {"eta": "next tuesday"},
        "InvalidTaskError",
    ),
}


#: A content type the worker accepts but cannot decode: msgpack, not installed here.
MSGPACK = (b"\x93\x91\x07\x80\x80", "application/x-msgpack", {}, "SerializerNotInstalled")


@pytest.mark.parametrize(
    "case", [*UNREADABLE, "an accepted serializer the worker lacks"],
    ids=[*UNREADABLE, "an accepted serializer the worker lacks"],
)  # fmt: skip
def test_a_message_the_worker_cannot_read_is_dead_lettered_as_it_came(
    workers: WorkerRunner, case: str
) -> None:
    """Celery drops these before any task code runs (acknowledged, or rejected without
    requeue), or, for a body of another shape or a serializer it lacks, stops the worker (or
    leaves the message unsettled); the library's strategy dead-letters them first, and marks
    the result."""
    body, content_type, headers, error = UNREADABLE.get(case, MSGPACK)
    accept: dict[str, Any] = {}
    if error == "SerializerNotInstalled":
        if importlib.util.find_spec("msgpack") is not None:
            pytest.skip("msgpack is installed: this worker can read msgpack")
        accept = {"accept_content": ["json", "msgpack"]}
    worker = workers.start(APP, worker_settings=accept)

    task_id = worker.publish_raw("dl.permanent", body, content_type, **headers)
    envelope = only_envelope(worker)

    assert envelope["reason"] == "exception"
    assert envelope["exception"]["type"].rsplit(".", 1)[-1] == error
    assert (envelope["task"]["id"], envelope["task"]["name"]) == (task_id, "dl.permanent")
    assert envelope["task"]["queue"] == worker.queue
    assert (envelope["task"]["args"], envelope["task"]["kwargs"]) == ([], {})
    assert [a["number"] for a in envelope["attempts"]] == [1]
    original = envelope["original"]
    assert original_body(original) == body
    assert original["content_type"] == content_type
    assert {k: original["headers"][k] for k in headers} == headers
    result = worker.client.AsyncResult(task_id)
    worker.wait_for(lambda: result.state == "FAILURE", what="the result marked FAILURE")
    assert error in type(result.result).__name__ + repr(result.result)
    assert "the worker cannot read a message of dl.permanent" in worker.output_text()
    assert not any(a.get("id") == task_id for a in worker.attempts())  # the body never ran


def test_a_message_whose_id_is_no_task_id_is_dead_lettered_and_the_worker_goes_on(
    workers: WorkerRunner,
) -> None:
    """Celery raises on a list for an id in the worker's main process, which stops the worker,
    and the message, unacknowledged, stops the next one."""
    worker = workers.start(APP)
    worker.publish_raw("dl.permanent", json.dumps([[7, "log"], {}, {}]).encode(), id=["7f3c"])

    envelope = only_envelope(worker)
    after = worker.send("dl.permanent", 8)  # the worker still takes tasks
    worker.wait_for(lambda: after.state == "FAILURE", what="the next task run")

    assert envelope["task"]["id"] == ""
    assert envelope["exception"]["message"] == "the id header is not a task id: ['7f3c']"
    assert worker.process.poll() is None


def test_a_message_dead_letter_false_cannot_read_is_left_to_celery(workers: WorkerRunner) -> None:
    worker = workers.start(APP)

    worker.publish_raw("dl.off", b"[[], {")
    worker.wait_for(lambda: "Can't decode message body" in worker.output_text())
    time.sleep(0.3)

    assert worker.drain(f"{worker.queue}.dlq") == []


@pytest.mark.parametrize("broker", ["rabbitmq", "redis"], indirect=True)
def test_an_unreadable_message_whose_dead_letter_cannot_be_published_comes_back(
    workers: WorkerRunner,
) -> None:
    """As for a task that failed: the message is requeued until its envelope can be
    published, then dead-lettered exactly once."""
    with publishing_through_a_cut_proxy(workers) as (worker, proxy):
        task_id = worker.publish_raw("dl.permanent", b"[[7], {")

        refused = "could not dead-letter the unreadable message of dl.permanent"
        worker.wait_for(
            lambda: worker.output_text().count(refused) >= 2,
            what="the message to come back after the failed dead-letter publish",
        )
        assert worker.drain(f"{worker.queue}.dlq") == []

        proxy.restore()
        envelope = only_envelope(worker)

    assert envelope["task"]["id"] == task_id
    assert envelope["exception"]["type"] == "kombu.exceptions.DecodeError"


def test_an_unreadable_message_whose_body_decoded_still_fails_its_workflow(
    workers: WorkerRunner,
) -> None:
    """An eta that is no date: the body decoded, so its link_error runs as for any failure."""
    worker = workers.start(APP)
    embed = {"errbacks": [dict(worker.signature("dl.errback"))], "callbacks": None,
             "chain": None, "chord": None}  # fmt: skip
    body = json.dumps([[7, str(worker.log)], {}, embed]).encode()

    task_id = worker.publish_raw("dl.permanent", body, "application/json", eta="next tuesday")
    envelope = only_envelope(worker)
    worker.wait_for(
        lambda: any(a["task"] == "dl.errback" for a in worker.attempts()), what="the errback"
    )

    assert envelope["exception"]["type"] == "celery.exceptions.InvalidTaskError"
    assert [a["failed_id"] for a in worker.attempts() if a["task"] == "dl.errback"] == [task_id]
    assert not any(a.get("id") == task_id for a in worker.attempts())


def test_a_pool_child_the_worker_forks_leaves_the_main_processs_connection_alone(
    broker: Broker,
) -> None:
    """The worker forks a pool child whenever one dies (or is recycled). Kombu's own pools
    close the connections a child inherits, and on RabbitMQ that shuts the parent's socket
    down: its next dead-letter publish would fail, or, retried, land twice. The library's
    publishing connection survives the fork: the next publish needs no reconnect."""
    queue = Queue(broker.queue_name("forked"), durable=True)
    app = Celery("forking", set_as_current=False)
    app.conf.update(broker_url=broker.url, broker_transport_options=broker.transport_options,
                    broker_transport=broker.transport)  # fmt: skip
    try:
        with confirmed_producer(app) as producer:
            producer.publish({"n": 1}, routing_key=queue.name, declare=[queue])
            before = producer.connection.connection
        child = billiard.Process(target=time.sleep, args=(0.05,))
        child.start()
        child.join()
        assert child.exitcode == 0
        with confirmed_producer(app) as producer:
            assert producer.connection.connection is before, "the parent had to reconnect"
            producer.publish({"n": 2}, routing_key=queue.name, declare=[queue], retry=False)
        with app.connection_for_read() as conn:
            bound = queue.bind(conn.default_channel)
            got = []
            while (message := bound.get(no_ack=True)) is not None:
                got.append(message.decode()["n"])
        assert got == [1, 2]
    finally:
        broker.cleanup([queue.name])
