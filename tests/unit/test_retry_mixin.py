"""RetryMixin.retry: what it hands to Celery's own Task.retry."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, Signature, Task
from celery.exceptions import Reject
from kombu.exceptions import EncodeError, OperationalError

from resilient_tasks import ResilientTask
from resilient_tasks.history import HEADER, Attempt, History
from resilient_tasks.testing import capture_events


@pytest.fixture
def task() -> Iterator[Any]:
    app = Celery("mixin", set_as_current=False)
    app.finalize()

    @app.task(base=ResilientTask, bind=True, name="mixin.sync", shared=False)
    def sync(self: Task) -> None:
        """A task body."""

    yield sync
    while sync.request_stack.top is not None:  # what in_worker pushed; the stack may be shared
        sync.pop_request()


@pytest.fixture
def celery_retry(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Capture what reaches celery.Task.retry instead of publishing."""
    seen: dict[str, Any] = {}

    def fake_retry(self: Task, *args: Any, **options: Any) -> None:
        seen["args"], seen["options"] = args, options

    monkeypatch.setattr(Task, "retry", fake_retry)
    return seen


def in_worker(task: Any, **request: Any) -> None:
    task.push_request(called_directly=False, hostname="w1@host", delivery_info={}, **request)


def test_retry_appends_this_attempt_to_the_history_header(
    task: Any, celery_retry: dict[str, Any]
) -> None:
    earlier = History().record(
        Attempt(number=1, at="2026-01-01T00:00:00+00:00", hostname="w0", exception_type="E",
                message="m", delay=1.0)
    )  # fmt: skip
    in_worker(task, id="t1", retries=1, headers={HEADER: earlier.encode()})

    task.retry(exc=ConnectionError("reset"), countdown=2.5)

    history = History.decode(celery_retry["options"]["headers"][HEADER])
    assert [(a.number, a.exception_type, a.delay) for a in history.attempts] == [
        (1, "E", 1.0),
        (2, "ConnectionError", 2.5),
    ]
    assert history.attempts[1].hostname == "w1@host"
    assert history.first_attempt_at == "2026-01-01T00:00:00+00:00"


def test_retry_keeps_custom_headers_and_lets_explicit_ones_win(
    task: Any, celery_retry: dict[str, Any]
) -> None:
    in_worker(task, id="t1", retries=0, headers={"tenant": "acme", "trace": "old"})

    task.retry(exc=ConnectionError(), countdown=1, headers={"trace": "new"})

    headers = celery_retry["options"]["headers"]
    assert headers["tenant"] == "acme"
    assert headers["trace"] == "new"


def test_retry_drops_rabbitmq_dead_letter_headers(task: Any, celery_retry: dict[str, Any]) -> None:
    in_worker(
        task,
        id="t1",
        retries=0,
        headers={"x-death": [{"count": 1}], "x-first-death-queue": "q", "tenant": "acme"},
    )

    task.retry(exc=ConnectionError(), countdown=1)

    headers = celery_retry["options"]["headers"]
    assert "x-death" not in headers
    assert "x-first-death-queue" not in headers
    assert headers["tenant"] == "acme"


def test_retry_without_a_countdown_records_the_default_retry_delay(
    task: Any, celery_retry: dict[str, Any]
) -> None:
    in_worker(task, id="t1", retries=0, headers={})

    task.retry(exc=ConnectionError())

    history = History.decode(celery_retry["options"]["headers"][HEADER])
    assert history.attempts[0].delay == task.default_retry_delay == 180


@pytest.mark.parametrize(
    ("publish_error", "requeue"),
    [
        (OperationalError("[Errno 111] Connection refused"), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (EncodeError("cannot serialize"), False),
    ],
    ids=["broker-unreachable", "connection-reset", "not-a-broker-error"],
)
def test_a_retry_that_cannot_be_published_requeues_only_when_the_broker_is_unreachable(
    task: Any, monkeypatch: pytest.MonkeyPatch, publish_error: Exception, requeue: bool
) -> None:
    def unpublishable(*_: Any, **__: Any) -> None:
        raise publish_error

    monkeypatch.setattr(Signature, "apply_async", unpublishable)
    in_worker(task, id="t1", retries=0, is_eager=False)

    with pytest.raises(Reject) as raised:
        task.retry(exc=ConnectionError("reset"), countdown=1)

    assert raised.value.requeue is requeue
    assert raised.value.reason is publish_error


@pytest.mark.parametrize(
    ("max_retries", "called_with"),
    [(1, {}), (5, {"max_retries": 1})],
    ids=["task-option", "retry-argument"],
)
def test_a_retry_celery_refuses_past_max_retries_is_not_reported_as_scheduled(
    max_retries: int, called_with: dict[str, Any]
) -> None:
    app = Celery("refused", set_as_current=False)

    @app.task(base=ResilientTask, bind=True, max_retries=max_retries, shared=False)
    def always_retries(self: Task) -> None:
        raise self.retry(exc=ValueError("again"), countdown=0, **called_with)

    with capture_events() as events:
        result = always_retries.apply()

    assert result.state == "FAILURE"
    assert events.names() == [
        "task_started", "task_retry_scheduled", "task_started", "task_failed",
    ]  # fmt: skip
