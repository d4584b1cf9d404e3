"""How late a delayed task starts against its due time: ``python -m benchmarks.lateness``.

``--tasks`` tasks are published through the task class with a countdown spread over
``--spread`` seconds, to a worker on the broker, once with ``delayed_delivery="broker"`` (they
wait on the broker and are moved to the queue when due) and once with ``"worker"`` (Celery's
ETA message, held by the worker). Each task records when it started; the lateness is that
start minus the ``eta`` its message carries. Prints p50, p99 and the maximum, in milliseconds.

Example::

    python -m benchmarks.lateness --brokers redis --tasks 500
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from datetime import datetime

from apps.delayed_tasks import define

from . import workload

MODES = ("broker", "worker")


def lateness(site: workload.Site, mode: str, tasks: int, spread: float) -> list[float]:
    """Seconds each of ``tasks`` delayed tasks started after its due time."""
    queue = site.broker.queue_name(f"late-{mode}")
    settings = {"resilient_tasks_delayed_delivery": mode}
    worker = site.runner.start("apps.delayed_app", queues=[queue], settings=settings)
    try:
        note = define(worker.client)["delayed.note"]
        log = str(worker.log)
        for _ in range(tasks):
            note.apply_async((log,), countdown=1.0 + random.uniform(0, spread))
        deadline = time.monotonic() + spread + 60
        while len(worker.attempts()) < tasks and time.monotonic() < deadline:
            time.sleep(0.5)
        attempts = worker.attempts()
    finally:
        site.runner.stop(worker, timeout=5)
        site.broker.cleanup([queue])
    return [a["t"] - datetime.fromisoformat(a["eta"]).timestamp() for a in attempts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lateness", description=__doc__)
    parser.add_argument("--brokers", default="redis", help="comma-separated: redis, rabbitmq")
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--spread", type=float, default=10.0, help="seconds the due times span")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: broker, worker")
    args = parser.parse_args(argv)
    sites, skipped = workload.available(args.brokers.split(","))
    for kind, why in skipped.items():
        print(f"{kind}: skipped ({why})")
    try:
        for kind, site in sites.items():
            for mode in args.modes.split(","):
                late = sorted(lateness(site, mode, args.tasks, args.spread))
                if not late:
                    print(f"{kind:8} {mode:6} no task ran")
                    continue
                p99 = late[min(len(late) - 1, int(len(late) * 0.99))]
                print(
                    f"{kind:8} {mode:6} {len(late)} of {args.tasks} ran; lateness ms: "
                    f"p50 {statistics.median(late) * 1000:7.1f}  p99 {p99 * 1000:7.1f}  "
                    f"max {late[-1] * 1000:7.1f}  earliest {late[0] * 1000:7.1f}"
                )
    finally:
        for site in sites.values():
            site.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
