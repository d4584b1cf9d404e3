"""A worker with Sentry initialised at import, as a Celery project does it, sending its events
to a JSON-lines file instead of a Sentry server.

Settings (worker only): ``rt_sentry_events``, the file each Sentry event is appended to (one
JSON object a line, from whichever process captured it); ``rt_sentry_celery``, whether Sentry's
own ``CeleryIntegration`` is enabled beside :class:`ResilientTasksIntegration`. Sentry's logging
integration turns error lines into events, and the library's event log is connected, so its
error lines and Celery's reach Sentry as they would in a project.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import sentry_sdk
from celery import Task
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import Transport

from apps.base import make_app, record
from resilient_tasks import ResilientTask, RetryPolicy, observability
from resilient_tasks.sentry import ResilientTasksIntegration

app = make_app(__name__)
observability.configure_logging(json=True)
observability.connect()


class FileTransport(Transport):
    """Appends every event of an envelope to a JSON-lines file; no network."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def capture_envelope(self, envelope: Envelope) -> None:
        event = envelope.get_event()
        if event is None:
            return
        line = json.dumps({"pid": os.getpid(), **event}, default=str) + "\n"
        # One write of an O_APPEND file: lines of concurrent processes do not interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


# Error log lines become Sentry events (the default of sentry-sdk 2; 3 sends none).
integrations: list[Any] = [
    ResilientTasksIntegration(),
    LoggingIntegration(event_level=logging.ERROR),
]
if app.conf.get("rt_sentry_celery"):
    integrations.append(CeleryIntegration())
sentry_sdk.init(
    dsn="https://public@sentry.invalid/1",
    transport=FileTransport(app.conf["rt_sentry_events"]),
    integrations=integrations,
    # Only what the test names: whether CeleryIntegration is on is the test's choice.
    auto_enabling_integrations=False,
)

# Five retries, then a dead letter (retries_exhausted).
SIX_TRIES = RetryPolicy(retry_on=(ConnectionError,), max_attempts=6, backoff=0.05)


@app.task(base=ResilientTask, bind=True, name="sn.down", retry_policy=SIX_TRIES)
def down(self: Task, log: str) -> None:
    """Always fails with ConnectionError: retried five times, then dead-lettered."""
    record(self, log)
    raise ConnectionError(f"billing API down (attempt {self.request.retries + 1})")


@app.task(base=ResilientTask, bind=True, name="sn.recovers", retry_policy=SIX_TRIES)
def recovers(self: Task, log: str) -> str:
    """Fails three times, then succeeds."""
    record(self, log)
    if self.request.retries < 3:
        raise ConnectionError("billing API down")
    return "paid"


@app.task(
    base=ResilientTask,
    bind=True,
    name="sn.not_dead_lettered",
    dead_letter=False,
    retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=3, backoff=0.05),
)
def not_dead_lettered(self: Task, log: str) -> None:
    """Retried twice, then fails for good without a dead letter."""
    record(self, log)
    raise ConnectionError("billing API down")


@app.task(bind=True, name="sn.plain")
def plain(self: Task, log: str) -> None:
    """A plain ``celery.Task``: left to Sentry's CeleryIntegration."""
    record(self, log)
    raise KeyError("no such customer")
