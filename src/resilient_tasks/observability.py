"""Where events are logged: one structlog event per occurrence of a task's life, and the task's
identity bound in structlog's contextvars while it runs.

Nothing happens until you ask for it: :func:`connect` wires Celery's signals and the library's
own events (:mod:`resilient_tasks._events`) to structlog, and :func:`configure_logging` is the
opt-in helper for workers that want every log line, Celery's own included, as JSON. The library
never calls ``structlog.configure()`` otherwise.

=========================  ======================================  =========
event                      source                                  level
=========================  ======================================  =========
``task_started``           Celery ``task_prerun`` (or the call)    info
``task_succeeded``         Celery ``task_postrun`` (``SUCCESS``)   info
``task_retry_scheduled``   the library (``RetryMixin.retry``)      warning
``task_failed``            Celery ``task_failure``                 error (1)
``task_dead_lettered``     the library (``ResilientRequest``)      error
``task_soft_time_limit``   the library (``TimeLimitMixin``)        warning
``task_hard_time_limit``   the library (``ResilientRequest``)      error
``task_worker_lost``       the library (``ResilientRequest``)      warning
``task_revoked``           Celery ``task_revoked``                 warning
``task_rejected``          Celery ``task_rejected``                warning
``task_unknown``           Celery ``task_unknown``                 error
=========================  ======================================  =========

(1) info when the task dead-letters the failure: its error line, with the traceback, is then
``task_dead_lettered``. After :func:`connect`, Celery's own ``Task ... raised unexpected`` line
is not written for a library task (unless the app sets :data:`CELERY_FAILURE_LOG_SETTING`):
each failure is one error line.

Until structlog is configured, the events go through ``logging`` (logger
``resilient_tasks.events``), each at its level.

Every event carries ``task_id``, ``task_name``, ``attempt`` (``request.retries + 1``),
``queue`` (the routing key it was delivered with), ``root_id``, ``parent_id``,
``correlation_id`` and ``hostname``. Task arguments and return values are never logged.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar, Token
from types import FrameType, MappingProxyType
from typing import Any

import structlog
from billiard.einfo import ExceptionWithTraceback
from celery import Task, current_app, current_task, signals, states
from celery.app.task import Context
from celery.utils.log import get_multiprocessing_logger
from celery.utils.objects import mro_lookup
from celery.worker.request import Request

from . import (
    _celery_events,  # noqa: F401  (registers the listener that sends Celery events)
    _events,
    _reason,
)
from ._steps import StepsMixin
from .decide import unretried_reason
from .history import exception_type_name
from .options import check_before
from .timelimit import redeliveries

__all__ = [
    "CELERY_FAILURE_LOG_SETTING",
    "CONTEXT_KEYS",
    "CORRELATION_HEADER",
    "EVENTS",
    "FLEET_EVENTS",
    "LOGGER_NAME",
    "ObservabilityMixin",
    "configure_logging",
    "connect",
    "disconnect",
    "is_connected",
]

logger = logging.getLogger(__name__)

#: Every event this module logs, and the level it is logged at.
EVENTS: Mapping[str, str] = MappingProxyType(
    {
        "task_started": "info",
        "task_succeeded": "info",
        "task_retry_scheduled": "warning",
        "task_failed": "error",
        "task_dead_lettered": "error",
        "task_soft_time_limit": "warning",
        # The failure it ends in says ERROR once (task_dead_lettered or task_failed); a hard
        # limit that is retried is no more than a warning.
        "task_hard_time_limit": "warning",
        "task_worker_lost": "warning",
        "task_revoked": "warning",
        "task_rejected": "warning",
        "task_unknown": "error",
        "task_deferred": "info",
        "retry_budget_exhausted": "warning",
    }
)
#: Events about a circuit breaker or the state store, not about one task, and their level. They
#: carry the breaker's name (or the store's URL) instead of a task's identity.
FLEET_EVENTS: Mapping[str, str] = MappingProxyType(
    {
        "circuit_opened": "warning",
        "circuit_half_open": "info",
        "circuit_closed": "info",
        "state_store_unavailable": "warning",
        "state_store_available": "info",
    }
)
#: The keys bound in ``structlog.contextvars`` while a task runs.
CONTEXT_KEYS = (
    "task_id",
    "task_name",
    "attempt",
    "queue",
    "root_id",
    "parent_id",
    "correlation_id",
)
#: The message header that carries the correlation id from a publisher to the task it publishes.
#: (Celery reserves ``correlation_id`` itself: a header of that name never reaches the task.)
CORRELATION_HEADER = "resilient_correlation_id"
#: The name of the structlog (and, with stdlib integration, ``logging``) logger of the events.
LOGGER_NAME = "resilient_tasks.events"
#: The app setting that keeps Celery's own ``Task ... raised unexpected`` error line for library
#: tasks after :func:`connect` (by default the events say it, once: see the docs' "Logs").
CELERY_FAILURE_LOG_SETTING = "resilient_tasks_celery_failure_log"
#: The logger of Celery's line of a task's failure.
CELERY_TRACE_LOGGER = "celery.app.trace"
#: The loggers of the ``Hard time limit (...) exceeded`` line in the worker's main process:
#: Celery's, and the library's own where it settles a hard limit (the same line).
HARD_LIMIT_LOGGERS = ("celery.worker.request", "resilient_tasks.timelimit")
_HARD_LIMIT_LINE = "Hard time limit (%ss) exceeded for %s[%s]"
#: How many occurrences are remembered to drop a second report of the same one.
DEDUPE_SIZE = 1024

_log = structlog.get_logger(LOGGER_NAME)
_stdlib = logging.getLogger(LOGGER_NAME)
_LEVELS = {
    name: logging.getLevelName(name.upper()) for name in {*EVENTS.values(), *FLEET_EVENTS.values()}
}
_UID = "resilient_tasks.observability."
# Test helpers (resilient_tasks.testing) receive each event here before it is logged.
_Sink = Callable[[str, str, Mapping[str, Any]], None]
_sinks: list[_Sink] = []
_state = {"connected": False, "plain_tasks": True}
# The innermost task run whose identity is bound in this context, until its task_postrun (by
# task_prerun, or by a library task's own call); the runs it is nested in follow its ``outer``.
_bound: ContextVar[_Described | None] = ContextVar(
    "resilient_tasks_observability_bound", default=None
)
# After connect(plain_tasks=False): the innermost library task run that has not yet reached its
# after_return (where task_succeeded is logged); the run it is nested in follows its ``outer``.
_finishing: ContextVar[_Described | None] = ContextVar(
    "resilient_tasks_observability_finishing", default=None
)


# -- one event per occurrence ---------------------------------------------------------------------


class _Occurrences:
    """A bounded LRU of the occurrences already logged in this process."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._seen: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, key: tuple[Any, ...]) -> bool:
        """Remember ``key``; True unless it was already remembered."""
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return False
            self._seen[key] = None
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)
            return True

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def after_fork(self) -> None:
        self._lock = threading.Lock()


