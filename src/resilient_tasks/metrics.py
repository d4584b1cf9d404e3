"""Prometheus metrics of a worker: what its tasks did (attempts, retries, dead letters,
deferrals, retry delays) and what waits on its broker (dead letters, delayed messages, circuit
breakers), served over HTTP for Prometheus to scrape.

Install the extra (``pip install "resilient-tasks[prometheus]"``, on ``prometheus_client``) and
name a port in the app's configuration::

    app.conf.resilient_tasks_metrics_port = 9808

Every worker of an app with a library task then serves ``http://<host>:9808/metrics``; nothing
is served, and ``prometheus_client`` is not imported, while the setting is unset.

=======================================================  =========  =====================
metric                                                   type       labels
=======================================================  =========  =====================
``resilient_tasks_task_attempts_total``                  counter    ``task``
``resilient_tasks_task_retries_total``                   counter    ``task``
``resilient_tasks_retry_delay_seconds``                  histogram  ``task``
``resilient_tasks_task_dead_letters_total``              counter    ``task``, ``reason``
``resilient_tasks_task_deferrals_total``                 counter    ``task``, ``breaker``
``resilient_tasks_dead_letter_queue_depth``              gauge      ``queue``
``resilient_tasks_delayed_messages``                     gauge      ``queue``
``resilient_tasks_circuit_state``                        gauge      ``breaker``
=======================================================  =========  =====================

**Prefork pools.** The counters are counted where each occurrence happens: attempts and most
retries in the pool children, dead letters, deferrals and the retries of hard time limits in
the worker's main process. They are added up with ``prometheus_client``'s multiprocess mode:
before the pool forks, the worker's main process makes a directory of its own (or uses
``PROMETHEUS_MULTIPROC_DIR`` if the environment sets one), where every process of the worker
keeps its counts in a file of its own; the endpoint sums the files of the live and the exited
processes alike, so a pool child that exits or is replaced (``worker_max_tasks_per_child``, a
killed child) loses none of its counts. The directory the worker made is removed when it exits.

**Gauges** are measured when Prometheus scrapes, in the main process, and kept for
:data:`GAUGE_CACHE_SECONDS`: the depth of every dead-letter queue the app's tasks imply (and of
any other one this worker dead-lettered to), the delayed messages waiting on the broker
(:func:`resilient_tasks.delayed.delayed_stats`) and the state of each circuit breaker the app's
tasks declare (0 closed, 1 half-open, 2 open), read from the breakers' state store.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from celery import bootsteps, signals

from . import _events
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

__all__ = [
    "CIRCUIT_STATES",
    "GAUGE_CACHE_SECONDS",
    "METRICS",
    "PORT_SETTING",
    "RETRY_DELAY_BUCKETS",
    "MetricsStep",
    "metrics_port",
]

logger = logging.getLogger(__name__)

#: The app setting naming the port the worker serves its metrics on (unset: none served).
PORT_SETTING = "resilient_tasks_metrics_port"
#: How long a scrape's measure of the broker (queue depths, delayed messages, breakers) is
#: reused, so that frequent scrapes, or several Prometheus servers, do not load the broker.
GAUGE_CACHE_SECONDS = 5.0
#: The buckets (seconds) of ``resilient_tasks_retry_delay_seconds``.
RETRY_DELAY_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: The value of ``resilient_tasks_circuit_state`` for each state of a breaker.
CIRCUIT_STATES: Mapping[str, int] = MappingProxyType({"closed": 0, "half_open": 1, "open": 2})
#: Every metric served, by its name as Prometheus shows it, with its help text.
METRICS: Mapping[str, str] = MappingProxyType(
    {
        "resilient_tasks_task_attempts_total": "Task attempts started (every run of a task's "
        "body in the worker, first runs and retries alike).",
        "resilient_tasks_task_retries_total": "Retries scheduled.",
        "resilient_tasks_retry_delay_seconds": "The delay chosen for each retry scheduled.",
        "resilient_tasks_task_dead_letters_total": "Dead letters published, by task and reason.",
        "resilient_tasks_task_deferrals_total": "Tasks deferred by their open circuit breaker.",
        "resilient_tasks_dead_letter_queue_depth": "Messages in each dead-letter queue now.",
        "resilient_tasks_delayed_messages": "Delayed messages (retries, countdowns) waiting on "
        "the broker now, per destination queue (RabbitMQ: per delay queue).",
        "resilient_tasks_circuit_state": "Each circuit breaker's state now: 0 closed, "
        "1 half-open, 2 open.",
    }
)
#: Where the processes of a worker keep their counts (``prometheus_client``'s name for it).
_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_port(app: Celery) -> int | None:
    """The port :data:`PORT_SETTING` names, or ``None`` when it is unset; a clear
    :class:`~resilient_tasks.ConfigurationError` for anything but a port number.

    Example::

        app.conf.resilient_tasks_metrics_port = 9808
        metrics_port(app)  # 9808
        app.conf.resilient_tasks_metrics_port = "http"
        metrics_port(app)  # ConfigurationError: ... a port number from 1 to 65535 ...
    """
    value = app.conf.get(PORT_SETTING)
    if value is None or value == "":
        return None
    port: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        port = value
    elif isinstance(value, str) and value.strip().isdigit():
        port = int(value.strip())
    if port is None or not 1 <= port <= 65535:
        raise ConfigurationError(
            f"app setting {PORT_SETTING}={value!r}: expected a port number from 1 to 65535 to "
            "serve the Prometheus metrics on, or None (the default) to serve none"
        )
    return port


# -- what happened: counted in the process where it happened ---------------------------------------


def _task_name(fields: Mapping[str, Any]) -> str:
    """The task's name, from an event's ``task`` or its ``request`` (a worker ``Request``, a
    task's ``Context`` or a message's headers)."""
    name = getattr(fields.get("task"), "name", None)
    if isinstance(name, str):
        return name
    request = fields.get("request")
    if isinstance(request, Mapping):
        name = request.get("task")
    else:
        name = getattr(request, "task_name", None) or getattr(request, "task", None)
        name = getattr(name, "name", name)
    return name if isinstance(name, str) else "unknown"


class _Counts:
    """The counters and the histogram, fed by Celery's ``task_prerun`` and the library's
    events (:mod:`resilient_tasks._events`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import Counter, Histogram

        def counter(name: str, labels: tuple[str, ...]) -> Counter:
            short = name.removeprefix("resilient_tasks_").removesuffix("_total")
            return Counter(
                short, METRICS[name], labels, namespace="resilient_tasks", registry=registry
            )

        self.attempts = counter("resilient_tasks_task_attempts_total", ("task",))
        self.retries = counter("resilient_tasks_task_retries_total", ("task",))
        self.dead_letters = counter("resilient_tasks_task_dead_letters_total", ("task", "reason"))
        self.deferrals = counter("resilient_tasks_task_deferrals_total", ("task", "breaker"))
        self.retry_delays = Histogram(
            "retry_delay_seconds",
            METRICS["resilient_tasks_retry_delay_seconds"],
            ("task",),
            namespace="resilient_tasks",
            buckets=RETRY_DELAY_BUCKETS,
            registry=registry,
        )
        #: The dead-letter queues this process published to (for the depth gauge).
        self.dead_letter_queues: set[str] = set()

    def on_prerun(self, sender: Any = None, **_: Any) -> None:
        self.attempts.labels(getattr(sender, "name", None) or "unknown").inc()

    def on_event(self, event: str, fields: Mapping[str, Any]) -> None:
        if event == "task_retry_scheduled":
            task = _task_name(fields)
            self.retries.labels(task).inc()
            delay = fields.get("delay")
            if isinstance(delay, (int, float)):
                self.retry_delays.labels(task).observe(max(0.0, float(delay)))
        elif event == "task_dead_lettered":
            reason = fields.get("reason")
            self.dead_letters.labels(_task_name(fields), str(reason or "unknown")).inc()
            queue = fields.get("queue")
            if isinstance(queue, str):
                self.dead_letter_queues.add(queue)
        elif event == "task_deferred":
            self.deferrals.labels(_task_name(fields), str(fields.get("breaker"))).inc()


# -- what waits on the broker: measured at scrape time ---------------------------------------------


class _BrokerGauges:
    """A ``prometheus_client`` collector: the gauges measured on the broker when scraped, kept
    for :data:`GAUGE_CACHE_SECONDS`. A measure that fails (the broker is down) leaves its gauge
    without samples, logged, and does not fail the scrape."""

    def __init__(self, app: Celery, counts: _Counts, ttl: float = GAUGE_CACHE_SECONDS) -> None:
        self.app = app
        self.counts = counts
        self.ttl = ttl
        self._lock = threading.Lock()
        self._measured: list[Metric] = []
        self._at = -float("inf")

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # one measure at a time, shared by concurrent scrapes
            if time.monotonic() - self._at >= self.ttl:
                self._measured = self.measure()
                self._at = time.monotonic()
            measured = self._measured
        yield from measured

    def measure(self) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        def gauge(name: str, label: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, METRICS[name], labels=[label])

        depth = gauge("resilient_tasks_dead_letter_queue_depth", "queue")
        for queue, count in self._attempt("dead-letter queue depths", self._depths, []):
            depth.add_metric([queue], count)
        delayed = gauge("resilient_tasks_delayed_messages", "queue")
        for queue, count in self._attempt("delayed messages", self._delayed, []):
            delayed.add_metric([queue], count)
        circuit = gauge("resilient_tasks_circuit_state", "breaker")
        for breaker, state in self._attempt("circuit breaker states", self._circuits, []):
            circuit.add_metric([breaker], state)
        return [depth, delayed, circuit]

    def _attempt(self, what: str, measure: Any, default: Any) -> Any:
        try:
            return measure()
        except Exception as exc:
            logger.warning("resilient_tasks: metrics: could not measure the %s: %s", what, exc)
            return default

    def _depths(self) -> list[tuple[str, int]]:
        from .dlq.selection import dead_letter_queues, queue_depths

        # The registry is read once here, not again for every queue it names.
        seen = sorted(self.counts.dead_letter_queues)
        return list(queue_depths(self.app, [*dead_letter_queues(self.app), *seen]).items())

    def _delayed(self) -> list[tuple[str, int]]:
        from .delayed import delayed_stats

        return [(waiting.queue, waiting.waiting) for waiting in delayed_stats(self.app)]

    def _circuits(self) -> list[tuple[str, int]]:
        from ._fleet_state import state_for

        specs = {}
        for task in list(self.app.tasks.values()):
            spec = getattr(task, "circuit_breaker", None)
            if spec is not None:
                specs[spec.name] = spec
        if not specs:
            return []
        state = state_for(self.app)
        found = []
        for name, spec in sorted(specs.items()):
            reply = state.breaker(spec, "report")  # reports nothing: reads the state
            if reply is not None:
                found.append((name, CIRCUIT_STATES.get(reply.state, 0)))
        return found


# -- the worker ------------------------------------------------------------------------------------


_UID = "resilient_tasks.metrics"
#: The directories the workers make: ``<tmp>/resilient-tasks-metrics-<pid>-<random>``.
_DIR_PREFIX = "resilient-tasks-metrics-"
_LOCK = ".lock"


def _remove_stale_directories() -> None:
    """Remove the directories of workers that exited without removing theirs (SIGKILL): those
    whose lock no process holds any more (a worker holds its lock, through its main process
    and its pool children, as long as it runs; a lock is seen across containers too, where a
    process id is not)."""
    import fcntl

    for path in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*"):
        try:
            fd = os.open(path / _LOCK, os.O_RDWR)
        except OSError:  # no lock (yet), or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: that worker runs
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _hold_lock(directory: str) -> int:
    """Take the lock of the worker's directory, for as long as the worker runs."""
    import fcntl

    fd = os.open(os.path.join(directory, _LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


class _Exporter:
    """The metrics of one worker: set up in its main process before the pool forks."""

    def __init__(self, app: Celery, port: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, values
            from prometheus_client.multiprocess import MultiProcessCollector
        except ImportError:
            raise ConfigurationError(
                f"app setting {PORT_SETTING}={port!r}: serving metrics needs prometheus_client; "
                'install it with: pip install "resilient-tasks[prometheus]"'
            ) from None
        self.port = port
        self.pid = os.getpid()
        given = os.environ.get(_DIR_ENV)
        self.owned = not given
        if self.owned:
            _remove_stale_directories()
            self.directory = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{self.pid}-")
            _hold_lock(self.directory)
            os.environ[_DIR_ENV] = self.directory  # inherited by the pool's children
            atexit.register(self.remove_directory)
        else:  # the environment's own: the user wipes it between runs
            self.directory = str(given)
        if not getattr(values.ValueClass, "_multiprocess", False):
            # prometheus_client chose its value class at import, before the variable was set
            # (the app imported it first): the metrics made from now on count in the files.
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self.counts = _Counts(registry=None)  # served from the files, not from a registry
        self.registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(self.registry, path=self.directory)  # type: ignore[no-untyped-call]
        self.registry.register(_BrokerGauges(app, self.counts))
        self.server: Any = None
        self.thread: threading.Thread | None = None
        # One set of receivers per process: a second worker built in it (an embedded test
        # worker) replaces the first's, so that nothing is counted twice.
        for signal, receiver in (
            (signals.task_prerun, self.counts.on_prerun),
            (signals.worker_process_init, self._in_child),
            (signals.worker_process_shutdown, self._child_exits),
        ):
            signal.disconnect(dispatch_uid=_UID)
            signal.connect(receiver, weak=False, dispatch_uid=_UID)
        _events.listeners[:] = [
            listener
            for listener in _events.listeners
            if not isinstance(getattr(listener, "__self__", None), _Counts)
        ]
        _events.listeners.append(self.counts.on_event)

    def start(self) -> None:
        from prometheus_client import start_http_server

        try:
            self.server, self.thread = start_http_server(self.port, registry=self.registry)
        except OSError as exc:
            raise ConfigurationError(
                f"app setting {PORT_SETTING}={self.port}: cannot serve the metrics on that "
                f"port ({exc}); give each worker on a host a port of its own"
            ) from exc
        logger.info(
            "resilient_tasks: Prometheus metrics on http://0.0.0.0:%d/metrics (counted in %s)",
            self.port,
            self.directory,
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def _in_child(self, **_: Any) -> None:
        # A child forked while the endpoint runs holds a copy of its listening socket: let go
        # of it, so that the port is free as soon as the main process closes it.
        if self.server is not None:
            self.server.socket.close()
            self.server = None

    def _child_exits(self, pid: int | None = None, **_: Any) -> None:
        from prometheus_client import multiprocess

        # Only the "live" gauges of the exiting process are dropped; its counts stay summed.
        multiprocess.mark_process_dead(pid or os.getpid(), self.directory)  # type: ignore[no-untyped-call]

    def remove_directory(self) -> None:
        if os.getpid() == self.pid and self.owned:
            shutil.rmtree(self.directory, ignore_errors=True)


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """A step of the worker (not of its consumer): serves the metrics on the port
    :data:`PORT_SETTING` names; does nothing while it is unset.

    Library tasks add it to their app's worker steps when they are bound, so there is nothing
    to install by hand. The counting is set up when the worker is built, before its pool forks
    its children; the endpoint starts once the pool has started and stops with the worker.

    Example::

        app.conf.resilient_tasks_metrics_port = 9808   # celery -A proj worker: /metrics on 9808
        app.steps["worker"].add(MetricsStep)            # for an app without library tasks
    """

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.port = metrics_port(parent.app)

    def include_if(self, parent: Any) -> bool:
        return self.port is not None

    def create(self, parent: Any) -> _Exporter:
        assert self.port is not None  # include_if
        return _Exporter(parent.app, self.port)
