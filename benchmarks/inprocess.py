"""The in-process cost per task of the library's hooks, through Celery's own tracer.

Each variant is the same no-op task; each is run through ``celery.app.trace.build_tracer`` (the
function a prefork pool child calls for every message) with a request built as the worker builds
it (protocol 2 headers, delivery info, hostname), ``iterations`` times in a loop, after Celery's
``setup_worker_optimizations`` as in a pool child. Repeats
alternate the order of the variants; the figures are medians over repeats.

Variants:

* ``plain``: a ``celery.Task`` with ``acks_late`` and ``reject_on_worker_lost``;
* ``custom_call``: the same with a ``__call__`` that only calls ``super().__call__``. Celery's
  tracer calls ``task.run`` directly unless the class overrides ``__call__``; then it calls the
  task, and ``Task.__call__`` (in a worker, Celery's stack-protected version of it) calls
  ``run``. This variant isolates what any ``__call__`` override costs, whoever writes it;
* ``resilient``: a ``ResilientTask`` with a ``RetryPolicy``;
* ``resilient_events``: the same after ``resilient_tasks.observability.configure_logging()``
  and ``connect()``, when that module exists, with a root logger at INFO writing to
  ``os.devnull``: every ``task_started`` / ``task_succeeded`` event is built and rendered as
  JSON, and the write costs nothing. Events hang on Celery's signals, which fire for every task
  of the process, so this phase runs last and ``plain_events`` (the plain task with events on)
  is measured beside it; then both again with the root logger at WARNING
  (``events_not_logged``: the events connected, their lines filtered out, as on a worker at
  ``--loglevel=WARNING``).
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery, Task, signals
from celery.app.trace import (
    build_tracer,
    reset_worker_optimizations,
    setup_worker_optimizations,
)

from resilient_tasks import ResilientTask, RetryPolicy

HOSTNAME = "bench@localhost"
POLICY = RetryPolicy(retry_on=(ConnectionError, TimeoutError), max_attempts=5)


def noop(n: int) -> None:
    """The task body."""


class CustomCall(Task):  # type: ignore[misc]
    """A plain task whose ``__call__`` only defers to Celery's."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs)


def make_app() -> tuple[Celery, dict[str, Task]]:
    app = Celery("bench-inprocess", set_as_current=False)
    app.conf.update(broker_url="memory://", result_backend=None, task_ignore_result=True)
    common = {"ignore_result": True, "shared": False}
    tasks = {
        "plain": app.task(name="bench.plain", acks_late=True, reject_on_worker_lost=True, **common)(
            noop
        ),
        "custom_call": app.task(
            base=CustomCall,
            name="bench.custom_call",
            acks_late=True,
            reject_on_worker_lost=True,
            **common,
        )(noop),
        "resilient": app.task(
            base=ResilientTask, name="bench.resilient", retry_policy=POLICY, **common
        )(noop),
    }
    app.finalize()
    # app.task() hands back a proxy until the app is finalized; a worker's tracer gets the task
    # itself (from app.tasks), and a proxy would add a layer to every call of a task that has a
    # __call__ of its own.
    return app, {label: app.tasks[task.name] for label, task in tasks.items()}


def tracer_call(app: Celery, task: Task) -> Callable[[], Any]:
    """One call of the worker's tracer for ``task``, with a request as a worker builds it."""
    tracer = build_tracer(task.name, task, app=app, hostname=HOSTNAME)
    task_id = str(uuid.uuid4())
    args: tuple[Any, ...] = (1,)
    kwargs: dict[str, Any] = {}
    message = app.amqp.as_task_v2(task_id, task.name, args=args, kwargs=kwargs)
    request = {
        **message.headers,
        "delivery_info": {
            "exchange": "",
            "routing_key": "bench",
            "priority": 0,
            "redelivered": False,
        },
        "reply_to": None,
        "correlation_id": task_id,
        "hostname": HOSTNAME,
        "is_eager": False,
        "args": args,
        "kwargs": kwargs,
    }

    def call() -> Any:
        return tracer(task_id, args, kwargs, request)

    return call


