"""Where failure handlers run: :class:`FailureHooksMixin`.

On a terminal failure the handler registered for the most specific matching exception type runs
with a frozen :class:`FailureDetails`; ``on_give_up(details)`` (the hook Celery lacks) and
``on_retry(details)`` can be overridden. A handler or hook that raises is logged with its
traceback and changes nothing else: the task's own exception stands, dead-lettering goes on,
and no retry is made because of it.

Failures inside the task are handled in the pool child, where the exception is live; a hard
time limit and a lost worker, which only the worker's main process sees, are handled there.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from celery import Task
from celery.exceptions import Retry

from . import _reason
from ._chain import exception_chain
from ._steps import StepsMixin
from .decide import Reason
from .envelope import redact, redact_patterns
from .history import Attempt, History
from .options import check_before, check_hook, invalid

__all__ = ["FailureDetails", "FailureHooksMixin", "handler_for"]

logger = logging.getLogger(__name__)

#: What ``failure_handlers`` maps an exception type to.
Handler = Callable[["FailureDetails"], object]
_DETAILS_ON_RETRY = "_resilient_on_retry_takes_details"


@dataclass(frozen=True)
class FailureDetails:
    """What a failure handler or hook learns about a failure. An immutable value.

    ``kwargs`` are redacted as in the dead-letter envelope. ``history`` holds every attempt,
    this one last. ``reason`` says why the task gave up (``None`` for a retry); ``delay`` is
    the wait before a retry (``None`` when giving up).

    Example::

        >>> details = FailureDetails(task_name="billing.sync", task_id="f7c9", args=(42,),
        ...                          kwargs={"token": "[REDACTED]"}, exception=KeyError("x"),
        ...                          reason="permanent")
        >>> details.attempts, details.reason
        (0, 'permanent')
    """

    task_name: str
    task_id: str | None
    args: Sequence[Any]
    kwargs: Mapping[str, Any]
    exception: BaseException
    reason: Reason | None = None
    delay: float | None = None
    history: History = field(default_factory=History)
    hostname: str | None = None

    @property
    def attempts(self) -> int:
        """How many attempts were made (those left out of a long history included)."""
        return len(self.history.attempts) + self.history.dropped


def handler_for(
    handlers: Mapping[type[BaseException], Handler], exc: BaseException
) -> Handler | None:
    """The handler for the most specific type along ``exc``'s chain.

    Each exception in the chain (``exc``, then its ``__cause__`` / ``__context__``) is matched
    by its MRO; the match nearest to its own type wins, so an exact match on a cause beats a
    generic ``Exception`` match on a wrapper such as ``Permanent``. On a tie, the outer
    exception wins.

    Example::

        >>> handlers = {OSError: "os", ConnectionError: "conn", Exception: "any"}
        >>> handler_for(handlers, ConnectionResetError()), handler_for(handlers, KeyError())
        ('conn', 'any')
        >>> from resilient_tasks import Permanent
        >>> handler_for({KeyError: "key", Exception: "any"}, Permanent(KeyError("gone")))
        'key'
    """
    best: tuple[int, Handler] | None = None
    for link in exception_chain(exc):
        for distance, klass in enumerate(type(link).__mro__):
            if klass in handlers:
                if best is None or distance < best[0]:
                    best = (distance, handlers[klass])
                break
    return None if best is None else best[1]


def run_isolated(what: str, hook: Callable[..., object], *args: Any) -> None:
    """Run ``hook``; log what it raises, with the traceback, and swallow it."""
    try:
        hook(*args)
    except Exception:
        logger.exception("resilient_tasks: %s raised; the task's outcome stands", what)


class FailureHooksMixin(StepsMixin):
    """Run failure handlers and hooks on terminal failures and retries, isolated.

    Combine it with ``celery.Task`` (mixins first, in any order among themselves: it sees the
    decisions of :class:`~resilient_tasks.RetryMixin` either way), or use
    :class:`~resilient_tasks.ResilientTask`, which includes it.

    Options (class attributes or ``@app.task`` keywords):
        failure_handlers: a mapping of exception type to a callable taking a
            :class:`FailureDetails`, run once on a terminal failure. The most specific match
            along the exception chain wins (see :func:`handler_for`).

    Overridable hooks:
        ``on_give_up(details)``: a terminal failure (after the handler). Celery has no such hook.
        ``on_retry(details)``: a retry was scheduled. Celery's own ``on_retry(exc, task_id,
        args, kwargs, einfo)`` keeps working: override it with either signature.

    Example::

        from resilient_tasks import ResilientTask

        def page_oncall(details):
            pager.trigger(f"{details.task_name} gave up: {details.reason}")

        @app.task(base=ResilientTask, failure_handlers={PaymentDeclined: page_oncall})
        def charge(order_id): ...
    """

    failure_handlers: Mapping[type[BaseException], Handler] = MappingProxyType({})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_hook(cls, "on_give_up", "details")
        handlers = getattr(cls, "failure_handlers", None)
        if not isinstance(handlers, Mapping):
            raise invalid(
                cls,
                "failure_handlers",
                handlers,
                "expected a mapping of exception type to a callable, e.g. {KeyError: alert}",
            )
        for key, handler in handlers.items():
            if not (isinstance(key, type) and issubclass(key, BaseException)):
                raise invalid(
                    cls, "failure_handlers", handlers, f"key {key!r} is not an exception type"
                )
            if not callable(handler):
                raise invalid(
                    cls,
                    "failure_handlers",
                    handlers,
                    f"the handler for {key.__name__} is not callable",
                )
        check_before(cls, FailureHooksMixin, Task, "Celery's methods would shadow it")
        own = cls.__dict__.get("on_retry")
        if own is not None and _takes_details(own):
            setattr(cls, _DETAILS_ON_RETRY, True)
            cls.on_retry = _details_only(own)

    def on_give_up(self, details: FailureDetails) -> None:
        """A terminal failure: runs after the matching ``failure_handlers`` entry. No-op."""

    def _step_retried(self, retry: Retry) -> None:
        if getattr(self, _DETAILS_ON_RETRY, False):
            run_isolated(f"on_retry of {self.name}", self.on_retry, self._retry_details(retry))

    def _step_gave_up(self, exc: Exception) -> None:
        handler = handler_for(getattr(self, "failure_handlers", {}), exc)
        if handler is not None or _overrides_on_give_up(self):  # else nobody reads details
            _run_give_up_hooks(self, handler, self._details(exc, _reason.reason_of(exc)))

    def _details(
        self, exc: BaseException, reason: Reason | None, delay: float | None = None
    ) -> FailureDetails:
        request = self.request
        now = datetime.now(timezone.utc)
        attempt = Attempt.failed(
            (request.retries or 0) + 1,
            exc,
            hostname=request.hostname,
            delay=delay,
            at=now,
        )
        return FailureDetails(
            task_name=self.name,
            task_id=request.id,
            args=tuple(request.args or ()),
            kwargs=_redacted(self, request.kwargs or {}),
            exception=exc,
            reason=reason,
            delay=delay,
            history=History.from_headers(request.headers).record(attempt),
            hostname=request.hostname,
        )

    def _retry_details(self, retry: Retry) -> FailureDetails:
        when = retry.when
        delay = float(when) if isinstance(when, int | float) else None
        exc = retry.exc if isinstance(retry.exc, BaseException) else retry
        return self._details(exc, None, delay)


def _overrides_on_give_up(task: Any) -> bool:
    on_give_up = getattr(type(task), "on_give_up", None)
    return on_give_up is not None and on_give_up is not FailureHooksMixin.on_give_up


def give_up(task: Any, details: FailureDetails) -> None:
    """Run the failure handler for ``details`` and the task's ``on_give_up``, each isolated."""
    handler = handler_for(getattr(task, "failure_handlers", {}), details.exception)
    _run_give_up_hooks(task, handler, details)


