"""Where time limits and lost workers are handled: :class:`TimeLimitMixin`.

* **Soft limit** (in the pool child): the task's :meth:`~TimeLimitMixin.on_soft_time_limit`
  hook runs for cleanup, then the retry policy decides: a retry if it matches
  ``SoftTimeLimitExceeded``, otherwise a dead letter with reason ``soft_time_limit``.
* **Hard limit** and **lost worker** (in the worker's main process, where they are seen):
  :func:`settle_hard_time_limit` and :func:`settle_worker_lost`, which the task's
  ``Request`` (:mod:`resilient_tasks.worker`) calls: one retry or one dead letter for a hard
  limit; a lost worker's message comes back until ``max_redeliveries`` is spent, then it is
  dead-lettered.
* At worker start, a warning names the tasks whose time limits the pool cannot enforce.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task, signals
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.worker.state import task_ready

from . import _events, _reason, deadletter, retry
from ._steps import StepsMixin
from .decide import AttemptState, RetryIn, decide
from .options import check_before, check_hook, check_seconds, invalid, task_label

__all__ = [
    "ENFORCING_POOLS",
    "REDELIVERIES",
    "TimeLimitMixin",
    "handles_losses",
    "redeliveries",
    "settle_hard_time_limit",
    "settle_worker_lost",
]

logger = logging.getLogger(__name__)

#: The message header that counts how often a message came back after losing its worker.
REDELIVERIES = "resilient_redeliveries"
#: The pools that enforce both soft and hard time limits.
ENFORCING_POOLS = frozenset({"prefork"})


class TimeLimitMixin(StepsMixin):
    """Handle soft and hard time limits, and workers that die, once and without loops.

    Combine it with ``celery.Task`` (mixins first), or use
    :class:`~resilient_tasks.ResilientTask`, which includes it.

    Options (class attributes or ``@app.task`` keywords):
        soft_time_limit, time_limit: Celery's own; validated when the task is declared
            (positive numbers, soft below hard).
        max_redeliveries: how often a message may come back after the pool child running it
            died (SIGKILL, the OOM killer, ``os._exit``) before it is dead-lettered with reason
            ``worker_lost`` instead of run again. Default ``3``; ``0`` dead-letters at the
            first loss. The count travels with the message (header
            ``resilient_redeliveries``), so it holds across workers.

    Override :meth:`on_soft_time_limit` for cleanup when the soft limit strikes.

    Example::

        from celery import Celery
        from resilient_tasks import ResilientTask

        app = Celery("reports")

        class Export(ResilientTask):
            soft_time_limit = 30
            time_limit = 40
            max_redeliveries = 2

            def on_soft_time_limit(self, exc):
                self.tmpdir.cleanup()
    """

    max_redeliveries: int = 3

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_before(cls, TimeLimitMixin, Task, "Celery's methods would shadow it")
        check_hook(cls, "on_soft_time_limit", "exc")
        soft = check_seconds(cls, "soft_time_limit")
        hard = check_seconds(cls, "time_limit")
        if soft is not None and hard is not None and soft >= hard:
            raise invalid(
                cls,
                "soft_time_limit",
                cls.soft_time_limit,
                f"must be below time_limit={cls.time_limit!r}, so the task can clean up "
                "before it is killed",
            )
        redeliveries = getattr(cls, "max_redeliveries", None)
        if isinstance(redeliveries, bool) or not isinstance(redeliveries, int) or redeliveries < 0:
            raise invalid(cls, "max_redeliveries", redeliveries, "expected a whole number >= 0")

    def on_soft_time_limit(self, exc: SoftTimeLimitExceeded) -> None:
        """Clean up when the soft time limit strikes; runs inside the task, once. No-op default.

        What it raises is logged and does not replace the time-limit failure.
        """

    def _step_soft_time_limit(self, exc: SoftTimeLimitExceeded) -> None:
        _events.emit("task_soft_time_limit", task=self, request=self.request, exception=exc)
        try:
            self.on_soft_time_limit(exc)
        except Exception:
            logger.exception(
                "on_soft_time_limit of %s[%s] raised; the soft time limit stands",
                self.name,
                self.request.id,
            )


def _warn_about_unenforced_time_limits(sender: Any = None, **_: Any) -> None:
    pool = _pool_name(getattr(sender, "pool_cls", None))
    app = getattr(sender, "app", None)
    if app is None or pool is None or pool in ENFORCING_POOLS:
        return
    limited = sorted(
        task_label(type(task))
        for task in app.tasks.values()
        if isinstance(task, TimeLimitMixin) and (task.soft_time_limit or task.time_limit)
    )
    if limited:
        logger.warning(
            "resilient_tasks: the %s pool does not enforce time limits; these tasks set "
            "soft_time_limit/time_limit that will not be applied: %s. Run them on a prefork "
            "worker (celery worker -P prefork).",
            pool,
            ", ".join(limited),
        )


def _pool_name(pool_cls: Any) -> str | None:
    if pool_cls is None:
        return None
    if isinstance(pool_cls, str):
        return pool_cls.rsplit(":", 1)[0].rsplit(".", 1)[-1]
    module = getattr(pool_cls, "__module__", "") or ""
    return module.rsplit(".", 1)[-1] or None


signals.worker_init.connect(
    _warn_about_unenforced_time_limits,
    weak=False,
    dispatch_uid="resilient_tasks.time_limit_pool_check",
)


# -- in the worker's main process ---------------------------------------------------------------


def handles_losses(task: Any) -> bool:
    """Whether ``task`` has this mixin's handling of hard limits and lost workers."""
    return hasattr(task, "max_redeliveries")


