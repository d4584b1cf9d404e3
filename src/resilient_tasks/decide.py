"""Where a retry is decided: one failed attempt in, "retry in so many seconds" or "give up,
for this reason" out.

:class:`AttemptState` is everything a decision looks at, built in one place
(:meth:`AttemptState.of_message`) whether the pool child or the worker's main process asks.
:func:`decide` applies a :class:`~resilient_tasks.RetryPolicy`; :func:`celery_reason` says why a
task that retries by Celery's own options (``autoretry_for``, ``max_retries``) stopped;
:func:`decide_for` picks between the two for a task, so the pool child and the main process
reach the same reason. All of it is pure, apart from a wait strategy's own jitter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol, TypeAlias

from celery.exceptions import MaxRetriesExceededError, SoftTimeLimitExceeded, TimeLimitExceeded

from ._chain import Matcher, exception_chain, matches
from ._delayed_rabbitmq import waits as broker_waits
from .classify import retry_after_seconds
from .exceptions import Permanent, RetryAfter
from .history import History, run_started

__all__ = [
    "AttemptState",
    "GiveUp",
    "Policy",
    "Reason",
    "RetryIn",
    "backoff_enabled",
    "celery_reason",
    "decide",
    "decide_for",
    "set_backoff",
    "unretried_reason",
]

logger = logging.getLogger(__name__)

#: Why a task stopped for good; the dead-letter envelope's ``reason``.
Reason: TypeAlias = Literal[
    "exception",
    "retries_exhausted",
    "deadline_exceeded",
    "permanent",
    "soft_time_limit",
    "hard_time_limit",
    "worker_lost",
    "retry_budget_exhausted",
]


def _matches(matchers: tuple[Matcher, ...], chain: tuple[BaseException, ...]) -> bool:
    for exc in chain:
        for matcher in matchers:
            try:
                if matches(matcher, exc):
                    return True
            except Exception:
                logger.exception("retry predicate %r raised; counted as no match", matcher)
    return False


class Policy(Protocol):
    """What :func:`decide` reads of a policy: :class:`~resilient_tasks.RetryPolicy` is one.
    (A protocol, so that this module needs nothing from :mod:`resilient_tasks.policy`, which
    builds on it.)"""

    @property
    def retry_on(self) -> tuple[Matcher, ...]: ...
    @property
    def give_up_on(self) -> tuple[Matcher, ...]: ...
    @property
    def max_attempts(self) -> int | None: ...
    @property
    def max_elapsed(self) -> float | None: ...
    def next_delay(self, state: AttemptState) -> float: ...


@dataclass(frozen=True)
class AttemptState:
    """Everything a retry decision looks at about one failed attempt. An immutable value.

    Arguments:
        task_name: the task's registered name.
        attempt: the number of the attempt that just failed, 1 for the first.
        exception: what it raised.
        elapsed: seconds since the first attempt started.
        history: the attempts before this one, as carried by the message.
        task_id: the task's id, when known.

    Example::

        >>> from resilient_tasks import RetryPolicy
        >>> state = AttemptState("billing.sync", attempt=1, exception=TimeoutError(), elapsed=0.2)
        >>> decide(RetryPolicy(retry_on=TimeoutError, backoff=2), state)
        RetryIn(delay=2.0)
    """

    task_name: str
    attempt: int
    exception: BaseException
    elapsed: float = 0.0
    history: History = field(default_factory=History)
    task_id: str | None = None

    @classmethod
    def starting_at(
        cls,
        *,
        task_name: str,
        task_id: str | None,
        attempt: int,
        exception: BaseException,
        history: History,
        started: datetime,
        now: datetime,
    ) -> AttemptState:
        """The state of attempt ``attempt`` that started at ``started`` and failed at ``now``.

        ``elapsed`` counts from the first attempt recorded in ``history``, or from ``started``
        when this is the first attempt.
        """
        first = history.first_attempt_time() or started
        return cls(
            task_name=task_name,
            task_id=task_id,
            attempt=attempt,
            exception=exception,
            elapsed=max(0.0, (now - first).total_seconds()),
            history=history,
        )

    @classmethod
    def of_message(
        cls,
        *,
        task_name: str,
        task_id: str | None,
        retries: int | None,
        headers: Mapping[str, Any] | None,
        exception: BaseException,
        started: datetime,
        now: datetime,
    ) -> AttemptState:
        """The state of the attempt a message describes: Celery's ``retries`` count and the
        history its headers carry. The pool child and the worker's main process both build
        it here, from a task request or a worker request alike.

        Example::

            >>> from datetime import datetime, timezone
            >>> now = datetime.now(timezone.utc)
            >>> AttemptState.of_message(task_name="t", task_id="1", retries=2, headers={},
            ...                         exception=KeyError(), started=now, now=now).attempt
            3
        """
        return cls.starting_at(
            task_name=task_name,
            task_id=task_id,
            attempt=int(retries or 0) + 1,
            exception=exception,
            history=History.from_headers(headers),
            started=started,
            now=now,
        )

    @classmethod
    def in_worker(cls, request: Any, exception: BaseException) -> AttemptState:
        """The state of the attempt a worker's ``Request`` (the worker's main process) ran,
        failed with ``exception``."""
        return cls.of_message(
            task_name=request.name,
            task_id=request.id,
            retries=request._context.retries,
            headers=request.message.headers,
            exception=exception,
            started=run_started(request),
            now=datetime.now(timezone.utc),
        )


@dataclass(frozen=True)
class RetryIn:
    """Decision: retry after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class GiveUp:
    """Decision: stop; the failure is terminal for ``reason``."""

    reason: Reason


