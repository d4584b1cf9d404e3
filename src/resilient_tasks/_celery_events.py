"""The library's occurrences as Celery events, for Flower, celery-exporter and every other
consumer of Celery's event stream.

A worker started with ``-E`` (or ``worker_send_task_events = True``) sends ``task-received``,
``task-started``, ``task-failed``, ``task-retried``... from the task's ``Request`` in its main
process. Dead-lettering and circuit-breaker deferrals happen there too, on the same request: this
listener of :mod:`resilient_tasks._events` sends them through that request's event dispatcher
(``Request.send_event``, as Celery sends ``task-failed``), so they go out only when the worker
sends task events, and only for a task whose ``send_events`` is on:

=======================  ========================================================================
Celery event             fields (besides Celery's own ``uuid``, ``hostname``, ``timestamp``...)
=======================  ========================================================================
``task-dead-lettered``   ``reason``, ``queue`` (the dead-letter queue), ``exception``
                         (``"Type: message"``), ``exception_type`` (qualified)
``task-deferred``        ``breaker``, ``delay`` (seconds), ``deferrals`` (how many so far)
=======================  ========================================================================

A dead-lettered task's ``task-dead-lettered`` comes before its ``task-failed``, so a monitor
that keeps the last state (Flower) still shows it ``FAILURE``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _events
from .history import exception_type_name

__all__ = ["DEAD_LETTERED", "DEFERRED", "send"]

#: The Celery event type of a dead letter published.
DEAD_LETTERED = "task-dead-lettered"
#: The Celery event type of a task deferred by its open circuit breaker.
DEFERRED = "task-deferred"


def send(event: str, fields: Mapping[str, Any]) -> None:
    """Send the Celery event of the library's ``event``, if it has one and the worker sends
    task events. A listener of :mod:`resilient_tasks._events`, registered at import."""
    request: Any = fields.get("request")
    if event == "task_dead_lettered" and _sends(request):
        exc = fields.get("exception")
        request.send_event(
            DEAD_LETTERED,
            reason=fields.get("reason"),
            queue=fields.get("queue"),
            exception=_described(exc),
            exception_type=None if exc is None else exception_type_name(exc),
        )
    elif event == "task_deferred" and _sends(request):
        request.send_event(
            DEFERRED,
            breaker=fields.get("breaker"),
            delay=fields.get("delay"),
            deferrals=fields.get("deferrals"),
        )


def _sends(request: Any) -> bool:
    """Whether ``request`` is a worker's request whose dispatcher sends events (checked first,
    before anything is built: the usual worker runs without ``-E``)."""
    eventer = getattr(request, "eventer", None)
    return eventer is not None and bool(eventer.enabled) and hasattr(request, "send_event")


def _described(exc: Any) -> str | None:
    """``"Type: message"``, as the library's log events say it."""
    if exc is None:
        return None
    inner = getattr(exc, "exc", None)  # billiard's ExceptionWithTraceback
    if isinstance(inner, BaseException):
        exc = inner
    try:
        text = str(exc)
    except Exception:
        text = ""
    kind = type(exc).__name__
    return f"{kind}: {text[:1000]}" if text and text != repr(exc) else kind


if send not in _events.listeners:
    _events.listeners.append(send)