def settle_hard_time_limit(request: Any, timeout: float | None) -> None:
    """The worker's ``request`` ran past its hard time limit (its pool child was killed): one
    retry if the task's policy retries ``TimeLimitExceeded``, else one dead letter; the
    message is acknowledged either way, so it never comes back in a loop."""
    if request._resilient_settled:  # billiard reports a hard limit twice
        return
    request._resilient_settled = True
    task_ready(request)
    exc = TimeLimitExceeded(timeout)
    logger.error("Hard time limit (%ss) exceeded for %s[%s]", timeout, request.name, request.id)
    _events.emit("task_hard_time_limit", request=request, timeout=timeout, exception=exc)
    policy = getattr(request.task, "retry_policy", None)
    decision = decide(policy, AttemptState.in_worker(request, exc)) if policy else None
    if isinstance(decision, RetryIn):
        retry.retry_from_worker(request, exc, decision.delay)
        return
    deadletter.fail_for_good(request, exc, decision.reason if decision else "hard_time_limit")


def settle_worker_lost(
    request: Any, exc: BaseException, exc_info: ExceptionInfo, fail: Callable[[], Any]
) -> Any:
    """The pool child running the worker's ``request`` died: republish the message with its
    redelivery count raised, or dead-letter it (reason ``worker_lost``) once it has come back
    ``max_redeliveries`` times. ``fail`` is Celery's own ``on_failure`` for the task, for a
    task Celery acknowledged before it ran (no ``acks_late``), which will not come back."""
    task = request.task
    request._resilient_settled = True
    _reason.mark(exc, "worker_lost")  # what task_failed says, if it ends the task
    if not (task.acks_late and task.reject_on_worker_lost):
        # Celery acknowledges and fails it; it will not come back, so dead-letter it too.
        if getattr(task, "dead_letter", False) and not deadletter.dead_letter(
            request, exc, exc_info, "worker_lost"
        ):
            return None
        return fail()
    task_ready(request)
    returned = redeliveries(request.message.headers)
    _events.emit(
        "task_worker_lost",
        request=request,
        redeliveries=returned,
        max_redeliveries=task.max_redeliveries,
        exception=exc,
    )
    if returned >= task.max_redeliveries:
        logger.error(
            "resilient_tasks: %s[%s] lost its worker %d times (max_redeliveries=%d); "
            "dead-lettering it instead of running it again",
            request.name,
            request.id,
            returned + 1,
            task.max_redeliveries,
        )
        deadletter.fail_for_good(request, exc, "worker_lost")
        return None
    logger.warning(
        "resilient_tasks: %s[%s] lost its worker; redelivery %d of %d",
        request.name,
        request.id,
        returned + 1,
        task.max_redeliveries,
    )
    headers = {**retry.without_x_death(request._context.headers), REDELIVERIES: returned + 1}
    if retry.republish(request, headers):
        request.acknowledge()
    return None


def redeliveries(headers: Mapping[str, Any] | None) -> int:
    """How often a message has come back after losing its worker.

    The higher of the library's ``resilient_redeliveries`` header and RabbitMQ's
    ``x-delivery-count`` (quorum queues), so a worker that died whole is counted too where the
    broker counts.

    Example::

        >>> redeliveries({"resilient_redeliveries": 2}), redeliveries({"x-delivery-count": 4})
        (2, 4)
    """
    headers = headers or {}
    counts = [headers.get(REDELIVERIES), headers.get("x-delivery-count")]
    return max(
        (int(c) for c in counts if isinstance(c, int) and not isinstance(c, bool)), default=0
    )