_occurrences = _Occurrences(DEDUPE_SIZE)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_occurrences.after_fork)


def _wanted(event: str, level: str | None = None) -> bool:
    """Whether ``event`` would be logged (at ``level``, else its own), or a test sink listens:
    skip building the rest if not. Asks ``logging`` while structlog is not configured (see
    :func:`_record`), else the bound logger's ``is_enabled_for`` (structlog's stdlib and
    filtering loggers have it); a logger without it logs everything."""
    if _sinks:
        return True
    if level is None:
        level = EVENTS[event] if event in EVENTS else FLEET_EVENTS[event]
    if not structlog.is_configured():
        return _stdlib.isEnabledFor(_LEVELS[level])
    is_enabled_for = getattr(_log.bind(), "is_enabled_for", None)
    return is_enabled_for is None or bool(is_enabled_for(_LEVELS[level]))


def _record(
    event: str,
    fields: dict[str, Any],
    *,
    retries: Any = 0,
    redelivered: int = 0,
    level: str | None = None,
) -> None:
    """Log ``event`` once per (event, task id, retries, redeliveries), at ``level`` (else the
    event's own).

    Through structlog once the application configured it (``structlog.configure()``, or
    :func:`configure_logging`); until then through ``logging`` (:func:`_log_plain`): structlog's
    default logger prints to standard output, which a Celery worker redirects into ``WARNING``
    lines whatever the event's level."""
    task_id = fields.get("task_id")
    if task_id is not None and not _occurrences.first((event, task_id, retries, redelivered)):
        return
    if level is None:
        level = EVENTS[event] if event in EVENTS else FLEET_EVENTS[event]
    for sink in list(_sinks):
        try:
            sink(event, level, fields)
        except Exception:
            logger.exception("resilient_tasks: event sink %r raised on %s", sink, event)
    if structlog.is_configured():
        getattr(_log, level)(event, **fields)
    else:
        _log_plain(event, level, fields)


def _log_plain(event: str, level: str, fields: Mapping[str, Any]) -> None:
    """Log ``event`` with ``logging``: ``event key=value ...`` (values as ``repr``), then the
    traceback, if there is one, on the lines after, as ``logging`` shows ``exc_info``. The
    fields are on the record too, as ``record.data`` (as Celery's ``celery.app.trace`` lines
    carry theirs)."""
    text = " ".join(
        [event, *(f"{key}={value!r}" for key, value in fields.items() if key != "traceback")]
    )
    trace = fields.get("traceback")
    if trace:
        text = f"{text}\n{str(trace).rstrip()}"
    _stdlib.log(_LEVELS[level], "%s", text, extra={"data": {"event": event, **fields}})


