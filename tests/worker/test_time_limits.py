"""Time limits and lost workers: handled once, never looped (real prefork worker, every broker)."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from support.worker import Worker, WorkerRunner

APP = "apps.timelimit_app"
pytestmark = pytest.mark.worker


def runs(worker: Worker, task: str, role: str | None = None) -> list[dict[str, Any]]:
    return [a for a in worker.attempts() if a["task"] == task and a.get("role") == role]


def settle(result: Any) -> Any:
    return result.get(timeout=60, interval=0.05, propagate=False)


def test_soft_limit_runs_the_cleanup_once_then_dead_letters(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    result = worker.send("tl.soft")

    exc = settle(result)
    (envelope,) = worker.dead_letters(1)

    assert type(exc).__name__ == "SoftTimeLimitExceeded"
    assert envelope["reason"] == "soft_time_limit"
    assert len(runs(worker, "tl.soft")) == 1
    assert len(runs(worker, "tl.soft", "cleanup")) == 1


def test_soft_limit_is_retried_when_the_policy_says_so(workers: WorkerRunner) -> None:
    worker = workers.start(APP)

    settle(worker.send("tl.soft_retry"))
    (envelope,) = worker.dead_letters(1)

    assert envelope["reason"] == "retries_exhausted"
    assert [a["exception_type"] for a in envelope["attempts"]] == [
        "billiard.exceptions.SoftTimeLimitExceeded"
    ] * 2
    assert len(runs(worker, "tl.soft_retry")) == 2
    assert len(runs(worker, "tl.soft_retry", "cleanup")) == 2  # once per attempt


def test_hard_limit_yields_one_envelope_and_never_runs_again(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    result = worker.send("tl.hard")

    (envelope,) = worker.dead_letters(1)
    time.sleep(2)  # a requeue would have run it again by now

    assert envelope["reason"] == "hard_time_limit"
    assert envelope["exception"]["type"] == "billiard.exceptions.TimeLimitExceeded"
    assert worker.drain(f"{worker.queue}.dlq") == []
    assert len(runs(worker, "tl.hard")) == 1
    assert settle(result) is not None
    assert result.state == "FAILURE"


def test_hard_limit_is_retried_once_per_attempt_when_the_policy_says_so(
    workers: WorkerRunner,
) -> None:
    worker = workers.start(APP)

    worker.send("tl.hard_retry")

    (envelope,) = worker.dead_letters(1)
    time.sleep(2)

    assert envelope["reason"] == "retries_exhausted"
    assert [a["number"] for a in envelope["attempts"]] == [1, 2]
    assert envelope["attempts"][0]["delay"] == 0.1
    assert len(runs(worker, "tl.hard_retry")) == 2
    assert worker.drain(f"{worker.queue}.dlq") == []


def test_a_pool_child_killed_after_asking_for_a_retry_leaves_one_copy_of_the_task(
    workers: WorkerRunner,
) -> None:
    """Celery publishes a retry from the pool child; killed before the main process heard of
    it, the child would leave two copies running: its retry, and the unacknowledged original
    that came back. The main process publishes the retry: the task comes back once (a lost
    worker) and succeeds once."""
    worker = workers.start(APP)
    result = worker.send("tl.retry_then_die")

    assert result.get(timeout=30) == "done"
    time.sleep(1.0)  # a second copy, if any, would run now

    attempts = [a for a in worker.attempts() if a.get("id") == result.id]
    assert [a.get("role") or a["retries"] for a in attempts] == [0, "killed", 0, 1, "done"]
    assert worker.drain(f"{worker.queue}.dlq") == []


def test_worker_lost_message_is_dead_lettered_after_max_redeliveries_while_others_run(
    workers: WorkerRunner,
) -> None:
    worker = workers.start(APP)
    poison = worker.send("tl.exit")
    others = [worker.send("tl.work", 0.05) for _ in range(20)]

    (envelope,) = worker.dead_letters(1, timeout=60)
    results = [settle(r) for r in others]

    assert envelope["reason"] == "worker_lost"
    assert envelope["task"]["id"] == poison.id
    assert envelope["exception"]["type"] == "billiard.exceptions.WorkerLostError"
    assert len(runs(worker, "tl.exit")) == 3  # the first run and max_redeliveries=2 more
    assert results == ["done"] * 20
    assert worker.process.poll() is None  # the worker survived its poison message


def test_warm_shutdown_mid_task_loses_nothing_and_is_no_failure(workers: WorkerRunner) -> None:
    queue = workers.broker.queue_name()
    worker = workers.start(APP, queues=[queue], concurrency=1)
    running = worker.send("tl.work", 2.0)
    worker.wait_for(
        lambda: any(a["id"] == running.id for a in runs(worker, "tl.work", "start")),
        what="the long task to start",
    )
    waiting = worker.send("tl.work", 0.1)  # queued behind it (concurrency 1)

    workers.stop(worker, signal.SIGTERM)
    assert settle(running) == "done"
    replacement = workers.start(APP, queues=[queue], concurrency=1)
    assert settle(waiting) == "done"

    assert replacement.drain(f"{queue}.dlq") == []
    starts = [
        a["id"] for a in worker.attempts() + replacement.attempts() if a.get("role") == "start"
    ]
    assert starts.count(running.id) == 1


@pytest.mark.parametrize("broker", ["filesystem"], indirect=True)
def test_a_pool_that_cannot_enforce_time_limits_is_warned_about_at_start(
    workers: WorkerRunner,
) -> None:
    worker = workers.start(APP, pool="solo", concurrency=1)

    output = worker.output_text()
    assert "the solo pool does not enforce time limits" in output
    assert "tl.soft" in output
    assert "tl.hard" in output
    assert "tl.work" not in output.split("does not enforce time limits")[1].split("\n")[0]


def test_failure_handlers_run_once_in_the_child_or_in_the_worker_for_a_hard_limit(
    workers: WorkerRunner,
) -> None:
    worker = workers.start(APP)
    raised, killed = worker.send("tl.raise_handled"), worker.send("tl.hard_handled")

    settle(raised)
    settle(killed)
    worker.dead_letters(2)
    time.sleep(0.5)

    handled = {a["task"]: a for a in worker.attempts() if a.get("role") == "handler"}
    assert len([a for a in worker.attempts() if a.get("role") == "handler"]) == 2
    assert handled["tl.raise_handled"]["reason"] == "exception"
    assert handled["tl.hard_handled"]["reason"] == "hard_time_limit"
    assert handled["tl.hard_handled"]["pid"] == worker.process.pid  # the main process
    assert handled["tl.raise_handled"]["pid"] in {
        a["pid"] for a in runs(worker, "tl.raise_handled")
    }
