"""Tasks for the dead-letter tools tests (``celery -A apps.tools_app dlq ...``).

``tools.flaky`` fails while a file exists (the bug) and succeeds once it is gone (the fix);
``tools.crash`` kills the pool process running it, every time (a worker_lost dead letter after
``max_redeliveries``, 3); the others are only ever dead-lettered by the tests, never run.
Together they imply the dead-letter queues ``<queue>.dlq`` and ``<queue>.graveyard``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Task

from apps.base import make_app, record
from resilient_tasks import ResilientTask, RetryPolicy

app = make_app(__name__)

QUICK = RetryPolicy(retry_on=(ConnectionError,), max_attempts=2, backoff=0.05)


@app.task(base=ResilientTask, bind=True, name="tools.flaky", retry_policy=QUICK)
def flaky(self: Task, n: int, broken: str, log: str) -> int:
    """Retry, then give up, while the file ``broken`` exists; record the attempt otherwise."""
    if os.path.exists(broken):
        raise ConnectionError(f"upstream down for {n}")
    record(self, log, n=n)
    return n


@app.task(base=ResilientTask, bind=True, name="tools.crash")
def crash(self: Task, log: str) -> None:
    """Record the run, then die as a pool process killed under it would."""
    record(self, log)
    os._exit(1)


@app.task(base=ResilientTask, name="tools.export")
def export(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError


@app.task(base=ResilientTask, name="tools.login")
def login(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError


@app.task(base=ResilientTask, name="tools.graveyard", dead_letter_queue="{queue}.graveyard")
def graveyard(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError


@app.task(base=ResilientTask, name="tools.quiet", dead_letter=False)
def quiet(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError
