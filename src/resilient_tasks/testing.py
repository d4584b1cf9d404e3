"""Test helpers for projects that use resilient-tasks, and the pytest plugin that offers them as
fixtures (registered through the ``pytest11`` entry point, so installing the package is enough).

========================  ==========================================  =========================
fixture                   context manager                             what it gives
========================  ==========================================  =========================
``resilient_events``      :func:`capture_events`                      the events of
                                                                      :mod:`~resilient_tasks.observability`
                                                                      logged in this process
``dead_letters``          :func:`capture_dead_letters`                the envelopes dead-lettered
                                                                      in this process
``no_backoff``            :func:`backoff_disabled`                    retries without waiting
========================  ==========================================  =========================

"In this process" means what runs in the test's own process: ``task.apply()``, a task called
with ``task_always_eager``, or an in-process worker (``celery.contrib.testing.worker``). Events
of a separate ``celery worker`` process are in that worker's log.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest

from . import _events, observability, policy

__all__ = [
    "CapturedEvents",
    "backoff_disabled",
    "capture_dead_letters",
    "capture_events",
    "dead_letters",
    "no_backoff",
    "resilient_events",
]


class CapturedEvents(list[dict[str, Any]]):
    """The events captured so far, oldest first: each a dict with ``event``, ``log_level`` and
    the event's fields (as ``structlog.testing.capture_logs`` gives them).

    Example::

        >>> events = CapturedEvents([
        ...     {"event": "task_started", "log_level": "info", "task_id": "a"},
        ...     {"event": "task_succeeded", "log_level": "info", "task_id": "a"},
        ... ])
        >>> events.names()
        ['task_started', 'task_succeeded']
        >>> events.named("task_succeeded")[0]["task_id"]
        'a'
    """

    def names(self, task_id: str | None = None) -> list[str]:
        """The event names, of one task if ``task_id`` is given."""
        return [e["event"] for e in self if task_id is None or e.get("task_id") == task_id]

    def named(self, event: str) -> list[dict[str, Any]]:
        """The events called ``event``."""
        return [e for e in self if e["event"] == event]


@contextmanager
def capture_events() -> Iterator[CapturedEvents]:
    """Capture the events :mod:`~resilient_tasks.observability` logs while the block runs.

    Connects :func:`~resilient_tasks.observability.connect` for the block if it is not already
    (and disconnects it after; a connection already made is kept as it is, ``plain_tasks``
    included), and forgets the occurrences already logged, so a test that reuses a task id
    sees its events. They are still logged through structlog as usual.

    Example::

        >>> import structlog
        >>> from celery import Celery
        >>> app = Celery("demo", set_as_current=False)
        >>> @app.task(name="demo.add")
        ... def add(x, y):
        ...     return x + y
        >>> with structlog.testing.capture_logs(), capture_events() as events:
        ...     _ = add.apply((1, 2), task_id="t-1")  # capture_logs: no console output here
        >>> events.names()
        ['task_started', 'task_succeeded']
        >>> events[0]["task_id"], events[0]["attempt"], events[0]["log_level"]
        ('t-1', 1, 'info')
    """
    captured = CapturedEvents()

    def sink(event: str, level: str, fields: Mapping[str, Any]) -> None:
        captured.append({"event": event, "log_level": level, **fields})

    was_connected = observability.is_connected()
    if not was_connected:  # else as it is, ``plain_tasks`` included
        observability.connect()
    observability._occurrences.clear()
    observability._sinks.append(sink)
    try:
        yield captured
    finally:
        observability._sinks.remove(sink)
        if not was_connected:
            observability.disconnect()


@contextmanager
def capture_dead_letters() -> Iterator[list[dict[str, Any]]]:
    """Capture the envelopes (:mod:`resilient_tasks.envelope`) dead-lettered in this process
    while the block runs, as they were published.

    Example::

        >>> from resilient_tasks import _events
        >>> with capture_dead_letters() as envelopes:
        ...     _events.emit("task_dead_lettered", envelope={"reason": "permanent"})
        >>> envelopes
        [{'reason': 'permanent'}]
    """
    envelopes: list[dict[str, Any]] = []

    def listener(event: str, fields: Mapping[str, Any]) -> None:
        if event == "task_dead_lettered" and fields.get("envelope") is not None:
            envelopes.append(fields["envelope"])

    _events.listeners.append(listener)
    try:
        yield envelopes
    finally:
        _events.listeners.remove(listener)


@contextmanager
def backoff_disabled() -> Iterator[None]:
    """Every retry policy schedules its retries at once while the block runs
    (:func:`resilient_tasks.policy.set_backoff`); which attempts retry and when to give up stay
    as the policies say. The previous setting is restored after.

    Example::

        >>> from resilient_tasks.policy import AttemptState, RetryPolicy, decide
        >>> with backoff_disabled():
        ...     decide(RetryPolicy(backoff=60), AttemptState("t", attempt=1,
        ...                                                  exception=ConnectionError()))
        RetryIn(delay=0.0)
    """
    before = policy.backoff_enabled()
    policy.set_backoff(False)
    try:
        yield
    finally:
        policy.set_backoff(before)


@pytest.fixture
def resilient_events() -> Iterator[CapturedEvents]:
    """The events logged in this test's process (see :func:`capture_events`).

    Example::

        def test_sync_retries_then_succeeds(resilient_events, no_backoff):
            sync_invoice.apply(args=(42,))

            assert resilient_events.names() == [
                "task_started", "task_retry_scheduled", "task_started", "task_succeeded",
            ]
    """
    with capture_events() as events:
        yield events


@pytest.fixture
def dead_letters() -> Iterator[list[dict[str, Any]]]:
    """The envelopes dead-lettered in this test's process (see :func:`capture_dead_letters`).

    Example::

        def test_a_deleted_invoice_is_dead_lettered(celery_worker, dead_letters):
            sync_invoice.delay(404).get(propagate=False)

            (envelope,) = dead_letters
            assert envelope["reason"] == "permanent"
    """
    with capture_dead_letters() as envelopes:
        yield envelopes


@pytest.fixture
def no_backoff() -> Iterator[None]:
    """Retries without waiting for this test (see :func:`backoff_disabled`).

    Example::

        def test_gives_up_after_five_attempts(no_backoff):
            result = sync_invoice.apply(args=(42,))

            assert result.failed()
    """
    with backoff_disabled():
        yield
