"""Retry policies: what to retry, how often, how long, and how long to wait in between.

A :class:`RetryPolicy` is a frozen value validated when it is built. The decision about one
failed attempt is :func:`~resilient_tasks.decide.decide`, a pure function of the policy and an
:class:`~resilient_tasks.decide.AttemptState` (:mod:`resilient_tasks.decide`, whose names are
importable from here too); the task mixin only wires it into Celery
(see :mod:`resilient_tasks.retry`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

from tenacity import Future, RetryCallState, Retrying
from tenacity.wait import wait_fixed, wait_random_exponential

from ._chain import Matcher, exception_chain
from ._seconds import to_seconds
from .decide import (
    AttemptState,
    GiveUp,
    Reason,
    RetryIn,
    backoff_enabled,
    decide,
    set_backoff,
    unretried_reason,
)
from .exceptions import ConfigurationError
from .history import Attempt, History

if TYPE_CHECKING:
    from .budget import RetryBudget

__all__ = [
    "DEFAULT_BACKOFF",
    "AttemptState",
    "GiveUp",
    "Reason",
    "RetryIn",
    "RetryPolicy",
    "backoff_enabled",
    "decide",
    "exception_chain",
    "set_backoff",
    "unretried_reason",
]

logger = logging.getLogger(__name__)

#: A tenacity wait strategy: any ``tenacity.wait_*`` object, their sums, or a plain function.
Wait: TypeAlias = Callable[[RetryCallState], float]

#: The default backoff: exponential with full jitter, capped at 10 minutes (Celery's
#: ``retry_backoff`` defaults, as a tenacity strategy). The delay after attempt ``n`` fails is
#: ``uniform(0, min(600, 1 * 2 ** (n - 1)))`` seconds.
DEFAULT_BACKOFF: Wait = wait_random_exponential(multiplier=1, max=600)

_RETRYING = Retrying()  # tenacity's call state wants an owner; it is never run.


def _normalise_matchers(
    option: str, value: object, owner: str = "RetryPolicy"
) -> tuple[Matcher, ...]:
    items: tuple[object, ...]
    if isinstance(value, type | BaseException) or callable(value):
        items = (value,)
    elif isinstance(value, list | tuple | set | frozenset):
        items = tuple(value)
    else:
        raise ConfigurationError(
            f"{owner}: {option} must be exception types and/or predicates "
            f"(callables taking the exception, returning bool); got {value!r}"
        )
    result: list[Matcher] = []
    for item in items:
        if isinstance(item, type):
            if not issubclass(item, BaseException):
                raise ConfigurationError(
                    f"{owner}: {option} holds {item.__qualname__}, which is not an exception "
                    f"type; list exception classes such as ConnectionError, or predicates"
                )
            result.append(item)
        elif callable(item):
            _check_takes_an_exception(option, item, owner)
            result.append(item)
        else:
            raise ConfigurationError(
                f"{owner}: {option} holds {item!r}, which is neither an exception type nor a "
                f"predicate; write the class itself (ConnectionError), not its name or an instance"
            )
    return tuple(result)


def _check_takes_an_exception(
    option: str, predicate: Callable[..., object], owner: str = "RetryPolicy"
) -> None:
    """A predicate is called with the exception: refuse one that cannot take it, now."""
    try:
        inspect.signature(predicate).bind(BaseException())
    except TypeError:
        raise ConfigurationError(
            f"{owner}: {option} holds {predicate!r}, a callable that cannot be called with "
            "the exception; a predicate takes one argument: lambda exc: ..."
        ) from None
    except ValueError:  # no signature to inspect (some builtins): trust it
        pass


def _normalise_seconds(
    option: str, value: object, *, allow_none: bool, owner: str = "RetryPolicy"
) -> float | None:
    if value is None and allow_none:
        return None
    try:
        return to_seconds(value)
    except TypeError:
        none = " or None for no cap" if allow_none else ""
        raise ConfigurationError(
            f"{owner}: {option} must be a number of seconds or a timedelta{none}; got {value!r}"
        ) from None


def _normalise_backoff(value: object) -> Wait:
    if isinstance(value, int | float | timedelta) and not isinstance(value, bool):
        seconds = _normalise_seconds("backoff", value, allow_none=False)
        assert seconds is not None
        if seconds < 0:
            raise ConfigurationError(f"RetryPolicy: backoff must be >= 0 seconds; got {value!r}")
        return wait_fixed(seconds)
    if callable(value) and not isinstance(value, type):
        backoff: Wait = value
        return backoff
    raise ConfigurationError(
        "RetryPolicy: backoff must be a tenacity wait strategy (e.g. wait_exponential(), "
        "wait_random_exponential(max=60), wait_fixed(2) + wait_random(0, 1)), a function of a "
        f"tenacity RetryCallState, or a number of seconds; got {value!r}"
    )


@dataclass(frozen=True, init=False)
class RetryPolicy:
    """Which failures a task retries, how often, for how long, and the wait in between.

    A frozen value, validated when built: a bad argument raises
    :class:`~resilient_tasks.ConfigurationError` naming it. :meth:`replace` makes a changed copy.

    Arguments:
        retry_on: exception types and/or predicates ``(exc) -> bool``. A failure is retried when
            anything in its exception chain (``__cause__`` / ``__context__``) matches. A single
            type or predicate is accepted for a tuple of one. ``()`` retries nothing.
        give_up_on: the same form; a match here wins over ``retry_on``.
        max_attempts: attempts in total, the first one included. ``1`` means never retry;
            ``None`` means no cap (bound it with ``max_elapsed`` then).
        max_elapsed: seconds (or a timedelta) since the first attempt started after which no new
            attempt is scheduled: a retry whose start would fall past it is not made. ``None``
            means no cap.
        backoff: the wait before each retry. A tenacity wait strategy (any ``wait_*`` object,
            their sums such as ``wait_fixed(1) + wait_random(0, 2)``, or a plain function of a
            ``RetryCallState``), or seconds as a number or timedelta for a fixed wait. ``0``
            retries at once. The default is :data:`DEFAULT_BACKOFF`: exponential with full
            jitter, capped, the delay after attempt ``n`` fails being
            ``uniform(0, min(600, 2 ** (n - 1)))`` seconds.
        budget: a :class:`~resilient_tasks.RetryBudget` shared with other tasks (or workers),
            or ``None``: a retry this policy decides while the budget is spent is not made,
            and the task is dead-lettered with reason ``retry_budget_exhausted``.

    The wait strategy sees a tenacity ``RetryCallState`` whose ``attempt_number`` is the attempt
    that just failed (1 for the first), whose ``outcome`` holds its exception, whose
    ``seconds_since_start`` is the time since the first attempt started and whose ``idle_for``
    is the sum of the earlier delays. :class:`~resilient_tasks.RetryAfter` overrides the computed
    delay for one attempt; :class:`~resilient_tasks.Permanent` stops retrying.

    Example::

        >>> from tenacity import wait_exponential
        >>> policy = RetryPolicy(
        ...     retry_on=(ConnectionError, TimeoutError),
        ...     max_attempts=4,
        ...     backoff=wait_exponential(multiplier=0.5, max=10),
        ... )
        >>> policy.delays(3)
        [0.5, 1.0, 2.0]
        >>> policy.replace(max_attempts=2).max_attempts
        2
    """

    retry_on: tuple[Matcher, ...]
    give_up_on: tuple[Matcher, ...]
    max_attempts: int | None
    max_elapsed: float | None
    backoff: Wait
    budget: RetryBudget | None

    def __init__(
        self,
        retry_on: object = (ConnectionError,),
        give_up_on: object = (),
        max_attempts: int | None = 5,
        max_elapsed: float | timedelta | None = None,
        backoff: object = DEFAULT_BACKOFF,
        budget: RetryBudget | None = None,
    ) -> None:
        from .budget import RetryBudget

        if budget is not None and not isinstance(budget, RetryBudget):
            raise ConfigurationError(
                "RetryPolicy: budget must be a resilient_tasks.RetryBudget(...), or None for "
                f"no budget; got {budget!r}"
            )
        if max_attempts is not None and (
            isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
        ):
            raise ConfigurationError(
                "RetryPolicy: max_attempts must be a whole number >= 1, or None for no cap; "
                f"got {max_attempts!r}"
            )
        elapsed = _normalise_seconds("max_elapsed", max_elapsed, allow_none=True)
        if elapsed is not None and elapsed <= 0:
            raise ConfigurationError(
                f"RetryPolicy: max_elapsed must be > 0 seconds, or None for no cap; "
                f"got {max_elapsed!r}"
            )
        object.__setattr__(self, "retry_on", _normalise_matchers("retry_on", retry_on))
        object.__setattr__(self, "give_up_on", _normalise_matchers("give_up_on", give_up_on))
        object.__setattr__(self, "max_attempts", max_attempts)
        object.__setattr__(self, "max_elapsed", elapsed)
        object.__setattr__(self, "backoff", _normalise_backoff(backoff))
        object.__setattr__(self, "budget", budget)

    def replace(self, **changes: Any) -> RetryPolicy:
        """A new policy with ``changes`` applied, validated like a new one.

        Example::

            >>> RetryPolicy(max_attempts=3).replace(max_attempts=None).max_attempts is None
            True
        """
        fields = {
            "retry_on": self.retry_on,
            "give_up_on": self.give_up_on,
            "max_attempts": self.max_attempts,
            "max_elapsed": self.max_elapsed,
            "backoff": self.backoff,
            "budget": self.budget,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise ConfigurationError(f"RetryPolicy.replace: unknown option(s) {sorted(unknown)}")
        return RetryPolicy(**{**fields, **changes})

    def next_delay(self, state: AttemptState) -> float:
        """The backoff after the attempt ``state`` describes, in seconds.

        Never negative; a strategy's NaN or negative value counts as 0, and its infinity stays
        infinite, which :func:`decide` reads as "no further attempt".
        """
        call = RetryCallState(_RETRYING, None, (), {})
        call.attempt_number = state.attempt
        call.start_time = 0.0
        call.outcome_timestamp = state.elapsed
        call.idle_for = state.history.idle_seconds()
        outcome = Future(state.attempt)
        outcome.set_exception(state.exception)
        call.outcome = outcome
        delay = float(self.backoff(call))
        return delay if delay > 0 else 0.0  # NaN > 0 is False

    def delays(self, n: int) -> list[float]:
        """The first ``n`` delays of this policy's backoff, for attempts failing at once.

        Deterministic where the wait strategy is; a strategy with jitter gives one random
        sample of its schedule. It ignores ``max_attempts``: ask for as many as you like.

        Example::

            >>> RetryPolicy(backoff=1.5).delays(3)
            [1.5, 1.5, 1.5]
        """
        exc = _sample_exception(self.retry_on)
        result: list[float] = []
        history = History()
        for attempt in range(1, n + 1):
            state = AttemptState(
                task_name="",
                attempt=attempt,
                exception=exc,
                elapsed=history.idle_seconds(),
                history=history,
            )
            delay = self.next_delay(state)
            result.append(delay)
            history = _with_delay(history, attempt, delay)
        return result


def _sample_exception(matchers: tuple[Matcher, ...]) -> BaseException:
    for matcher in matchers:
        if isinstance(matcher, type):
            try:
                sample: BaseException = matcher()
            except Exception:  # an exception type that needs arguments
                continue
            return sample
    return Exception("sample")


def _with_delay(history: History, attempt: int, delay: float) -> History:
    return history.record(
        Attempt(number=attempt, at="", hostname="", exception_type="", message="", delay=delay)
    )
