"""The tasks of ``apps.delayed_app``, shared with the tests' client (no app is made here): the
client publishes through the task classes, as a project calling ``note.apply_async(...)`` does."""

from __future__ import annotations

from celery import Celery, Task

from apps.base import record
from resilient_tasks import ResilientTask, RetryAfter, RetryPolicy

#: Retries only what asks for it (RetryAfter), at most once.
ASKED = RetryPolicy(retry_on=(), max_attempts=2)


def define(app: Celery) -> dict[str, Task]:
    """Define the tasks on ``app``; return them by name."""

    @app.task(base=ResilientTask, bind=True, name="delayed.later", retry_policy=ASKED, shared=False)
    def later(self: Task, seconds: float, log: str) -> str:
        """Ask to be retried ``seconds`` from now once, then succeed."""
        record(self, log)
        if self.request.retries == 0:
            raise RetryAfter(seconds, "come back later")
        return "done"

    @app.task(base=ResilientTask, bind=True, name="delayed.note", shared=False)
    def note(self: Task, log: str) -> str:
        """Record the run."""
        record(self, log)
        return "noted"

    return {task.name: task for task in (later, note)}
