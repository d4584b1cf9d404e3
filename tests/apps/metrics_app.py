"""Tasks for the metrics tests: known work whose counts the worker's /metrics must show."""

from __future__ import annotations

from celery import Task

from apps.base import make_app, record
from resilient_tasks import Permanent, ResilientTask, RetryPolicy

app = make_app(__name__)

#: Every retry waits 0.2 s: the retry-delay histogram's sum is 0.2 s per retry.
FIXED = RetryPolicy(retry_on=(ConnectionError,), max_attempts=5, backoff=0.2)


@app.task(base=ResilientTask, bind=True, name="metrics.ok")
def ok(self: Task, log: str) -> str:
    record(self, log)
    return "done"


@app.task(base=ResilientTask, bind=True, name="metrics.flaky", retry_policy=FIXED)
def flaky(self: Task, fail_times: int, log: str) -> str:
    """Fail ``fail_times`` times with ConnectionError, then succeed."""
    record(self, log)
    if self.request.retries < fail_times:
        raise ConnectionError(f"upstream reset on attempt {self.request.retries + 1}")
    return "done"


@app.task(base=ResilientTask, bind=True, name="metrics.doomed", retry_policy=FIXED)
def doomed(self: Task, log: str) -> None:
    """Dead-lettered at the first attempt (reason ``permanent``)."""
    record(self, log)
    raise Permanent(LookupError("invoice was deleted"))


@app.task(
    base=ResilientTask,
    bind=True,
    name="metrics.later",
    retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=2, backoff=600),
)
def later(self: Task, log: str) -> None:
    """Fail once; its retry waits ten minutes on the broker (a delayed message)."""
    record(self, log)
    raise ConnectionError("try again later")
