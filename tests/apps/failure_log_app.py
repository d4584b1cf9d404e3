"""A worker that calls ``observability.connect()`` and nothing else: no structlog configuration,
so the events go through ``logging`` in Celery's own format (``tests/worker/test_failure_logs``).
"""

from __future__ import annotations

import time

from celery import Task

from apps.base import make_app, record
from resilient_tasks import ResilientTask, RetryPolicy, observability

app = make_app(__name__)
observability.connect()


@app.task(base=ResilientTask, bind=True, name="fl.broken")
def broken(self: Task, log_path: str) -> None:
    """Fails for good at once (nothing retries KeyError): dead-lettered."""
    record(self, log_path)
    raise KeyError("no such customer")


@app.task(base=ResilientTask, bind=True, name="fl.kept", dead_letter=False)
def kept(self: Task, log_path: str) -> None:
    """Fails for good at once, and is not dead-lettered."""
    record(self, log_path)
    raise KeyError("no such order")


@app.task(
    base=ResilientTask,
    bind=True,
    name="fl.flaky",
    retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=3, backoff=0.1),
)
def flaky(self: Task, log_path: str) -> str:
    """Fails once with ConnectionError, then succeeds."""
    record(self, log_path)
    if self.request.retries == 0:
        raise ConnectionError("upstream reset")
    return "done"


@app.task(base=ResilientTask, bind=True, name="fl.stuck", time_limit=1)
def stuck(self: Task, log_path: str) -> None:
    """Runs past its hard time limit: killed, and dead-lettered."""
    record(self, log_path)
    time.sleep(30)


@app.task(bind=True, name="fl.ok")
def ok(self: Task, log_path: str) -> str:
    return "ok"
