"""Retry budgets shared by the fleet: :class:`RetryBudget`, a field of
:class:`~resilient_tasks.RetryPolicy` (``budget=``).

Over a sliding window, the retries of the tasks that share a budget (its ``key``, by default
the task's name) stay under ``ratio`` of their first attempts plus
``min_retries_per_second``: when a dependency fails for everyone, at most that many of the
failures are retried, and the rest are dead-lettered at once (reason
``retry_budget_exhausted``) instead of multiplying the load on it. State lives in Redis
(:mod:`resilient_tasks._fleet_state`); the pool child that runs the task uses it:

* a first attempt is counted in the child, and sent with the child's next call to the store,
  which it makes at most every :data:`SYNC_INTERVAL` seconds or when it asks for a retry;
* a retry the policy decided is asked of the budget (one script call, which also sends the
  first attempts counted): granted, it goes ahead; refused, the task gives up.

The store failing grants every retry (fail open).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from . import _events
from ._fleet_state import state_for
from .exceptions import ConfigurationError

__all__ = ["SYNC_INTERVAL", "RetryBudget", "count_first_attempt", "spend"]

logger = logging.getLogger(__name__)

#: How often at most a process sends the first attempts it counted, between retries.
SYNC_INTERVAL = 1.0


@dataclass(frozen=True, init=False)
class RetryBudget:
    """A share of first attempts that may be retried, shared by every task with its ``key``.

    A frozen value, validated when built: a bad argument raises
    :class:`~resilient_tasks.ConfigurationError` naming it.

    Arguments:
        ratio: retries allowed per first attempt over the window (``0.1``: one in ten).
        min_retries_per_second: retries allowed on top, so that a quiet task can still retry.
        window: seconds (or a timedelta) over which first attempts and retries are counted.
        key: what tasks share the budget; ``None`` (default) gives each task its own, by name.

    Over the last ``window`` seconds, retries stay at or under
    ``ratio * first_attempts + min_retries_per_second * window``.

    Example::

        >>> RetryBudget(ratio=0.1, min_retries_per_second=1.0, window=60.0).allowed(200)
        80.0
    """

    ratio: float
    min_retries_per_second: float
    window: float
    key: str | None

    def __init__(
        self,
        ratio: float,
        min_retries_per_second: float,
        window: float | timedelta,
        key: str | None = None,
    ) -> None:
        from .policy import _normalise_seconds

        for option, value in (("ratio", ratio), ("min_retries_per_second", min_retries_per_second)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value < float("inf")
            ):
                raise ConfigurationError(
                    f"RetryBudget: {option} must be a number >= 0; got {value!r}"
                )
        seconds = _normalise_seconds("window", window, allow_none=False, owner="RetryBudget")
        if seconds is None or not 0 < seconds < float("inf"):
            raise ConfigurationError(f"RetryBudget: window must be > 0 seconds; got {window!r}")
        if key is not None and (not isinstance(key, str) or not key.strip()):
            raise ConfigurationError(
                f"RetryBudget: key must be a non-empty string, or None for the task's name; "
                f"got {key!r}"
            )
        object.__setattr__(self, "ratio", float(ratio))
        object.__setattr__(self, "min_retries_per_second", float(min_retries_per_second))
        object.__setattr__(self, "window", seconds)
        object.__setattr__(self, "key", key)

    def allowed(self, first_attempts: int) -> float:
        """The retries the window allows when it holds ``first_attempts``."""
        return self.ratio * first_attempts + self.min_retries_per_second * self.window

    def key_for(self, task_name: str) -> str:
        return self.key or task_name


class _Counted:
    """The first attempts this process counted and has not sent yet, by budget key."""

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}
        self.sent: dict[str, float] = {}
        self.lock = threading.Lock()

    def take(self, key: str) -> int:
        with self.lock:
            self.sent[key] = time.monotonic()
            return self.pending.pop(key, 0)


_counted = _Counted()


def count_first_attempt(task: Any, budget: RetryBudget) -> None:
    """Count a first attempt of ``task`` in its budget (sent at most every second)."""
    key = budget.key_for(task.name)
    with _counted.lock:
        _counted.pending[key] = _counted.pending.get(key, 0) + 1
        due = time.monotonic() - _counted.sent.get(key, float("-inf")) >= SYNC_INTERVAL
    if due:
        state_for(task.app).budget(budget, key, _counted.take(key), spend=False)


def spend(task: Any, budget: RetryBudget, request: Any, exc: BaseException) -> bool:
    """Ask ``task``'s budget for one retry; ``True`` if granted (or if the store does not
    answer). A refusal is logged and emitted as ``retry_budget_exhausted``."""
    key = budget.key_for(task.name)
    reply = state_for(task.app).budget(budget, key, _counted.take(key), spend=True)
    if reply is None or reply.granted:
        return True
    logger.warning(
        "resilient_tasks: %s[%s]: the retry budget %r is spent (%d retries for %d first "
        "attempts in %g s, %.1f allowed); the task is dead-lettered instead of retried",
        task.name,
        request.id,
        key,
        reply.retries,
        reply.attempts,
        budget.window,
        reply.allowed,
    )
    _events.emit("retry_budget_exhausted", task=task, request=request, budget=key,
                 attempts=reply.attempts, retries=reply.retries, allowed=reply.allowed,
                 exception=exc)  # fmt: skip
    return False