# -- what a request says about its task ------------------------------------------------------------


class _Described:
    """The identity of one task run, read from a worker ``Request``, a task ``Context`` or a
    message's headers."""

    __slots__ = (
        "_headers",
        "correlation_id",
        "hostname",
        "logged",
        "outer",
        "parent_id",
        "queue",
        "retries",
        "root_id",
        "started",
        "task_id",
        "task_name",
        "tokens",
    )

    def __init__(self, source: Any, task: Any = None, task_id: str | None = None) -> None:
        # Read once per task run: the common sources (a task's Context, whose fields are in its
        # __dict__, and plain dicts) are tested by exact type before the Mapping ABC.
        fields: Mapping[str, Any]
        if isinstance(source, Context):
            fields = source.__dict__
            headers: Any = fields.get("headers")
        elif isinstance(source, Request):
            fields = headers = source.request_dict
        elif _is_mapping(source):
            fields = headers = source
        else:  # anything else with the attributes (or None)
            fields = {key: getattr(source, key, None) for key in _READ}
            headers = fields["headers"]
        get = fields.get
        delivery: Any = get("delivery_info")
        name = get("task")
        retries = get("retries")
        self.task_id: str | None = get("id") or task_id
        self.task_name: str | None = name if isinstance(name, str) else getattr(task, "name", None)
        self.retries: int = retries if type(retries) is int else _whole(retries)
        self.queue: str | None = delivery.get("routing_key") if _is_mapping(delivery) else None
        self.root_id: str | None = get("root_id")
        self.parent_id: str | None = get("parent_id")
        self.hostname: str | None = get("hostname")
        self._headers: Mapping[str, Any] = headers if _is_mapping(headers) else {}
        self.correlation_id: str | None = self._headers.get(CORRELATION_HEADER) or self.root_id
        #: When the run started (``time.monotonic()``, at task_started), for ``runtime``.
        self.started: float | None = None
        #: Once bound (:func:`_bind`): the tokens that restore the keys, and the bound run this
        #: one is nested in.
        self.tokens: tuple[Token[Any], ...] = ()
        self.outer: _Described | None = None
        #: Whether its info events are logged (asked once, at task_started, for the run).
        self.logged = False

    def values(self) -> tuple[Any, ...]:
        """The values of :data:`CONTEXT_KEYS`, in that order."""
        return (
            self.task_id,
            self.task_name,
            self.retries + 1,
            self.queue,
            self.root_id,
            self.parent_id,
            self.correlation_id,
        )

    def context(self) -> dict[str, Any]:
        """The keys bound in structlog's contextvars while the task runs."""
        return dict(zip(CONTEXT_KEYS, self.values(), strict=True))

    def fields(self, **extra: Any) -> dict[str, Any]:
        """The fields every event carries, then ``extra``."""
        return {**self.context(), "hostname": self.hostname, **extra}

    def record(self, event: str, **extra: Any) -> None:
        """Log ``event`` for this run, unless it would be filtered out."""
        if _wanted(event):
            self.emit(event, **extra)

    def emit(self, event: str, **extra: Any) -> None:
        """Log ``event`` for this run (the caller knows it is wanted)."""
        _record(
            event,
            self.fields(**extra),
            retries=self.retries,
            redelivered=redeliveries(self._headers),
        )


#: What :class:`_Described` reads from a source that is neither a request nor a mapping.
_READ = ("delivery_info", "task", "retries", "id", "root_id", "parent_id", "hostname", "headers")


def _is_mapping(value: Any) -> bool:
    """``isinstance(value, Mapping)``, a plain dict tested first by its exact type."""
    return type(value) is dict or isinstance(value, Mapping)


