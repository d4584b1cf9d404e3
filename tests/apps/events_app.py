"""A worker that logs JSON through structlog, with the library's events connected (with
``connect(plain_tasks=False)`` when the setting ``rt_events_plain_tasks`` is false).

Every pool process binds ``pool_process`` itself at start: the tests check that a task's
bindings are restored around it without disturbing what the process bound.
"""

from __future__ import annotations

import os
import time
from typing import Any

import structlog
from celery import Task, signals

from apps.base import make_app, record
from resilient_tasks import ResilientTask, RetryPolicy, observability

app = make_app(__name__)
observability.configure_logging(json=True)
# rt_events_plain_tasks=False: connect(plain_tasks=False), for workers of library tasks only.
observability.connect(plain_tasks=app.conf.get("rt_events_plain_tasks", True))
log = structlog.get_logger("events_app")


@signals.worker_process_init.connect(weak=False)
def _bind_pool_process(**_: Any) -> None:
    structlog.contextvars.bind_contextvars(pool_process=os.getpid())


@signals.task_postrun.connect(weak=False)
def _log_context_after(task_id: str | None = None, **_: Any) -> None:
    """Connected after observability's own receiver, so it sees what that one restored."""
    log.info("context_after", finished=task_id, seen=structlog.contextvars.get_contextvars())


@app.task(
    base=ResilientTask,
    bind=True,
    name="ev.flaky",
    retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=3, backoff=0.1),
)
def flaky(self: Task, log_path: str) -> str:
    """Fails once with ConnectionError, then succeeds."""
    record(self, log_path)
    if self.request.retries == 0:
        raise ConnectionError("upstream reset")
    return "done"


@app.task(base=ResilientTask, bind=True, name="ev.broken")
def broken(self: Task, log_path: str, password: str = "", **options: Any) -> None:
    """Fails for good at once (nothing retries KeyError)."""
    record(self, log_path)
    raise KeyError("no such customer")


@app.task(base=ResilientTask, bind=True, name="ev.soft", soft_time_limit=0.3, time_limit=5)
def soft(self: Task, log_path: str) -> None:
    record(self, log_path)
    time.sleep(3)


@app.task(base=ResilientTask, bind=True, name="ev.hard", time_limit=1)
def hard(self: Task, log_path: str) -> None:
    record(self, log_path)
    time.sleep(30)


@app.task(bind=True, name="ev.plain_hard", time_limit=1)
def plain_hard(self: Task, log_path: str) -> None:
    """A plain ``celery.Task`` past its hard limit: Celery reports it from the main process."""
    record(self, log_path)
    time.sleep(30)


@app.task(base=ResilientTask, bind=True, name="ev.context")
def context(self: Task, log_path: str) -> str:
    """Logs the contextvars it starts with."""
    log.info("context_seen", seen=structlog.contextvars.get_contextvars())
    return str(self.request.id)


@app.task(bind=True, name="ev.plain_context")
def plain_context(self: Task, log_path: str) -> str:
    """A plain ``celery.Task`` that logs the contextvars it starts with, and its own id."""
    log.info("context_seen", seen=structlog.contextvars.get_contextvars(), own_id=self.request.id)
    return str(self.request.id)


@app.task(base=ResilientTask, bind=True, name="ev.parent")
def parent(self: Task, log_path: str) -> str:
    """Publishes an ``ev.context`` child and returns its id."""
    log.info("context_seen", seen=structlog.contextvars.get_contextvars())
    return str(context.apply_async(args=[log_path]).id)
