"""Tasks for the benchmarks (``nox -s bench``): the same no-op body as a plain ``celery.Task``
and as a ``ResilientTask``, a permanent failure, and a retry an hour away.

Completions are counted without touching the broker or a result backend: each pool process
keeps, in a small file it maps into memory (``<bench_dir>/slot-<pid>``), the time of its first
task, the time of its latest task and how many it ran. Writing it costs about a microsecond, the
same for every variant, and the benchmark process reads the files to know when a run is over.

Settings read from the worker's configuration (``app.conf``):

* ``bench_dir``: the folder of the slot files (required);
* ``bench_events``: at import, where ``resilient_tasks.observability`` exists (the benchmark
  reports whether events were on), set up the worker's logs as the library recommends
  (``configure_logging(json=True)``) and ``connect()`` the events; at ``--loglevel=WARNING``
  the info events (``task_started``, ``task_succeeded``) are then built and filtered, at
  ``INFO`` written as JSON lines; ``"library"`` connects them with ``plain_tasks=False``.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path
from typing import Any

from apps.base import make_app
from resilient_tasks import Permanent, ResilientTask, RetryPolicy

app = make_app(__name__)

#: The slot layout: first tick (float), latest tick (float), ticks (int).
SLOT = struct.Struct("=ddq")


def _events_connected() -> bool:
    if not app.conf.get("bench_events"):
        return False
    try:
        from resilient_tasks import observability
    except ImportError:
        return False
    observability.configure_logging(json=True)
    observability.connect(plain_tasks=app.conf.get("bench_events") != "library")
    return True


EVENTS = _events_connected()

#: What a user would write: transient errors retried with the default backoff.
POLICY = RetryPolicy(retry_on=(ConnectionError, TimeoutError), max_attempts=5)
#: Every failure retried once, an hour later: the retry storm.
IN_AN_HOUR = RetryPolicy(retry_on=(ConnectionError,), max_attempts=2, backoff=3600)


class _Slot:
    """This process's completion counter, in a memory-mapped file the benchmark reads."""

    def __init__(self, folder: str) -> None:
        path = Path(folder) / f"slot-{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, SLOT.size)
            self._map = mmap.mmap(fd, SLOT.size)
        finally:
            os.close(fd)
        self._first = 0.0
        self._count = 0

    def tick(self) -> None:
        now = time.time()
        if not self._count:
            self._first = now
        self._count += 1
        SLOT.pack_into(self._map, 0, self._first, now, self._count)


class Ticker:
    """Counts one task per call in this process's slot file in ``app.conf["bench_dir"]``
    (opened on first use, once per process)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._slot: _Slot | None = None
        self._pid = 0

    def __call__(self) -> None:
        if self._slot is None or self._pid != os.getpid():
            self._slot, self._pid = _Slot(self.app.conf["bench_dir"]), os.getpid()
        self._slot.tick()


tick = Ticker(app)


@app.task(
    name="bench.plain",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
)
def plain(n: int) -> None:
    tick()


@app.task(base=ResilientTask, name="bench.resilient", ignore_result=True, retry_policy=POLICY)
def resilient(n: int) -> None:
    tick()


@app.task(
    name="bench.plain_failing",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
)
def plain_failing(n: int) -> None:
    """Celery's own failure path, for comparison: logged, nothing dead-lettered."""
    tick()
    raise LookupError(f"record {n} is gone")


@app.task(base=ResilientTask, name="bench.failing", ignore_result=True, retry_policy=POLICY)
def failing(n: int) -> None:
    tick()
    raise Permanent(LookupError(f"record {n} is gone"))


@app.task(
    base=ResilientTask,
    name="bench.failing_no_dlq",
    ignore_result=True,
    retry_policy=POLICY,
    dead_letter=False,
)
def failing_no_dlq(n: int) -> None:
    """The same failure with dead-lettering off: what the rest of the library costs on it."""
    tick()
    raise Permanent(LookupError(f"record {n} is gone"))


@app.task(base=ResilientTask, name="bench.storm", ignore_result=True, retry_policy=IN_AN_HOUR)
def storm(n: int) -> None:
    tick()
    raise ConnectionError(f"record {n}: upstream down, try again in an hour")


@app.task(
    name="bench.plain_storm",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(ConnectionError,),
    max_retries=1,
    default_retry_delay=3600,
)
def plain_storm(n: int) -> None:
    """The retry storm with Celery's own autoretry, for comparison."""
    tick()
    raise ConnectionError(f"record {n}: upstream down, try again in an hour")


#: Every failure retried once, a second later: the retry path's throughput.
IN_A_SECOND = RetryPolicy(retry_on=(ConnectionError,), max_attempts=2, backoff=1.0)


def _fail_first(task: Any, n: int) -> None:
    tick()
    if task.request.retries == 0:
        raise ConnectionError(f"record {n}: upstream blinked, try again in a second")


@app.task(base=ResilientTask, bind=True, name="bench.retry_once", ignore_result=True,
          retry_policy=IN_A_SECOND)  # fmt: skip
def retry_once(self: Any, n: int) -> None:
    """Fails once, then succeeds: the retry waits on the broker (RabbitMQ, Redis)."""
    _fail_first(self, n)


@app.task(base=ResilientTask, bind=True, name="bench.retry_once_worker", ignore_result=True,
          retry_policy=IN_A_SECOND, delayed_delivery="worker")  # fmt: skip
def retry_once_worker(self: Any, n: int) -> None:
    """The same, its retry held by the worker (Celery's ETA message)."""
    _fail_first(self, n)


@app.task(bind=True, name="bench.plain_retry_once", ignore_result=True, acks_late=True,
          reject_on_worker_lost=True, autoretry_for=(ConnectionError,), max_retries=1,
          default_retry_delay=1)  # fmt: skip
def plain_retry_once(self: Any, n: int) -> None:
    """The same with Celery's own autoretry, for comparison."""
    _fail_first(self, n)
