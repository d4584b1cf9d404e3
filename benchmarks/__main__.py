"""``python -m benchmarks`` (what ``nox -s bench`` runs): every benchmark, then the report.

Examples::

    nox -s bench                                  # the figures in docs/benchmarks.md
    nox -s bench -- --quick --note "smoke run"    # small sizes, to see that everything runs
    nox -s bench -- --brokers rabbitmq --rounds 7 --loglevel INFO

Writes ``benchmarks/results/latest.json`` (every sample; git-ignored), ``docs/benchmarks.json``
(the summary), ``docs/img/benchmarks.png`` and the figures section of ``docs/benchmarks.md``
(``--no-docs`` leaves the docs alone).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
import traceback
from contextlib import nullcontext
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

from . import ROOT, inprocess, profiling, report, retrypath, workload

RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--brokers", default="rabbitmq,redis", help="comma-separated")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per throughput run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=9,
        help="rounds of the success variants (a round's ratio is noisy on shared cores: the "
        "median of many is steadier)",
    )
    parser.add_argument(
        "--failure-rounds",
        type=int,
        default=5,
        help="how many of the rounds also run the failure path and replay",
    )
    parser.add_argument("--storm-tasks", type=int, default=10_000, help="0 skips the storm")
    parser.add_argument(
        "--retry-tasks", type=int, default=3000, help="tasks per retry-path run; 0 skips it"
    )
    parser.add_argument(
        "--storm-hold-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the worker to pull every retry in before measuring",
    )
    parser.add_argument(
        "--storm-compare",
        action="store_true",
        help="also run the storm with Celery's own autoretry (a plain celery.Task)",
    )
    parser.add_argument("--inprocess-iterations", type=int, default=20_000)
    parser.add_argument("--inprocess-repeats", type=int, default=15)
    parser.add_argument("--loglevel", default="WARNING", help="the workers' --loglevel")
    parser.add_argument("--no-replay", action="store_true")
    parser.add_argument(
        "--success-only",
        action="store_true",
        help="only the success variants (for a longer, steadier ratio: --tasks 20000 --rounds 9)",
    )
    parser.add_argument(
        "--only-ratio",
        action="store_true",
        help="only plain and resilient, the two variants of the ratio (implies --success-only; "
        "more rounds in the same time: --tasks 5000 --rounds 25)",
    )
    parser.add_argument(
        "--library-events",
        action="store_true",
        help="with --only-ratio: also the resilient task after connect(plain_tasks=False)",
    )
    parser.add_argument(
        "--broker-own-core",
        action="store_true",
        help="the brokers on one CPU core, the benchmark and its workers on the others: the "
        "worker's figures as with the broker on a host of its own",
    )
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--py-spy-tasks", type=int, default=5000, help="0 skips py-spy")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--note", default="", help="shown above the figures, e.g. 'noisy'")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON only")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: write the summary and the docs from results/latest.json again",
    )
    if parser.parse_known_args(argv)[0].quick:
        # Small sizes as defaults, so that an option given beside --quick still counts.
        parser.set_defaults(
            tasks=500,
            rounds=2,
            failure_rounds=2,
            storm_tasks=1000,
            storm_hold_timeout=30.0,
            retry_tasks=300,
            inprocess_iterations=5000,
            inprocess_repeats=5,
            py_spy_tasks=1000,
        )
    args = parser.parse_args(argv)
    args.success_only = args.success_only or args.only_ratio
    return args


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": workload.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "celery": version("celery"),
        "kombu": version("kombu"),
        "resilient_tasks": version("resilient-tasks"),
    }


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def throughput(sites: dict[str, workload.Site], args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of the success variants (order rotated every round), Celery's own failure path and
    the dead-lettering one (then replay), broker by broker."""
    events = _events_available()
    variants: list[tuple[str, str, bool | str]] = [
        ("plain", "bench.plain", False),
        ("resilient", "bench.resilient", events),
    ]
    if events and not args.only_ratio:
        # What connecting the events costs any task, apart from what the library's hooks cost.
        variants.append(("resilient_no_events", "bench.resilient", False))
        variants.append(("plain_events", "bench.plain", True))
    if events and (args.library_events or not args.only_ratio):
        # connect(plain_tasks=False): no task_prerun/task_postrun receivers, so no dispatch.
        variants.append(("resilient_library_events", "bench.resilient", "library"))
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in sites}
    for round_ in range(args.rounds):
        order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
        for kind, site in sites.items():
            site.loglevel = args.loglevel
            entry: dict[str, Any] = {"order": [label for label, _, _ in order]}
            for label, task, with_events in order:
                entry[label] = workload.success(site, task, args.tasks, events=with_events)
                say(f"{kind} round {round_ + 1}: {label} {entry[label]['per_second']:,.0f}/s")
            if args.success_only or round_ >= args.failure_rounds:
                say(
                    f"{kind} round {round_ + 1}: ratio "
                    f"{entry['resilient']['per_second'] / entry['plain']['per_second']:.3f}"
                )
                results[kind].append(entry)
                continue
            entry["plain_failing"] = workload.success(site, "bench.plain_failing", args.tasks)
            entry["failing_no_dlq"] = workload.success(
                site, "bench.failing_no_dlq", args.tasks, events=events
            )
            failing, replayed = workload.failure(
                site, args.tasks, replay=not args.no_replay, events=events
            )
            entry["failing"] = failing
            if replayed is not None:
                entry["replay"] = replayed
            say(
                f"{kind} round {round_ + 1}: ratio "
                f"{entry['resilient']['per_second'] / entry['plain']['per_second']:.3f}, "
                f"Celery failures {entry['plain_failing']['per_second']:,.0f}/s, resilient "
                f"failures without dead-lettering {entry['failing_no_dlq']['per_second']:,.0f}/s, "
                "dead-lettered "
                f"{failing['per_second']:,.0f}/s, replay "
                f"{(replayed or {}).get('per_second', 0):,.0f}/s"
            )
            results[kind].append(entry)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        return render(json.loads((RESULTS / "latest.json").read_text()), args)
    command = "nox -s bench" + (" -- " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    raw: dict[str, Any] = {
        "generated_at": datetime.now(timezone.utc).isoformat(),
        "command": command,
        "note": args.note,
        "machine": machine(),
        "config": {
            "tasks": args.tasks,
            "rounds": args.rounds,
            "failure_rounds": 0 if args.success_only else min(args.failure_rounds, args.rounds),
            "concurrency": workload.CONCURRENCY,
            "prefetch": workload.PREFETCH,
            "loglevel": args.loglevel,
            "events": _events_available(),
            "storm_tasks": args.storm_tasks,
        },
        "profile": {},
    }
    if not args.success_only:
        say(f"in-process: {args.inprocess_iterations} calls x {args.inprocess_repeats} repeats")
        raw["inprocess"] = inprocess.measure(args.inprocess_iterations, args.inprocess_repeats)
        say(f"in-process: library hooks {raw['inprocess']['library_overhead_us']:.1f} us per task")
    if not args.no_profile and not args.success_only:
        raw["profile"]["attribution"] = profiling.attribute_inprocess()
        raw["profile"]["pyinstrument"] = profiling.pyinstrument_inprocess(RESULTS)
    sites, raw["skipped"] = workload.available([b for b in args.brokers.split(",") if b])
    pinned = workload.broker_on_own_core(list(sites)) if args.broker_own_core else nullcontext()
    try:
        with pinned as placed:
            raw["config"]["placement"] = placed
            _measure(raw, sites, args)
    finally:
        for site in sites.values():
            site.close()
    report.write_json(RESULTS / "latest.json", raw)
    return render(raw, args)


def _measure(
    raw: dict[str, Any], sites: dict[str, workload.Site], args: argparse.Namespace
) -> None:
    """The worker benchmarks, broker by broker, into ``raw``."""
    raw["throughput"] = throughput(sites, args)
    raw["storm"] = {}
    for kind, site in sites.items():
        if args.storm_tasks and not args.success_only:
            say(f"{kind}: retry storm of {args.storm_tasks} tasks")
            raw["storm"][kind] = _guarded(
                workload.retry_storm, site, args.storm_tasks, 500, args.storm_hold_timeout
            )
            if args.storm_compare:
                raw["storm"][f"{kind}, Celery autoretry"] = _guarded(
                    workload.retry_storm, site, args.storm_tasks, 500,
                    args.storm_hold_timeout, 20, "bench.plain_storm",
                )  # fmt: skip
    raw["retry_path"] = {}
    if args.retry_tasks and not args.success_only:
        for kind, site in sites.items():
            say(f"{kind}: the retry path, {args.retry_tasks} tasks failing once")
            raw["retry_path"].update(
                retrypath.measure(site, kind, args.retry_tasks, min(3, args.rounds))
            )
    if not args.no_profile and args.py_spy_tasks and not args.success_only:
        # One broker is enough to see where a worker spends its time.
        for kind, site in list(sites.items())[:1]:
            for task in ("bench.resilient", "bench.failing"):
                say(f"{kind}: py-spy on a worker running {task}")
                raw["profile"][f"py_spy_{kind}_{task.split('.')[1]}"] = _guarded(
                    profiling.py_spy_worker, site, args.py_spy_tasks, RESULTS, task
                )


def render(raw: dict[str, Any], args: argparse.Namespace) -> int:
    """The summary, the docs' figures section and chart, from a run's raw results."""
    summary = report.summarise(raw)
    report.write_json(RESULTS / "summary.json", summary)
    if not args.no_docs:
        report.write_json(DOCS / "benchmarks.json", summary)
        drawn = report.chart(summary, DOCS / "img" / "benchmarks.png")
        report.write_docs(
            DOCS / "benchmarks.md",
            report.markdown(summary, "img/benchmarks.png" if drawn else None),
        )
    print(report.markdown(summary, None))
    return 0


def _guarded(function: Any, *args: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = function(*args)
    except Exception as exc:
        traceback.print_exc()
        return {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return result


def _events_available() -> bool:
    try:
        from resilient_tasks import observability  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