_backoff = {"enabled": True}


def set_backoff(enabled: bool) -> None:
    """Turn every policy's waiting on or off in this process (for test suites).

    With backoff off, every retry :func:`decide` schedules (``RetryAfter`` included) is
    scheduled at once; which attempts retry and when to give up stay as the policy says.
    :func:`resilient_tasks.testing.no_backoff` wraps it for pytest.

    Example::

        >>> from resilient_tasks import RetryPolicy
        >>> set_backoff(False)
        >>> decide(RetryPolicy(backoff=60), AttemptState("t", attempt=1,
        ...                                               exception=ConnectionError()))
        RetryIn(delay=0.0)
        >>> set_backoff(True)
    """
    _backoff["enabled"] = enabled


def backoff_enabled() -> bool:
    """Whether policies wait between attempts in this process (see :func:`set_backoff`).

    Example::

        >>> backoff_enabled()
        True
    """
    return _backoff["enabled"]


def unretried_reason(exc: BaseException) -> Reason:
    """The reason for a failure nothing retries: the time limit that raised it, or
    ``"exception"``.

    Example::

        >>> from celery.exceptions import SoftTimeLimitExceeded
        >>> unretried_reason(SoftTimeLimitExceeded()), unretried_reason(KeyError())
        ('soft_time_limit', 'exception')
    """
    if isinstance(exc, SoftTimeLimitExceeded):
        return "soft_time_limit"
    if isinstance(exc, TimeLimitExceeded):
        return "hard_time_limit"
    return "exception"


