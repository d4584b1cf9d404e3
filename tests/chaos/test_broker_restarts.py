"""Brokers restarted mid-run. These stop and start the local RabbitMQ and Redis that every other
test uses: marked ``broker_restart``, they run only with ``RT_CHAOS_RESTART=1`` (``nox -s
chaos``), on a machine where nothing else uses the brokers.

What each one claims:

* **RabbitMQ** (``rabbitmqctl stop_app`` / ``start_app``): durable queues and persistent
  messages survive, so the accounting of ``test_mixed_workload`` holds: nothing lost, the
  permanent failures exactly are dead-lettered. Two allowances, both bounded and recorded: a
  task whose acknowledgement died with the connection after its envelope was confirmed is
  dead-lettered a second time (at most what the worker had unacknowledged: at-least-once); a
  transient task whose retry could not be published while the broker was down is dead-lettered
  with the publish error (reason ``exception``): it is in the dead-letter queue, replayable,
  not lost.
* **Redis with the connections killed** (``CLIENT KILL TYPE normal``): Redis keeps its data; the
  same accounting as RabbitMQ.
* **Redis restarted** (``redis-cli shutdown nosave``, then the exact command CI starts it with):
  this Redis keeps nothing on disk (``--save "" --appendonly no``), so a restart empties it:
  queued messages, unacknowledged ones and unread dead letters go with it, by configuration; no
  client library can keep them. The claim is what survives: every task settled before the
  restart stays accounted (the test reads the dead-letter queue as it goes), no task is
  dead-lettered twice, and tasks sent after the restart are all accounted for by the same rules
  as above. How many of the earlier tasks Redis lost is recorded.
* **A Redis that persists** (a private ``redis-server`` with ``--appendonly yes --appendfsync
  always`` on its own port, restarted with ``SHUTDOWN``): the full accounting holds, as on
  RabbitMQ. It touches no shared server, but it is a restart test all the same.

A worker that never resumes consuming after the restart is replaced by a fresh one (recorded as
``stuck_worker_replaced``): the claim is that nothing is lost, which a stuck consumer does not
disprove but would hide.

On Redis, a task lost before its body ever started is recorded (``lost_before_delivery``) but
not counted against the library: Kombu's Redis transport takes a message off its list
(``BRPOP``) before it records it as unacknowledged, so a connection cut between the two loses
it before Celery or the library sees it. Every task that reached a worker must be accounted
for.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from kombu import Connection

from chaos.accounting import (
    TASKS,
    Ledger,
    mixed_plan,
    record,
    send,
    settle_or_replace,
)
from support.brokers import REDIS_URL, Broker
from support.servers import persistent_redis as private_persistent_redis
from support.servers import wait_until_up
from support.worker import WorkerRunner, running

APP = "apps.chaos_app"
pytestmark = [
    pytest.mark.worker,
    pytest.mark.broker_restart,
    pytest.mark.timeout(600 + TASKS // 2),
]
#: How CI starts Redis (and so how it is started again).
REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
    "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip
#: What a worker can have unacknowledged when its connection drops (prefetch 1 x 2 processes,
#: plus retries held for their countdown): only those may be processed twice.
IN_FLIGHT = 10
OUTAGE = 5.0
#: Kombu restores what a lost Redis connection left unacknowledged once it is this old.
REDIS_VISIBILITY = 10


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def once_a_third_is_settled(ledger: Ledger, disrupt: Callable[[], None]) -> Callable[[], None]:
    """A ``during`` hook for :func:`settle` that calls ``disrupt()`` once, a third of the way."""
    done: dict[str, bool] = {}

    def during() -> None:
        if not done and len(ledger.settled()) >= len(ledger.sent) // 3:
            done["yes"] = True
            disrupt()

    during.done = done  # type: ignore[attr-defined]
    return during


def redis_settings(broker: Broker) -> dict[str, object]:
    return {
        "broker_transport_options": {
            **broker.transport_options,
            "visibility_timeout": REDIS_VISIBILITY,
        }
    }


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_rabbitmq_restarted_mid_run_loses_nothing(workers: WorkerRunner, broker: Broker) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed here")
    worker = workers.start(APP)
    ledger = send(worker, mixed_plan(TASKS))
    state = {"stopped": False}

    def restart() -> None:
        run("rabbitmqctl", "stop_app")
        state["stopped"] = True
        time.sleep(OUTAGE)
        run("rabbitmqctl", "start_app")
        run("rabbitmqctl", "await_startup")
        state["stopped"] = False

    during = once_a_third_is_settled(ledger, restart)
    try:
        worker, took, replaced = settle_or_replace(
            workers, worker, ledger, timeout=180 + TASKS / 4, during=during
        )
    finally:
        if state["stopped"]:
            run("rabbitmqctl", "start_app")
        wait_until_up(broker.url)

    problems = ledger.problems(allowed_duplicates=IN_FLIGHT, outage=True)
    record("RabbitMQ stop_app / start_app mid-run", broker="rabbitmq", seconds=took,
           stuck_worker_replaced=replaced, problems=problems, **ledger.figures())  # fmt: skip
    assert during.done  # type: ignore[attr-defined]
    assert not problems


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_redis_connections_killed_mid_run_loses_nothing(
    workers: WorkerRunner, broker: Broker
) -> None:
    settings = redis_settings(broker)
    worker = workers.start(APP, settings=settings)
    ledger = send(worker, mixed_plan(TASKS))

    def kill_connections() -> None:
        with Connection(broker.url) as conn:
            conn.default_channel.client.client_kill_filter(_type="normal", skipme=True)

    during = once_a_third_is_settled(ledger, kill_connections)
    worker, took, replaced = settle_or_replace(
        workers, worker, ledger, timeout=180 + TASKS / 4, during=during, settings=settings
    )

    problems = ledger.problems(allowed_duplicates=IN_FLIGHT, outage=True, transport_losses=True)
    record("Redis CLIENT KILL TYPE normal mid-run", broker="redis", seconds=took,
           stuck_worker_replaced=replaced, problems=problems, **ledger.figures())  # fmt: skip
    assert during.done  # type: ignore[attr-defined]
    assert not problems


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_redis_restarted_empty_mid_run_keeps_what_it_settled_and_loses_nothing_after(
    workers: WorkerRunner, broker: Broker
) -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli are not installed here")
    settings = redis_settings(broker)
    worker = workers.start(APP, settings=settings)
    ledger = send(worker, mixed_plan(TASKS))
    earlier = set(ledger.sent)
    at_restart: dict[str, set[str]] = {}

    def restart() -> None:
        at_restart["settled"] = ledger.settled()
        subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], timeout=30, check=False)
        time.sleep(OUTAGE)
        run(*REDIS_START)
        wait_until_up(REDIS_URL)

    during = once_a_third_is_settled(ledger, restart)
    try:
        worker, took, replaced = settle_or_replace(
            workers, worker, ledger, timeout=60, during=during, stall=20, settings=settings
        )
    finally:
        try:
            wait_until_up(REDIS_URL, timeout=5)
        except Exception:
            run(*REDIS_START)
            wait_until_up(REDIS_URL)
    assert during.done  # type: ignore[attr-defined]

    # After the restart, a second batch; the queue is declared anew first (Redis forgot the
    # exchange's binding with everything else, and a client that believes it declared it would
    # publish into nothing).
    with worker.client.connection_for_write() as conn:
        worker.client.amqp.queues[worker.queue].bind(conn.default_channel).declare()
    send(worker, [(n + TASKS, kind) for n, kind in mixed_plan(TASKS // 2, seed=2)], ledger)
    later = set(ledger.sent) - earlier
    worker, took_after, replaced_after = settle_or_replace(
        workers, worker, ledger, timeout=120 + TASKS / 4, among=later, settings=settings
    )

    lost_with_redis = ledger.unsettled(earlier)
    problems = ledger.only(later).problems(
        allowed_duplicates=IN_FLIGHT, outage=True, transport_losses=True
    )
    twice = {i for i, n in ledger.only(earlier).dead_lettered.items() if n > 1}
    record("Redis shutdown nosave + start mid-run (no persistence)", broker="redis",
           seconds=took + took_after, stuck_worker_replaced=replaced or replaced_after,
           settled_before_restart=len(at_restart["settled"]),
           earlier_lost_with_redis=len(lost_with_redis), earlier_dead_lettered_twice=len(twice),
           problems_after_restart=problems, **ledger.only(later).figures())  # fmt: skip
    assert not (lost_with_redis & at_restart["settled"])  # what was settled stays settled
    assert len(twice) <= IN_FLIGHT
    assert not problems


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """A private redis-server with an fsync-always append-only file, on a free port; yields its
    URL and a function that restarts it (``SHUTDOWN``, which saves, then the same command)."""
    with private_persistent_redis(tmp_path / "redis") as server:
        yield server.url, lambda: server.restart(OUTAGE)


def test_persistent_redis_restarted_mid_run_loses_nothing(
    persistent_redis: tuple[str, Callable[[], None]], tmp_path: Path
) -> None:
    url, restart = persistent_redis
    broker = Broker("redis", url)
    broker.transport_options = {
        "unacked_key": f"{broker.prefix}-unacked",
        "unacked_index_key": f"{broker.prefix}-unacked_index",
        "unacked_mutex_key": f"{broker.prefix}-unacked_mutex",
        "polling_interval": 0.05,
        "visibility_timeout": REDIS_VISIBILITY,
    }
    with contextmanager(running)(broker, tmp_path) as workers:
        worker = workers.start(APP)
        ledger = send(worker, mixed_plan(TASKS))
        during = once_a_third_is_settled(ledger, restart)
        worker, took, replaced = settle_or_replace(
            workers, worker, ledger, timeout=180 + TASKS / 4, during=during
        )

        problems = ledger.problems(allowed_duplicates=IN_FLIGHT, outage=True, transport_losses=True)
        record("Redis with appendfsync always, SHUTDOWN + start mid-run", broker="redis (AOF)",
               seconds=took, stuck_worker_replaced=replaced, problems=problems,
               **ledger.figures())  # fmt: skip
        assert during.done  # type: ignore[attr-defined]
        assert not problems
