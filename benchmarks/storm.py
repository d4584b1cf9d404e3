"""The retry storm, with the retries waiting on the broker against Celery's own, held by the
worker: ``python -m benchmarks.storm``.

``--tasks`` tasks fail once and are each retried an hour later: the library's ``bench.storm``
(a ``ResilientTask``, whose delayed retries wait on the broker where ``delayed_delivery`` is
``"broker"``) and Celery's own autoretry ``bench.plain_storm`` (an ETA message, held by the
worker that receives it). For each: how many retries the worker holds, the growth of its main
process's memory, and how long ordinary tasks published after the storm wait
(:func:`benchmarks.workload.retry_storm`).

Example::

    python -m benchmarks.storm --brokers redis --tasks 3000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import workload

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"library": "bench.storm", "Celery autoretry": "bench.plain_storm"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storm", description=__doc__)
    parser.add_argument("--brokers", default="redis", help="comma-separated: redis, rabbitmq")
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--hold-timeout", type=float, default=60.0, help="seconds to wait for "
                        "the worker to pull the retries in before measuring")  # fmt: skip
    args = parser.parse_args(argv)
    sites, skipped = workload.available(args.brokers.split(","))
    for kind, why in skipped.items():
        print(f"{kind}: skipped ({why})")
    figures: dict[str, dict[str, object]] = {}
    try:
        for kind, site in sites.items():
            for label, task in VARIANTS.items():
                result = workload.retry_storm(site, args.tasks, 200, args.hold_timeout, 20, task)
                figures[f"{kind}, {label}"] = result
                print(
                    f"{kind:8} {label:17} held in the worker {result['held_in_worker']:>5}  "
                    f"waiting on the broker {result['delayed_on_broker']:>5}  "
                    f"main process +{result['main_growth_kib'] / 1024:5.1f} MiB  "
                    f"probes waited {_seconds(result['probe_wait_seconds'])}"
                )
    finally:
        for site in sites.values():
            site.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "storm.json").write_text(json.dumps(figures, indent=2, default=str))
    return 0


def _seconds(value: object) -> str:
    return f"{value:.1f} s" if isinstance(value, float) else "never (within the timeout)"


if __name__ == "__main__":
    raise SystemExit(main())
