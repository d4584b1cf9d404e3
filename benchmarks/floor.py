"""The floor under any failure-path figure: what Celery's own tracer spends on a task that fails,
against one that succeeds, with no library at all, on the Python that runs it.

``python -m benchmarks.floor`` (not part of ``nox -s bench``; ``nox -s floor`` runs it on
every Python that nox finds). A plain ``celery.Task`` that returns and one that raises, each
run through ``celery.app.trace.build_tracer`` as a pool child runs it (after Celery's
``setup_worker_optimizations``), ``--calls`` calls per repeat, ``--repeats`` repeats in
alternating order, medians. Then the parts of a failure, timed the same way on the traceback
of one failed call:

* ``einfo``: billiard's ``ExceptionInfo``, which Celery builds for every failure: the traceback
  as text (``traceback.format_exception``) and a picklable copy of every frame;
* ``frame copy``: billiard's ``Traceback`` alone. On Python 3.11 and later each frame's copy
  holds its code object's whole position table (``co_positions()``), and Celery's tracer
  function has thousands of positions;
* ``format``: ``traceback.format_exception`` alone. Celery formats the traceback twice: once
  in ``ExceptionInfo``, once more for its error log line;
* ``pickle``: the ``ExceptionInfo`` pickled (the pool child, sending it) and unpickled (the
  worker's main process, which sets the pace of a prefork worker);

and the same failure on a ``ResilientTask`` (``Permanent``, no events), whose
``ExceptionInfo`` crosses the pipe without its frames (``resilient_tasks._einfo``).

Example::

    python -m benchmarks.floor
    PYENV_VERSION=3.11.7:3.10.13:3.12.1:3.13.0 nox -s floor

Prints a table and writes ``benchmarks/results/floor-<python>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import platform
import statistics
import sys
import time
from collections.abc import Callable
from traceback import format_exception
from typing import Any

import celery
from billiard.einfo import ExceptionInfo, Traceback
from celery import Celery, signals
from celery.app.trace import setup_worker_optimizations

from resilient_tasks import Permanent, ResilientTask, RetryPolicy

from . import ROOT, inprocess


def succeeds(n: int) -> None:
    """The success path's body."""


def fails(n: int) -> None:
    """Celery's own failure path: a plain task that raises."""
    raise LookupError(f"record {n} is gone")


def gives_up(n: int) -> None:
    """The library's: a ``ResilientTask`` that gives up at once."""
    raise Permanent(LookupError(f"record {n} is gone"))


def make_calls() -> dict[str, Callable[[], Any]]:
    """One tracer call per variant, with a request as a worker builds it."""
    app = Celery("bench-floor", set_as_current=False)
    app.conf.update(broker_url="memory://", result_backend=None, task_ignore_result=True)
    plain = {"ignore_result": True, "shared": False, "acks_late": True}
    tasks = {
        "success": app.task(name="floor.success", **plain)(succeeds),
        "failure": app.task(name="floor.failure", **plain)(fails),
        "resilient_failure": app.task(
            base=ResilientTask,
            name="floor.resilient_failure",
            ignore_result=True,
            shared=False,
            retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=5),
        )(gives_up),
    }
    app.finalize()
    setup_worker_optimizations(app, inprocess.HOSTNAME)
    return {name: inprocess.tracer_call(app, app.tasks[task.name]) for name, task in tasks.items()}


def _traced(call: Callable[[], Any]) -> Callable[[], Any]:
    """The call, with what crosses the pool's pipe: pickled by the child, unpickled by the main
    process."""

    def round_trip() -> Any:
        return pickle.loads(pickle.dumps(call()))

    return round_trip


def _parts(failure: Callable[[], Any]) -> tuple[dict[str, Callable[[], Any]], int]:
    """The parts of one failure, on the traceback the tracer saw (as Celery's ``task_failure``
    hands it to its receivers), and how many bytes its ``ExceptionInfo`` pickles to."""
    seen: dict[str, Any] = {}

    def keep(exception: BaseException, traceback: Any, **_: Any) -> None:
        seen["exc_info"] = (type(exception), exception, traceback)

    signals.task_failure.connect(keep, weak=False)
    try:
        einfo = failure()[0]  # the tracer's return: (ExceptionInfo, ...)
    finally:
        signals.task_failure.disconnect(keep)
    exc_info = seen["exc_info"]
    return {
        "einfo": lambda: ExceptionInfo(exc_info=exc_info),
        "frame copy": lambda: Traceback(exc_info[2]),
        "format": lambda: format_exception(*exc_info),
        "pickle": lambda: pickle.loads(pickle.dumps(einfo)),
    }, len(pickle.dumps(einfo))


def per_call_us(call: Callable[[], Any], calls: int) -> float:
    began = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - began) / calls * 1e6


def measure(calls: int, repeats: int) -> dict[str, Any]:
    # Celery's error line is built and formatted as on a worker, and written nowhere.
    root = logging.getLogger()
    root.handlers[:] = [logging.StreamHandler(open(os.devnull, "w"))]  # noqa: SIM115
    root.setLevel(logging.WARNING)
    traced = make_calls()
    timed = {
        "success": _traced(traced["success"]),
        "failure": _traced(traced["failure"]),
        "resilient_failure": _traced(traced["resilient_failure"]),
        "failure in the child": traced["failure"],
    }
    parts, sent_bytes = _parts(traced["failure"])
    timed.update(parts)
    samples: dict[str, list[float]] = {name: [] for name in timed}
    names = list(timed)
    for name in names:  # warm-up
        per_call_us(timed[name], max(1, calls // 10))
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            samples[name].append(per_call_us(timed[name], calls))
    us = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "python": platform.python_version(),
        "celery": celery.__version__,
        "calls": calls,
        "repeats": repeats,
        "us_per_call": us,
        "pickled_einfo_bytes": sent_bytes,
        "failure_over_success": us["failure"] / us["success"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    result = measure(args.calls, args.repeats)
    print(f"Python {result['python']}, Celery {result['celery']}: µs per call, medians")
    for name, value in result["us_per_call"].items():
        print(f"  {name:22} {value:9.1f}")
    print(f"  a failure costs the tracer {result['failure_over_success']:.0f} successes;"
          f" the ExceptionInfo it sends is {result['pickled_einfo_bytes']:,} bytes")  # fmt: skip
    out = ROOT / "benchmarks" / "results" / f"floor-{result['python']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
