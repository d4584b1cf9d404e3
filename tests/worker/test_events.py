"""The events and bound contextvars, as a real prefork worker logs them (JSON, every broker).

One worker per broker serves the whole module (``apps.events_app``: ``configure_logging(json=True)``
and ``connect()`` at import); each test sends its own tasks and reads only the log lines of
their ids.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resilient_tasks.observability import CONTEXT_KEYS, CORRELATION_HEADER, EVENTS
from support.brokers import BROKERS, make_broker
from support.worker import Worker, WorkerRunner

APP = "apps.events_app"
IDENTITY = {*CONTEXT_KEYS, "hostname"}
#: The app's plain ``celery.Task`` tasks. Its library tasks are dead-lettered, and the error line
#: of their failure is task_dead_lettered's: their task_failed is at info.
PLAIN_TASKS = {"ev.plain_hard", "ev.plain_context"}
pytestmark = pytest.mark.worker


@pytest.fixture(scope="module", params=BROKERS)
def worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    yield from events_worker(request.param, tmp_path_factory.mktemp(f"events-{request.param}"))


def events_worker(broker: str, tmp_path: Path, **worker_settings: Any) -> Iterator[Worker]:
    runner = WorkerRunner(make_broker(broker, tmp_path), tmp_path)
    try:
        yield runner.start(APP, worker_settings=worker_settings)
    finally:
        runner.close()


def log_lines(worker: Worker) -> list[dict[str, Any]]:
    """The worker's JSON log lines, in the order they were written."""
    lines = []
    for line in worker.output_text().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def events_of(worker: Worker, task_id: str) -> list[dict[str, Any]]:
    return [
        line
        for line in log_lines(worker)
        if line.get("logger") == "resilient_tasks.events" and line.get("task_id") == task_id
    ]


def wait_for_events(worker: Worker, task_id: str, count: int) -> list[dict[str, Any]]:
    """The events of ``task_id`` once there are ``count`` of them (and no more came soon)."""
    worker.wait_for(lambda: len(events_of(worker, task_id)) >= count, what=f"{count} events")
    time.sleep(0.3)
    return events_of(worker, task_id)


def names(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["event"], e["attempt"]) for e in events]


def assert_identity(events: list[dict[str, Any]], worker: Worker, task: str, task_id: str) -> None:
    for event in events:
        assert set(event) >= IDENTITY, event
        dead_lettered = event["event"] == "task_failed" and task not in PLAIN_TASKS
        assert event["level"] == ("info" if dead_lettered else EVENTS[event["event"]])
        assert (event["task_id"], event["task_name"], event["queue"]) == (
            task_id,
            task,
            worker.queue,
        )
        assert event["root_id"] == task_id
        assert event["correlation_id"] == task_id
        assert event["hostname"].startswith(f"{worker.queue.rsplit('-', 1)[0]}-w")  # the node


def test_a_retry_then_a_success(worker: Worker) -> None:
    assert_retry_then_success(worker)


def assert_retry_then_success(worker: Worker) -> None:
    result = worker.send("ev.flaky")

    assert result.get(timeout=30) == "done"
    events = wait_for_events(worker, result.id, 4)

    assert names(events) == [
        ("task_started", 1),
        ("task_retry_scheduled", 1),
        ("task_started", 2),
        ("task_succeeded", 2),
    ]
    assert_identity(events, worker, "ev.flaky", result.id)
    assert events[1]["delay"] == 0.1
    assert events[1]["exception"] == "ConnectionError: upstream reset"
    assert [e["parent_id"] for e in events] == [None, None, result.id, result.id]
    assert isinstance(events[3]["runtime"], float)


def test_celerys_own_lines_are_json_with_the_task_bound(worker: Worker) -> None:
    result = worker.send("ev.context")
    result.get(timeout=30)
    wait_for_events(worker, result.id, 2)

    (succeeded,) = [
        line
        for line in log_lines(worker)
        if line.get("logger") == "celery.app.trace" and result.id in line["event"]
    ]
    assert succeeded["level"] == "info"
    assert (succeeded["task_id"], succeeded["task_name"], succeeded["attempt"]) == (
        result.id,
        "ev.context",
        1,
    )


