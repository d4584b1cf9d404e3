"""The tasks of ``apps.expires_app``, shared with the tests' client (no app is made here): the
client publishes through the task classes, as a project calling ``add.apply_async(...)`` does."""

from __future__ import annotations

import time

from celery import Celery, Task

from apps.base import record
from resilient_tasks import ResilientTask, RetryPolicy

#: One retry, 0.1 s after a ConnectionError.
ONCE = RetryPolicy(retry_on=(ConnectionError,), max_attempts=2, backoff=0.1)


def define(app: Celery) -> dict[str, Task]:
    """Define the tasks on ``app``; return them by name."""

    @app.task(base=ResilientTask, bind=True, name="exp.slow", shared=False)
    def slow(self: Task, seconds: float, log: str) -> None:
        """Keep the worker's only process (and, with ``acks_late``, its prefetch) busy."""
        record(self, log)
        time.sleep(seconds)

    @app.task(base=ResilientTask, bind=True, name="exp.add", shared=False)
    def add(self: Task, x: int, y: int, log: str) -> int:
        record(self, log)
        return x + y

    @app.task(base=ResilientTask, bind=True, name="exp.flaky", retry_policy=ONCE, shared=False)
    def flaky(self: Task, seconds: float, log: str) -> str:
        """Fail the first attempt after ``seconds`` (retried 0.1 s later), succeed the second."""
        record(self, log)
        if self.request.retries == 0:
            time.sleep(seconds)
            raise ConnectionError("upstream reset")
        return "done"

    return {task.name: task for task in (slow, add, flaky)}
