"""Failure handlers and hooks: the right one runs, once, with the details, and never interferes."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytest
from celery import Celery

from resilient_tasks import FailureDetails, Permanent, ResilientTask, RetryPolicy
from resilient_tasks.hooks import handler_for

QUICK = RetryPolicy(retry_on=ConnectionError, max_attempts=3, backoff=0)


@pytest.fixture
def app() -> Celery:
    app = Celery("hooks", set_as_current=False)
    app.conf.task_always_eager = False
    app.finalize()
    return app


def failing(app: Celery, exc: BaseException, **options: Any) -> Any:
    @app.task(base=ResilientTask, name="hooks.task", shared=False, **options)
    def task(**kwargs: Any) -> None:
        raise exc

    return task


def test_the_handler_for_the_most_specific_type_runs_once_with_the_details(app: Celery) -> None:
    seen: list[tuple[str, FailureDetails]] = []
    handlers = {
        OSError: lambda d: seen.append(("OSError", d)),
        ConnectionError: lambda d: seen.append(("ConnectionError", d)),
        Exception: lambda d: seen.append(("Exception", d)),
    }
    task = failing(app, ConnectionResetError("peer"), failure_handlers=handlers,
                   retry_policy=QUICK)  # fmt: skip

    result = task.apply(kwargs={"password": "hunter2", "user": "ann"})

    assert result.state == "FAILURE"
    ((name, details),) = seen
    assert name == "ConnectionError"
    assert details.reason == "retries_exhausted"
    assert details.attempts == 3
    assert [a.number for a in details.history.attempts] == [1, 2, 3]
    assert details.kwargs == {"password": "[REDACTED]", "user": "ann"}
    assert isinstance(details.exception, ConnectionResetError)


def test_a_handler_is_found_through_the_cause(app: Celery) -> None:
    seen: list[FailureDetails] = []
    task = failing(app, Permanent(KeyError("customer 7")), failure_handlers={KeyError: seen.append})

    task.apply()

    assert [d.reason for d in seen] == ["permanent"]


def test_no_handler_matches_nothing_runs(app: Celery) -> None:
    assert handler_for({KeyError: print}, ValueError()) is None


def test_a_raising_handler_is_logged_and_the_tasks_own_exception_stands(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[int] = []

    def broken(details: FailureDetails) -> None:
        attempts.append(details.attempts)
        raise RuntimeError("pager down")

    task = failing(app, KeyError("gone"), failure_handlers={KeyError: broken})

    with caplog.at_level(logging.ERROR):
        result = task.apply()

    assert isinstance(result.result, KeyError)
    assert attempts == [1]  # no retry because the handler raised
    assert "failure handler" in caplog.text
    assert "RuntimeError: pager down" in caplog.text


def test_on_give_up_runs_after_the_handler_on_terminal_failure_only(app: Celery) -> None:
    order: list[str] = []

    class Base(ResilientTask):  # type: ignore[misc]
        failure_handlers: ClassVar = {ConnectionError: lambda d: order.append("handler")}

        def on_give_up(self, details: FailureDetails) -> None:
            order.append(f"give_up:{details.reason}")

    @app.task(base=Base, name="hooks.flaky", shared=False, retry_policy=QUICK)
    def flaky() -> None:
        raise ConnectionError("down")

    flaky.apply()

    assert order == ["handler", "give_up:retries_exhausted"]


def test_on_retry_with_details_runs_for_each_retry(app: Celery) -> None:
    retries: list[tuple[int, float | None]] = []

    class Base(ResilientTask):  # type: ignore[misc]
        def on_retry(self, details: FailureDetails) -> None:
            retries.append((details.attempts, details.delay))

    @app.task(base=Base, name="hooks.retrying", shared=False,
              retry_policy=QUICK.replace(backoff=1.5))  # fmt: skip
    def retrying() -> None:
        raise ConnectionError("down")

    retrying.apply()

    assert retries == [(1, 1.5), (2, 1.5)]


def test_celerys_own_on_retry_signature_keeps_working(app: Celery) -> None:
    calls: list[tuple[Any, ...]] = []

    class Base(ResilientTask):  # type: ignore[misc]
        def on_retry(self, exc: Any, task_id: Any, args: Any, kwargs: Any, einfo: Any) -> None:
            calls.append((type(exc).__name__, task_id))

    @app.task(base=Base, name="hooks.celery_style", shared=False, retry_policy=QUICK)
    def celery_style() -> None:
        raise ConnectionError("down")

    result = celery_style.apply()

    assert [c[0] for c in calls] == ["ConnectionError", "ConnectionError"]
    assert result.state == "FAILURE"


def test_hooks_do_not_run_on_success(app: Celery) -> None:
    seen: list[FailureDetails] = []

    @app.task(base=ResilientTask, name="hooks.fine", shared=False,
              failure_handlers={Exception: seen.append})  # fmt: skip
    def fine() -> int:
        return 1

    assert fine.apply().result == 1
    assert seen == []