def test_a_failure_for_good_then_its_dead_letter(worker: Worker) -> None:
    assert_failure_then_dead_letter(worker)


def assert_failure_then_dead_letter(worker: Worker) -> None:
    result = worker.send("ev.broken", password="hunter2")

    result.get(timeout=30, propagate=False)
    events = wait_for_events(worker, result.id, 3)

    assert names(events) == [
        ("task_started", 1),
        ("task_failed", 1),
        ("task_dead_lettered", 1),
    ]
    assert_identity(events, worker, "ev.broken", result.id)
    assert events[2]["reason"] == "exception"
    assert events[2]["dead_letter_queue"] == f"{worker.queue}.dlq"
    assert events[2]["exception"] == "KeyError: 'no such customer'"
    assert "hunter2" not in worker.output_text()
    assert_one_error_line(worker, result.id)


def assert_one_error_line(worker: Worker, task_id: str) -> None:
    """One JSON line at error for the failure: task_dead_lettered, with the traceback in its
    own key, and the process that wrote it (Celery's ``raised unexpected`` line is not)."""
    lines = [line for line in log_lines(worker) if task_id in json.dumps(line)]
    (error,) = [line for line in lines if line["level"] in {"error", "critical"}]
    assert error["event"] == "task_dead_lettered"
    assert error["process_name"] == "MainProcess"
    assert error["exception"] == "KeyError: 'no such customer'"
    assert error["traceback"].startswith("Traceback (most recent call last):")
    assert error["traceback"].endswith("KeyError: 'no such customer'")
    (failed,) = [line for line in lines if line.get("event") == "task_failed"]
    assert failed["process_name"].startswith("ForkPoolWorker-")


def test_a_soft_time_limit(worker: Worker) -> None:
    result = worker.send("ev.soft")

    result.get(timeout=30, propagate=False)
    events = wait_for_events(worker, result.id, 4)

    assert names(events) == [
        ("task_started", 1),
        ("task_soft_time_limit", 1),
        ("task_failed", 1),
        ("task_dead_lettered", 1),
    ]
    assert_identity(events, worker, "ev.soft", result.id)
    assert {e.get("reason") for e in events[2:]} == {"soft_time_limit"}


def test_a_hard_time_limit(worker: Worker) -> None:
    result = worker.send("ev.hard")

    events = wait_for_events(worker, result.id, 4)

    assert names(events) == [
        ("task_started", 1),
        ("task_hard_time_limit", 1),
        ("task_dead_lettered", 1),
        ("task_failed", 1),
    ]
    assert_identity(events, worker, "ev.hard", result.id)
    assert events[1]["timeout"] == 1
    assert {e["reason"] for e in events[2:]} == {"hard_time_limit"}


def test_a_plain_tasks_hard_time_limit_names_its_attempt_and_queue(worker: Worker) -> None:
    """Celery reports it from the worker's main process, where the task's request is not
    pushed (Celery 5.7 sends ``task_failure`` from ``Request.on_timeout``, then again from
    ``on_failure``): the event still carries the run's identity, its third attempt, once."""
    result = worker.send("ev.plain_hard", retries=2)

    events = wait_for_events(worker, result.id, 2)

    assert names(events) == [("task_started", 3), ("task_failed", 3)]
    assert_identity(events, worker, "ev.plain_hard", result.id)
    assert events[1]["reason"] == "hard_time_limit"
    assert events[1]["exception_type"] == "billiard.exceptions.TimeLimitExceeded"


def test_a_revoked_task(worker: Worker) -> None:
    """Revoked by expiry, which needs no remote control: the worker holds the message until its
    countdown and then finds it expired. (Celery also gives the message a TTL, and RabbitMQ
    drops it unseen once that runs out in the queue; the idle worker takes it at once.)"""
    result = worker.send("ev.context", countdown=2.0, expires=1.0)

    events = wait_for_events(worker, result.id, 1)

    assert names(events) == [("task_revoked", 1)]
    assert_identity(events, worker, "ev.context", result.id)
    assert (events[0]["expired"], events[0]["terminated"]) == (True, False)


