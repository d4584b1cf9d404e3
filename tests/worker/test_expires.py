"""An expired task ends REVOKED, on every broker, however long it waited behind other work.

``ResilientTask`` acknowledges late, so a worker's prefetch window stays full while its tasks
run and a queued message waits on the broker, not in the worker. Celery gives a task sent with
``expires`` the AMQP ``expiration`` property too, and RabbitMQ dropped such a message unseen
once it expired there: no worker ever saw it, its result stayed ``PENDING`` and ``get()`` hung.
The library publishes its tasks without that property (:mod:`resilient_tasks._expiry`), so the
worker finds the expiry on receipt and marks the task ``REVOKED``, as a plain Celery worker does.

Each test runs one pool process (prefetch 1) behind a task that keeps it busy for 2 s, longer
than the expiry.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from celery import Task
from celery.exceptions import TaskRevokedError

from apps.expires_tasks import define
from support.worker import Worker, WorkerRunner

APP = "apps.expires_app"
BUSY = 2.0
pytestmark = pytest.mark.worker


def start(workers: WorkerRunner) -> tuple[Worker, dict[str, Task]]:
    """A worker with one pool process, and the tasks as its client publishes them."""
    worker = workers.start(APP, concurrency=1)
    return worker, define(worker.client)


def revoked_events(worker: Worker, task_id: str) -> list[dict[str, Any]]:
    events = []
    for line in worker.output_text().splitlines():
        if line.startswith("{") and f'"{task_id}"' in line:
            event = json.loads(line)
            if event.get("event") == "task_revoked":
                events.append(event)
    return events


def wait_until_started(worker: Worker, task: str) -> None:
    """Wait until ``task`` has started (a test publishes what must queue behind it only then:
    the filesystem transport does not keep the order of messages sent within a moment)."""
    worker.wait_for(lambda: any(a["task"] == task for a in worker.attempts()), what=task)


def assert_revoked_by_the_worker(worker: Worker, task_id: str) -> None:
    worker.wait_for(lambda: revoked_events(worker, task_id), what="the task_revoked event")
    (event,) = revoked_events(worker, task_id)
    assert (event["expired"], event["terminated"]) == (True, False)
    assert worker.drain(f"{worker.queue}.dlq") == []


def test_a_task_that_expires_behind_busy_work_is_revoked(workers: WorkerRunner) -> None:
    worker, tasks = start(workers)
    log = str(worker.log)
    tasks["exp.slow"].apply_async((BUSY, log))
    wait_until_started(worker, "exp.slow")
    sent = time.monotonic()
    result = tasks["exp.add"].apply_async((1, 1, log), expires=1)

    with pytest.raises(TaskRevokedError):
        result.get(timeout=BUSY + 8, interval=0.05)

    assert time.monotonic() - sent >= 1
    assert result.state == "REVOKED"
    assert [a["task"] for a in worker.attempts()] == ["exp.slow"]
    assert_revoked_by_the_worker(worker, result.id)


def test_a_retry_that_expires_behind_busy_work_is_revoked(workers: WorkerRunner) -> None:
    """Celery's retry keeps the task's ``expires`` (and would give it the TTL that is left).
    The first attempt fails after 0.5 s, once the busy task is queued: its retry (published by
    the worker's main process) queues behind it."""
    worker, tasks = start(workers)
    log = str(worker.log)
    result = tasks["exp.flaky"].apply_async((0.5, log), expires=1.5)
    wait_until_started(worker, "exp.flaky")
    tasks["exp.slow"].apply_async((BUSY, log))

    with pytest.raises(TaskRevokedError):
        result.get(timeout=BUSY + 8, interval=0.05)

    assert result.state == "REVOKED"
    assert [(a["task"], a["retries"]) for a in worker.attempts()] == [
        ("exp.flaky", 0),
        ("exp.slow", 0),
    ]
    assert_revoked_by_the_worker(worker, result.id)
