"""Tasks for the dead-letter tests: each ends for a different reason."""

from __future__ import annotations

import os
from typing import Any

from celery import Task

from apps.base import append, make_app, record
from resilient_tasks import Permanent, ResilientTask, RetryPolicy

app = make_app(__name__)

QUICK = RetryPolicy(retry_on=(ConnectionError,), max_attempts=3, backoff=0.1)


@app.task(base=ResilientTask, bind=True, name="dl.permanent", retry_policy=QUICK)
def permanent(self: Task, invoice: int, log: str) -> None:
    record(self, log)
    raise Permanent(LookupError(f"invoice {invoice} was deleted"))


@app.task(base=ResilientTask, bind=True, name="dl.exhausted", retry_policy=QUICK)
def exhausted(self: Task, log: str) -> None:
    record(self, log)
    raise ConnectionError(f"billing API down (attempt {self.request.retries + 1})")


@app.task(base=ResilientTask, bind=True, name="dl.unlisted", retry_policy=QUICK)
def unlisted(self: Task, log: str, password: str = "", **options: Any) -> None:
    record(self, log)
    raise KeyError("no such customer")


@app.task(
    base=ResilientTask,
    bind=True,
    name="dl.autoretry",
    autoretry_for=(ConnectionError,),
    max_retries=1,
    default_retry_delay=0.1,
)
def autoretry(self: Task, log: str) -> None:
    """Celery's own autoretry, no policy: still dead-lettered when it runs out."""
    record(self, log)
    raise ConnectionError("down")


@app.task(base=ResilientTask, bind=True, name="dl.off", dead_letter=False)
def off(self: Task, log: str) -> None:
    record(self, log)
    raise KeyError("not dead-lettered")


@app.task(
    base=ResilientTask, bind=True, name="dl.custom_queue", dead_letter_queue="{queue}.graveyard"
)
def custom_queue(self: Task, log: str) -> None:
    record(self, log)
    raise KeyError("to the graveyard")


@app.task(base=ResilientTask, bind=True, name="dl.sometimes", retry_policy=QUICK)
def sometimes(self: Task, n: int, broken: str, log: str) -> int:
    """Fail permanently for n % 10 < 3 while the file ``broken`` exists (the bug); else succeed."""
    if n % 10 < 3 and os.path.exists(broken):
        raise Permanent(ValueError(f"record {n} is malformed"))
    append(log, task="dl.sometimes", n=n, id=self.request.id, headers=self.request.headers or {})
    return n


@app.task(bind=True, name="dl.errback")
def errback(self: Task, failed_id: str, log: str) -> None:
    append(log, task="dl.errback", failed_id=failed_id)


@app.task(bind=True, name="dl.step")
def step(self: Task, x: int, log: str) -> int:
    record(self, log, x=x)
    return x + 1