def test_a_child_task_carries_its_parents_root_id_and_correlation_id(worker: Worker) -> None:
    parent = worker.send("ev.parent", headers={CORRELATION_HEADER: "req-42"})
    child_id = parent.get(timeout=30)

    parent_events = wait_for_events(worker, parent.id, 2)
    child_events = wait_for_events(worker, child_id, 2)

    assert {(e["root_id"], e["parent_id"], e["correlation_id"]) for e in parent_events} == {
        (parent.id, None, "req-42")
    }
    assert {(e["root_id"], e["parent_id"], e["correlation_id"]) for e in child_events} == {
        (parent.id, parent.id, "req-42")
    }


def test_nothing_bound_for_one_task_leaks_into_the_next(worker: Worker) -> None:
    """Concurrency 2, 36 tasks of three shapes: each task starts with exactly its own keys (and
    what its pool process bound itself), and after each the process has only its own again."""
    assert_nothing_leaks(worker)


def assert_nothing_leaks(worker: Worker) -> None:
    sent = []
    for i in range(12):
        sent.append((worker.send("ev.context"), None))
        correlation = f"req-{uuid.uuid4().hex[:8]}-{i}"
        sent.append(
            (worker.send("ev.context", headers={CORRELATION_HEADER: correlation}), correlation)
        )
        sent.append((worker.send("ev.parent"), None))
    expected: dict[str, dict[str, Any]] = {}
    for result, correlation in sent:
        value = result.get(timeout=30)
        task = "ev.parent" if value != result.id else "ev.context"
        expected[result.id] = {
            "task_id": result.id,
            "task_name": task,
            "attempt": 1,
            "queue": worker.queue,
            "root_id": result.id,
            "parent_id": None,
            "correlation_id": correlation or result.id,
        }
        if task == "ev.parent":
            expected[value] = {
                **expected[result.id],
                "task_id": value,
                "task_name": "ev.context",
                "parent_id": result.id,
            }

    def afters() -> list[dict[str, Any]]:
        return [
            x
            for x in log_lines(worker)
            if x["event"] == "context_after" and x["finished"] in expected
        ]

    worker.wait_for(lambda: len(afters()) >= len(expected), what="every task to finish")

    seen = [x for x in log_lines(worker) if x["event"] == "context_seen"]
    starts = {x["seen"]["task_id"]: x for x in seen if "task_id" in x["seen"]}  # a plain task's
    for task_id, keys in expected.items():
        line = starts[task_id]
        assert line["seen"] == {**keys, "pool_process": line["pool_process"]}
    assert len(afters()) == len(expected)
    for line in afters():
        assert line["seen"] == {"pool_process": line["pool_process"]}


# -- connect(plain_tasks=False) --------------------------------------------------------------------


@pytest.fixture(scope="module", params=BROKERS)
def library_only(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """A worker whose app calls ``connect(plain_tasks=False)``."""
    tmp_path = tmp_path_factory.mktemp(f"events-library-{request.param}")
    yield from events_worker(request.param, tmp_path, rt_events_plain_tasks=False)


def test_library_only_a_retry_then_a_success(library_only: Worker) -> None:
    assert_retry_then_success(library_only)


def test_library_only_a_failure_for_good_then_its_dead_letter(library_only: Worker) -> None:
    assert_failure_then_dead_letter(library_only)


def test_library_only_a_plain_task_logs_its_failure_and_nothing_else(
    library_only: Worker,
) -> None:
    succeeds = library_only.send("ev.plain_context")
    fails = library_only.send("ev.plain_hard")

    succeeds.get(timeout=30)
    events = wait_for_events(library_only, fails.id, 1)

    assert names(events) == [("task_failed", 1)]
    assert events[0]["reason"] == "hard_time_limit"
    assert events_of(library_only, succeeds.id) == []
    (seen,) = [x["seen"] for x in log_lines(library_only) if x.get("own_id") == succeeds.id]
    assert "task_id" not in seen


def test_library_only_nothing_bound_for_one_task_leaks_into_the_next(
    library_only: Worker,
) -> None:
    assert_nothing_leaks(library_only)
