"""TimeLimitMixin's hook, the time-limit reasons, and the redelivery count: pure parts."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from resilient_tasks import ResilientTask, RetryMixin, RetryPolicy, TimeLimitMixin
from resilient_tasks.policy import AttemptState, GiveUp, decide
from resilient_tasks.timelimit import _pool_name, redeliveries


@pytest.fixture
def app() -> Celery:
    app = Celery("tl", set_as_current=False)
    app.finalize()
    return app


def soft_limited(app: Celery, base: type, hook: Any) -> Any:
    class Base(base):  # type: ignore[misc,valid-type]
        def on_soft_time_limit(self, exc: SoftTimeLimitExceeded) -> None:
            hook(exc)

    @app.task(base=Base, name="tl.export", shared=False, soft_time_limit=1, time_limit=2)
    def export() -> None:
        raise SoftTimeLimitExceeded()

    return export


@pytest.mark.parametrize(
    "base",
    [
        ResilientTask,
        type("TimeLimitOuter", (TimeLimitMixin, RetryMixin, Task), {}),
        type("RetryOuter", (RetryMixin, TimeLimitMixin, Task), {}),
    ],
    ids=["ResilientTask", "time-limit-mixin-outer", "retry-mixin-outer"],
)
def test_soft_limit_runs_the_cleanup_hook_once_and_the_limit_stands(
    app: Celery, base: type
) -> None:
    seen: list[BaseException] = []
    task = soft_limited(app, base, seen.append)

    result = task.apply()  # through Celery's tracer, as in a worker

    assert isinstance(result.result, SoftTimeLimitExceeded)
    assert len(seen) == 1
    assert isinstance(seen[0], SoftTimeLimitExceeded)


def test_a_task_called_as_a_function_runs_no_hook(app: Celery) -> None:
    seen: list[BaseException] = []
    task = soft_limited(app, ResilientTask, seen.append)

    with pytest.raises(SoftTimeLimitExceeded):
        task()

    assert seen == []


def test_a_cleanup_hook_that_raises_is_logged_and_does_not_hide_the_limit(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(exc: BaseException) -> None:
        raise OSError("disk gone")

    task = soft_limited(app, ResilientTask, broken)

    with caplog.at_level(logging.ERROR):
        result = task.apply()

    assert isinstance(result.result, SoftTimeLimitExceeded)

    assert "on_soft_time_limit of tl.export" in caplog.text
    assert "OSError: disk gone" in caplog.text


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (SoftTimeLimitExceeded(), "soft_time_limit"),
        (TimeLimitExceeded(5), "hard_time_limit"),
        (KeyError(), "exception"),
    ],
)
def test_an_unretried_time_limit_gives_up_with_its_own_reason(
    exc: BaseException, reason: str
) -> None:
    policy = RetryPolicy(retry_on=ConnectionError)

    assert decide(policy, AttemptState("t", attempt=1, exception=exc)) == GiveUp(reason)  # type: ignore[arg-type]


def test_a_time_limit_the_policy_lists_is_retried() -> None:
    policy = RetryPolicy(retry_on=(SoftTimeLimitExceeded, TimeLimitExceeded), backoff=2)

    for exc in (SoftTimeLimitExceeded(), TimeLimitExceeded(5)):
        assert decide(policy, AttemptState("t", attempt=1, exception=exc)).delay == 2.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("headers", "count"),
    [
        (None, 0),
        ({}, 0),
        ({"resilient_redeliveries": 2}, 2),
        ({"x-delivery-count": 3}, 3),
        ({"resilient_redeliveries": 1, "x-delivery-count": 4}, 4),
        ({"resilient_redeliveries": "2"}, 0),
        ({"resilient_redeliveries": True}, 0),
    ],
)
def test_redeliveries_reads_the_highest_count(headers: Any, count: int) -> None:
    assert redeliveries(headers) == count


@pytest.mark.parametrize(
    ("pool", "name"),
    [
        ("celery.concurrency.prefork:TaskPool", "prefork"),
        ("celery.concurrency.solo:TaskPool", "solo"),
        (type("TaskPool", (), {"__module__": "celery.concurrency.thread"}), "thread"),
        (None, None),
    ],
)
def test_pool_name(pool: Any, name: str | None) -> None:
    assert _pool_name(pool) == name
