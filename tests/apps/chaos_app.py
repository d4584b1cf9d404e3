"""Tasks for the reliability suite (``tests/chaos``): a mixed workload, and bad input of every
kind that can reach a worker.

Every task records what it did in the attempt log (its last argument, or ``log=`` for the tasks
that take keyword arguments), so a test can account for every message.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Task

from apps.base import append, make_app, record
from resilient_tasks import (
    ConfigurationError,
    FailureDetails,
    Permanent,
    ResilientTask,
    RetryPolicy,
)

app = make_app(__name__)

#: Transient failures are retried at once, and often enough to survive a few failures in a row.
FAST = RetryPolicy(retry_on=(ConnectionError,), max_attempts=4, backoff=0.05)


# -- the mixed workload ------------------------------------------------------------------------


@app.task(base=ResilientTask, bind=True, name="chaos.mixed", retry_policy=FAST)
def mixed(self: Task, n: int, kind: str, log: str) -> int:
    """``ok`` succeeds; ``permanent`` gives up at once; ``transient`` raises ConnectionError on
    its first one (even ``n``) or two (odd ``n``) attempts, then succeeds. Each attempt works
    for 10 ms first, so that a killed pool child is often in the middle of one."""
    append(log, id=self.request.id, role="started", retries=self.request.retries)
    time.sleep(0.01)
    attempt = self.request.retries + 1
    if kind == "permanent":
        raise Permanent(ValueError(f"record {n} is malformed"))
    if kind == "transient" and attempt <= 1 + n % 2:
        raise ConnectionError(f"record {n}: upstream reset on attempt {attempt}")
    append(log, id=self.request.id, n=n, kind=kind, role="done", retries=self.request.retries)
    return n


# -- bad input -----------------------------------------------------------------------------------


class NeedsArgs(Exception):
    """An exception that cannot be unpickled: ``__init__`` requires two arguments, and
    ``BaseException.__reduce__`` would call it with one (the formatted message)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"error {code}: {detail}")
        self.code = code


class FlakyNeedsArgs(ConnectionError):
    """The same, but a transient failure a policy retries."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"error {code}: {detail}")
        self.code = code


@app.task(base=ResilientTask, bind=True, name="chaos.fail")
def fail(self: Task, *args: Any, log: str, **kwargs: Any) -> None:
    """Records what it received (types only: the log must not hold secrets), then fails for
    good with an exception no policy retries."""
    append(
        log,
        task=self.name,
        id=self.request.id,
        role="ran",
        arg_types=[type(a).__name__ for a in args],
        kwarg_names=sorted(kwargs),
    )
    raise LookupError("nothing to do with these arguments")


@app.task(base=ResilientTask, bind=True, name="chaos.succeed")
def succeed(self: Task, *args: Any, log: str, **kwargs: Any) -> None:
    append(
        log,
        task=self.name,
        id=self.request.id,
        role="done",
        arg_types=[type(a).__name__ for a in args],
    )


@app.task(base=ResilientTask, bind=True, name="chaos.unpicklable")
def unpicklable(self: Task, log: str) -> None:
    record(self, log)
    raise NeedsArgs(402, "payment required")


@app.task(
    base=ResilientTask,
    bind=True,
    name="chaos.unpicklable_transient",
    retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=3, backoff=0.05),
)
def unpicklable_transient(self: Task, log: str) -> None:
    record(self, log)
    raise FlakyNeedsArgs(503, "unavailable")


def _down(depth: int) -> None:
    if depth == 0:
        raise ValueError("the bottom of a very deep call stack " + "x" * 100_000)
    _up(depth - 1)


def _up(depth: int) -> None:
    if depth == 0:
        raise ValueError("the bottom of a very deep call stack " + "x" * 100_000)
    _down(depth - 1)


@app.task(base=ResilientTask, bind=True, name="chaos.deep")
def deep(self: Task, depth: int, log: str) -> None:
    """Fails ``depth`` frames down, alternating two functions so Python cannot fold the
    traceback: a traceback of hundreds of kilobytes, and a 100 kB exception message."""
    record(self, log)
    _down(depth)


def _forever(n: int) -> int:
    return _forever(n + 1) + 1


@app.task(base=ResilientTask, bind=True, name="chaos.recursion")
def recursion(self: Task, log: str) -> None:
    record(self, log)
    _forever(0)


@app.task(base=ResilientTask, bind=True, name="chaos.surrogate_transient", retry_policy=FAST)
def surrogate_transient(self: Task, text: str, log: str) -> str:
    """Fails three times with ``text`` (which may hold a lone surrogate) in the message, then
    succeeds on the fourth and last attempt the policy allows."""
    record(self, log)
    if self.request.retries < 3:
        raise ConnectionError(f"upstream said {text!s}")
    append(log, task=self.name, id=self.request.id, role="done")
    return "ok"


@app.task(base=ResilientTask, bind=True, name="chaos.surrogate_permanent")
def surrogate_permanent(self: Task, text: str, log: str) -> None:
    record(self, log)
    raise Permanent(ValueError(f"cannot parse {text!s}"))


def raising_handler(details: FailureDetails) -> None:
    append(details.args[-1], task=details.task_name, id=details.task_id, role="handler")
    raise RuntimeError("the failure handler itself failed")


class RaisingHooks(ResilientTask):
    """Every hook raises after recording that it ran."""

    def on_give_up(self, details: FailureDetails) -> None:
        append(details.args[-1], task=details.task_name, id=details.task_id, role="on_give_up")
        raise RuntimeError("on_give_up failed")

    def on_retry(self, details: FailureDetails) -> None:  # type: ignore[override]
        append(details.args[-1], task=details.task_name, id=details.task_id, role="on_retry")
        raise RuntimeError("on_retry failed")


class RaisingCeleryOnFailure(ResilientTask):
    """Celery's own ``on_failure`` hook raises."""

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        append(args[-1], task=self.name, id=task_id, role="on_failure")
        raise RuntimeError("Celery's on_failure failed")


