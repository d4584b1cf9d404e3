"""Instructions per task, counted by Valgrind's callgrind: a cost that does not move with the
machine's load, so that variants differing by a fraction of a percent can be told apart.

Not part of ``nox -s bench``: it needs ``valgrind``, under which a program runs many times
slower. Three places to count:

* ``inprocess``: Celery's tracer in one process, as :mod:`benchmarks.inprocess` runs it,
  ``--tasks`` calls less none (so the imports and the set-up cancel out). It splits the cost
  by part:

  - ``plain``, ``resilient``: the task without events;
  - ``plain_receivers``: the plain task with a no-op receiver on ``task_prerun`` and
    ``task_postrun``, i.e. what Celery's own signal dispatch costs a task once anything listens;
  - ``resilient_events``, ``plain_events``: after ``configure_logging()`` and ``connect()``,
    the log level at WARNING (the events built and filtered out, as on a worker at
    ``--loglevel=WARNING``);
  - ``resilient_library_events``: the resilient task after ``connect(plain_tasks=False)``
    (no ``task_prerun`` / ``task_postrun`` receivers), at WARNING;
  - ``resilient_events_logged``: the same as ``resilient_events`` at INFO, every event
    rendered as JSON into ``os.devnull``.

* ``steps``: what each of the library's steps costs a ``resilient_library_events`` task
  (``connect(plain_tasks=False)``, at WARNING) in the tracer, counted with the garbage
  collector off (its passes would move the small differences): the task whole, then with one
  step taken out at a time (:data:`STEPS`), and the plain task.

* ``worker`` (the slowest: a whole worker under callgrind, twice a variant): a real
  ``celery worker -P prefork -c 2`` on the broker (the main process and both pool children,
  every file callgrind writes), run once with ``--warmup`` tasks and once with ``--warmup`` +
  ``--tasks``, started after the messages are published and stopped warm once the last is
  done; the difference over ``--tasks``.
  Variants: ``plain``, ``resilient`` (events connected), ``resilient_no_events``,
  ``plain_events``, ``resilient_library_events`` (``connect(plain_tasks=False)``), as in
  :mod:`benchmarks.cpu`. It reports the main process apart (valgrind
  runs the program in the process it was started as, so its file has the worker's pid). The
  broker's own work is not counted.

Both run Python with ``PYTHONHASHSEED=0``; repeated counts agree to a few tenths of a percent.

Examples::

    python -m benchmarks.instructions inprocess
    python -m benchmarks.instructions worker --broker rabbitmq --variants plain,resilient
    python -m benchmarks.instructions steps

Prints a table and writes ``benchmarks/results/instructions-<where>.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import ROOT, cpu, workload

INPROCESS = (
    "plain",
    "resilient",
    "plain_receivers",
    "resilient_events",
    "plain_events",
    "resilient_library_events",
    "resilient_events_logged",
)
#: The success-path variants of benchmarks.cpu, whose (task, events connected) it names.
WORKER = ("plain", "resilient", "resilient_no_events", "plain_events", "resilient_library_events")
_TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def valgrind(out: Path) -> tuple[str, ...]:
    """The command prefix that runs a program under callgrind, one output file per process."""
    found = shutil.which("valgrind")
    if found is None:
        raise SystemExit("python -m benchmarks.instructions needs valgrind on the PATH")
    return (found, "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.%p.out")


def counted(folder: Path) -> dict[int, int]:
    """The instructions of every process callgrind wrote a file for in ``folder``, by pid."""
    totals: dict[int, int] = {}
    for path in folder.glob("callgrind.*.out"):
        found = _TOTAL.search(path.read_bytes())
        if found is None:
            raise RuntimeError(f"{path} has no total: did the process end before callgrind did?")
        totals[int(path.name.split(".")[1])] = int(found.group(1))
    return totals


# -- in one process --------------------------------------------------------------------------


#: The steps ``steps`` takes out one at a time, and what taking each out leaves.
STEPS = {
    "binding": "the seven CONTEXT_KEYS not bound in structlog's contextvars",
    "attempt": "no attempt_started nor running id (two ContextVars)",
    "after_return": "no after_return (where task_succeeded is logged)",
    "started": "no task_started step (its clock and the level check)",
}


def _take_out(step: str) -> None:
    """Take ``step`` (one of :data:`STEPS`) out of the library, in this process only."""
    from resilient_tasks import _steps, observability

    if step == "binding":
        observability._bind_keys = lambda described: ()
    elif step == "attempt":

        def before(self: Any, request: Any) -> tuple[None, None, Any]:
            return None, None, self._step_bind(request)

        def after(self: Any, started: tuple[Any, Any, Any]) -> None:
            if started[2] is not None:
                self._step_unbind(started[2])

        _steps.StepsMixin._step_before = before
        _steps.StepsMixin._step_after = after
    elif step == "after_return":
        del observability.ObservabilityMixin.after_return
    elif step == "started":
        observability._started = lambda described: None
    elif step:
        raise SystemExit(f"unknown step {step!r}; the steps are {', '.join(STEPS)}")


def loop(variant: str, calls: int, without: str = "") -> None:
    """What runs under callgrind: the variant's set-up, a warm-up, then ``calls`` calls;
    ``without`` a step (``steps``), with the garbage collector off."""
    from celery import signals
    from celery.app.trace import setup_worker_optimizations

    from . import inprocess

    if without:
        gc.disable()
        _take_out("" if without == "-" else without)
    app, tasks = inprocess.make_app()
    setup_worker_optimizations(app, inprocess.HOSTNAME)
    call = inprocess.tracer_call(app, tasks[variant.split("_", 1)[0]])
    if variant == "plain_receivers":
        for signal in (signals.task_prerun, signals.task_postrun):
            signal.connect(_nothing, weak=False)
    elif "events" in variant:
        inprocess._events_on(plain_tasks="library" not in variant)
        if not variant.endswith("logged"):
            logging.getLogger().setLevel(logging.WARNING)
    for _ in range(300):
        call()
    for _ in range(calls):
        call()


def _nothing(**_: Any) -> None:
    """A receiver that does nothing."""


def inprocess_counts(variants: list[str], calls: int, without: str = "") -> dict[str, float]:
    results: dict[str, float] = {}
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for variant in variants:
        totals = []
        for n in (0, calls):
            with tempfile.TemporaryDirectory(prefix="rt-callgrind-") as tmp:
                program = (sys.executable, "-m", "benchmarks.instructions", "_loop", variant)
                subprocess.run(
                    [*valgrind(Path(tmp)), *program, str(n), *([without] if without else [])],
                    cwd=ROOT,
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                totals.append(sum(counted(Path(tmp)).values()))
        results[variant] = (totals[1] - totals[0]) / calls
        label = f"{variant} without {without}" if without not in ("", "-") else variant
        print(f"inprocess {label:40} {results[variant]:10,.0f} instructions a task", flush=True)
    return results


def step_counts(calls: int) -> dict[str, float]:
    """``steps``: the events task whole and without each step, and plain, collector off."""
    variant = "resilient_library_events"
    whole = inprocess_counts([variant], calls, "-")[variant]
    plain = inprocess_counts(["plain"], calls, "-")["plain"]
    costs = {"plain": plain, variant: whole}
    for step in STEPS:
        left = inprocess_counts([variant], calls, step)[variant]
        costs[f"step {step}"] = whole - left
    print(f"{variant} over plain: {whole - plain:+,.0f} instructions a task; by step:")
    for step, meaning in STEPS.items():
        print(f"  {step:14} {costs[f'step {step}']:+9,.0f}  (without it: {meaning})")
    return costs


# -- a real worker ---------------------------------------------------------------------------


def worker_counts(
    kind: str, variants: list[str], warmup: int, tasks: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Instructions per task of the whole worker and of its main process alone, by variant."""
    os.environ["PYTHONHASHSEED"] = "0"  # the worker inherits the environment
    sites, skipped = workload.available([kind])
    if kind in skipped:
        raise SystemExit(f"{kind}: {skipped[kind]}")
    site = sites[kind]
    results: dict[str, float] = {}
    main: dict[str, float] = {}
    try:
        site.runner.ready_timeout = 600.0
        for variant in variants:
            task, events, _ = cpu.VARIANTS[variant]
            (total0, main0), (total1, main1) = (
                _worker_run(site, variant, task, events, n) for n in (warmup, warmup + tasks)
            )
            results[variant] = (total1 - total0) / tasks
            main[variant] = (main1 - main0) / tasks
            print(
                f"{kind} {variant:22} {results[variant]:12,.0f} instructions a task,"
                f" {main[variant]:10,.0f} of them in the main process",
                flush=True,
            )
    finally:
        site.runner.launcher = ()
        site.close()
    return results, main


