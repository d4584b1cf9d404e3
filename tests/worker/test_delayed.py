"""Delayed messages wait on the broker (Redis), not in a worker's memory.

A retry with a countdown, or ``apply_async(countdown=...)``, of a library task is held in a
sorted set on Redis until it is due; a step of every worker moves it onto its queue then.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from apps.delayed_tasks import define
from resilient_tasks.delayed import delayed_stats
from support.brokers import broker_at
from support.servers import persistent_redis, private_rabbitmq
from support.worker import Worker, WorkerRunner, running

APP = "apps.delayed_app"
pytestmark = pytest.mark.worker
BOTH = pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)


def runs(worker: Worker, task: str, task_id: str | None = None) -> list[dict[str, Any]]:
    return [
        a
        for a in worker.attempts()
        if a.get("task") == task and (task_id is None or a.get("id") == task_id)
    ]


def publish(worker: Worker, name: str, *args: Any, **options: Any) -> Any:
    """Publish through the task class, as a project does (``send_task`` by name bypasses it)."""
    tasks = worker.client.tasks
    task = tasks[name] if name in tasks else define(worker.client)[name]
    return task.apply_async((*args, str(worker.log)), **options)


def settled(worker: Worker) -> bool:
    """Whether the worker has nothing in hand: no task active, reserved or scheduled."""
    inspect = worker.inspect(timeout=2)
    replies = [inspect.active(), inspect.reserved(), inspect.scheduled()]
    return all(r is not None and not any(r.values()) for r in replies)


def waiting(worker: Worker) -> int:
    """The test's delayed messages on the broker: on Redis those for its queue; on RabbitMQ
    every one in the test's own delay topology (RabbitMQ counts per delay queue only)."""
    stats = delayed_stats(worker.client)
    if worker.client.connection_for_write().transport.driver_type == "amqp":
        return sum(q.waiting for q in stats)
    return sum(q.waiting for q in stats if q.queue == worker.queue)


@BOTH
def test_a_retry_longer_than_the_visibility_timeout_runs_once(workers: WorkerRunner) -> None:
    # Celery's ETA message would be restored from the unacked set every 4 s, and run again
    # by each worker that gets it back (celery#4400): here it waits in Redis instead.
    short = {
        **workers.broker.transport_options,
        "visibility_timeout": 4,
        "unacked_restore_throttle": 1,
    }
    settings = {"broker_transport_options": short}
    worker = workers.start(APP, settings=settings)
    workers.start(APP, queues=[worker.queue], settings=settings)

    result = publish(worker, "delayed.later", 12.0)

    assert result.get(timeout=40) == "done"
    time.sleep(5.0)  # a second copy, if any, would have run by now
    attempts = runs(worker, "delayed.later", result.id)
    assert [a["retries"] for a in attempts] == [0, 1]
    assert attempts[1]["t"] - attempts[0]["t"] >= 12.0


@BOTH
def test_delayed_messages_wait_on_the_broker_and_new_work_is_not_held_up(
    workers: WorkerRunner,
) -> None:
    worker = workers.start(APP, concurrency=1)
    later = [publish(worker, "delayed.note", countdown=300) for _ in range(200)]
    worker.wait_for(lambda: waiting(worker) == 200, what="200 delayed messages on Redis")

    started = time.monotonic()
    now = [publish(worker, "delayed.note") for _ in range(5)]

    assert [r.get(timeout=10) for r in now] == ["noted"] * 5
    assert time.monotonic() - started < 10
    assert not any(runs(worker, "delayed.note", r.id) for r in later)


@BOTH
def test_a_worker_killed_while_retries_wait_loses_none_and_runs_none_early(
    workers: WorkerRunner,
) -> None:
    worker = workers.start(APP, settings={"worker_enable_remote_control": True})
    results = [publish(worker, "delayed.later", 6.0) for _ in range(50)]
    worker.wait_for(
        lambda: len([a for a in worker.attempts() if a["retries"] == 0]) == 50,
        what="the 50 first attempts",
    )
    worker.wait_for(lambda: waiting(worker) == 50, what="the 50 retries on the broker")
    # Each original is acknowledged once its retry is confirmed, a round trip after the retry
    # reaches the broker (longer on a loaded broker): a kill inside that window runs the
    # original again (at least once). Here every retry waits and every original is settled:
    # the worker has no task left in hand.
    worker.wait_for(lambda: settled(worker), what="every original settled")

    workers.stop(worker, signal.SIGKILL, timeout=0)
    workers.start(APP, queues=[worker.queue])

    assert [r.get(timeout=40) for r in results] == ["done"] * 50
    time.sleep(2.0)
    for result in results:
        first, second = runs(worker, "delayed.later", result.id)  # its log, whoever ran it
        due = datetime.fromisoformat(second["eta"]).timestamp()
        assert second["t"] >= due >= first["t"] + 6.0 - 0.01


