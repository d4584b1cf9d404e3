"""Tasks on queues that RabbitMQ itself dead-letters (``x-dead-letter-exchange``)."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import Reject

from apps.base import make_app, record
from apps.native_queues import native_queues
from resilient_tasks import ResilientTask, RetryAfter, RetryPolicy
from resilient_tasks.rabbitmq import declare_dead_letter_queues


def configure(app: Celery) -> None:
    app.conf.task_queues = native_queues(app.conf.rt_native)


app = make_app(__name__)
configure(app)


@signals.worker_init.connect(weak=False)
def _declare(**_: Any) -> None:
    declare_dead_letter_queues(app)


@app.task(base=ResilientTask, bind=True, name="native.reject")
def reject(self: Task, log: str) -> None:
    """Reject without requeue: Celery does not see a failure, RabbitMQ dead-letters it."""
    record(self, log)
    raise Reject("malformed payload", requeue=False)


@app.task(base=ResilientTask, bind=True, name="native.poison")
def poison(self: Task, log: str) -> None:
    """Requeue itself forever: the quorum queue's delivery limit stops it."""
    record(self, log)
    raise Reject("try again", requeue=True)


@app.task(base=ResilientTask, bind=True, name="native.ok")
def ok(self: Task, log: str) -> str:
    record(self, log)
    return "ok"


@app.task(base=ResilientTask, bind=True, name="native.later",
          retry_policy=RetryPolicy(retry_on=(), max_attempts=2))  # fmt: skip
def later(self: Task, log: str) -> str:
    """Ask to be retried 2 s from now once, then succeed."""
    record(self, log)
    if self.request.retries == 0:
        raise RetryAfter(2, "come back later")
    return "done"
