"""Drop-in: Celery's own retry options behave the same on ResilientTask as on celery.Task."""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

import pytest

from resilient_tasks.history import History
from support.worker import Worker, WorkerRunner

APP = "apps.parity_app"
pytestmark = pytest.mark.worker


def schedule(worker: Worker, task: str) -> list[float]:
    """The countdown of each retry: the message's eta minus the previous attempt's start."""
    attempts = [a for a in worker.attempts() if a["task"] == task]
    return [
        round(datetime.fromisoformat(b["eta"]).timestamp() - a["t"], 1)
        for a, b in itertools.pairwise(attempts)
    ]


def run_both(worker: Worker, plain: str, resilient: str) -> tuple[Any, Any]:
    results = worker.send(plain), worker.send(resilient)
    return tuple(r.get(timeout=30, interval=0.05, propagate=False) for r in results)  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("plain", "resilient", "expected"),
    [
        # retry_backoff=True, no jitter: 2**retries seconds.
        ("parity.plain_backoff", "parity.resilient_backoff", [1.0, 2.0]),
        # retry_kwargs={"max_retries": 2} with default_retry_delay=0.5.
        ("parity.plain_retry_kwargs", "parity.resilient_retry_kwargs", [0.5, 0.5]),
    ],
)
def test_celery_autoretry_options_make_the_same_attempts_with_the_same_delays(
    workers: WorkerRunner, plain: str, resilient: str, expected: list[float]
) -> None:
    worker = workers.start(APP)

    plain_exc, resilient_exc = run_both(worker, plain, resilient)

    assert type(plain_exc) is type(resilient_exc) is ConnectionError
    for delays in (schedule(worker, plain), schedule(worker, resilient)):
        # The eta counts from the retry, a little after the attempt started (more on a busy
        # machine): never earlier than the countdown, and well short of the next one.
        assert len(delays) == len(expected)
        assert all(e <= d < e + 0.5 for d, e in zip(delays, expected, strict=True)), delays


def test_celery_autoretry_on_a_resilient_task_still_records_the_history(
    workers: WorkerRunner,
) -> None:
    worker = workers.start(APP)

    run_both(worker, "parity.plain_backoff", "parity.resilient_backoff")

    last = [a for a in worker.attempts() if a["task"] == "parity.resilient_backoff"][-1]
    history = History.from_headers(last["headers"])
    assert [(a.number, a.delay, a.exception_type) for a in history.attempts] == [
        (1, 1.0, "ConnectionError"),
        (2, 2.0, "ConnectionError"),
    ]