def _whole(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _exception(exc: BaseException | None) -> dict[str, Any]:
    """``exception`` (type and message) and ``exception_type`` (qualified) of ``exc``."""
    if exc is None:
        return {"exception": None, "exception_type": None}
    if isinstance(exc, ExceptionWithTraceback):
        exc = exc.exc
    try:
        text = str(exc)
    except Exception:
        text = ""
    kind = type(exc).__name__
    if text == repr(exc):  # billiard's time-limit exceptions: "TimeLimitExceeded(1,)"
        text = ""
    return {
        "exception": f"{kind}: {text[:1000]}" if text else kind,
        "exception_type": exception_type_name(exc),
    }


# -- contextvars ---------------------------------------------------------------------------------


# structlog's own ContextVar of each of CONTEXT_KEYS (the one ``bind_contextvars`` sets and
# ``merge_contextvars`` reads), learned once from the tokens of a ``bind_contextvars`` call:
# setting them directly skips building each variable's name and looking it up, twice per task.
_key_vars: list[tuple[ContextVar[Any], ...]] = []


def _context_vars() -> tuple[ContextVar[Any], ...]:
    if not _key_vars:
        tokens = structlog.contextvars.bind_contextvars(**dict.fromkeys(CONTEXT_KEYS))
        for token in tokens.values():
            token.var.reset(token)
        _key_vars.append(tuple(tokens[key].var for key in CONTEXT_KEYS))
    return _key_vars[0]


def _bind_keys(described: _Described) -> tuple[Token[Any], ...]:
    """Bind :data:`CONTEXT_KEYS` as ``structlog.contextvars.bind_contextvars`` would; return the
    tokens for :func:`_reset_keys`."""
    return tuple(map(ContextVar.set, _context_vars(), described.values()))


def _reset_keys(tokens: tuple[Token[Any], ...]) -> None:
    """Restore the keys :func:`_bind_keys` bound to what they were before."""
    try:
        for token in tokens:
            token.var.reset(token)
    except (ValueError, RuntimeError):  # bound in another context: unbind by name
        structlog.contextvars.unbind_contextvars(*CONTEXT_KEYS)


def _bind(described: _Described) -> None:
    """Bind the run's identity; it becomes the innermost bound run."""
    described.tokens = _bind_keys(described)
    described.outer = _bound.get()
    _bound.set(described)


def _bound_described(task_id: str | None) -> _Described | None:
    """The innermost bound run, if it is ``task_id``'s."""
    top = _bound.get()
    if top is not None and task_id is not None and top.task_id == task_id:
        return top
    return None


def _unbind(task_id: str | None) -> None:
    """Restore what the innermost binding of ``task_id`` bound to what it was before."""
    top = _bound.get()
    if top is not None and top.task_id == task_id:  # the usual case: the innermost run ended
        _bound.set(top.outer)
        _reset_keys(top.tokens)
        return
    # A run nested in it never saw its task_postrun: unlink the run of task_id, keep the rest.
    inner = top
    while inner is not None and inner.outer is not None and inner.outer.task_id != task_id:
        inner = inner.outer
    if inner is None or inner.outer is None:
        return
    ended = inner.outer
    inner.outer = ended.outer
    _reset_keys(ended.tokens)


class ObservabilityMixin(StepsMixin):
    """Bind the task's identity in ``structlog.contextvars`` around its call, with or without
    :func:`connect`.

    While the task body runs, ``task_id``, ``task_name``, ``attempt``, ``queue``, ``root_id``,
    ``parent_id`` and ``correlation_id`` are bound, so every structlog line the task writes
    carries them (with ``structlog.contextvars.merge_contextvars`` among the processors); when
    the call returns or raises, exactly those keys are restored to what they were before.
    Keys the task binds itself are its own to unbind (``structlog.contextvars.bound_contextvars``
    does it). A task called directly as a function binds nothing. Events are logged by
    :func:`connect`, not by this mixin.

    The binding also covers the other mixins' work inside the call (a retry being scheduled, a
    soft time limit's cleanup, the failure hooks), whatever the order of the bases. After
    :func:`connect`, the keys stay bound for the whole run, until Celery's ``task_postrun``
    (so Celery's own result and log lines carry them too): the mixin binds them at the start
    of its call, where the task's request is at hand, and logs ``task_started`` there; a task
    with a ``before_start`` of its own, which Celery runs between ``task_prerun`` and the
    call, has them bound by ``task_prerun`` instead, as a plain task does.

    Example::

        import structlog
        from celery import Celery, Task
        from resilient_tasks.observability import ObservabilityMixin

        app = Celery("proj")

        class Observed(ObservabilityMixin, Task):
            pass

        @app.task(base=Observed)
        def export(report_id):
            structlog.get_logger().info("exporting")  # carries task_id, attempt, ...
    """

    #: Whether, after :func:`connect`, the call binds the keys (else ``task_prerun`` does).
    _step_binds_at_call = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_before(cls, ObservabilityMixin, Task, "Celery's __call__ would shadow it")
        cls._step_binds_at_call = _celerys_own(cls, "before_start")

    def _step_bind(self, request: Any) -> Any:
        if not _state["connected"]:
            return _bind_keys(_Described(request, self))
        if not _state["plain_tasks"]:  # no task_prerun/task_postrun: the call is the run
            return _start_call(_Described(request, self), request)
        if self._step_binds_at_call:  # bound until task_postrun, as task_prerun binds a plain task
            _start(_Described(request, self))
        return None

    def _step_unbind(self, binding: Any) -> None:
        _reset_keys(binding)

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Celery's hook after the outcome is stored; after ``connect(plain_tasks=False)``,
        where ``task_succeeded`` is logged. A subclass that overrides it calls ``super()``."""
        super().after_return(status, retval, task_id, args, kwargs, einfo)
        run = _finishing.get()
        if run is None or run.task_id != task_id:
            return
        _finishing.set(run.outer)
        if status == states.SUCCESS and run.logged:
            _succeeded(run)


# -- Celery's signals -----------------------------------------------------------------------------


def _describe_run(task: Any, task_id: str | None) -> _Described:
    """What Celery's signal for ``task_id`` says about the run: the task's own request when it
    is that run's, else the worker's request that sent the signal."""
    request = getattr(task, "request", None)
    if request is None or getattr(request, "id", None) != task_id:
        request = _sending_request(task_id)
    return _Described(request, task, task_id)


#: How many callers up :func:`_sending_request` looks for the worker's ``Request``.
_SENDER_DEPTH = 8


def _sending_request(task_id: str | None) -> Request | None:
    """The worker ``Request`` of ``task_id`` whose method is sending the signal being received.

    In the worker's main process Celery sends ``task_failure`` from the request's own methods,
    in some places without pushing the task's request first: ``on_timeout`` for a hard time
    limit (Celery 5.7), ``on_failure`` for a lost worker (before 5.6). The request is then the
    ``self`` of a caller a few frames up. Looking there costs nothing on the path every task
    takes, unlike keeping every request received by its id.
    """
    if task_id is None:
        return None
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_SENDER_DEPTH):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Request) and candidate.id == task_id:
            return candidate
    return None


def _on_prerun(sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any) -> None:
    task = task if task is not None else sender
    if getattr(task, "_step_binds_at_call", False):  # an ObservabilityMixin task: its call binds
        return
    _start(_describe_run(task, task_id))


def _start(described: _Described) -> None:
    """A task run starts: bind its identity until task_postrun, log ``task_started``."""
    _bind(described)
    _started(described)


def _start_call(described: _Described, request: Any) -> tuple[Token[Any], ...]:
    """A library task's call starts, after ``connect(plain_tasks=False)``: bind its identity
    for the call (return the tokens), log ``task_started``, and leave the run for its
    ``after_return`` to log ``task_succeeded``."""
    tokens = _bind_keys(described)
    _started(described)
    # A run that never reached its after_return (a retry, Ignore, Reject) is left behind: only
    # a task applied eagerly inside another one is nested in what is there.
    described.outer = _finishing.get() if getattr(request, "is_eager", False) else None
    _finishing.set(described)
    return tokens


def _started(described: _Described) -> None:
    """Log ``task_started``, and note when, for ``task_succeeded``'s ``runtime``."""
    described.started = time.monotonic()
    # task_started and task_succeeded share a level: ask once for the run whether it is logged.
    described.logged = _wanted("task_started")
    if described.logged:
        described.emit("task_started")


def _succeeded(described: _Described) -> None:
    """Log ``task_succeeded`` for a run whose ``task_started`` was logged."""
    started = described.started
    runtime = None if started is None else round(time.monotonic() - started, 6)
    described.emit("task_succeeded", runtime=runtime)


def _celerys_own(cls: type, name: str) -> bool:
    """Whether ``cls`` takes ``name`` from ``celery.Task`` (as Celery's tracer tells)."""
    return mro_lookup(cls, name, stop={Task, object}, monkey_patched=["celery.app.task"]) is None


def _on_postrun(
    sender: Any = None,
    task_id: str | None = None,
    task: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    # task_succeeded comes from here rather than from Celery's task_success, which the tracer
    # would otherwise send for every task of the process: one signal less per task.
    described = _bound_described(task_id)
    if state == states.SUCCESS:
        if described is None:  # not bound here (a postrun without its prerun): ask again
            if _wanted("task_succeeded"):
                _describe_run(task if task is not None else sender, task_id).record(
                    "task_succeeded"
                )
        elif described.logged:
            _succeeded(described)
    _unbind(task_id)


def _on_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    einfo: Any = None,
    **_: Any,
) -> None:
    # A failure the library dead-letters is told at ERROR, with its traceback, once: by
    # task_dead_lettered. task_failed is then an info line, and the error line otherwise.
    level = "info" if _dead_letters(sender) else "error"
    if not _wanted("task_failed", level):
        return
    described = _describe_run(sender, task_id)
    reason = None
    if exception is not None:
        # Celery sends a stand-in for an exception it cannot pickle; the one the task raised,
        # which carries the reason, is still being handled in the pool child.
        marked = _reason.recorded(exception) or _reason.recorded(sys.exc_info()[1] or exception)
        reason = marked or unretried_reason(exception)
    extra: dict[str, Any] = {"reason": reason, **_exception(exception)}
    if level == "error":
        extra["traceback"] = _traceback_text(einfo)
    _record(
        "task_failed",
        described.fields(**extra),
        retries=described.retries,
        redelivered=redeliveries(described._headers),
        level=level,
    )


def _dead_letters(task: Any) -> bool:
    """Whether a terminal failure of ``task`` is dead-lettered (by its ``ResilientRequest``
    in the worker's main process, which logs ``task_dead_lettered``)."""
    # DeadLetterMixin's own method: a plain task may have an attribute of that name.
    return bool(getattr(task, "dead_letter", False)) and hasattr(task, "dead_letter_queue_for")


def _is_library_task(task: Any) -> bool:
    """Whether ``task`` is built on the library's tasks (``ResilientTask``, or the mixins with
    :class:`ObservabilityMixin`)."""
    return isinstance(task, ObservabilityMixin)


def _replaces_celerys_line(task: Any, event: str, level: str | None = None) -> bool:
    """Whether ``event`` (logged at ``level``, else its own) says for ``task`` what a line of
    Celery's says, so that line is dropped: a library task, of an app that does not keep
    Celery's lines (:data:`CELERY_FAILURE_LOG_SETTING`), and the event is logged."""
    if task is None or not _is_library_task(task):
        return False
    return not task.app.conf.get(CELERY_FAILURE_LOG_SETTING) and _wanted(event, level)


class _CeleryFailureLine(logging.Filter):
    """Drops Celery's ``Task ... raised unexpected: ...`` error line (logger
    ``celery.app.trace``, written in the pool child after ``task_failure``) for a library task,
    whose failure the events tell at ERROR with the traceback: ``task_dead_lettered`` when it
    is dead-lettered, else ``task_failed``. The line stays for other tasks, while that event's
    ERROR level is not logged, and where the app sets :data:`CELERY_FAILURE_LOG_SETTING`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        data = getattr(record, "data", None)
        if not isinstance(data, dict) or data.get("description") != "raised unexpected":
            return True
        task = current_task._get_current_object()
        if task is None or getattr(task.request, "id", None) != data.get("id"):
            return True
        event = "task_dead_lettered" if _dead_letters(task) else "task_failed"
        return not _replaces_celerys_line(task, event, "error")


_celery_failure_line = _CeleryFailureLine()


class _CeleryHardLimitLine(logging.Filter):
    """Drops Celery's ``Hard time limit (...) exceeded`` error line (:data:`HARD_LIMIT_LOGGERS`,
    in the worker's main process) for a library task, whose
    ``task_hard_time_limit`` event says it, and whose failure, if it is one, is the one ERROR
    line. Kept as :class:`_CeleryFailureLine` keeps Celery's other line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _HARD_LIMIT_LINE or not isinstance(record.args, tuple):
            return True
        if len(record.args) != 3:
            return True
        task = current_app.tasks.get(str(record.args[1]))
        return not _replaces_celerys_line(task, "task_hard_time_limit")


_celery_hard_limit_line = _CeleryHardLimitLine()


def _traceback_text(einfo: Any) -> str | None:
    """The traceback of Celery's ``ExceptionInfo`` (its text), if any."""
    text = getattr(einfo, "traceback", None)
    return str(text).rstrip() if text else None


def _on_revoked(
    sender: Any = None,
    request: Any = None,
    terminated: bool | None = None,
    signum: Any = None,
    expired: bool | None = None,
    **_: Any,
) -> None:
    _Described(request, sender).record(
        "task_revoked",
        terminated=bool(terminated),
        expired=bool(expired),
        signum=None if signum is None else str(signum),
    )


def _message_fields(sender: Any, message: Any) -> _Described:
    headers = getattr(message, "headers", None) or {}
    delivery = getattr(message, "delivery_info", None) or {}
    data = {**headers, "delivery_info": delivery, "hostname": getattr(sender, "hostname", None)}
    return _Described(data)


def _on_rejected(
    sender: Any = None, message: Any = None, exc: BaseException | None = None, **_: Any
) -> None:
    _message_fields(sender, message).record("task_rejected", **_exception(exc))


def _on_unknown(
    sender: Any = None,
    message: Any = None,
    exc: BaseException | None = None,
    name: str | None = None,
    id: str | None = None,
    **_: Any,
) -> None:
    described = _message_fields(sender, message)
    described.task_id = described.task_id or id
    described.task_name = described.task_name or name
    described.record("task_unknown", **_exception(exc))


def _on_before_publish(sender: Any = None, headers: Any = None, **_: Any) -> None:
    """Put the correlation id in the headers of a message being published."""
    if not isinstance(headers, MutableMapping) or headers.get(CORRELATION_HEADER):
        return
    correlation = headers.get("correlation_id") or _current_correlation_id()
    if correlation:
        headers[CORRELATION_HEADER] = correlation


def _current_correlation_id() -> str | None:
    bound = structlog.contextvars.get_contextvars()
    if bound.get("correlation_id"):
        return str(bound["correlation_id"])
    request = getattr(current_task._get_current_object(), "request", None)
    if request is None or getattr(request, "called_directly", True):
        return None
    custom = getattr(request, "headers", None) or {}
    found = custom.get(CORRELATION_HEADER) or getattr(request, "root_id", None)
    return str(found) if found else None


# -- the library's own events ---------------------------------------------------------------------


def _on_library_event(event: str, fields: Mapping[str, Any]) -> None:
    if event in FLEET_EVENTS:
        if _wanted(event):
            extra = {k: v for k, v in fields.items() if k != "exception"}
            if "exception" in fields:
                extra.update(_exception(fields["exception"]))
            _record(event, extra)
        return
    request = fields.get("request")
    task = fields.get("task")
    described = _Described(request, task)
    exception = _exception(fields.get("exception"))
    if event == "task_retry_scheduled":
        described.record(event, delay=fields.get("delay"), **exception)
    elif event == "task_soft_time_limit":
        described.record(event, **exception)
    elif event == "task_dead_lettered":
        if _wanted(event):
            envelope: Any = fields.get("envelope") or {}
            raised: Any = envelope.get("exception") if _is_mapping(envelope) else None
            trace = raised.get("traceback") if _is_mapping(raised) else None
            described.emit(
                event,
                reason=fields.get("reason"),
                dead_letter_queue=fields.get("queue"),
                **exception,
                traceback=str(trace).rstrip() if trace else None,
            )
    elif event == "task_hard_time_limit":
        described.record(event, timeout=fields.get("timeout"), **exception)
    elif event == "task_deferred":
        if _wanted(event):  # each deferral once: a task may be deferred again and again
            extra = {"breaker": fields.get("breaker"), "delay": fields.get("delay"),
                     "deferrals": fields.get("deferrals")}  # fmt: skip
            _record(event, described.fields(**extra), retries=(described.retries,
                    fields.get("deferrals")))  # fmt: skip
    elif event == "retry_budget_exhausted":
        described.record(
            event,
            budget=fields.get("budget"),
            window_first_attempts=fields.get("attempts"),
            window_retries=fields.get("retries"),
            allowed=fields.get("allowed"),
            **exception,
        )
    elif event == "task_worker_lost":
        described.record(
            event,
            redeliveries=fields.get("redeliveries"),
            max_redeliveries=fields.get("max_redeliveries"),
            **exception,
        )


_SIGNALS: tuple[tuple[Any, Callable[..., None]], ...] = (
    (signals.task_prerun, _on_prerun),
    (signals.task_postrun, _on_postrun),
    (signals.task_failure, _on_failure),
    (signals.task_revoked, _on_revoked),
    (signals.task_rejected, _on_rejected),
    (signals.task_unknown, _on_unknown),
    (signals.before_task_publish, _on_before_publish),
)


#: What binds a plain task's identity and logs its ``task_started`` / ``task_succeeded``.
_RUN_SIGNALS = (signals.task_prerun, signals.task_postrun)


def connect(*, plain_tasks: bool = True) -> None:
    """Log an event for every occurrence in a task's life, and bind the task's identity in
    ``structlog.contextvars`` while it runs. Idempotent: a second call changes nothing (one
    with the other ``plain_tasks`` switches to it).

    Call it where the worker imports your Celery app (and in processes that publish, for the
    correlation id). It connects receivers to Celery's ``task_prerun``, ``task_postrun``,
    ``task_failure``, ``task_revoked``, ``task_rejected``, ``task_unknown`` and
    ``before_task_publish`` signals and a listener to the library's own
    events; it does not configure structlog or ``logging``. Until structlog is configured the
    events are logged with ``logging`` (logger :data:`LOGGER_NAME`), at their levels. It adds
    a filter to Celery's ``celery.app.trace`` logger that drops Celery's ``raised unexpected``
    line of a library task's failure, which the events tell at ERROR with the traceback
    (the app setting :data:`CELERY_FAILURE_LOG_SETTING` keeps it).

    ``plain_tasks=False`` is for workers whose tasks are all library tasks
    (:class:`~resilient_tasks.ResilientTask` or :class:`ObservabilityMixin`): it leaves out
    the ``task_prerun`` and ``task_postrun`` receivers, and with them Celery's dispatch of
    those two signals for every task (about half of what the events cost a task that
    succeeds). A library task then binds its keys for its call only (Celery's own
    ``succeeded in`` line, written after the call, does not carry them; a ``before_start``
    runs before they are bound), logs ``task_started`` in its call and ``task_succeeded``
    from its ``after_return``; a plain ``celery.Task`` gets no ``task_started``, no
    ``task_succeeded`` and no bound keys, and every other event as before.

    Example::

        >>> from resilient_tasks import observability
        >>> observability.connect()
        >>> observability.connect()  # no second receiver
        >>> observability.is_connected()
        True
        >>> observability.connect(plain_tasks=False)  # only library tasks: no task_prerun
        >>> observability.disconnect()
    """
    for signal, receiver in _SIGNALS:
        uid = _UID + receiver.__name__
        if plain_tasks or signal not in _RUN_SIGNALS:
            signal.connect(receiver, weak=False, dispatch_uid=uid)
        else:
            signal.disconnect(receiver, dispatch_uid=uid)
    if _on_library_event not in _events.listeners:
        _events.listeners.append(_on_library_event)
    trace_logger = logging.getLogger(CELERY_TRACE_LOGGER)
    if _celery_failure_line not in trace_logger.filters:
        trace_logger.addFilter(_celery_failure_line)
    for name in HARD_LIMIT_LOGGERS:
        if _celery_hard_limit_line not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_celery_hard_limit_line)
    _state["connected"] = True
    _state["plain_tasks"] = plain_tasks