@BOTH
def test_a_revoked_delayed_task_is_revoked_when_it_arrives(workers: WorkerRunner) -> None:
    worker = workers.start(APP, settings={"worker_enable_remote_control": True})
    result = publish(worker, "delayed.note", countdown=3)
    worker.wait_for(lambda: waiting(worker) == 1, what="the delayed message on Redis")

    worker.client.control.revoke(result.id)

    worker.wait_for(lambda: result.state == "REVOKED", timeout=15, what="the task revoked")
    assert runs(worker, "delayed.note", result.id) == []


@BOTH
def test_delayed_stats_counts_what_waits_by_queue_and_task(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    for _ in range(3):
        publish(worker, "delayed.note", countdown=120)
    worker.wait_for(lambda: waiting(worker) == 3, what="3 delayed messages")

    shown = worker.celery("delayed", "stats", "--json")

    assert shown.returncode == 0, shown.stderr
    if workers.broker.kind == "rabbitmq":
        # 120 s = 64 + 32 + 16 + 8: all three wait in the 64-second delay queue first.
        lines = [json.loads(x) for x in shown.stdout.splitlines()]
        level = f"{workers.broker.prefix}_celery_delayed_6"
        assert [(x["queue"], x["waiting"], x["tasks"]) for x in lines] == [(level, 3, {})]
        return
    (line,) = [json.loads(x) for x in shown.stdout.splitlines() if worker.queue in x]
    assert (line["queue"], line["waiting"], line["tasks"]) == (worker.queue, 3, {"delayed.note": 3})
    assert line["next_due"] is not None


@BOTH
def test_a_queue_the_worker_starts_consuming_later_gets_its_delayed_messages(
    workers: WorkerRunner,
) -> None:
    worker = workers.start(APP, settings={"worker_enable_remote_control": True})
    later = workers.broker.queue_name("added")
    workers.queues.add(later)
    worker.client.control.add_consumer(later, reply=True, timeout=5, destination=[worker.nodename])

    result = publish(worker, "delayed.note", countdown=1, queue=later)

    assert result.get(timeout=15) == "noted"


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_an_app_whose_broker_changes_delays_on_the_new_broker(workers: WorkerRunner) -> None:
    app = workers.start(APP).client
    other = workers.broker.url.rsplit("/", 1)[0] + "/15"
    queue = workers.broker.queue_name("moved")
    workers.queues.add(queue)
    note = define(app)["delayed.note"]
    note.apply_async(("-",), queue=queue, countdown=60)

    app.conf.broker_url = other
    try:
        note.apply_async(("-",), queue=queue, countdown=60)
        counts = {q.queue: q.waiting for q in delayed_stats(app)}
    finally:
        with app.connection_for_write() as connection:
            client = connection.default_channel.client
            keys = list(client.scan_iter(match=f"*{workers.broker.prefix}*"))
            if keys:
                client.delete(*keys)

    assert counts == {queue: 1}


def main_rss_mib(worker: Worker) -> float:
    """The worker's main process's resident memory (median of three samples)."""
    samples = []
    for _ in range(3):
        status = Path(f"/proc/{worker.process.pid}/status").read_text()
        (line,) = [x for x in status.splitlines() if x.startswith("VmRSS:")]
        samples.append(int(line.split()[1]) / 1024)
        time.sleep(0.2)
    return sorted(samples)[1]


@BOTH
@pytest.mark.timeout(400)  # 3,000 tasks through a worker: about a minute alone, more in CI
def test_a_storm_of_retries_waits_on_the_broker_and_new_work_starts_at_once(
    workers: WorkerRunner,
) -> None:
    # 3,000 tasks each retrying in an hour. Held by the worker (Celery's ETA messages) they
    # grow its main process by about 9 KB each and, on RabbitMQ, fill its prefetch so that new
    # work waits behind them for minutes: here they wait on the broker.
    worker = workers.start(APP, settings={"worker_enable_remote_control": True})
    warmup = [publish(worker, "delayed.note") for _ in range(200)]
    assert [r.get(timeout=60) for r in warmup] == ["noted"] * 200
    before = main_rss_mib(worker)

    storm = [publish(worker, "delayed.later", 3600.0) for _ in range(3000)]
    worker.wait_for(lambda: waiting(worker) == 3000, timeout=180, what="3,000 retries waiting")
    after = main_rss_mib(worker)
    started = time.monotonic()
    probes = [publish(worker, "delayed.note") for _ in range(20)]

    assert [r.get(timeout=20) for r in probes] == ["noted"] * 20
    assert time.monotonic() - started < 20
    scheduled = worker.inspect(timeout=5).scheduled() or {}
    assert sum(len(held) for held in scheduled.values()) == 0  # none held by the worker
    assert after - before < 10, f"main process grew {after - before:.1f} MiB"
    attempts = runs(worker, "delayed.later")
    assert all(a["retries"] == 0 for a in attempts)  # no retry ran early
    assert {r.id for r in storm} == {a["id"] for a in attempts}
    # Each ran once (a redelivery would show as a second run, or as a run marked redelivered).
    twice = {i for i, n in Counter(a["id"] for a in attempts).items() if n > 1}
    assert len(attempts) == 3000, [a for a in attempts if a["id"] in twice]
    assert not any(a.get("redelivered") for a in attempts)


@pytest.mark.parametrize("kind", ["rabbitmq", "redis"])
def test_retries_waiting_on_a_broker_that_restarts_are_none_lost(kind: str, tmp_path: Path) -> None:
    # A private server (RabbitMQ, or Redis with an fsync-always append-only file): stopped
    # cleanly and started again on its data while 30 retries wait on it.
    server = private_rabbitmq() if kind == "rabbitmq" else persistent_redis(tmp_path / "redis")
    with server as broker_server:
        broker = broker_at(kind, broker_server.url)
        with contextmanager(running)(broker, tmp_path) as workers:
            worker = workers.start(APP, settings={"worker_enable_remote_control": True})
            results = [publish(worker, "delayed.later", 10.0) for _ in range(30)]
            worker.wait_for(lambda: waiting(worker) == 30, what="30 retries on the broker")
            # Every original settled (see the SIGKILL test): the retries are what waits.
            worker.wait_for(lambda: settled(worker), what="every original settled")

            broker_server.restart()

            assert [r.get(timeout=60) for r in results] == ["done"] * 30
            time.sleep(2.0)  # a second copy, if any, would have run by now
            for result in results:
                _, second = runs(worker, "delayed.later", result.id)
                assert second["retries"] == 1
                assert second["t"] >= datetime.fromisoformat(second["eta"]).timestamp()


class Twice:
    """A producer that publishes every message twice: what RabbitMQ's at-least-once
    dead-lettering does to a delayed message when a node fails while handing it on."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.producer, name)

    def publish(self, body: Any, **options: Any) -> Any:
        self.producer.publish(body, **options)
        return self.producer.publish(body, **options)


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_a_delayed_message_that_arrives_twice_runs_once(workers: WorkerRunner) -> None:
    worker = workers.start(APP, concurrency=1)
    note = define(worker.client)["delayed.note"]
    with worker.client.producer_or_acquire() as producer:
        copied = note.apply_async((str(worker.log),), countdown=1, producer=Twice(producer))
        once = note.apply_async((str(worker.log),), producer=Twice(producer))  # not delayed

    assert copied.get(timeout=20) == "noted"
    worker.wait_for(lambda: len(runs(worker, "delayed.note", once.id)) == 2, what="both copies")
    time.sleep(2.0)  # the second copy would have run by now
    assert len(runs(worker, "delayed.note", copied.id)) == 1
    assert "arrived twice" in worker.output_text()


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_delay_queues_declared_otherwise_leave_delays_to_the_worker(
    workers: WorkerRunner,
) -> None:
    # Someone declared the delay queues with other arguments (here: classic, no TTL): RabbitMQ
    # refuses the library's declaration, and the message is held by the worker instead of lost.
    worker = workers.start(APP)
    with worker.client.connection_for_write() as connection:
        connection.default_channel.queue_declare(
            f"{workers.broker.prefix}_celery_delayed_27", durable=True
        )

    result = publish(worker, "delayed.note", countdown=1)

    assert result.get(timeout=20) == "noted"
    (attempt,) = runs(worker, "delayed.note", result.id)
    assert attempt["t"] >= datetime.fromisoformat(attempt["eta"]).timestamp()
