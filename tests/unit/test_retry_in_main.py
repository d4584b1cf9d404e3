"""A library task's retry is published by the worker's main process, before it acknowledges.

The retry is decided in the pool child, but its message is published where the original is
acknowledged: a child killed between the two can then leave only one copy of the task. These
tests run the task through Celery's tracer as a pool child does, pickle what comes back, and
hand it to a ResilientRequest in place of the main process (see test_reason_recovery).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from billiard.einfo import ExceptionInfo
from celery import Celery, Signature, Task
from celery.exceptions import Reject, Retry, WorkerLostError
from kombu.exceptions import EncodeError, OperationalError
from test_reason_recovery import (
    TRANSIENT,
    _message,
    headers_for,
    in_the_child,
    raising,
    traced,
)
from test_reason_recovery import app as app  # the fixture: a throwaway app, finalized

from resilient_tasks import ResilientTask, RetryMixin, deadletter, publish, retry
from resilient_tasks.policy import Reason
from resilient_tasks.retry import HandedOverRetry
from resilient_tasks.worker import ResilientRequest


@pytest.fixture
def sent(app: Celery, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every publish of a task message, wherever it is made."""
    published: list[dict[str, Any]] = []

    def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        published.append({"name": name, "args": args, **options})

    monkeypatch.setattr(app, "send_task", send_task)
    return published


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What the main process did with the message, in order; publishes go through a stand-in
    for the confirmed producer."""
    steps: list[Any] = []

    @contextmanager
    def producer(app: Celery) -> Iterator[str]:
        steps.append("producer")
        yield "confirmed"

    def dead_letter(self: ResilientRequest, exc: Any, exc_info: Any, reason: Reason) -> bool:
        steps.append(("dead_letter", type(exc).__name__, reason))
        return True

    monkeypatch.setattr(publish, "confirmed_producer", producer)
    monkeypatch.setattr(deadletter, "dead_letter", dead_letter)
    monkeypatch.setattr(ResilientRequest, "acknowledge", lambda self: steps.append("ack"))
    monkeypatch.setattr(ResilientRequest, "reject", lambda self, requeue: steps.append(
        ("reject", requeue)))  # fmt: skip
    return steps


def retrying(app: Celery, **options: Any) -> tuple[Any, dict[str, Any], ExceptionInfo]:
    task = raising(app, ConnectionError("upstream reset"), retry_policy=TRANSIENT, **options)
    headers = headers_for(task, retries=0)
    return task, headers, in_the_child(task, headers)


def test_the_child_publishes_nothing_and_hands_the_retry_to_the_main_process(
    app: Celery, sent: list[dict[str, Any]]
) -> None:
    task, headers, einfo = retrying(app)

    assert sent == []
    retry = einfo.exception
    assert isinstance(retry, HandedOverRetry)
    assert isinstance(retry, Retry)
    options = retry.sig["options"]
    assert (retry.sig["task"], options["task_id"], options["retries"]) == (
        task.name, headers["id"], 1,
    )  # fmt: skip
    # What Celery's publish would have taken from the task it ran in.
    assert (options["parent_id"], options["root_id"]) == (headers["id"], headers["id"])


def test_the_main_process_publishes_the_retry_with_confirms_then_acknowledges(
    app: Celery, sent: list[dict[str, Any]], settled: list[Any]
) -> None:
    task, headers, einfo = retrying(app)
    request = ResilientRequest(_message(headers), app=app, task=task, hostname="w1@host")

    def publish(signature: Signature, producer: Any = None, **_: Any) -> None:
        settled.append(("publish", signature["options"]["retries"], producer))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Signature, "apply_async", publish)
        request.on_failure(einfo)

    assert settled == ["producer", ("publish", 1, "confirmed"), "ack"]


@pytest.mark.parametrize(
    ("error", "acks_late", "outcome"),
    [
        (OperationalError("[Errno 111] Connection refused"), True, ("reject", True)),
        (EncodeError("cannot serialize"), True, ("dead_letter", "EncodeError", "exception")),
        (OperationalError("[Errno 111] Connection refused"), False,
         ("dead_letter", "OperationalError", "exception")),
    ],
    ids=["broker-unreachable", "not-a-broker-error", "broker-unreachable-acks-early"],
)  # fmt: skip
def test_a_retry_the_main_process_cannot_publish_is_requeued_or_dead_lettered(
    app: Celery, settled: list[Any], error: Exception, acks_late: bool, outcome: Any
) -> None:
    task, headers, einfo = retrying(app, acks_late=acks_late)
    request = ResilientRequest(_message(headers), app=app, task=task, hostname="w1@host")

    def unpublishable(*_: Any, **__: Any) -> None:
        raise error

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Signature, "apply_async", unpublishable)
        request.on_failure(einfo)

    assert outcome in settled
    assert ("ack" in settled) is (outcome[0] == "dead_letter")  # requeued: not acknowledged


def test_a_retry_read_after_its_lost_worker_was_settled_is_not_published(
    app: Celery, settled: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Billiard can report the job lost before it reads the result the child had written.
    task, headers, einfo = retrying(app)
    republished: list[Any] = []
    monkeypatch.setattr(retry, "republish", lambda self, h, **_: republished.append(
        h) or True)  # fmt: skip
    request = ResilientRequest(_message(headers), app=app, task=task, hostname="w1@host")

    request.on_failure(deadletter.exception_info(WorkerLostError("exited: SIGKILL")))
    request.on_failure(einfo)

    assert len(republished) == 1  # the lost worker's redelivery, and no retry besides
    assert "producer" not in settled


def test_a_retry_that_does_not_throw_is_published_by_the_child(
    app: Celery, sent: list[dict[str, Any]]
) -> None:
    @app.task(base=ResilientTask, bind=True, name="main-retry.no_throw", shared=False)
    def no_throw(self: Task) -> str:
        self.retry(countdown=5, throw=False)  # goes on: the publish cannot wait for the end
        return "went on"

    assert traced(no_throw, headers_for(no_throw, retries=0)) == "went on"
    assert [s["name"] for s in sent] == [no_throw.name]


def test_a_task_on_celerys_own_request_publishes_its_retry_in_the_child(
    app: Celery, sent: list[dict[str, Any]]
) -> None:
    base = type("Retrying", (RetryMixin, Task), {"retry_policy": TRANSIENT})
    task = raising(app, ConnectionError("upstream reset"), base=base)

    einfo = in_the_child(task, headers_for(task, retries=0))

    assert type(einfo.exception) is Retry
    assert [s["name"] for s in sent] == [task.name]


def test_an_apply_async_override_reads_a_result_while_the_retry_is_held(
    app: Celery, sent: list[dict[str, Any]]
) -> None:
    queued: list[str] = []

    class Logged(ResilientTask):  # type: ignore[misc]
        def apply_async(self, *args: Any, **options: Any) -> Any:
            result = super().apply_async(*args, **options)
            queued.append(result.id)  # as a project's base task logs what it queued
            return result

    task = raising(app, ConnectionError("upstream reset"), base=Logged, retry_policy=TRANSIENT)
    headers = headers_for(task, retries=0)

    einfo = in_the_child(task, headers)

    assert isinstance(einfo.exception, HandedOverRetry)  # handed over, not rejected
    assert queued == [headers["id"]]
    assert sent == []


def catching(app: Celery) -> Any:
    """A task that catches the ``Retry`` its ``self.retry()`` raises and goes on."""

    @app.task(base=ResilientTask, bind=True, name="main-retry.caught", shared=False)
    def caught(self: Task) -> str:
        try:
            self.retry(countdown=30)
        except Exception:  # Celery has published the retry by now, and so does the library
            return "logged and went on"
        return "not reached"

    return caught


def test_a_retry_the_task_catches_is_published_by_the_child(
    app: Celery, sent: list[dict[str, Any]]
) -> None:
    caught = catching(app)

    assert traced(caught, headers_for(caught, retries=0)) == "logged and went on"
    assert [(s["name"], s["retries"]) for s in sent] == [(caught.name, 1)]


def test_a_retry_replaced_by_another_exception_is_published_and_the_other_is_the_outcome(
    app: Celery, sent: list[dict[str, Any]]
) -> None:
    @app.task(base=ResilientTask, bind=True, name="main-retry.replaced", shared=False)
    def replaced(self: Task) -> None:
        try:
            self.retry(countdown=30)
        except Retry as retry:
            raise LookupError("record 7 is gone") from retry

    einfo = in_the_child(replaced, headers_for(replaced, retries=0))

    assert type(einfo.exception) is LookupError
    assert [(s["name"], s["retries"]) for s in sent] == [(replaced.name, 1)]


@pytest.mark.parametrize(
    ("error", "outcome"),
    [(OperationalError("[Errno 111] Connection refused"), "requeued"),
     (EncodeError("cannot serialize"), "EncodeError")],
    ids=["broker-unreachable", "not-a-broker-error"],
)  # fmt: skip
def test_a_caught_retry_the_child_cannot_publish_requeues_or_fails_the_task(
    app: Celery, monkeypatch: pytest.MonkeyPatch, error: Exception, outcome: str
) -> None:
    def unpublishable(*_: Any, **__: Any) -> None:
        raise error

    monkeypatch.setattr(app, "send_task", unpublishable)
    caught = catching(app)

    einfo = in_the_child(caught, headers_for(caught, retries=0))

    failure = einfo.exception
    seen = "requeued" if isinstance(failure, Reject) and failure.requeue else type(failure).__name__
    assert seen == outcome
