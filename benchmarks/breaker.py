"""The fleet-wide circuit breaker: what it costs while closed, and what it spares a dependency
that is down: ``python -m benchmarks.breaker``.

``--cost`` (the default when neither option is given), on the success path, breaker closed:

* **in process**: what the worker's main process adds per task, :func:`resilient_tasks.breaker.
  admit` then :func:`~resilient_tasks.breaker.report` on a fake request, state in Redis
  (``REDIS_URL`` of the test harness), for a guarded task and an unguarded one (``--micro-tasks``
  requests, median of ``--micro-repeats``); and how many round trips to Redis it makes per 10,000
  tasks (calls to ``FleetState.breaker``, counted by wrapping it), run flat out and paced at
  ``--paced-rate`` tasks a second;
* **end to end**: ``--tasks`` trivial tasks published to a fresh queue, then run by one
  ``celery worker -P prefork -c 2`` on the Redis broker (``benchmarks.apps_breaker``), guarded
  and unguarded in turn, timed as :mod:`benchmarks.workload` times a run (first to last tick);
  tasks per second, median of ``--rounds``.

``--outage``: two workers (``-c 2`` each) on the Redis broker run ``--outage-tasks`` tasks of
``apps.protect_app`` while its dependency (a flag file) is down for ``--down`` seconds, then up:
once ``protect.charge`` (guarded) and once ``protect.unguarded``. The dependency's calls log
gives the calls per second; a table and a chart (``docs/img/breaker-outage.png``).

Prints markdown tables and asserts nothing about time; the raw figures go to
``benchmarks/results/breaker.json``. Examples::

    python -m benchmarks.breaker                       # --cost, default sizes
    python -m benchmarks.breaker --outage
    python -m benchmarks.breaker --cost --tasks 2000 --rounds 5 --micro-tasks 20000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery

from apps.base import read_log
from resilient_tasks import _fleet_state
from resilient_tasks import breaker as breaker_module
from resilient_tasks._fleet_state import FleetState, breaker_key, budget_key
from resilient_tasks.breaker import CircuitBreaker
from support.brokers import REDIS_URL

from . import ROOT, workload

RESULTS = ROOT / "benchmarks" / "results"
PNG = ROOT / "docs" / "img" / "breaker-outage.png"
COST_APP = "benchmarks.apps_breaker"
OUTAGE_APP = "apps.protect_app"
VARIANTS = {"guarded": "breaker_bench.guarded", "unguarded": "breaker_bench.unguarded"}
OUTAGE_VARIANTS = {"guarded": "protect.charge", "unguarded": "protect.unguarded"}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def load() -> str:
    """``uptime``'s load averages, for the record."""
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    return out.strip().split("load average:")[-1].strip()


# -- the cost: in process -----------------------------------------------------------------------


class _FakeTask:
    def __init__(self, spec: CircuitBreaker | None, app: Celery) -> None:
        self.circuit_breaker = spec
        self.app = app
        self.name = "breaker_bench.fake"


class _FakeRequest:
    """What ``admit`` and ``report`` read of Celery's ``Request`` on the success path."""

    def __init__(self, task: _FakeTask) -> None:
        self.task = task
        self._context = SimpleNamespace(headers={}, retries=0)


def _run(requests: list[_FakeRequest]) -> int:
    """``admit`` then ``report(..., None)`` for each request; the nanoseconds it took."""
    admit, report = breaker_module.admit, breaker_module.report
    began = time.perf_counter_ns()
    for request in requests:
        if admit(request):
            report(request, None)
    return time.perf_counter_ns() - began


