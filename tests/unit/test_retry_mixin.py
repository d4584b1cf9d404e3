"""RetryMixin.retry: what it hands to Celery's own Task.retry."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, Task

from resilient_tasks import ResilientTask
from resilient_tasks.history import HEADER, Attempt, History


@pytest.fixture
def task() -> Any:
    app = Celery("mixin", set_as_current=False)
    app.finalize()

    @app.task(base=ResilientTask, bind=True, name="mixin.sync", shared=False)
    def sync(self: Task) -> None:
        """A task body."""

    return sync


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