def disconnect() -> None:
    """Undo :func:`connect`: no more events, no more bindings, no correlation header.

    Example::

        >>> from resilient_tasks import observability
        >>> observability.connect(); observability.disconnect()
        >>> observability.is_connected()
        False
    """
    for signal, receiver in _SIGNALS:
        signal.disconnect(receiver, dispatch_uid=_UID + receiver.__name__)
    while _on_library_event in _events.listeners:
        _events.listeners.remove(_on_library_event)
    logging.getLogger(CELERY_TRACE_LOGGER).removeFilter(_celery_failure_line)
    for name in HARD_LIMIT_LOGGERS:
        logging.getLogger(name).removeFilter(_celery_hard_limit_line)
    _occurrences.clear()
    _finishing.set(None)
    _state["connected"] = False
    _state["plain_tasks"] = True


def is_connected() -> bool:
    """Whether :func:`connect` is in effect in this process.

    Example::

        >>> from resilient_tasks.observability import is_connected
        >>> is_connected()
        False
    """
    return _state["connected"]


# -- opt-in logging setup for workers -----------------------------------------------------------

_formatter: dict[str, logging.Formatter] = {}


def configure_logging(*, json: bool = True) -> None:
    """Opt in to structured logs in a worker: structlog through ``logging``, and every line
    Celery writes (its own included) rendered by structlog, as JSON or, with ``json=False``,
    as plain ``key=value`` text.

    It calls ``structlog.configure()`` (stdlib integration, contextvars merged, ISO UTC
    timestamps) and connects to Celery's ``after_setup_logger`` and ``after_setup_task_logger``
    signals, so that when the worker sets up its log handlers (the ``-l`` level, ``-f`` file,
    ``worker_hijack_root_logger``), each gets structlog's ``ProcessorFormatter``. Call it at the
    import of the module the worker loads (``celery -A proj worker``), before the worker sets
    up logging; Celery's own handling is otherwise unchanged. Idempotent.

    Example::

        # proj/celery.py
        from celery import Celery
        from resilient_tasks import observability

        app = Celery("proj")
        observability.configure_logging(json=True)
        observability.connect()
    """
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    tail: list[structlog.typing.Processor] = [
        _add_process_name,
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
    ]
    if json:
        tail.append(_exception_and_traceback)
    _formatter["current"] = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared, processors=[*tail, renderer]
    )
    for signal in (signals.after_setup_logger, signals.after_setup_task_logger):
        signal.connect(_use_structlog_formatter, weak=False, dispatch_uid=_UID + signal.name)