def _run_give_up_hooks(task: Any, handler: Any, details: FailureDetails) -> None:
    if handler is not None:
        run_isolated(f"failure handler {handler!r} of {task.name}", handler, details)
    on_give_up = getattr(task, "on_give_up", None)
    if on_give_up is not None:
        run_isolated(f"on_give_up of {task.name}", on_give_up, details)


def details_from_worker(
    request: Any, exc: BaseException, reason: Reason, history: History
) -> FailureDetails:
    """The details of a failure the worker's main process settled (hard limit, lost worker)."""
    return FailureDetails(
        task_name=request.name,
        task_id=request.id,
        args=tuple(request.args or ()),
        kwargs=_redacted(request.task, request.kwargs or {}),
        exception=exc,
        reason=reason,
        history=history,
        hostname=request.hostname,
    )


def _redacted(task: Any, kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(redact(dict(kwargs), redact_patterns(task.app)))


def _takes_details(method: Callable[..., object]) -> bool:
    """Whether an ``on_retry`` override uses the library's ``(self, details)`` signature."""
    try:
        parameters = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 2 and not any(p.kind == p.VAR_POSITIONAL for p in parameters)


def _details_only(method: Callable[..., object]) -> Callable[..., object]:
    """Let a ``(self, details)`` override ignore Celery's own ``on_retry`` call."""

    def on_retry(self: Any, *args: Any, **kwargs: Any) -> object:
        if len(args) == 1 and isinstance(args[0], FailureDetails):
            return method(self, args[0])
        return None  # Celery's (exc, task_id, args, kwargs, einfo) call

    on_retry.__doc__ = method.__doc__
    on_retry.__wrapped__ = method  # type: ignore[attr-defined]
    return on_retry
