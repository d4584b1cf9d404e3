"""``ResilientTask``: every concern of the library on one ``celery.Task`` subclass."""

from __future__ import annotations

from typing import Any

from celery import Task

from .breaker import CircuitBreakerMixin
from .deadletter import DeadLetterMixin
from .delayed import DelayedDeliveryMixin
from .hooks import FailureHooksMixin
from .observability import ObservabilityMixin
from .options import (
    CELERY_TASK_OPTIONS,
    check_bool,
    check_no_misspelt_options,
)
from .retry import RetryMixin
from .timelimit import TimeLimitMixin

__all__ = ["ResilientTask"]

#: The options this library adds to Celery's, for spotting a misspelt one.
LIBRARY_OPTIONS = frozenset(
    {
        "retry_policy",
        "dead_letter",
        "dead_letter_queue",
        "delayed_delivery",
        "max_redeliveries",
        "failure_handlers",
        "circuit_breaker",
    }
)


class ResilientTask(
    ObservabilityMixin,
    FailureHooksMixin,
    RetryMixin,
    CircuitBreakerMixin,
    DelayedDeliveryMixin,
    TimeLimitMixin,
    DeadLetterMixin,
    Task,  # type: ignore[misc]
):
    """A ``celery.Task`` that retries by policy and dead-letters what finally fails.

    It combines :class:`~resilient_tasks.ObservabilityMixin` (structlog context while it runs),
    :class:`~resilient_tasks.FailureHooksMixin` (``failure_handlers``,
    ``on_give_up``, ``on_retry``), :class:`~resilient_tasks.RetryMixin` (``retry_policy``),
    :class:`~resilient_tasks.CircuitBreakerMixin` (``circuit_breaker``: a breaker shared by
    the fleet),
    :class:`~resilient_tasks.DelayedDeliveryMixin` (``delayed_delivery``: delayed messages wait
    on the broker), :class:`~resilient_tasks.TimeLimitMixin` (time limits,
    ``max_redeliveries``) and :class:`~resilient_tasks.DeadLetterMixin` (``dead_letter``,
    ``dead_letter_queue``).

    Use it as the base of a task; nothing else in the project changes. Options are validated
    when the task class is created (at import, or at the latest when the app is finalized):
    a bad one raises :class:`~resilient_tasks.ConfigurationError` naming the task and the option.

    Defaults that differ from ``celery.Task``: ``acks_late = True`` and
    ``reject_on_worker_lost = True``, so a message is acknowledged only once its outcome is
    settled and comes back if the worker running it dies.

    Celery's own options keep their meaning. Without a ``retry_policy`` the task behaves as a
    plain ``celery.Task`` (``autoretry_for``, ``retry_backoff``, ``max_retries``, ``self.retry``).

    Example::

        from celery import Celery
        from tenacity import wait_exponential
        from resilient_tasks import ResilientTask, RetryPolicy

        app = Celery("billing", broker="amqp://guest:guest@127.0.0.1:5672//")

        @app.task(
            base=ResilientTask,
            bind=True,
            retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=5,
                                     backoff=wait_exponential(multiplier=1, max=60)),
            soft_time_limit=30,
            time_limit=40,
        )
        def sync_invoice(self, invoice_id):
            ...
    """

    acks_late = True
    reject_on_worker_lost = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_no_misspelt_options(cls, CELERY_TASK_OPTIONS | LIBRARY_OPTIONS)
        check_bool(cls, "acks_late")
        check_bool(cls, "reject_on_worker_lost")
