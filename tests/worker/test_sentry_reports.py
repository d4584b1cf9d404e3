"""Sentry hears about a library task once, when it gives up, on a real prefork worker.

``apps.sentry_app`` initialises Sentry at import (so in the worker's main process, which
publishes dead letters, and in its pool children) with a transport that appends each event to
a file the test reads. One worker per setting of Sentry's own ``CeleryIntegration`` serves the
module; each test reads only the events of its own task ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resilient_tasks.sentry import CONTEXT, MECHANISM
from support.brokers import make_broker
from support.worker import Worker, WorkerRunner

pytestmark = pytest.mark.worker


@pytest.fixture(scope="module", params=[False, True], ids=["alone", "with-celery-integration"])
def worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    tmp_path = tmp_path_factory.mktemp("sentry")
    runner = WorkerRunner(make_broker("filesystem", tmp_path), tmp_path)
    events = tmp_path / "sentry-events.jsonl"
    try:
        started = runner.start(
            "apps.sentry_app",
            worker_settings={"rt_sentry_events": str(events), "rt_sentry_celery": request.param},
        )
        started.settings["rt_sentry_events"] = str(events)
        yield started
    finally:
        runner.close()


def sentry_events(worker: Worker, task_id: str) -> list[dict[str, Any]]:
    """The Sentry events about ``task_id``, in the order they were captured."""
    path = Path(worker.settings["rt_sentry_events"])
    if not path.exists():
        return []
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        about = (event.get("tags") or {}).get("celery_task_id")
        if about == task_id or task_id in json.dumps(event.get("logentry") or {}):
            found.append(event)
    return found


def settled(worker: Worker, result: Any) -> None:
    """Wait until the task's final state is stored (after its dead letter, if any)."""
    worker.wait_for(lambda: result.ready(), timeout=60, what=f"the outcome of {result.id}")


def test_a_task_retried_five_times_then_dead_lettered_is_one_sentry_event(worker: Worker) -> None:
    result = worker.send("sn.down")
    settled(worker, result)
    worker.wait_for(lambda: sentry_events(worker, result.id), what="the Sentry event")

    [event] = sentry_events(worker, result.id)
    assert event["tags"]["resilient_tasks.task"] == "sn.down"
    assert event["tags"]["resilient_tasks.reason"] == "retries_exhausted"
    assert event["tags"]["resilient_tasks.attempts"] == "6"
    assert event["tags"]["resilient_tasks.dead_letter_queue"] == f"{worker.queue}.dlq"
    context = event["contexts"][CONTEXT]
    assert (context["task_id"], context["reason"], context["attempts"]) == (
        result.id,
        "retries_exhausted",
        6,
    )
    assert [a["number"] for a in context["history"]] == [1, 2, 3, 4, 5, 6]
    assert [a["delay"] is None for a in context["history"]] == [False] * 5 + [True]
    assert context["history"][-1]["message"] == "billing API down (attempt 6)"
    [exception] = event["exception"]["values"]
    assert (exception["type"], exception["mechanism"]["type"]) == ("ConnectionError", MECHANISM)
    # The frames come from the pool child's traceback, not from where the report was made.
    functions = [frame["function"] for frame in exception["stacktrace"]["frames"]]
    assert functions[-1] == "down"
    assert worker.dead_letters(1)[0]["task"]["id"] == result.id


def test_a_task_that_retries_then_succeeds_is_no_sentry_event(worker: Worker) -> None:
    result = worker.send("sn.recovers")
    assert result.get(timeout=60) == "paid"
    # Every attempt's event, had there been one, was written before the success was stored.
    assert sentry_events(worker, result.id) == []


def test_a_task_that_fails_for_good_without_dead_letter_is_one_sentry_event(worker: Worker) -> None:
    result = worker.send("sn.not_dead_lettered")
    settled(worker, result)
    worker.wait_for(lambda: sentry_events(worker, result.id), what="the Sentry event")

    [event] = sentry_events(worker, result.id)
    context = event["contexts"][CONTEXT]
    assert (context["reason"], context["attempts"], context["dead_letter_queue"]) == (
        "retries_exhausted",
        3,
        None,
    )
    assert [a["number"] for a in context["history"]] == [1, 2, 3]
    # Reported from the pool child, where the exception's own frames are.
    frames = event["exception"]["values"][-1]["stacktrace"]["frames"]
    assert frames[-1]["function"] == "not_dead_lettered"


def test_a_plain_task_is_left_to_celery_integration(worker: Worker) -> None:
    result = worker.send("sn.plain")
    settled(worker, result)
    if not worker.settings.get("rt_sentry_celery"):
        # Without CeleryIntegration, Sentry's logging integration reports Celery's error line.
        worker.wait_for(lambda: sentry_events(worker, result.id), what="the logged failure")
        assert all(CONTEXT not in e.get("contexts", {}) for e in sentry_events(worker, result.id))
        return
    worker.wait_for(lambda: sentry_events(worker, result.id), what="CeleryIntegration's event")
    [event] = sentry_events(worker, result.id)
    assert event["exception"]["values"][-1]["mechanism"]["type"] == "celery"
    assert CONTEXT not in event.get("contexts", {})
