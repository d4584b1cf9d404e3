"""The library's occurrences sent as Celery events, through the request's event dispatcher."""

from __future__ import annotations

from typing import Any

from resilient_tasks import _celery_events, _events


class Eventer:
    """What ``celery.events.EventDispatcher`` offers a ``Request``: ``enabled``, ``send``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.sent: list[tuple[str, dict[str, Any]]] = []


class Request:
    """A worker ``Request`` as ``Request.send_event`` uses it."""

    def __init__(self, eventer: Eventer | None) -> None:
        self.id = "t-1"
        self.eventer = eventer

    def send_event(self, type: str, **fields: Any) -> None:
        assert self.eventer is not None
        self.eventer.sent.append((type, {"uuid": self.id, **fields}))


def test_the_listener_is_registered_at_import() -> None:
    assert _events.listeners.count(_celery_events.send) == 1


def test_a_dead_letter_is_sent_with_its_reason_queue_and_exception() -> None:
    eventer = Eventer(enabled=True)

    _events.emit(
        "task_dead_lettered",
        request=Request(eventer),
        reason="retries_exhausted",
        queue="invoices.dlq",
        exception=ConnectionError("down"),
        envelope={},
    )

    assert eventer.sent == [
        (
            "task-dead-lettered",
            {
                "uuid": "t-1",
                "reason": "retries_exhausted",
                "queue": "invoices.dlq",
                "exception": "ConnectionError: down",
                "exception_type": "ConnectionError",
            },
        )
    ]


def test_a_deferral_is_sent_with_its_breaker_delay_and_count() -> None:
    eventer = Eventer(enabled=True)

    _events.emit("task_deferred", request=Request(eventer), breaker="crm", delay=4.5, deferrals=2)

    assert eventer.sent == [
        ("task-deferred", {"uuid": "t-1", "breaker": "crm", "delay": 4.5, "deferrals": 2})
    ]


def test_nothing_is_sent_when_the_worker_sends_no_events() -> None:
    disabled = Eventer(enabled=False)

    _events.emit("task_dead_lettered", request=Request(disabled), reason="exception")
    _events.emit("task_deferred", request=Request(None), breaker="crm")
    _events.emit("task_dead_lettered", request=None, reason="exception")

    assert disabled.sent == []


def test_other_occurrences_send_nothing() -> None:
    eventer = Eventer(enabled=True)

    _events.emit("task_retry_scheduled", request=Request(eventer), delay=1.0)

    assert eventer.sent == []
