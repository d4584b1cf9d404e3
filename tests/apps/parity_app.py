"""The same Celery autoretry options on a plain ``celery.Task`` and on a ``ResilientTask``."""

from __future__ import annotations

from typing import Any

from celery import Task

from apps.base import make_app, record
from resilient_tasks import ResilientTask

app = make_app(__name__)

BACKOFF = {
    "autoretry_for": (ConnectionError,),
    "retry_backoff": True,
    "retry_jitter": False,
    "max_retries": 2,
}
RETRY_KWARGS = {
    "autoretry_for": (ConnectionError,),
    "retry_kwargs": {"max_retries": 2},
    "default_retry_delay": 0.5,
}


def fail(task: Task, log: str) -> None:
    record(task, log)
    raise ConnectionError("down")


@app.task(bind=True, name="parity.plain_backoff", **BACKOFF)
def plain_backoff(self: Task, log: str) -> Any:
    fail(self, log)


@app.task(base=ResilientTask, bind=True, name="parity.resilient_backoff", **BACKOFF)
def resilient_backoff(self: Task, log: str) -> Any:
    fail(self, log)


@app.task(bind=True, name="parity.plain_retry_kwargs", **RETRY_KWARGS)
def plain_retry_kwargs(self: Task, log: str) -> Any:
    fail(self, log)


@app.task(base=ResilientTask, bind=True, name="parity.resilient_retry_kwargs", **RETRY_KWARGS)
def resilient_retry_kwargs(self: Task, log: str) -> Any:
    fail(self, log)
