"""resilient-tasks: Celery tasks that survive the real world.

Change one decorator and a task retries transient failures with proper backoff, keeping the
story of every attempt::

    from resilient_tasks import ResilientTask, RetryPolicy

    @app.task(base=ResilientTask, bind=True,
              retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=5))
    def sync_invoice(self, invoice_id): ...
"""

from __future__ import annotations

from . import _einfo  # noqa: F401 (connects the receivers that keep failures light)
from .breaker import CircuitBreaker, CircuitBreakerMixin
from .budget import RetryBudget
from .classify import TRANSIENT_ERRORS
from .deadletter import DeadLetterMixin
from .delayed import DelayedDeliveryMixin
from .exceptions import ConfigurationError, Permanent, RetryAfter
from .hooks import FailureDetails, FailureHooksMixin
from .observability import ObservabilityMixin
from .policy import RetryPolicy
from .retry import RetryMixin
from .task import ResilientTask
from .timelimit import TimeLimitMixin

__all__ = [
    "TRANSIENT_ERRORS",
    "CircuitBreaker",
    "CircuitBreakerMixin",
    "ConfigurationError",
    "DeadLetterMixin",
    "DelayedDeliveryMixin",
    "FailureDetails",
    "FailureHooksMixin",
    "ObservabilityMixin",
    "Permanent",
    "ResilientTask",
    "RetryAfter",
    "RetryBudget",
    "RetryMixin",
    "RetryPolicy",
    "TimeLimitMixin",
]

__version__ = "0.1.0"
