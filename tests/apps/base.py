"""What every test app shares: configuration from the environment the worker fixture sets, the
ready signal the fixture waits for, and an attempt log the tests read.

The worker subprocess imports a test app module, which calls :func:`make_app`; the test process
builds its own client app from the same settings (see ``support.worker``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, Task, signals

ENV_SETTINGS = "RT_TEST_SETTINGS"
ENV_READY_FILE = "RT_TEST_READY_FILE"


def make_app(main: str) -> Celery:
    """A Celery app configured from the settings the worker fixture put in the environment."""
    app = Celery(main)
    app.conf.update(json.loads(os.environ[ENV_SETTINGS]))
    return app


@signals.worker_ready.connect(weak=False)
def _announce_ready(**_: Any) -> None:
    ready = os.environ.get(ENV_READY_FILE)
    if ready:
        Path(ready).write_text(str(os.getpid()))


def record(task: Task, log: str, **extra: Any) -> None:
    """Append what this attempt saw to the JSON-lines file ``log``."""
    request = task.request
    delivery = request.delivery_info or {}
    line = {
        "task": task.name,
        "id": request.id,
        "retries": request.retries,
        "t": time.time(),
        "pid": os.getpid(),
        "queue": delivery.get("routing_key"),
        "priority": delivery.get("priority"),
        "headers": request.headers or {},
        "root_id": request.root_id,
        "parent_id": request.parent_id,
        "eta": request.eta,
        "redelivered": delivery.get("redelivered"),
    }
    append(log, **line, **extra)


def append(log: str, **fields: Any) -> None:
    """Append one JSON line to ``log``."""
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"t": time.time(), **fields}, default=str) + "\n")


def read_log(log: Path) -> list[dict[str, Any]]:
    """The attempts recorded in ``log``, oldest first."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line]