def decide(policy: Policy, state: AttemptState, delay_queues: bool = False) -> RetryIn | GiveUp:
    """Decide what follows a failed attempt. Pure, apart from a wait strategy's own jitter.

    In order: :class:`~resilient_tasks.Permanent` anywhere in the chain gives up
    (``"permanent"``); a ``give_up_on`` match, or a failure that neither matches ``retry_on``
    nor carries :class:`~resilient_tasks.RetryAfter`, gives up (``"exception"``, or
    ``"soft_time_limit"`` / ``"hard_time_limit"`` for a time limit, see
    :func:`unretried_reason`); reaching ``max_attempts`` gives up (``"retries_exhausted"``).
    The wait is the ``RetryAfter`` seconds, else a server's ``Retry-After`` on an HTTP 429/503
    error in the chain (:func:`resilient_tasks.classify.retry_after_seconds`, capped), else the
    policy's backoff; a retry that would start later than ``max_elapsed`` after the first
    attempt, or never (a backoff of infinity), gives up (``"deadline_exceeded"``); anything else
    is retried after that wait. With ``delay_queues`` (RabbitMQ's delay queues, which wait in
    steps of 64 ms) ``max_elapsed`` judges the wait rounded up, the one the retry gets.

    Example::

        >>> from resilient_tasks import RetryPolicy
        >>> policy = RetryPolicy(retry_on=ConnectionError, max_attempts=2, backoff=1)
        >>> decide(policy, AttemptState("t", attempt=1, exception=ConnectionError()))
        RetryIn(delay=1.0)
        >>> decide(policy, AttemptState("t", attempt=2, exception=ConnectionError()))
        GiveUp(reason='retries_exhausted')
        >>> decide(policy, AttemptState("t", attempt=1, exception=KeyError()))
        GiveUp(reason='exception')
    """
    chain = tuple(exception_chain(state.exception))
    if any(isinstance(exc, Permanent) for exc in chain):
        return GiveUp("permanent")
    if _matches(policy.give_up_on, chain):
        return GiveUp(unretried_reason(state.exception))
    retry_after = next((exc for exc in chain if isinstance(exc, RetryAfter)), None)
    if retry_after is None and not _matches(policy.retry_on, chain):
        return GiveUp(unretried_reason(state.exception))
    if policy.max_attempts is not None and state.attempt >= policy.max_attempts:
        return GiveUp("retries_exhausted")
    if retry_after is not None:
        delay = retry_after.seconds
    else:
        server = retry_after_seconds(state.exception)  # an HTTP 429/503 with Retry-After
        delay = server if server is not None else policy.next_delay(state)
    if not _backoff["enabled"]:
        delay = 0.0
    # What the broker will wait: the delay rounded up to the delay queues' steps.
    waits = broker_waits(delay) if delay_queues and 0 < delay < math.inf else delay
    if math.isinf(delay) or (
        policy.max_elapsed is not None and state.elapsed + waits > policy.max_elapsed
    ):
        return GiveUp("deadline_exceeded")
    return RetryIn(delay)


def celery_reason(task: Any, state: AttemptState) -> Reason:
    """Why a task without a ``retry_policy`` stopped: Celery's own retry options
    (``autoretry_for``, ``max_retries``, ``retry_kwargs``) ran out, or it just raised.

    Example::

        >>> from types import SimpleNamespace
        >>> task = SimpleNamespace(autoretry_for=(ConnectionError,), max_retries=2)
        >>> celery_reason(task, AttemptState("t", attempt=3, exception=ConnectionError()))
        'retries_exhausted'
        >>> celery_reason(task, AttemptState("t", attempt=1, exception=KeyError()))
        'exception'
    """
    exc = state.exception
    if any(isinstance(e, Permanent) for e in exception_chain(exc)):
        return "permanent"
    if isinstance(exc, MaxRetriesExceededError):
        return "retries_exhausted"
    autoretry = tuple(getattr(task, "autoretry_for", ()) or ())
    # Celery's autoretry hands retry_kwargs to Task.retry, where their max_retries wins.
    max_retries = (getattr(task, "retry_kwargs", None) or {}).get(
        "max_retries", getattr(task, "max_retries", None)
    )
    if (
        autoretry
        and isinstance(exc, autoretry)
        and max_retries is not None
        and state.attempt - 1 >= max_retries
    ):
        return "retries_exhausted"
    return unretried_reason(exc)


def decide_for(task: Any, state: AttemptState) -> RetryIn | GiveUp:
    """What follows a failed attempt of ``task``: its ``retry_policy``'s decision, or, for a
    task that retries by Celery's own options, why it stopped (Celery's autoretry schedules its
    own retries: a failure that reaches here gives up).

    Example::

        >>> from types import SimpleNamespace
        >>> from resilient_tasks import RetryPolicy
        >>> policy = RetryPolicy(retry_on=ConnectionError, backoff=1)
        >>> decide_for(SimpleNamespace(retry_policy=policy),
        ...            AttemptState("t", attempt=1, exception=ConnectionError()))
        RetryIn(delay=1.0)
    """
    policy: Policy | None = getattr(task, "retry_policy", None)
    if policy is None:
        return GiveUp(celery_reason(task, state))
    from .delayed import waits_in_delay_queues  # the task's module imports this one

    return decide(policy, state, delay_queues=waits_in_delay_queues(task))
