"""Where Sentry hears about library tasks: one event per task that gives up, none per retry.

:class:`ResilientTasksIntegration` is a Sentry SDK integration (``pip install
'resilient-tasks[sentry]'``). With it, a task of the library
(:class:`~resilient_tasks.ResilientTask`, or any of its mixins) is reported to Sentry **once,
when it gives up**, with why and how it got there:

* a task that dead-letters is reported by the worker's main process once its envelope is on
  the broker (the library's ``task_dead_lettered`` event), whatever ended it: the retry policy
  gave up, a hard time limit, a lost worker;
* a task with ``dead_letter=False`` is reported when Celery's ``task_failure`` signal says it
  failed for good (in the pool child, with the live traceback; in the main process for a hard
  time limit or a lost worker);
* a retry is never reported, nor is a run that ends in success.

The event carries the tags ``resilient_tasks.task``, ``resilient_tasks.reason``,
``resilient_tasks.attempts``, ``resilient_tasks.dead_letter_queue`` and ``celery_task_id``, and
the context ``resilient_tasks`` (see :data:`CONTEXT`) with the attempt history the message
carried. A dead letter's exception crossed from the pool child without its frames: the
event's stack trace is read from the envelope's traceback text, so Sentry groups it as it
would the live exception.

Sentry's own ``CeleryIntegration`` (enabled by default when Celery is installed) reports every
exception a task raises, from the pool child. For library tasks those reports are dropped
(an event processor), and so are the error lines Celery's tracer and the library's event log
(``resilient_tasks.events``) write for them: the report above replaces them. Plain
``celery.Task`` tasks are reported by ``CeleryIntegration`` exactly as before, and its tracing
is untouched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

try:
    import sentry_sdk
    from sentry_sdk.integrations import Integration
    from sentry_sdk.scope import add_global_event_processor
    from sentry_sdk.utils import capture_internal_exceptions, event_from_exception
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "resilient_tasks.sentry needs the Sentry SDK: pip install 'resilient-tasks[sentry]'"
    ) from error

from celery import current_task, signals

from . import _events, _reason
from ._steps import StepsMixin
from .decide import unretried_reason
from .history import Attempt, History

if TYPE_CHECKING:
    from sentry_sdk._types import Event, Hint

__all__ = ["CONTEXT", "HISTORY_LIMIT", "MECHANISM", "ResilientTasksIntegration"]

#: The name of the Sentry context the report carries: ``task_name``, ``task_id``, ``reason``,
#: ``attempts`` (how many ran), ``queue``, ``dead_letter_queue`` (``None`` when not
#: dead-lettered), ``history`` (the attempts, oldest first, each with ``number``, ``at``,
#: ``hostname``, ``exception_type``, ``message`` and ``delay``) and ``history_dropped``.
CONTEXT = "resilient_tasks"
#: The ``mechanism`` type of the reports, as Sentry shows it.
MECHANISM = "resilient_tasks"
#: How many attempts the context's ``history`` keeps: the latest ones. Sentry's SDK cuts a
#: list in an event to its first 10 items; ``history_dropped`` counts the earlier attempts.
HISTORY_LIMIT = 10

#: The loggers whose error lines about a library task the report replaces.
_TRACER_LOGGER = "celery.app.trace"
_EVENTS_LOGGER = "resilient_tasks.events"
# One frame of a Python traceback's text, and the line of source under it.
_FRAME = re.compile(r'^  File "(?P<path>[^"]+)", line (?P<lineno>\d+), in (?P<function>.+)$')
_TRACEBACK_START = "Traceback (most recent call last):"


class ResilientTasksIntegration(Integration):
    """The Sentry SDK integration: library tasks are reported once, when they give up.

    Pass it to ``sentry_sdk.init`` where the worker imports your Celery app (the module the
    worker's ``-A`` names, or a ``celeryd_init`` receiver), so that both the worker's main
    process, which publishes dead letters, and its pool children, which inherit it, have it.
    Sentry's ``CeleryIntegration`` may stay on: its reports of library tasks are dropped.

    Example::

        import sentry_sdk
        from sentry_sdk.integrations.celery import CeleryIntegration
        from resilient_tasks.sentry import ResilientTasksIntegration

        sentry_sdk.init(
            dsn="https://key@sentry.example.com/1",
            integrations=[CeleryIntegration(), ResilientTasksIntegration()],
        )
    """

    identifier = "resilient_tasks"

    @staticmethod
    def setup_once() -> None:
        if _on_library_event not in _events.listeners:
            _events.listeners.append(_on_library_event)
        signals.task_failure.connect(
            _on_task_failure, weak=False, dispatch_uid="resilient_tasks.sentry"
        )
        add_global_event_processor(_drop_per_raise_reports)


def _enabled() -> bool:
    return sentry_sdk.get_client().get_integration(ResilientTasksIntegration) is not None


# -- the report ---------------------------------------------------------------------------------


def _on_library_event(event: str, fields: Mapping[str, Any]) -> None:
    """A dead letter is on the broker (in the worker's main process): report it."""
    if event != "task_dead_lettered" or not _enabled():
        return
    exc = fields.get("exception")
    envelope = fields.get("envelope") or {}
    if not isinstance(exc, BaseException):
        return
    task = envelope.get("task") or {}
    with capture_internal_exceptions():
        _report(
            exc,
            task_name=str(task.get("name")),
            task_id=str(task.get("id")),
            reason=str(fields.get("reason") or envelope.get("reason")),
            queue=task.get("queue"),
            dead_letter_queue=fields.get("queue"),
            history=envelope.get("attempts") or [],
            traceback=(envelope.get("exception") or {}).get("traceback") or "",
            fresh_scope=True,
        )


def _on_task_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    **_: Any,
) -> None:
    """Celery's ``task_failure``: report a library task that does not dead-letter (one that
    does is reported when its dead letter is published)."""
    if (
        not isinstance(sender, StepsMixin)
        or getattr(sender, "dead_letter", False)
        or exception is None
        or not _enabled()
    ):
        return
    with capture_internal_exceptions():
        request = sender.request
        ours = getattr(request, "id", None) == task_id
        headers = getattr(request, "headers", None) if ours else None
        final = Attempt.failed(
            int(getattr(request, "retries", 0) or 0) + 1 if ours else 1,
            exception,
            hostname=getattr(request, "hostname", None) if ours else None,
            delay=None,
            at=datetime.now(timezone.utc),
        )
        history = History.from_headers(headers).record(final)
        delivery = (getattr(request, "delivery_info", None) or {}) if ours else {}
        _report(
            exception,
            task_name=str(sender.name),
            task_id=str(task_id),
            reason=_reason.recorded(exception) or unretried_reason(exception),
            queue=delivery.get("routing_key"),
            dead_letter_queue=None,
            history=[attempt.as_dict() for attempt in history.attempts],
            traceback="",
            fresh_scope=False,
        )


def _report(
    exc: BaseException,
    *,
    task_name: str,
    task_id: str,
    reason: str,
    queue: str | None,
    dead_letter_queue: str | None,
    history: Sequence[Mapping[str, Any]],
    traceback: str,
    fresh_scope: bool,
) -> None:
    had_frames = exc.__traceback__ is not None
    event, hint = event_from_exception(exc, mechanism={"type": MECHANISM, "handled": False})
    if not had_frames:
        _frames_from_text(event, traceback)
    attempts = len(history)
    event["level"] = "error"
    event["transaction"] = task_name
    event.setdefault("tags", {}).update(
        {
            "celery_task_id": task_id,
            "resilient_tasks.task": task_name,
            "resilient_tasks.reason": reason,
            "resilient_tasks.attempts": str(attempts),
            **({"resilient_tasks.dead_letter_queue": dead_letter_queue}
               if dead_letter_queue else {}),
        }
    )  # fmt: skip
    event.setdefault("contexts", {})[CONTEXT] = {
        "task_name": task_name,
        "task_id": task_id,
        "reason": reason,
        "attempts": attempts,
        "queue": queue,
        "dead_letter_queue": dead_letter_queue,
        "history": [dict(attempt) for attempt in history[-HISTORY_LIMIT:]],
        "history_dropped": max(0, attempts - HISTORY_LIMIT),
    }
    if fresh_scope:
        # The main process serves every task: what it gathered is about none of them.
        with sentry_sdk.isolation_scope() as scope:
            scope.clear_breadcrumbs()
            sentry_sdk.capture_event(event, hint=hint)
    else:
        sentry_sdk.capture_event(event, hint=hint)


def _frames_from_text(event: Event, traceback: str) -> None:
    """Replace the stack trace of ``event``'s last exception by the frames of the last
    traceback in the text ``traceback`` (none found: no stack trace, rather than one of the
    place the exception was reported from)."""
    values = (event.get("exception") or {}).get("values") or []
    if not values:
        return
    frames: list[dict[str, Any]] = []
    lines = traceback[traceback.rfind(_TRACEBACK_START) :].splitlines()
    for number, line in enumerate(lines):
        match = _FRAME.match(line)
        if match is None:
            continue
        path = match["path"]
        frame: dict[str, Any] = {
            "filename": path,
            "abs_path": path,
            "lineno": int(match["lineno"]),
            "function": match["function"],
            "in_app": "site-packages" not in path and not path.startswith("<"),
        }
        source = lines[number + 1] if number + 1 < len(lines) else ""
        if source.startswith("    ") and not _FRAME.match(source):
            frame["context_line"] = source.strip()
        frames.append(frame)
    if frames:
        values[-1]["stacktrace"] = {"frames": frames}
    else:
        values[-1].pop("stacktrace", None)


# -- what the report replaces -------------------------------------------------------------------


def _drop_per_raise_reports(event: Event, hint: Hint) -> Event | None:
    """Sentry event processor: drop what would report a library task's failure a second time
    (or a retry at all): ``CeleryIntegration``'s capture of what the task raised, and the error
    lines of Celery's tracer and the library's event log about it."""
    if not _enabled():
        return event
    if event.get("logger") == _EVENTS_LOGGER:
        return None
    mechanisms = {
        (value.get("mechanism") or {}).get("type")
        for value in (event.get("exception") or {}).get("values") or []
    }
    if ("celery" in mechanisms or event.get("logger") == _TRACER_LOGGER) and isinstance(
        current_task._get_current_object(), StepsMixin
    ):
        return None
    return event
