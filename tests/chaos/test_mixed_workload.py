"""A mixed workload under fire: 20 % permanent failures, 20 % transient ones, pool children
killed at random, the worker's broker connection cut. Every task ends succeeded or
dead-lettered; none is lost, none dead-lettered twice, and the dead-lettered ones are exactly
the permanent failures (plus any that lost their worker ``max_redeliveries + 1`` times, reason
``worker_lost``).

The size is ``$RT_CHAOS_TASKS`` (300 in the default test run, 2000 under ``nox -s chaos``).
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest

from chaos.accounting import (
    TASKS,
    Killer,
    mixed_plan,
    record,
    send,
    settle,
    settle_or_replace,
)
from support.brokers import Broker
from support.proxy import CuttableProxy
from support.worker import WorkerRunner

APP = "apps.chaos_app"
pytestmark = [pytest.mark.worker, pytest.mark.timeout(180 + TASKS // 2)]
BOTH = pytest.mark.parametrize("broker", ["rabbitmq", "redis"], indirect=True)


@BOTH
def test_mixed_workload_with_pool_children_killed_at_random_loses_nothing(
    workers: WorkerRunner, broker: Broker
) -> None:
    worker = workers.start(APP)
    ledger = send(worker, mixed_plan(TASKS))
    killer = Killer(worker, limit=max(15, TASKS // 40))

    took = settle(worker, ledger, timeout=120 + TASKS / 4, during=killer)

    problems = ledger.problems()
    record("pool children killed", broker=broker.kind, kills=killer.kills, seconds=took,
           problems=problems, **ledger.figures())  # fmt: skip
    assert killer.kills >= 10
    assert not problems
    assert worker.process.poll() is None


@BOTH
def test_mixed_workload_with_the_workers_broker_connection_cut_loses_nothing(
    workers: WorkerRunner, broker: Broker
) -> None:
    """The worker talks to the broker through a proxy that drops every connection for 3 s
    mid-run and refuses new ones meanwhile: the broker keeps its state; what the worker had in
    flight comes back.

    A worker that never resumes consuming (seen on Redis: the consumer does not notice the cut)
    is replaced after a while by a fresh one, which must then settle everything: messages the
    stuck worker held are not lost, they return to the queue. The replacement is recorded.
    """
    url = urlsplit(broker.url)
    proxy = CuttableProxy((url.hostname or "127.0.0.1", url.port or _PORTS[url.scheme]))
    proxied = url._replace(netloc=url.netloc.rsplit(":", 1)[0] + f":{proxy.port}").geturl()
    settings = {}
    if broker.kind == "redis":
        # Kombu restores the messages a lost Redis connection had unacknowledged once they are
        # this old (an hour by default).
        options = {**broker.transport_options, "visibility_timeout": 10}
        settings["broker_transport_options"] = options
    try:
        worker = workers.start(APP, settings=settings, worker_settings={"broker_url": proxied})
        ledger = send(worker, mixed_plan(TASKS))
        cut: dict[str, float] = {}

        def outage() -> None:
            if "at" not in cut and len(ledger.settled()) >= len(ledger.sent) // 3:
                proxy.cut()
                cut["at"] = time.monotonic()
            elif "at" in cut and "restored" not in cut and time.monotonic() - cut["at"] > 3:
                proxy.restore()
                cut["restored"] = time.monotonic()

        worker, took, replaced = settle_or_replace(
            workers,
            worker,
            ledger,
            timeout=60 + TASKS / 4,
            during=outage,
            stall=15,
            settings=settings,
        )
    finally:
        proxy.close()

    # On Redis a message popped (BRPOP) whose reply dies in the cut is lost before it reaches
    # the worker: recorded, not counted (see Ledger.problems).
    problems = ledger.problems(
        allowed_duplicates=_IN_FLIGHT, outage=True, transport_losses=broker.kind == "redis"
    )
    record("worker's broker connection cut for 3 s", broker=broker.kind, seconds=took,
           stuck_worker_replaced=replaced, problems=problems, **ledger.figures())  # fmt: skip
    assert "restored" in cut
    assert not problems


_PORTS = {"amqp": 5672, "redis": 6379}
#: What a worker can have unacknowledged when its connection drops (prefetch 1 x 2 processes,
#: plus retries it holds for their countdown): only those may be processed twice.
_IN_FLIGHT = 10