def _add_process_name(
    _logger: Any, _name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """``process_name``: the ``logging`` record's (``MainProcess``, ``ForkPoolWorker-1``), as
    Celery's own format shows it."""
    record = event_dict.get("_record")
    if record is not None:
        event_dict.setdefault("process_name", record.processName)
    return event_dict


def _exception_and_traceback(
    _logger: Any, _name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """A line logged with ``exc_info`` (Celery's, or ``logger.exception``) as the library's
    events say it: ``exception`` is ``"Type: message"``, ``exception_type`` the qualified
    type, and the traceback is in ``traceback``."""
    exc_info = event_dict.pop("exc_info", None)
    if not exc_info:
        return event_dict
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or exc_info[1] is None:
        return event_dict
    for key, value in _exception(exc_info[1]).items():
        event_dict.setdefault(key, value)
    event_dict.setdefault("traceback", "".join(traceback.format_exception(*exc_info)).rstrip())
    return event_dict


def _use_structlog_formatter(sender: Any = None, logger: Any = None, **_: Any) -> None:
    formatter = _formatter.get("current")
    if formatter is None:
        return
    # The pool's own logger (billiard's, for "Process ... exited") is set up beside the root one.
    for configured in (logger, get_multiprocessing_logger()):
        for handler in getattr(configured, "handlers", None) or ():
            handler.setFormatter(formatter)
