"""CPU time per task, by process: the worker's main process, its pool children and the broker.

``python -m benchmarks.cpu`` (not part of ``nox -s bench``; it gives the CPU budget in
``docs/benchmark-notes.md``: which process a failure's cost lands in, and how much is the
broker's). For each variant: a fresh queue, one
``celery worker -P prefork -c 2`` started on it and left idle for a second, then ``--tasks``
messages published and the CPU time (user + system, from ``/proc/<pid>/stat``) that each
process used from the first message published until the last task was done (for the
dead-lettering variant, until the last envelope was on the dead-letter queue). The broker is
found by its process name (``beam.smp``, ``redis-server``). The wall-clock rate includes the
publishing, which overlaps the work; the CPU per task is the figure to read.

Examples::

    python -m benchmarks.cpu                       # both brokers, every variant, 5000 tasks
    python -m benchmarks.cpu --brokers redis --tasks 2000

Prints a table and writes ``benchmarks/results/cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from . import ROOT, workload

#: label: (task, events connected (``"library"``: ``connect(plain_tasks=False)``), ends when
#: the dead-letter queue holds every envelope)
VARIANTS: dict[str, tuple[str, bool | str, bool]] = {
    "plain": ("bench.plain", False, False),
    "resilient": ("bench.resilient", True, False),
    "resilient_no_events": ("bench.resilient", False, False),
    "plain_events": ("bench.plain", True, False),
    "resilient_library_events": ("bench.resilient", "library", False),
    "plain_failing": ("bench.plain_failing", False, False),
    "failing_no_dlq": ("bench.failing_no_dlq", True, False),
    "failing": ("bench.failing", True, True),
    # Each fails once and succeeds on its retry a second later: two runs a task. Events off
    # for all three, as benchmarks.retrypath runs them, so that they compare alike.
    "retry_broker": ("bench.retry_once", False, False),
    "retry_worker": ("bench.retry_once_worker", False, False),
    "plain_autoretry": ("bench.plain_retry_once", False, False),
}
#: How many times each task of a variant runs.
RUNS = {"retry_broker": 2, "retry_worker": 2, "plain_autoretry": 2}


def measure(site: workload.Site, label: str, tasks: int) -> dict[str, Any]:
    task, events, until_dead_lettered = VARIANTS[label]
    brokers = workload.broker_pids(site.kind)
    with site.run(label, events=events) as run:
        worker = run.start()
        time.sleep(1.0)
        children = worker.pool_children()
        pids = {"main": [worker.process.pid], "children": children, "broker": brokers}
        before = {role: sum(map(workload.cpu_seconds, ps)) for role, ps in pids.items()}
        began = time.time()
        run.publish(task, tasks)
        if until_dead_lettered:
            run.wait_for_depth(f"{run.queue}.dlq", tasks, 120 + tasks / 10, "the dead letters")
        else:
            runs = RUNS.get(label, 1) * tasks
            run.wait(lambda: run.slots().count >= runs, 120 + runs / 10, f"{runs} runs of {task}")
        seconds = time.time() - began
        used = {
            role: sum(map(workload.cpu_seconds, ps)) - before[role] for role, ps in pids.items()
        }
    per_task_ms = {role: 1000 * value / tasks for role, value in used.items()}
    return {
        "task": task,
        "tasks": tasks,
        "events": events,
        "per_second_with_publishing": tasks / seconds,
        "cpu_seconds": used,
        "cpu_ms_per_task": {**per_task_ms, "total": sum(per_task_ms.values())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__)
    parser.add_argument("--brokers", default="rabbitmq,redis", help="comma-separated")
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sites, skipped = workload.available([b for b in args.brokers.split(",") if b])
    for kind, why in skipped.items():
        print(f"{kind}: skipped ({why})")
    results: dict[str, dict[str, Any]] = {}
    try:
        for kind, site in sites.items():
            results[kind] = {}
            for label in args.variants.split(","):
                result = results[kind][label] = measure(site, label, args.tasks)
                ms = result["cpu_ms_per_task"]
                print(
                    f"{kind:8} {label:15} {result['per_second_with_publishing']:7,.0f}/s  CPU ms "
                    f"per task: main {ms['main']:.2f}, pool children {ms['children']:.2f}, "
                    f"broker {ms['broker']:.2f}, total {ms['total']:.2f}",
                    flush=True,
                )
    finally:
        for site in sites.values():
            site.close()
    out = ROOT / "benchmarks" / "results" / "cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tasks": args.tasks, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
