"""What one failure writes to a real prefork worker's log, and the Celery events it sends.

``apps.failure_log_app`` calls ``observability.connect()`` alone: the events go through
``logging`` in Celery's own format, each at its level. ``apps.events_app`` logs JSON
(``configure_logging(json=True)``).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resilient_tasks.observability import CELERY_FAILURE_LOG_SETTING
from support.brokers import BROKERS, make_broker
from support.worker import Worker, WorkerRunner

APP = "apps.failure_log_app"
pytestmark = pytest.mark.worker
#: The first line of a record in Celery's worker format: ``[time: LEVEL/ProcessName] message``.
RECORD = re.compile(r"^\[[^\]]*: (?P<level>[A-Z]+)/(?P<process>[\w-]+)\] (?P<message>.*)$")


@pytest.fixture(scope="module", params=BROKERS)
def worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    yield from started(request.param, tmp_path_factory.mktemp(f"flog-{request.param}"))


def started(broker: str, tmp_path: Path, *extra_args: str, **settings: Any) -> Iterator[Worker]:
    runner = WorkerRunner(make_broker(broker, tmp_path), tmp_path)
    try:
        yield runner.start(APP, worker_settings=settings, extra_args=extra_args)
    finally:
        runner.close()


def records(worker: Worker, task_id: str) -> list[tuple[str, str, list[str]]]:
    """The worker's log records that name ``task_id``: (level, process, lines), each record's
    lines being its first line and the lines after it that start no record (its traceback)."""
    found: list[tuple[str, str, list[str]]] = []
    current: list[str] | None = None
    for line in worker.output_text().splitlines():
        match = RECORD.match(line)
        if match:
            current = [match["message"]]
            if task_id in line:
                found.append((match["level"], match["process"], current))
            continue
        if current is not None:
            current.append(line)
    return found


def settled(worker: Worker, task_id: str, last_event: str) -> list[tuple[str, str, list[str]]]:
    worker.wait_for(
        lambda: any(r[2][0].startswith(last_event) for r in records(worker, task_id)),
        what=last_event,
    )
    time.sleep(0.5)  # anything else about it would be written by now
    return records(worker, task_id)


def errors(found: list[tuple[str, str, list[str]]]) -> list[list[str]]:
    return [lines for level, _, lines in found if level in {"ERROR", "CRITICAL"}]


def test_a_dead_lettered_failure_is_one_error_line_with_its_traceback(worker: Worker) -> None:
    result = worker.send("fl.broken")

    found = settled(worker, result.id, "task_dead_lettered")

    (error,) = errors(found)
    assert error[0].startswith("task_dead_lettered ")
    assert "exception=\"KeyError: 'no such customer'\"" in error[0]
    assert error[1] == "Traceback (most recent call last):"
    assert error[-1] == "KeyError: 'no such customer'"
    (failed,) = [(level, lines) for level, _, lines in found if lines[0].startswith("task_failed")]
    assert failed[0] == "INFO"
    assert "raised unexpected" not in worker.output_text().split(result.id, 1)[-1]


def test_a_hard_time_limit_dead_lettered_is_one_error_line(worker: Worker) -> None:
    result = worker.send("fl.stuck")

    found = settled(worker, result.id, "task_dead_lettered")

    (error,) = errors(found)
    assert error[0].startswith("task_dead_lettered ")
    assert "TimeLimitExceeded" in error[0]
    levels = {lines[0].split(" ", 1)[0]: level for level, _, lines in found}
    assert levels["task_hard_time_limit"] == "WARNING"
    assert "Hard time limit (1s) exceeded" not in worker.output_text().split(result.id, 1)[-1]


def test_a_failure_not_dead_lettered_is_one_error_line_task_failed(worker: Worker) -> None:
    result = worker.send("fl.kept")

    found = settled(worker, result.id, "task_failed")

    (error,) = errors(found)
    assert error[0].startswith("task_failed ")
    assert error[1] == "Traceback (most recent call last):"
    assert error[-1] == "KeyError: 'no such order'"


def test_events_keep_their_level_and_process_through_celerys_redirected_stdout(
    worker: Worker,
) -> None:
    result = worker.send("fl.flaky")
    assert result.get(timeout=30) == "done"

    found = settled(worker, result.id, "task_succeeded")

    events = [(level, lines[0].split()[0]) for level, _, lines in found if "task_id=" in lines[0]]
    assert events == [
        ("INFO", "task_started"),
        ("WARNING", "task_retry_scheduled"),
        ("INFO", "task_started"),
        ("INFO", "task_succeeded"),
    ]
    processes = {process for _, process, lines in found if "task_id=" in lines[0]}
    assert all(process.startswith("ForkPoolWorker-") for process in processes), processes
    assert errors(found) == []  # a retry is no error (Celery's "retry: Retry in" is INFO)


@pytest.fixture(scope="module")
def celerys_line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A worker whose app sets ``resilient_tasks_celery_failure_log = True``."""
    yield from started(
        "filesystem", tmp_path_factory.mktemp("flog-celery"), **{CELERY_FAILURE_LOG_SETTING: True}
    )


