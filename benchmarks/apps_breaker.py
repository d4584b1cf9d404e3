"""The worker app of ``python -m benchmarks.breaker --cost``: one trivial task guarded by a
circuit breaker and the same task without it, both ``ResilientTask`` with the same retry policy,
so that the breaker is the only difference between them.

The worker imports it as ``benchmarks.apps_breaker`` (the benchmark runs from the repository's
root, which is on the worker's import path as its working folder). Completions are counted as
in ``apps.bench_app``: each pool process ticks a memory-mapped slot file in ``bench_dir``.

Settings read from the worker's configuration (``app.conf``):

* ``bench_dir``: the folder of the slot files (required);
* ``bench_breaker``: the breaker's name, so that each run has state of its own in Redis.
"""

from __future__ import annotations

from apps.base import make_app
from apps.bench_app import POLICY, Ticker
from resilient_tasks import CircuitBreaker, ResilientTask

app = make_app(__name__)

#: Closed for the whole run: the tasks never fail.
BREAKER = CircuitBreaker(
    app.conf.get("bench_breaker", "bench-breaker"),
    failure_threshold=0.5,
    minimum_calls=20,
    window=30.0,
    reset_timeout=30.0,
)

tick = Ticker(app)


@app.task(base=ResilientTask, name="breaker_bench.guarded", ignore_result=True,
          retry_policy=POLICY, circuit_breaker=BREAKER)  # fmt: skip
def guarded(n: int) -> None:
    tick()


@app.task(base=ResilientTask, name="breaker_bench.unguarded", ignore_result=True,
          retry_policy=POLICY)  # fmt: skip
def unguarded(n: int) -> None:
    tick()