def per_task_us(call: Callable[[], Any], iterations: int) -> float:
    gc.collect()
    began = time.perf_counter()
    for _ in range(iterations):
        call()
    return (time.perf_counter() - began) / iterations * 1e6


def _phase(
    calls: dict[str, Callable[[], Any]], iterations: int, repeats: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for name in names:  # warm-up
        per_task_us(calls[name], max(1, iterations // 10))
    for repeat in range(repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(per_task_us(calls[name], iterations))
    return samples


def _delta(samples: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x - y for x, y in zip(samples[a], samples[b], strict=True))


def _events_on(*, plain_tasks: bool = True) -> bool:
    """Events connected (``connect(plain_tasks=...)``) and rendered as JSON into a handler that
    writes to ``os.devnull``."""
    try:
        from resilient_tasks import observability
    except ImportError:
        return False
    observability.configure_logging(json=True)
    root = logging.getLogger()
    root.handlers[:] = [logging.StreamHandler(open(os.devnull, "w"))]  # noqa: SIM115
    root.setLevel(logging.INFO)
    signals.after_setup_logger.send(
        sender=None, logger=root, loglevel=logging.INFO, logfile=None, format="", colorize=False
    )
    observability.connect(plain_tasks=plain_tasks)
    return True


def _events_phase(
    calls: dict[str, Callable[[], Any]], iterations: int, repeats: int
) -> dict[str, list[float]]:
    return _phase(
        {"plain_events": calls["plain"], "resilient_events": calls["resilient"]},
        iterations,
        repeats,
    )


def _events_figures(samples: dict[str, list[float]], plain_us: float) -> dict[str, Any]:
    return {
        "us_per_task": {name: statistics.median(v) for name, v in samples.items()},
        "library_overhead_us": _delta(samples, "resilient_events", "plain_events"),
        "vs_plain_without_events_us": statistics.median(samples["resilient_events"]) - plain_us,
        "plain_vs_plain_without_events_us": statistics.median(samples["plain_events"]) - plain_us,
    }


def measure(iterations: int = 20_000, repeats: int = 15) -> dict[str, Any]:
    app, tasks = make_app()
    # As in a prefork pool child: Celery's worker optimizations (its stack-protected
    # Task.__call__ among them), undone when the measurement is over.
    setup_worker_optimizations(app, HOSTNAME)
    try:
        return _measure(app, tasks, iterations, repeats)
    finally:
        reset_worker_optimizations(app)


def _measure(app: Celery, tasks: dict[str, Task], iterations: int, repeats: int) -> dict[str, Any]:
    calls = {name: tracer_call(app, task) for name, task in tasks.items()}
    samples = _phase(calls, iterations, repeats)
    result: dict[str, Any] = {
        "iterations": iterations,
        "repeats": repeats,
        "us_per_task": {name: statistics.median(v) for name, v in samples.items()},
        "library_overhead_us": _delta(samples, "resilient", "plain"),
        "custom_call_overhead_us": _delta(samples, "custom_call", "plain"),
        "library_own_code_us": _delta(samples, "resilient", "custom_call"),
        "samples": samples,
    }
    if not _events_on():
        result["events"] = "resilient_tasks.observability is not importable: events not measured"
        return result
    events = _events_phase(calls, iterations, repeats)
    result["events"] = {
        **_events_figures(events, result["us_per_task"]["plain"]),
        "samples": events,
    }
    # The same with nothing logged (a worker at --loglevel=WARNING): what connecting the events
    # costs a task when their lines are filtered out.
    logging.getLogger().setLevel(logging.WARNING)
    quiet = _events_phase(calls, iterations, repeats)
    result["events_not_logged"] = _events_figures(quiet, result["us_per_task"]["plain"])
    return result


if __name__ == "__main__":
    import json

    print(json.dumps({k: v for k, v in measure(5_000, 5).items() if k != "samples"}, indent=2))