@app.task(base=RaisingCeleryOnFailure, bind=True, name="chaos.celery_on_failure_raises")
def celery_on_failure_raises(self: Task, log: str) -> None:
    record(self, log)
    raise ValueError("the task's own failure")


@app.task(
    base=RaisingHooks,
    bind=True,
    name="chaos.hooks_raise",
    failure_handlers={ValueError: raising_handler},
)
def hooks_raise(self: Task, log: str) -> None:
    record(self, log)
    raise ValueError("the task's own failure")


@app.task(base=RaisingHooks, bind=True, name="chaos.hooks_raise_retry", retry_policy=FAST)
def hooks_raise_retry(self: Task, log: str) -> str:
    record(self, log)
    if self.request.retries == 0:
        raise ConnectionError("once")
    append(log, task=self.name, id=self.request.id, role="done")
    return "ok"


@app.task(
    base=ResilientTask,
    bind=True,
    name="chaos.fresh_dlq",
    dead_letter_queue="{queue}.fresh.{task}",
)
def fresh_dlq(self: Task, log: str) -> None:
    record(self, log)
    raise LookupError("to a dead-letter queue nobody declared")


@app.task(base=ResilientTask, bind=True, name="chaos.pid")
def pid(self: Task, log: str) -> int:
    record(self, log)
    return os.getpid()


def _bad_template(self: Task, log: str) -> None:
    """A dead-letter queue template that can only fail when formatted."""
    record(self, log)
    raise LookupError("where does this go?")


try:
    # Created now (lazy=False), and only in this app (shared=False), so a refusal shows here.
    bad_template = app.task(
        base=ResilientTask,
        bind=True,
        name="chaos.bad_template",
        dead_letter_queue="{queue:d}",
        lazy=False,
        shared=False,
    )(_bad_template)
except ConfigurationError:  # refused when the task is created: nothing to try at run time
    bad_template = None


@app.task(base=ResilientTask, bind=True, name="chaos.odd_headers", retry_policy=FAST)
def odd_headers(self: Task, log: str) -> str:
    """Fails once, then succeeds; sent with damaged library headers."""
    record(self, log)
    if self.request.retries == 0:
        raise ConnectionError("once")
    append(log, task=self.name, id=self.request.id, role="done")
    return "ok"