def test_the_setting_brings_celerys_own_failure_line_back(celerys_line: Worker) -> None:
    result = celerys_line.send("fl.broken")

    found = settled(celerys_line, result.id, "task_dead_lettered")

    celery, dead_lettered = errors(found)
    assert "fl.broken" in celery[0]
    assert "raised unexpected: KeyError" in celery[0]
    assert celery[-1] == "KeyError: 'no such customer'"
    assert dead_lettered[0].startswith("task_dead_lettered ")


# -- Celery events (-E) ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=BROKERS)
def sending_events(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """A worker started with ``-E``."""
    yield from started(request.param, tmp_path_factory.mktemp(f"flog-ev-{request.param}"), "-E")


class Captured:
    """Celery's events, received with Celery's own ``app.events.Receiver`` in a thread."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.events: list[dict[str, Any]] = []
        self._connection = worker.client.connection_for_read()
        self._receiver = worker.client.events.Receiver(
            self._connection, handlers={"*": self.events.append}
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def of(self, task_id: str) -> list[dict[str, Any]]:
        """``task_id``'s events in the order they were sent (by their Lamport clock: the
        filesystem transport may deliver two sent in the same instant the other way round)."""
        found = [e for e in list(self.events) if e.get("uuid") == task_id]
        return sorted(found, key=lambda e: e.get("clock", 0))

    def listening(self) -> None:
        """Wait until events arrive: send a task until its ``task-succeeded`` is received."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = self.worker.send("fl.ok")
            probe.get(timeout=30)
            time.sleep(0.3)
            if any(e["type"] == "task-succeeded" for e in self.of(probe.id)):
                return
        raise AssertionError("no Celery event ever arrived")

    def close(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(10)
        self._connection.release()


@pytest.fixture
def captured(sending_events: Worker) -> Iterator[Captured]:
    capture = Captured(sending_events)
    try:
        capture.listening()
        yield capture
    finally:
        capture.close()


def test_a_dead_letter_is_a_celery_event_before_task_failed(
    sending_events: Worker, captured: Captured
) -> None:
    result = sending_events.send("fl.broken")

    sending_events.wait_for(
        lambda: any(e["type"] == "task-failed" for e in captured.of(result.id)),
        what="task-failed",
    )

    types = [e["type"] for e in captured.of(result.id)]
    assert types[-2:] == ["task-dead-lettered", "task-failed"]
    (dead,) = [e for e in captured.of(result.id) if e["type"] == "task-dead-lettered"]
    assert dead["reason"] == "exception"
    assert dead["queue"] == f"{sending_events.queue}.dlq"
    assert dead["exception"] == "KeyError: 'no such customer'"
    assert dead["exception_type"] == "KeyError"
    assert dead["hostname"] == sending_events.nodename
    assert len(sending_events.dead_letters(1)) == 1
