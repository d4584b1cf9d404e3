"""Policy-driven retries on a real prefork worker, on every broker.

Each test starts its own worker on its own queue (``workers`` fixture) and reads what every
attempt saw from the attempt log the task writes (``apps.base.record``).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from celery.result import AsyncResult

from support.worker import Worker, WorkerRunner

APP = "apps.retry_app"
pytestmark = pytest.mark.worker


def outcome(result: AsyncResult, timeout: float = 30) -> Any:
    """Wait for the task's final state and return its result (or exception)."""
    return result.get(timeout=timeout, interval=0.05, propagate=False)


def attempts_of(worker: Worker, task: str) -> list[dict[str, Any]]:
    return [a for a in worker.attempts() if a["task"] == task]


def gaps(attempts: list[dict[str, Any]]) -> list[float]:
    return [b["t"] - a["t"] for a, b in itertools.pairwise(attempts)]


def test_transient_failures_are_retried_with_the_policy_delays(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    result = worker.send("retry.flaky", 2)

    history = outcome(result)

    assert result.state == "SUCCESS"
    attempts = attempts_of(worker, "retry.flaky")
    assert [a["retries"] for a in attempts] == [0, 1, 2]
    # wait_exponential(multiplier=0.25): 0.25 s then 0.5 s; no retry runs before its delay.
    for gap, delay in zip(gaps(attempts), [0.25, 0.5], strict=True):
        assert gap >= delay - 0.02
    # The history the third attempt received: both failures, with the delays chosen.
    assert [h["number"] for h in history] == [1, 2]
    assert [h["delay"] for h in history] == [0.25, 0.5]
    assert {h["exception_type"] for h in history} == {"ConnectionError"}
    assert history[0]["message"] == "upstream reset on attempt 1"
    assert all(h["hostname"] for h in history)


def test_retry_after_sets_the_delay_of_that_attempt(workers: WorkerRunner) -> None:
    worker = workers.start(APP)

    assert outcome(worker.send("retry.rate_limited")) == "done"

    attempts = attempts_of(worker, "retry.rate_limited")
    assert len(attempts) == 2
    assert gaps(attempts)[0] >= 1.5 - 0.02
    recorded = attempts[1]["headers"]["resilient_history"]
    assert '"delay":1.5' in recorded


def test_a_retry_the_task_catches_still_runs(workers: WorkerRunner) -> None:
    worker = workers.start(APP)

    outcome(worker.send("retry.caught"))  # the first attempt, which carried on
    deadline = time.monotonic() + 15
    while len(attempts_of(worker, "retry.caught")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)

    assert [a["retries"] for a in attempts_of(worker, "retry.caught")] == [0, 1]


def test_max_attempts_stops_retrying(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    result = worker.send("retry.hopeless")

    exc = outcome(result)
    time.sleep(0.5)  # a fourth attempt would have been scheduled 0.1 s after the third

    assert result.state == "FAILURE"
    assert isinstance(exc, ConnectionError)
    assert len(attempts_of(worker, "retry.hopeless")) == 3


def test_max_elapsed_stops_retrying_before_the_deadline(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    result = worker.send("retry.deadline")

    exc = outcome(result)
    time.sleep(1.0)  # a further attempt would have been scheduled 0.8 s after the last one

    assert result.state == "FAILURE"
    assert isinstance(exc, ConnectionError)
    attempts = attempts_of(worker, "retry.deadline")
    # max_elapsed=2.0 with a 0.8 s backoff: attempts near 0, 0.8 and 1.6 s, then one more
    # would start past 2.0 s, so it is not made. Slow hops may leave room for only two. On
    # RabbitMQ a retry waits in the broker's delay queues in 64 ms steps: 0.832 s.
    step = 0.832 if workers.broker.kind == "rabbitmq" else 0.8
    assert 2 <= len(attempts) <= 3
    started = [a["t"] - attempts[0]["t"] for a in attempts]
    assert all(s <= 2.0 for s in started)
    assert started[-1] + step > 2.0


def test_permanent_failure_is_not_retried(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    result = worker.send("retry.permanent")

    exc = outcome(result)

    assert result.state == "FAILURE"
    assert type(exc).__name__ == "Permanent"
    assert len(attempts_of(worker, "retry.permanent")) == 1


def test_exception_not_in_retry_on_is_not_retried(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    result = worker.send("retry.unlisted")

    exc = outcome(result)

    assert result.state == "FAILURE"
    assert isinstance(exc, KeyError)
    assert len(attempts_of(worker, "retry.unlisted")) == 1


def test_retry_keeps_the_queue(workers: WorkerRunner) -> None:
    default, other = workers.broker.queue_name("default"), workers.broker.queue_name("other")
    worker = workers.start(APP, queues=[default, other])

    outcome(worker.send("retry.flaky", 2, queue=other))

    assert [a["queue"] for a in attempts_of(worker, "retry.flaky")] == [other] * 3


def test_retry_keeps_the_priority(workers: WorkerRunner) -> None:
    worker = workers.start(APP)

    outcome(worker.send("retry.flaky", 2, priority=7))

    assert [a["priority"] for a in attempts_of(worker, "retry.flaky")] == [7] * 3


def test_retry_keeps_custom_headers(workers: WorkerRunner) -> None:
    worker = workers.start(APP)

    outcome(worker.send("retry.flaky", 2, headers={"tenant": "acme", "trace": "t-1"}))

    attempts = attempts_of(worker, "retry.flaky")
    assert len(attempts) == 3
    for attempt in attempts:
        assert attempt["headers"]["tenant"] == "acme"
        assert attempt["headers"]["trace"] == "t-1"


def test_retry_keeps_link_and_the_callback_runs_once(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    link = worker.signature("retry.callback")

    outcome(worker.send("retry.flaky", 2, link=link))
    worker.wait_for(lambda: attempts_of(worker, "retry.callback"), what="the link callback")
    time.sleep(0.3)

    callbacks = attempts_of(worker, "retry.callback")
    assert len(callbacks) == 1
    assert [h["number"] for h in callbacks[0]["received"]] == [1, 2]


def test_retry_keeps_link_error_and_the_errback_runs_once_at_the_end(
    workers: WorkerRunner,
) -> None:
    worker = workers.start(APP)
    link_error = worker.signature("retry.errback")
    result = worker.send("retry.hopeless", link_error=link_error)

    outcome(result)
    worker.wait_for(lambda: attempts_of(worker, "retry.errback"), what="the link_error errback")
    time.sleep(0.3)

    errbacks = attempts_of(worker, "retry.errback")
    assert len(errbacks) == 1
    assert errbacks[0]["failed_id"] == result.id
    assert errbacks[0]["exc"] == "ConnectionError"
    assert len(attempts_of(worker, "retry.hopeless")) == 3


def test_retry_keeps_root_id_and_parent_id(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    parent = worker.send("retry.parent")
    child_id = outcome(parent)

    outcome(AsyncResult(child_id, app=worker.client))

    children = attempts_of(worker, "retry.flaky")
    assert len(children) == 3
    assert {(c["root_id"], c["parent_id"]) for c in children} == {(parent.id, parent.id)}
    assert {c["id"] for c in children} == {child_id}
