"""The retry path's throughput: tasks that fail once and succeed a second later, with the
retry waiting on the broker, held by the worker, and Celery's own autoretry:
``python -m benchmarks.retrypath``.

For each variant, ``--tasks`` tasks are published, then one worker (``-c 2``) runs them: a
first attempt that raises ``ConnectionError``, a retry a second later that succeeds. The figure
is tasks per second from the first attempt to the last retry done (median of ``--rounds``).

Example::

    python -m benchmarks.retrypath --brokers rabbitmq,redis --tasks 3000 --rounds 3

``--broker-own-core`` puts the brokers on one CPU core and the workers on the others, so the
broker's work no longer comes out of the worker's CPU, as with a broker on a host of its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from . import workload

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "library, retry on the broker": "bench.retry_once",
    "library, retry held by the worker": "bench.retry_once_worker",
    "Celery autoretry": "bench.plain_retry_once",
}


def retry_path(site: workload.Site, task: str, tasks: int) -> dict[str, Any]:
    """Tasks per second of ``tasks`` x ``task``, each attempted twice."""
    with site.run(task.rsplit(".", 1)[-1]) as run:
        run.publish(task, tasks)
        run.start()
        run.wait(
            lambda: run.slots().count >= 2 * tasks,
            workload._timeout(2 * tasks) + 30,
            f"{tasks} x {task}, twice",
        )
        slots = run.slots()
    seconds = slots.last - slots.first
    return {"task": task, "tasks": tasks, "seconds": seconds, "per_second": tasks / seconds}


def measure(site: workload.Site, kind: str, tasks: int, rounds: int) -> dict[str, Any]:
    """Each variant ``rounds`` times, interleaved so that drift hits every variant alike;
    the median per variant and its ratio to Celery's autoretry, printed as they come."""
    samples: dict[str, list[float]] = {label: [] for label in VARIANTS}
    for _ in range(rounds):
        for label, task in VARIANTS.items():
            samples[label].append(retry_path(site, task, tasks)["per_second"])
    base = statistics.median(samples["Celery autoretry"])
    figures: dict[str, Any] = {}
    for label, values in samples.items():
        median = statistics.median(values)
        figures[f"{kind}, {label}"] = {"per_second": values, "median": median,
                                       "against_celery": median / base}  # fmt: skip
        print(f"{kind:8} {label:34} {median:7.0f} tasks/s  "
              f"x{median / base:4.2f} of Celery's autoretry  "
              f"(rounds: {', '.join(f'{v:.0f}' for v in values)})", flush=True)  # fmt: skip
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retrypath", description=__doc__)
    parser.add_argument("--brokers", default="rabbitmq,redis", help="comma-separated")
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--broker-own-core",
        action="store_true",
        help="the brokers on one CPU core, the workers on the others (as on a broker host)",
    )
    args = parser.parse_args(argv)
    sites, skipped = workload.available(args.brokers.split(","))
    for kind, why in skipped.items():
        print(f"{kind}: skipped ({why})")
    figures: dict[str, Any] = {}
    pinned = workload.broker_on_own_core(list(sites)) if args.broker_own_core else nullcontext()
    try:
        with pinned as placed:
            if placed:
                print(placed)
            for kind, site in sites.items():
                figures.update(measure(site, kind, args.tasks, args.rounds))
    finally:
        for site in sites.values():
            site.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "retrypath.json").write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
