"""Where time limits and lost workers are handled: :class:`TimeLimitMixin`.

* **Soft limit** (in the pool child): the task's :meth:`~TimeLimitMixin.on_soft_time_limit`
  hook runs for cleanup, then the retry policy decides: a retry if it matches
  ``SoftTimeLimitExceeded``, otherwise a dead letter with reason ``soft_time_limit``.
* **Hard limit** and **lost worker** (in the worker's main process, where they are seen): see
  :mod:`resilient_tasks.request`, which reads this mixin's ``max_redeliveries``.
* At worker start, a warning names the tasks whose time limits the pool cannot enforce.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, signals
from celery.exceptions import SoftTimeLimitExceeded

from . import _events
from ._call import StepsMixin
from .options import check_before, check_hook, check_seconds, invalid, task_label

__all__ = ["ENFORCING_POOLS", "TimeLimitMixin"]

logger = logging.getLogger(__name__)

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

    def _rt_soft_time_limit(self, exc: SoftTimeLimitExceeded) -> None:
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
