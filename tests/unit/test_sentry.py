"""The Sentry integration, without a worker: what it reports, from which occurrence, and what
it drops. Sentry is initialised per test with a transport that keeps the events in a list."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from celery import Celery, signals
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.transport import Transport

from resilient_tasks import ResilientTask, _events
from resilient_tasks.sentry import CONTEXT, HISTORY_LIMIT, MECHANISM, ResilientTasksIntegration

app = Celery("sentry-unit", set_as_current=False)


@app.task(base=ResilientTask, bind=True, name="unit.sentry.dl", shared=False)
def dead_lettering(self: Any) -> None:
    raise ConnectionError("down")


@app.task(base=ResilientTask, bind=True, name="unit.sentry.off", shared=False, dead_letter=False)
def not_dead_lettering(self: Any) -> None:
    raise KeyError("no such customer")


@app.task(bind=True, name="unit.sentry.plain", shared=False)
def plain(self: Any) -> None:
    raise KeyError("no such customer")


class ListTransport(Transport):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        event = envelope.get_event()
        if event is not None:
            self.events.append(dict(event))


def start_sentry(*integrations: Any) -> ListTransport:
    transport = ListTransport()
    sentry_sdk.init(
        dsn="https://public@sentry.invalid/1",
        transport=transport,
        integrations=list(integrations),
        default_integrations=False,
        auto_enabling_integrations=False,
    )
    return transport


@pytest.fixture
def sentry() -> Iterator[ListTransport]:
    yield start_sentry(ResilientTasksIntegration())
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def envelope(attempts: int, text: str = "") -> dict[str, Any]:
    return {
        "reason": "retries_exhausted",
        "task": {"id": "f7c9", "name": "billing.sync", "queue": "billing"},
        "exception": {"type": "ConnectionError", "message": "down", "traceback": text},
        "attempts": [
            {"number": n, "at": "2026-01-01T00:00:00+00:00", "hostname": "w1",
             "exception_type": "ConnectionError", "message": f"down {n}",
             "delay": None if n == attempts else 0.5}
            for n in range(1, attempts + 1)
        ],
    }  # fmt: skip


def dead_lettered(exc: BaseException, attempts: int = 3, text: str = "") -> None:
    _events.emit(
        "task_dead_lettered",
        request=None,
        reason="retries_exhausted",
        queue="billing.dlq",
        exception=exc,
        envelope=envelope(attempts, text),
    )


def test_a_dead_letter_is_one_event_with_its_story(sentry: ListTransport) -> None:
    dead_lettered(ConnectionError("down"), attempts=3)

    [event] = sentry.events
    assert event["tags"] == {
        "celery_task_id": "f7c9",
        "resilient_tasks.task": "billing.sync",
        "resilient_tasks.reason": "retries_exhausted",
        "resilient_tasks.attempts": "3",
        "resilient_tasks.dead_letter_queue": "billing.dlq",
    }
    context = event["contexts"][CONTEXT]
    assert context["queue"] == "billing"
    assert [a["message"] for a in context["history"]] == ["down 1", "down 2", "down 3"]
    assert event["exception"]["values"][-1]["mechanism"]["type"] == MECHANISM


def test_the_context_keeps_the_latest_attempts(sentry: ListTransport) -> None:
    dead_lettered(ConnectionError("down"), attempts=HISTORY_LIMIT + 5)

    context = sentry.events[0]["contexts"][CONTEXT]
    assert [a["number"] for a in context["history"]] == list(range(6, HISTORY_LIMIT + 6))
    assert (context["attempts"], context["history_dropped"]) == (HISTORY_LIMIT + 5, 5)


def test_a_dead_letter_has_the_frames_of_its_traceback_text(sentry: ListTransport) -> None:
    exc = raised(ConnectionError("down"))
    text = "".join(traceback.format_exception(exc))
    exc.__traceback__ = None  # as it comes from the pool child

    dead_lettered(exc, text=text)

    frames = sentry.events[0]["exception"]["values"][-1]["stacktrace"]["frames"]
    assert frames[-1]["function"] == "raised"
    assert frames[-1]["context_line"] == "raise exc"
    assert frames[-1]["abs_path"] == __file__


def test_a_dead_letter_without_a_traceback_has_no_stack_trace(sentry: ListTransport) -> None:
    dead_lettered(ConnectionError("down"), text="")

    assert "stacktrace" not in sentry.events[0]["exception"]["values"][-1]


def test_a_retry_is_no_event(sentry: ListTransport) -> None:
    _events.emit("task_retry_scheduled", task=None, request=None, exception=OSError("x"))

    assert sentry.events == []


def test_without_the_integration_nothing_is_reported() -> None:
    transport = start_sentry()
    try:
        dead_lettered(ConnectionError("down"))
        not_dead_lettering.apply()
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)

    assert transport.events == []


def test_a_task_without_dead_letter_is_reported_when_it_fails(sentry: ListTransport) -> None:
    result = not_dead_lettering.apply()

    assert result.failed()
    [event] = sentry.events
    assert event["tags"]["resilient_tasks.task"] == "unit.sentry.off"
    assert event["contexts"][CONTEXT]["reason"] == "exception"
    assert event["contexts"][CONTEXT]["dead_letter_queue"] is None
    assert event["exception"]["values"][-1]["stacktrace"]["frames"][-1]["function"] == (
        "not_dead_lettering"
    )


def test_a_dead_lettering_task_is_not_reported_on_task_failure(sentry: ListTransport) -> None:
    signals.task_failure.send(sender=dead_lettering, task_id="a1", exception=KeyError("x"))
    signals.task_failure.send(sender=plain, task_id="a2", exception=KeyError("x"))

    assert sentry.events == []


def test_celery_integration_still_reports_plain_tasks_not_library_tasks() -> None:
    transport = start_sentry(ResilientTasksIntegration(), CeleryIntegration())
    try:
        plain.apply()
        not_dead_lettering.apply()
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)

    mechanisms = [e["exception"]["values"][-1]["mechanism"]["type"] for e in transport.events]
    assert sorted(mechanisms) == ["celery", MECHANISM]
