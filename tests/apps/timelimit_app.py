"""Tasks that hit time limits or kill their pool child."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from apps.base import append, make_app, read_log, record
from resilient_tasks import FailureDetails, ResilientTask, RetryPolicy

app = make_app(__name__)


class Cleaning(ResilientTask):
    """Records its soft-time-limit cleanup in the attempt log (the task's last argument)."""

    def on_soft_time_limit(self, exc: SoftTimeLimitExceeded) -> None:
        append(self.request.args[-1], task=self.name, id=self.request.id, role="cleanup")


@app.task(base=Cleaning, bind=True, name="tl.soft", soft_time_limit=0.5, time_limit=5)
def soft(self: Task, log: str) -> None:
    record(self, log)
    time.sleep(3)


@app.task(
    base=Cleaning,
    bind=True,
    name="tl.soft_retry",
    soft_time_limit=0.5,
    time_limit=5,
    retry_policy=RetryPolicy(retry_on=SoftTimeLimitExceeded, max_attempts=2, backoff=0.1),
)
def soft_retry(self: Task, log: str) -> None:
    record(self, log)
    time.sleep(3)


@app.task(base=ResilientTask, bind=True, name="tl.hard", time_limit=1)
def hard(self: Task, log: str) -> None:
    record(self, log)
    time.sleep(30)


@app.task(
    base=ResilientTask,
    bind=True,
    name="tl.hard_retry",
    time_limit=1,
    retry_policy=RetryPolicy(retry_on=TimeLimitExceeded, max_attempts=2, backoff=0.1),
)
def hard_retry(self: Task, log: str) -> None:
    record(self, log)
    time.sleep(30)


@app.task(base=ResilientTask, bind=True, name="tl.exit", max_redeliveries=2)
def exit_(self: Task, log: str) -> None:
    """A poison message: it kills the pool child running it."""
    record(self, log)
    os._exit(1)


class DiesAfterAskingForARetry(ResilientTask):
    """The pool child is killed right after the task's first attempt asked for a retry, before
    the worker's main process hears of it (the first time only)."""

    def on_retry(self, details: FailureDetails) -> None:  # type: ignore[override]
        log = details.args[-1]
        if not any(a.get("role") == "killed" for a in read_log(Path(log))):
            append(log, task=self.name, id=details.task_id, role="killed")
            os.kill(os.getpid(), signal.SIGKILL)


@app.task(
    base=DiesAfterAskingForARetry,
    bind=True,
    name="tl.retry_then_die",
    retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=3, backoff=0.05),
)
def retry_then_die(self: Task, log: str) -> str:
    record(self, log)
    if self.request.retries == 0:
        raise ConnectionError("upstream reset")
    append(log, task=self.name, id=self.request.id, role="done")
    return "done"


@app.task(base=ResilientTask, bind=True, name="tl.work")
def work(self: Task, seconds: float, log: str) -> str:
    record(self, log, role="start")
    time.sleep(seconds)
    append(log, task=self.name, id=self.request.id, role="done")
    return "done"


def note_failure(details: FailureDetails) -> None:
    """A failure handler: records where and why it ran."""
    append(
        details.args[-1],
        task=details.task_name,
        id=details.task_id,
        role="handler",
        reason=details.reason,
        attempts=details.attempts,
        pid=os.getpid(),
    )


@app.task(
    base=ResilientTask,
    bind=True,
    name="tl.hard_handled",
    time_limit=1,
    failure_handlers={TimeLimitExceeded: note_failure},
)
def hard_handled(self: Task, log: str) -> None:
    record(self, log)
    time.sleep(30)


@app.task(
    base=ResilientTask,
    bind=True,
    name="tl.raise_handled",
    failure_handlers={KeyError: note_failure},
)
def raise_handled(self: Task, log: str) -> None:
    record(self, log)
    raise KeyError("gone")