@contextmanager
def _counting() -> Iterator[list[int]]:
    """Count the calls to ``FleetState.breaker`` (one Redis round trip each) meanwhile."""
    count = [0]
    original = FleetState.breaker

    def counted(self: FleetState, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(self, *args, **kwargs)

    FleetState.breaker = counted  # type: ignore[method-assign]
    try:
        yield count
    finally:
        FleetState.breaker = original  # type: ignore[method-assign]


def _paced(task: _FakeTask, tasks: int, rate: float) -> None:
    """``tasks`` requests at ``rate`` a second (in batches of 10)."""
    began = time.monotonic()
    for start in range(0, tasks, 10):
        due = began + start / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        _run([_FakeRequest(task) for _ in range(min(10, tasks - start))])


def micro(tasks: int, repeats: int, paced_rate: float) -> dict[str, Any]:
    """ns per task of admit + report, guarded and unguarded; Redis round trips per 10,000."""
    app = Celery("breaker-bench-micro", set_as_current=False)
    app.conf.resilient_tasks_state_url = REDIS_URL
    name = f"bench-micro-{uuid.uuid4().hex[:10]}"
    spec = CircuitBreaker(name, failure_threshold=0.5, minimum_calls=20, window=30.0,
                          reset_timeout=30.0)  # fmt: skip
    guarded, unguarded = _FakeTask(spec, app), _FakeTask(None, app)
    store = _fleet_state.state_for(app)
    if not store.shared:
        raise RuntimeError(f"the breaker's state is not in Redis ({store.where})")
    try:
        if store.breaker(spec, "admit") is None:
            raise RuntimeError(f"Redis at {REDIS_URL} does not answer")
        _run([_FakeRequest(guarded) for _ in range(1000)])  # warm: the view is synced
        samples: dict[str, list[float]] = {"guarded": [], "unguarded": []}
        for _ in range(repeats):
            for label, task in (("unguarded", unguarded), ("guarded", guarded)):
                requests = [_FakeRequest(task) for _ in range(tasks)]
                samples[label].append(_run(requests) / tasks)
        with _counting() as flat:
            _run([_FakeRequest(guarded) for _ in range(10_000)])
        with _counting() as paced:
            _paced(guarded, 10_000, paced_rate)
        final = store.breaker(spec, "report")
    finally:
        store.store.forget(breakers=(name,))
    medians = {label: statistics.median(values) for label, values in samples.items()}
    return {
        "tasks": tasks,
        "repeats": repeats,
        "ns_per_task": samples,
        "median_ns": medians,
        "breaker_ns": medians["guarded"] - medians["unguarded"],
        "round_trips_per_10k_flat_out": flat[0],
        "round_trips_per_10k_paced": paced[0],
        "paced_rate": paced_rate,
        "paced_seconds": 10_000 / paced_rate,
        "final_state": None if final is None else final.state,
    }


# -- the cost: end to end -----------------------------------------------------------------------


def end_to_end(site: workload.Site, variant: str, tasks: int) -> dict[str, Any]:
    """Tasks per second of ``tasks`` x the trivial ``variant`` task on one worker (-c 2)."""
    task = VARIANTS[variant]
    name = f"{site.broker.prefix}-bench-{uuid.uuid4().hex[:8]}"
    try:
        with site.run(variant) as run:
            run.publish(task, tasks)
            run.worker = site.runner.start(
                COST_APP,
                queues=[run.queue],
                concurrency=workload.CONCURRENCY,
                settings={**run.overrides, "bench_breaker": name},
                extra_args=(f"--loglevel={site.loglevel}",),
            )
            run.wait(
                lambda: run.slots().count >= tasks,
                workload._timeout(tasks),
                f"{tasks} x {task}",
            )
            slots = run.slots()
            output = run.worker.output_text()
    finally:
        _forget(site.broker.url, breakers=[name])
    seconds = slots.last - slots.first
    opened = f"circuit breaker {name!r} opened" in output
    return {"task": task, "tasks": tasks, "seconds": seconds, "per_second": tasks / seconds,
            "breaker_opened": opened}  # fmt: skip


def cost(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"load_before": load()}
    say(f"load average: {figures['load_before']}")
    say(f"in process: {args.micro_tasks} requests x {args.micro_repeats} repeats, state at "
        f"{REDIS_URL}")  # fmt: skip
    figures["micro"] = micro(args.micro_tasks, args.micro_repeats, args.paced_rate)
    site = workload.Site("redis")
    site.loglevel = args.loglevel
    samples: dict[str, list[float]] = {label: [] for label in VARIANTS}
    runs: list[dict[str, Any]] = []
    try:
        for round_ in range(args.rounds):
            order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
            for label in order:
                result = end_to_end(site, label, args.tasks)
                samples[label].append(result["per_second"])
                runs.append({"round": round_ + 1, "variant": label, **result})
                say(f"round {round_ + 1}: {label} {result['per_second']:,.0f} tasks/s")
    finally:
        site.close()
    medians = {label: statistics.median(values) for label, values in samples.items()}
    figures["end_to_end"] = {
        "tasks": args.tasks,
        "rounds": args.rounds,
        "concurrency": workload.CONCURRENCY,
        "prefetch": workload.PREFETCH,
        "per_second": samples,
        "median": medians,
        "ratio": medians["guarded"] / medians["unguarded"],
        "round_ratios": [
            g / u for g, u in zip(samples["guarded"], samples["unguarded"], strict=True)
        ],
        "runs": runs,
    }
    figures["load_after"] = load()
    return figures


def print_cost(figures: dict[str, Any]) -> None:
    m, e = figures["micro"], figures["end_to_end"]
    print()
    print(f"Load average (1, 5, 15 min): before {figures['load_before']}; "
          f"after {figures['load_after']}")  # fmt: skip
    print()
    print(f"In process: `admit` + `report(request, None)`, breaker closed, state in Redis "
          f"({m['tasks']:,} requests, median of {m['repeats']})")  # fmt: skip
    print()
    print("| task | ns per task | µs per task |")
    print("| --- | ---: | ---: |")
    for label in ("unguarded", "guarded"):
        ns = m["median_ns"][label]
        print(f"| {label} | {ns:,.0f} | {ns / 1000:.2f} |")
    print(f"| the breaker's share | {m['breaker_ns']:,.0f} | {m['breaker_ns'] / 1000:.2f} |")
    print()
    print("| Redis round trips per 10,000 guarded tasks | count |")
    print("| --- | ---: |")
    print(f"| flat out (in {10_000 * m['median_ns']['guarded'] / 1e6:.0f} ms) "
          f"| {m['round_trips_per_10k_flat_out']} |")  # fmt: skip
    print(f"| paced at {m['paced_rate']:,.0f} tasks/s (over {m['paced_seconds']:.0f} s) "
          f"| {m['round_trips_per_10k_paced']} |")  # fmt: skip
    print()
    print(f"End to end: {e['tasks']:,} trivial tasks, one prefork worker -c {e['concurrency']} "
          f"(prefetch {e['prefetch']}), Redis broker, median of {e['rounds']} rounds")  # fmt: skip
    print()
    print("| task | tasks/s (median) | rounds |")
    print("| --- | ---: | --- |")
    for label in ("unguarded", "guarded"):
        values = ", ".join(f"{v:,.0f}" for v in e["per_second"][label])
        print(f"| {label} | {e['median'][label]:,.0f} | {values} |")
    ratios = ", ".join(f"{r:.3f}" for r in e["round_ratios"])
    print(f"| guarded / unguarded | {e['ratio']:.3f} | {ratios} |")
    print()


# -- the outage ---------------------------------------------------------------------------------


def outage(variant: str, tasks: int, down: float, timeout: float) -> dict[str, Any]:
    """``tasks`` x the ``variant`` task on two workers while the dependency is down for
    ``down`` seconds: every call the dependency got (seconds from the outage's start)."""
    task = OUTAGE_VARIANTS[variant]
    site = workload.Site("redis")
    breaker = f"{site.broker.prefix}-payments"
    budget = f"{site.broker.prefix}-budget"
    settings = {"test_breaker": breaker, "test_budget": budget}
    try:
        first = site.runner.start(OUTAGE_APP, settings=settings)
        second = site.runner.start(OUTAGE_APP, queues=[first.queue], settings=settings)
        flag, calls = site.tmp / "payments-down", site.tmp / "calls.log"
        flag.touch()
        began = time.time()
        results = [first.send(task, str(flag), str(calls)) for _ in range(tasks)]
        time.sleep(max(0.0, began + down - time.time()))
        flag.unlink()
        ended = time.time()
        while_down = len(read_log(calls))
        say(f"{variant}: dependency up again after {ended - began:.1f} s; "
            f"{while_down} calls while down")  # fmt: skip
        deadline = time.monotonic() + timeout
        while not all(r.ready() for r in results):
            if time.monotonic() > deadline:
                say(f"{variant}: not every task ended within {timeout:.0f} s")
                break
            time.sleep(0.5)
        time.sleep(2.0)  # a late call, if any, would have happened by now
        log = read_log(calls)
        states = Counter(r.state for r in results)
        dead = first.drain(f"{first.queue}.dlq")
        output = first.output_text() + second.output_text()
    finally:
        _forget(site.broker.url, breakers=[breaker], budgets=[budget])
        site.close()
    return {
        "task": task,
        "tasks": tasks,
        "down_seconds": ended - began,
        "calls_while_down": while_down,
        "calls": len(log),
        "successful_calls": sum(1 for c in log if c["up"]),
        "completed": states.get("SUCCESS", 0),
        "states": dict(states),
        "dead_lettered": len(dead),
        "dead_letter_reasons": dict(Counter(e.get("reason") for e in dead)),
        "opened": output.count(f"circuit breaker {breaker!r} opened"),
        "closed": output.count(f"circuit breaker {breaker!r} closed"),
        "call_times": [round(c["t"] - began, 4) for c in log],
    }


def per_second(times: list[float], until: float) -> list[int]:
    counts = Counter(int(t) for t in times if t >= 0)
    return [counts.get(s, 0) for s in range(int(until) + 1)]


def print_outage(figures: dict[str, Any]) -> None:
    runs = figures["runs"]
    any_run = next(iter(runs.values()))
    print()
    print(f"Load average (1, 5, 15 min): before {figures['load_before']}; "
          f"after {figures['load_after']}")  # fmt: skip
    print()
    print(f"Outage: {any_run['tasks']} tasks, two workers -c 2, Redis broker, dependency down "
          f"for the first {any_run['down_seconds']:.0f} s")  # fmt: skip
    print()
    print("| | calls while down | calls in all | tasks completed | dead-lettered |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, run in runs.items():
        reasons = ", ".join(f"{k}" for k in run["dead_letter_reasons"])
        dead = f"{run['dead_lettered']}" + (f" ({reasons})" if reasons else "")
        print(f"| {label} (`{run['task']}`) | {run['calls_while_down']} | {run['calls']} "
              f"| {run['completed']} | {dead} |")  # fmt: skip
    print()
    for label, run in runs.items():
        print(f"{label}: breaker opened {run['opened']}x (re-opens after a failed probe "
              f"included), closed {run['closed']}x; result states {run['states']}")  # fmt: skip
    print()


def chart(figures: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        say("matplotlib is not installed (pip install -e .[bench]): no chart")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = figures["runs"]
    down = max(run["down_seconds"] for run in runs.values())
    until = max([down + 5, *(max(run["call_times"], default=0) for run in runs.values())])
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ax.axvspan(0, down, color="#d62728", alpha=0.12, lw=0, label="dependency down")
    styles = {"guarded": ("#1f77b4", "protect.charge: circuit breaker"),
              "unguarded": ("#ff7f0e", "protect.unguarded: retries only")}  # fmt: skip
    for label, run in runs.items():
        series = per_second(run["call_times"], until)
        color, text = styles.get(label, (None, label))
        ax.step(range(len(series)), series, where="post", color=color, lw=1.6, label=text)
    ax.set_xlim(0, int(until) + 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the dependency went down")
    ax.set_ylabel("calls to the dependency per second")
    tasks = next(iter(runs.values()))["tasks"]
    ax.set_title(f"{tasks} tasks, two workers x 2 processes, Redis broker", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def outages(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"load_before": load(), "runs": {}}
    say(f"load average: {figures['load_before']}")
    for label in OUTAGE_VARIANTS:
        say(f"outage: {label}, {args.outage_tasks} tasks, {args.down:.0f} s down")
        figures["runs"][label] = outage(label, args.outage_tasks, args.down, args.outage_timeout)
    figures["load_after"] = load()
    return figures


# -- helpers ------------------------------------------------------------------------------------


def _forget(url: str, breakers: list[str], budgets: list[str] | None = None) -> None:
    keys = [breaker_key(n) for n in breakers] + [budget_key(n) for n in budgets or []]
    if not keys:
        return
    client = redis.Redis.from_url(url)
    try:
        client.delete(*keys)
    finally:
        client.close()


def _guarded(function: Callable[[], dict[str, Any]], what: str) -> dict[str, Any] | None:
    try:
        return function()
    except workload.BrokerUnavailable as exc:
        print(f"{what}: skipped, Redis does not answer ({exc})")
        return None


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.breaker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cost", action="store_true", help="the closed breaker's cost (default)")
    parser.add_argument("--outage", action="store_true", help="the outage picture and chart")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per end-to-end run")
    parser.add_argument("--rounds", type=int, default=3, help="end-to-end rounds (median)")
    parser.add_argument("--micro-tasks", type=int, default=100_000, help="requests per repeat")
    parser.add_argument("--micro-repeats", type=int, default=7)
    parser.add_argument("--paced-rate", type=float, default=1000.0,
                        help="tasks/s of the paced round-trip count")  # fmt: skip
    parser.add_argument("--loglevel", default="WARNING", help="the cost workers' --loglevel")
    parser.add_argument("--outage-tasks", type=int, default=200)
    parser.add_argument("--down", type=float, default=20.0, help="seconds the dependency is down")
    parser.add_argument("--outage-timeout", type=float, default=180.0,
                        help="seconds to wait for every task to end after the outage")  # fmt: skip
    parser.add_argument("--png", type=Path, default=PNG, help="where the outage chart goes")
    args = parser.parse_args(argv)
    if not args.cost and not args.outage:
        args.cost = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # The workers import benchmarks.apps_breaker: the repository's root on their import path.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    saved: dict[str, Any] = {}
    if args.cost:
        figures = _guarded(lambda: cost(args), "--cost")
        if figures is not None:
            saved["cost"] = figures
            print_cost(figures)
    if args.outage:
        figures = _guarded(lambda: outages(args), "--outage")
        if figures is not None:
            saved["outage"] = figures
            print_outage(figures)
            if chart(figures, args.png):
                print(f"Chart: {args.png}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "breaker.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**previous, **saved}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