def _worker_run(
    site: workload.Site, label: str, task: str, events: bool | str, count: int
) -> tuple[int, int]:
    """Instructions of a worker that ran ``count`` tasks: in all, and in its main process."""
    out = Path(tempfile.mkdtemp(prefix="rt-callgrind-", dir=site.tmp))
    site.runner.launcher = valgrind(out)
    with site.run(label, events=events) as run:
        run.publish(task, count)
        worker = run.start()
        run.wait(lambda: run.slots().count >= count, 600 + count, f"{count} x {task}")
        # Warm shutdown, with the time callgrind needs to write its files.
        site.runner.stop(worker, timeout=600)
        run.worker = None
    totals = counted(out)  # valgrind runs the program in its own process: the pid is the worker's
    return sum(totals.values()), totals[worker.process.pid]


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["_loop"]:
        loop(args_list[1], int(args_list[2]), *args_list[3:4])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    parser.add_argument("where", choices=("inprocess", "steps", "worker"))
    parser.add_argument("--variants", help="comma-separated (default: all of that place)")
    parser.add_argument("--tasks", type=int, help="inprocess: 2000 calls; worker: 1000 tasks")
    parser.add_argument("--warmup", type=int, default=100, help="worker: tasks of the base run")
    parser.add_argument("--broker", default="rabbitmq", help="worker: rabbitmq or redis")
    args = parser.parse_args(args_list)
    record: dict[str, Any] = {"where": args.where}
    if args.where == "inprocess":
        variants = args.variants.split(",") if args.variants else list(INPROCESS)
        results = inprocess_counts(variants, args.tasks or 2000)
    elif args.where == "steps":
        results = step_counts(args.tasks or 2000)
    else:
        variants = args.variants.split(",") if args.variants else list(WORKER)
        results, main_process = worker_counts(
            args.broker, variants, args.warmup, args.tasks or 1000
        )
        record["main_process"] = main_process
        record["broker"] = args.broker
    base = results.get("plain")
    if base and args.where != "steps":
        for variant, value in results.items():
            print(f"{variant:24} {value / base:6.3f} of plain, {value - base:+10,.0f}")
    out = ROOT / "benchmarks" / "results" / f"instructions-{args.where}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record["per_task"] = results
    out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
