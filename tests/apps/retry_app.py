"""Tasks for the retry tests: flaky, rate-limited, hopeless and permanent failures."""

from __future__ import annotations

from typing import Any

from celery import Task
from tenacity import wait_exponential, wait_fixed

from apps.base import append, make_app, record
from resilient_tasks import Permanent, ResilientTask, RetryAfter, RetryPolicy
from resilient_tasks.history import History

app = make_app(__name__)

#: Deterministic backoff: 0.25 s, 0.5 s, 1.0 s, ...
FLAKY_POLICY = RetryPolicy(
    retry_on=(ConnectionError,), max_attempts=5, backoff=wait_exponential(multiplier=0.25)
)


def history_of(task: Task) -> list[dict[str, Any]]:
    return [a.as_dict() for a in History.from_headers(task.request.headers).attempts]


@app.task(base=ResilientTask, bind=True, name="retry.flaky", retry_policy=FLAKY_POLICY)
def flaky(self: Task, fail_times: int, log: str) -> list[dict[str, Any]]:
    """Fail ``fail_times`` times with ConnectionError, then return the history it was given."""
    record(self, log)
    if self.request.retries < fail_times:
        raise ConnectionError(f"upstream reset on attempt {self.request.retries + 1}")
    return history_of(self)


@app.task(base=ResilientTask, bind=True, name="retry.rate_limited", retry_policy=FLAKY_POLICY)
def rate_limited(self: Task, log: str) -> str:
    """Ask to be retried after exactly 1.5 s (a server's Retry-After), then succeed."""
    record(self, log)
    if self.request.retries == 0:
        raise RetryAfter(1.5, "429 Too Many Requests")
    return "done"


@app.task(base=ResilientTask, bind=True, name="retry.caught")
def caught(self: Task, log: str) -> str:
    """Ask for a retry and catch the ``Retry`` it raises (a broad ``except`` around the body, as
    projects write): Celery has published the retry by then; on the second attempt, finish."""
    record(self, log)
    if self.request.retries == 0:
        try:
            self.retry(countdown=0.2)
        except Exception:
            return "went on after asking for a retry"
    return "retried"


@app.task(
    base=ResilientTask,
    bind=True,
    name="retry.hopeless",
    retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=3, backoff=0.1),
)
def hopeless(self: Task, log: str) -> None:
    """Always fail transiently: stops after max_attempts."""
    record(self, log)
    raise ConnectionError("still down")


@app.task(
    base=ResilientTask,
    bind=True,
    name="retry.deadline",
    retry_policy=RetryPolicy(
        retry_on=(ConnectionError,), max_attempts=None, max_elapsed=2.0, backoff=wait_fixed(0.8)
    ),
)
def deadline(self: Task, log: str) -> None:
    """Always fail transiently: stops when the next retry would start past max_elapsed."""
    record(self, log)
    raise ConnectionError("still down")


@app.task(base=ResilientTask, bind=True, name="retry.permanent", retry_policy=FLAKY_POLICY)
def permanent(self: Task, log: str) -> None:
    """A transient-looking failure marked Permanent: never retried."""
    record(self, log)
    raise Permanent(ConnectionError("account closed"))


@app.task(base=ResilientTask, bind=True, name="retry.unlisted", retry_policy=FLAKY_POLICY)
def unlisted(self: Task, log: str) -> None:
    """A failure retry_on does not list: never retried."""
    record(self, log)
    raise KeyError("invoice 7")


@app.task(bind=True, name="retry.parent")
def parent(self: Task, log: str) -> str:
    """Start a flaky child (two failures) and return its id."""
    record(self, log)
    return str(flaky.delay(2, log).id)


@app.task(bind=True, name="retry.callback")
def callback(self: Task, result: Any, log: str) -> None:
    record(self, log, role="callback", received=result)


@app.task(name="retry.errback")
def errback(request: Any, exc: BaseException, traceback: Any, log: str) -> None:
    """A new-style errback: Celery calls it in the worker with the failed request."""
    append(log, task="retry.errback", failed_id=request.id, exc=type(exc).__name__)
