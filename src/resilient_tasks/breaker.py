"""Circuit breakers shared by the fleet: :class:`CircuitBreaker` and the task option
``circuit_breaker=``.

Tasks that name the same breaker share its state across every worker, in Redis
(:mod:`resilient_tasks._fleet_state`). The breaker lives in the worker's **main process**,
where Celery's ``Request`` hands each message to the pool and hears how it ended
(:class:`~resilient_tasks.worker.ResilientRequest`):

* before a guarded message goes to the pool, :func:`admit` asks the breaker. Closed, it runs.
  Open, it is **deferred**: published again, with the same retry count, to wait on the broker
  until the breaker's next probe time, and acknowledged; no attempt is counted, no retry spent,
  no pool process used. Half-open, a bounded number of probes run fleet-wide; the others are
  deferred.
* when it ends, :func:`report` tells the breaker: a success, or a failure that matches the
  breaker's ``on`` (the pool child judges that on the exception as raised, its chain included,
  and marks it: :class:`CircuitBreakerMixin`). A failure that does not match (a ``ValueError``
  of the task's own code) counts as a call that got through.

What it costs a task while the breaker is closed: no round trip to Redis. A worker knows a
breaker closed for :data:`SYNC_INTERVAL` seconds after it last heard from it; it counts its
successes and sends them in one script call at most every :data:`SYNC_INTERVAL` seconds (the
same call brings back the state the rest of the fleet made). A failure is reported at once, so
the worker whose failure opens the breaker sees it open at once; the others within
:data:`SYNC_INTERVAL` seconds.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery import Task, bootsteps
from celery.exceptions import (
    Ignore,
    Reject,
    Retry,
    TaskRevokedError,
    Terminated,
    TimeLimitExceeded,
    WorkerLostError,
)
from celery.worker.state import task_ready

from . import _events
from ._chain import Matcher, exception_chain, matches
from ._fleet_state import FleetState, state_for
from ._steps import StepsMixin
from .classify import TRANSIENT_ERRORS
from .exceptions import ConfigurationError
from .options import check_before, invalid

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "DEFERRALS_HEADER",
    "SYNC_INTERVAL",
    "CircuitBreaker",
    "CircuitBreakerMixin",
    "admit",
    "report",
]

logger = logging.getLogger(__name__)

#: How long a worker trusts what it last heard of a closed breaker, and how often at most it
#: sends the successes it counted.
SYNC_INTERVAL = 1.0
#: The message header that counts how often a task was deferred by an open breaker.
DEFERRALS_HEADER = "resilient_deferrals"
# Where the pool child records whether a failure counts against the task's breaker.
_MARK = "_resilient_tasks_breaker_counts"


@dataclass(frozen=True, init=False)
class CircuitBreaker:
    """A circuit breaker, shared by every task (and every worker) that names it.

    A frozen value, validated when built: a bad argument raises
    :class:`~resilient_tasks.ConfigurationError` naming the breaker and the argument.

    Arguments:
        name: what tasks share: the same name is the same breaker fleet-wide.
        failure_threshold: the failed share of calls (``0 < x <= 1``) that opens it.
        minimum_calls: the calls the window must hold before the share is judged.
        window: seconds (or a timedelta) over which calls and failures are counted.
        reset_timeout: seconds an open breaker waits before it lets probes through.
        on: exception types and/or predicates: the failures that count against the
            dependency, matched along the exception's chain. Default
            :data:`~resilient_tasks.TRANSIENT_ERRORS`.
        half_open_probes: how many probes may run at once, fleet-wide, while half-open.

    Closed, guarded tasks run, and over the last ``window`` seconds their calls and failures
    are counted. When at least ``minimum_calls`` ran and the failed share reaches
    ``failure_threshold``, it opens for ``reset_timeout`` seconds: a guarded task is not run
    but deferred on the broker until then. Then it is half-open: ``half_open_probes`` tasks
    run; the first success closes it, a failure opens it again. A probe that reports nothing
    within ``reset_timeout`` (its worker died) frees its place.

    Example::

        >>> PAYMENTS = CircuitBreaker("payments-api", failure_threshold=0.5, minimum_calls=20,
        ...                           window=30.0, reset_timeout=30.0)
        >>> PAYMENTS.counts(ConnectionResetError()), PAYMENTS.counts(ValueError())
        (True, False)
    """

    name: str
    failure_threshold: float
    minimum_calls: int
    window: float
    reset_timeout: float
    on: tuple[Matcher, ...]
    half_open_probes: int

    def __init__(
        self,
        name: str,
        failure_threshold: float,
        minimum_calls: int,
        window: float | timedelta,
        reset_timeout: float | timedelta,
        on: object = TRANSIENT_ERRORS,
        half_open_probes: int = 1,
    ) -> None:
        from .policy import _normalise_matchers, _normalise_seconds

        if not isinstance(name, str) or not name.strip() or any(c in name for c in " \t\n{}"):
            raise ConfigurationError(
                f"CircuitBreaker: name must be a non-empty string without spaces or braces; "
                f"got {name!r}"
            )
        owner = f"CircuitBreaker({name!r})"
        if (
            isinstance(failure_threshold, bool)
            or not isinstance(failure_threshold, int | float)
            or not 0 < failure_threshold <= 1
        ):
            raise ConfigurationError(
                f"{owner}: failure_threshold must be a share of calls, 0 < x <= 1 (0.5 opens "
                f"when half the calls fail); got {failure_threshold!r}"
            )
        for option, count in (("minimum_calls", minimum_calls),
                              ("half_open_probes", half_open_probes)):  # fmt: skip
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigurationError(
                    f"{owner}: {option} must be a whole number >= 1; got {count!r}"
                )
        seconds = {}
        for option, value in (("window", window), ("reset_timeout", reset_timeout)):
            number = _normalise_seconds(option, value, allow_none=False, owner=owner)
            if number is None or not 0 < number < float("inf"):
                raise ConfigurationError(f"{owner}: {option} must be > 0 seconds; got {value!r}")
            seconds[option] = number
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "failure_threshold", float(failure_threshold))
        object.__setattr__(self, "minimum_calls", minimum_calls)
        object.__setattr__(self, "window", seconds["window"])
        object.__setattr__(self, "reset_timeout", seconds["reset_timeout"])
        object.__setattr__(self, "on", _normalise_matchers("on", on, owner=owner))
        object.__setattr__(self, "half_open_probes", half_open_probes)

    def counts(self, exc: BaseException) -> bool:
        """Whether the failure ``exc`` counts against the dependency (matches ``on``)."""
        for link in exception_chain(exc):
            for matcher in self.on:
                try:
                    if matches(matcher, link):
                        return True
                except Exception:
                    logger.exception("CircuitBreaker %r: the predicate %r raised; counted as "
                                     "no match", self.name, matcher)  # fmt: skip
        return False


# Every breaker declared in this process by name: one name, one configuration.
_declared: dict[str, CircuitBreaker] = {}
_declared_lock = threading.Lock()


class CircuitBreakerMixin(StepsMixin):
    """The task option ``circuit_breaker``: a :class:`CircuitBreaker`, or ``None`` (default).

    Combine it with ``celery.Task`` (mixins first), or use
    :class:`~resilient_tasks.ResilientTask`, which includes it. The breaker acts in the
    worker's main process (see the module docstring), through
    :class:`~resilient_tasks.worker.ResilientRequest`; a task called in the caller's process
    (``apply()``, ``task_always_eager``, a plain call) is not guarded.

    Example::

        from celery import Celery, Task
        from resilient_tasks import CircuitBreaker, CircuitBreakerMixin

        app = Celery("proj")
        PAYMENTS = CircuitBreaker("payments-api", failure_threshold=0.5, minimum_calls=20,
                                  window=30.0, reset_timeout=30.0)

        class Guarded(CircuitBreakerMixin, Task):
            circuit_breaker = PAYMENTS

        @app.task(base=Guarded)
        def charge(order_id): ...
    """

    circuit_breaker: CircuitBreaker | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_before(cls, CircuitBreakerMixin, Task, "no breaker would guard it")
        spec = getattr(cls, "circuit_breaker", None)
        if spec is None:
            return
        if not isinstance(spec, CircuitBreaker):
            raise invalid(
                cls, "circuit_breaker", spec, "expected a resilient_tasks.CircuitBreaker(...)"
            )
        with _declared_lock:
            known = _declared.setdefault(spec.name, spec)
        if known != spec:
            raise invalid(
                cls,
                "circuit_breaker",
                spec,
                f"another task declares the breaker {spec.name!r} with other settings "
                f"({known!r}); tasks that share a breaker must share one CircuitBreaker value",
            )

    @classmethod
    def on_bound(cls, app: Any) -> None:
        super().on_bound(app)
        app.steps["consumer"].add(FleetStateStep)

    def _step_raised(self, exc: Exception, request: Any) -> None:
        spec = self.circuit_breaker
        if spec is not None:
            failure = exc.exc if isinstance(exc, Retry) else exc
            if isinstance(failure, BaseException) and not isinstance(failure, _NOT_CALLS):
                with suppress(AttributeError):  # no __dict__: the main process judges it
                    failure.__dict__[_MARK] = spec.counts(failure)
        super()._step_raised(exc, request)


# Celery's control flow: not a call that failed.
_NOT_CALLS = (Ignore, Reject)
# An attempt cut short: no success, and a failure only if the breaker's `on` names it.
_NOT_TOLD = (WorkerLostError, Terminated, TimeLimitExceeded, TaskRevokedError)
_SAYS_NOTHING = (*_NOT_CALLS, *_NOT_TOLD)


# -- in the worker's main process ---------------------------------------------------------------


class _View:
    """One breaker as this process last heard of it, and the successes not yet sent."""

    __slots__ = ("lock", "state", "successes", "synced", "until")

    def __init__(self) -> None:
        self.state = "closed"
        self.until = 0.0  # monotonic: when an open breaker turns half-open
        self.synced = float("-inf")
        self.successes = 0
        self.lock = threading.Lock()


_views: dict[tuple[int, str], _View] = {}


def _view(state: FleetState, spec: CircuitBreaker) -> _View:
    key = (id(state), spec.name)
    view = _views.get(key)
    if view is None:
        view = _views.setdefault(key, _View())
    return view


def _call(
    state: FleetState, view: _View, spec: CircuitBreaker, op: str, failures: int = 0,
    probe: str = "",
) -> Any:  # fmt: skip
    """One script call to the breaker, with the successes ``view`` counted since the last; the
    view and the events follow its reply. ``None`` when the store does not answer."""
    with view.lock:
        successes, view.successes = view.successes, 0
    reply = state.breaker(spec, op, successes=successes, failures=failures, probe=probe)
    now = time.monotonic()
    if reply is None:  # failing open: run, as without the breaker
        with view.lock:
            view.state, view.synced = "closed", now
        return None
    with view.lock:
        view.state, view.synced = reply.state, now
        view.until = now + reply.remaining
    if reply.transition:
        _announce(spec, reply, state)
    return reply


def _announce(spec: CircuitBreaker, reply: Any, state: FleetState) -> None:
    if reply.transition == "opened" and not reply.calls:
        logger.warning("resilient_tasks: circuit breaker %r opened again: a probe failed; its "
                       "tasks wait on the broker for %g s", spec.name,
                       spec.reset_timeout)  # fmt: skip
        _events.emit("circuit_opened", breaker=spec.name, calls=0, failures=0,
                     reset_timeout=spec.reset_timeout, probe=True,
                     shared=state.shared)  # fmt: skip
    elif reply.transition == "opened":
        logger.warning(
            "resilient_tasks: circuit breaker %r opened (%d of %d calls failed within %g s); "
            "its tasks wait on the broker for %g s",
            spec.name,
            reply.failures,
            reply.calls,
            spec.window,
            spec.reset_timeout,
        )
        _events.emit("circuit_opened", breaker=spec.name, calls=reply.calls,
                     failures=reply.failures, reset_timeout=spec.reset_timeout,
                     shared=state.shared)  # fmt: skip
    elif reply.transition == "half_open":
        logger.info("resilient_tasks: circuit breaker %r is half-open: probing", spec.name)
        _events.emit("circuit_half_open", breaker=spec.name, shared=state.shared)
    elif reply.transition == "closed":
        logger.warning("resilient_tasks: circuit breaker %r closed: a probe succeeded", spec.name)
        _events.emit("circuit_closed", breaker=spec.name, shared=state.shared)


def admit(request: Any) -> bool:
    """Whether the worker's ``request`` may go to the pool now; ``False`` when the task's open
    breaker deferred it (the message is then published again to wait on the broker, and
    acknowledged, or, if that publish failed, requeued)."""
    spec: CircuitBreaker | None = getattr(request.task, "circuit_breaker", None)
    if spec is None:
        return True
    state = state_for(request.task.app)
    view = _view(state, spec)
    now = time.monotonic()
    if view.state == "closed" and now - view.synced < SYNC_INTERVAL:
        return True
    if view.state == "open" and now < view.until:
        return _defer(request, spec, view.until - now)
    reply = _call(state, view, spec, "admit")
    if reply is None or reply.action == "run":
        return True
    if reply.action == "probe":
        request._resilient_probe = True
        return True
    return _defer(request, spec, reply.wait)


def _defer(request: Any, spec: CircuitBreaker, wait: float) -> bool:
    from .retry import republish, without_x_death

    # Spread the deferred tasks out, so that they do not all come back in the same instant.
    delay = max(0.0, wait) + random.uniform(0.0, min(5.0, 0.2 * spec.reset_timeout))
    context = request._context
    try:
        deferrals = int((context.headers or {}).get(DEFERRALS_HEADER) or 0) + 1
    except (TypeError, ValueError):  # a header someone else wrote: counted afresh
        deferrals = 1
    headers = {**without_x_death(context.headers), DEFERRALS_HEADER: deferrals}
    request._resilient_settled = True
    if not republish(request, headers, countdown=delay, retries=int(context.retries or 0)):
        task_ready(request)
        return False  # requeued: it comes back and is asked again
    _events.emit("task_deferred", request=request, breaker=spec.name, delay=delay,
                 deferrals=deferrals)  # fmt: skip
    request.acknowledge()
    task_ready(request)
    return False


def report(request: Any, exc: BaseException | None) -> None:
    """Tell the task's breaker how the worker's ``request`` ended: ``exc`` ``None`` for a
    success, else the failure (a retry's cause included)."""
    spec: CircuitBreaker | None = getattr(request.task, "circuit_breaker", None)
    if spec is None or request.__dict__.get("_resilient_reported"):
        return
    request._resilient_reported = True  # once, whichever on_success / on_failure runs
    probe = request.__dict__.pop("_resilient_probe", False)
    state = state_for(request.task.app)
    view = _view(state, spec)
    failed = False
    if exc is not None:  # a success skips all of this
        if isinstance(exc, Retry):
            exc = exc.exc if isinstance(exc.exc, BaseException) else None
        failed = exc is not None and not isinstance(exc, _NOT_CALLS) and _counts(spec, exc)
        if not failed and isinstance(exc, _SAYS_NOTHING):
            # Celery's control flow (no call), or an attempt cut short (killed, terminated,
            # timed out): it says nothing of the dependency, unless `on` names what cut it short.
            if probe:
                _call(state, view, spec, "report", probe="release")
            return
    if probe:
        _call(state, view, spec, "report", probe="fail" if failed else "ok")
    elif failed:
        _call(state, view, spec, "report", failures=1)
    else:
        with view.lock:
            view.successes += 1
            due = time.monotonic() - view.synced >= SYNC_INTERVAL
        if due:
            _call(state, view, spec, "report")


def _counts(spec: CircuitBreaker, exc: BaseException) -> bool:
    marked = getattr(exc, "__dict__", {}).get(_MARK)
    if marked is not None:
        return bool(marked)
    from ._reason import as_raised

    return spec.counts(as_raised(exc))


class FleetStateStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Says at the worker's start where its breakers and retry budgets keep their state."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        app: Celery = parent.app
        protected = sorted(
            name
            for name, task in app.tasks.items()
            if getattr(task, "circuit_breaker", None) is not None
            or getattr(getattr(task, "retry_policy", None), "budget", None) is not None
        )
        if not protected:
            return
        state = state_for(app)
        if state.shared:
            logger.info("resilient_tasks: circuit breakers and retry budgets share their state "
                        "in Redis at %s", state.where)  # fmt: skip
        else:
            logger.warning(
                "resilient_tasks: circuit breakers and retry budgets keep their state in each "
                "worker process, not shared by the fleet (%s): set resilient_tasks_state_url "
                "to a Redis URL, or use a Redis broker, to share it",
                ", ".join(protected),
            )
