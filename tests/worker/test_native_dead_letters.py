"""RabbitMQ's own dead-lettering lands in the same dead-letter queues as the library's."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import celery
import pytest

from apps.native_queues import native_queues
from resilient_tasks._delayed_rabbitmq import FRACTION_LEVELS, Topology
from resilient_tasks.rabbitmq import declare_dead_letter_queues
from support.worker import Worker, WorkerRunner

APP = "apps.native_app"
# Celery's delayed-delivery topology (celery_delayed_*) is one per broker and these tests remove
# it: they run one at a time (the conftest's celery_delayed_delivery lock).
pytestmark = [pytest.mark.worker, pytest.mark.usefixtures("celery_delayed_delivery")]
CELERY = tuple(int(p) for p in celery.__version__.split(".")[:2])
CELERY_DELAYED_DELIVERY = [f"celery_delayed_{level}" for level in range(28)] + [
    "celery_delayed_delivery",
    *(Topology().fraction(ms) for ms in FRACTION_LEVELS),
    Topology().levels,
]


def start(workers: WorkerRunner, native: dict[str, Any], queues: list[str]) -> Worker:
    worker = workers.start(APP, queues=queues, settings={"rt_native": native})
    worker.client.conf.task_queues = native_queues(native)
    for queue in worker.client.conf.task_queues:
        workers.queues.update((queue.name, f"{queue.name}.dlq"))
    return worker


def x_death(message: Any) -> dict[str, Any]:
    return message.headers["x-death"][0]


def broker_dead_letters(worker: Worker, queue: str, count: int) -> list[Any]:
    """Raw messages RabbitMQ dead-lettered into ``queue`` (not envelopes)."""
    found: list[Any] = []

    def collect() -> bool:
        with worker.client.connection_for_read() as conn:
            bound = worker.client.amqp.queues[queue.removesuffix(".dlq")]
            dlq = type(bound)(queue, durable=True).bind(conn.default_channel)
            dlq.queue_declare(passive=True)
            while (message := dlq.get(no_ack=True)) is not None:
                found.append(message)
        return len(found) >= count

    worker.wait_for(collect, what=f"{count} broker dead letters in {queue}")
    return found


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_rejected_message_is_dead_lettered_by_rabbitmq(workers: WorkerRunner) -> None:
    queue = workers.broker.queue_name()
    worker = start(workers, {"classic": [{"name": queue}]}, [queue])

    result = worker.send("native.reject", queue=queue)

    (message,) = broker_dead_letters(worker, f"{queue}.dlq", 1)
    assert message.headers["id"] == result.id
    assert x_death(message)["reason"] == "rejected"
    assert x_death(message)["queue"] == queue


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_expired_message_is_dead_lettered_by_rabbitmq(workers: WorkerRunner) -> None:
    served, expiring = workers.broker.queue_name("served"), workers.broker.queue_name("ttl")
    native = {
        "classic": [{"name": served}, {"name": expiring, "arguments": {"x-message-ttl": 100}}]
    }
    worker = start(workers, native, [served])
    with worker.client.connection_for_write() as conn:
        worker.client.amqp.queues[expiring].bind(conn.default_channel).declare()
    declare_dead_letter_queues(worker.client)

    result = worker.send("native.reject", queue=expiring)

    (message,) = broker_dead_letters(worker, f"{expiring}.dlq", 1)
    assert message.headers["id"] == result.id
    assert x_death(message)["reason"] == "expired"


@pytest.mark.skipif(CELERY < (5, 5), reason="Celery consumes quorum queues from 5.5 on")
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_quorum_delivery_limit_dead_letters_a_poison_message(workers: WorkerRunner) -> None:
    queue = workers.broker.queue_name("quorum")
    # Celery >= 5.5 builds its delayed-delivery topology for quorum queues: remove it after.
    workers.broker.extra_cleanup += CELERY_DELAYED_DELIVERY
    worker = start(workers, {"classic": [], "quorum": [queue], "delivery_limit": 2}, [queue])

    result = worker.send("native.poison", queue=queue)

    (message,) = broker_dead_letters(worker, f"{queue}.dlq", 1)
    time.sleep(0.5)
    assert message.headers["id"] == result.id
    assert x_death(message)["reason"] == "delivery_limit"
    deliveries = [a for a in worker.attempts() if a["id"] == result.id]
    assert len(deliveries) == 3  # the first delivery and two more, then RabbitMQ stops it


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_broker_dead_lettered_messages_are_listed_and_replayed(workers: WorkerRunner) -> None:
    served, expiring = workers.broker.queue_name("served"), workers.broker.queue_name("ttl")
    ttl = {"name": expiring, "arguments": {"x-message-ttl": 100}}
    worker = start(workers, {"classic": [{"name": served}, ttl]}, [served])
    with worker.client.connection_for_write() as conn:
        worker.client.amqp.queues[expiring].bind(conn.default_channel).declare()
    declare_dead_letter_queues(worker.client)
    result = worker.send("native.ok", queue=expiring)
    dlq = f"{expiring}.dlq"
    worker.wait_for(lambda: listed(worker, dlq), what="the expired message in the DLQ")

    (letter,) = listed(worker, dlq)
    replay = worker.celery("dlq", "replay", "--queue", dlq, "--to-queue", served)

    assert letter["reason"] == "expired"
    assert letter["task"]["id"] == result.id
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert result.get(timeout=30, interval=0.05) == "ok"
    assert listed(worker, dlq) == []


def listed(worker: Worker, queue: str) -> list[dict[str, Any]]:
    run = worker.celery("dlq", "list", "--queue", queue, "--json")
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(CELERY < (5, 5), reason="Celery consumes quorum queues from 5.5 on")
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_a_retry_on_a_quorum_queue_with_a_direct_exchange_waits_on_the_broker(
    workers: WorkerRunner,
) -> None:
    # Celery 5.5+ delays natively only through topic and fanout exchanges; on a direct one (its
    # default) it warns and the worker holds the retry. The library's delay goes through.
    queue = workers.broker.queue_name("quorum")
    workers.broker.extra_cleanup += CELERY_DELAYED_DELIVERY
    worker = start(workers, {"classic": [], "quorum": [queue]}, [queue])

    result = worker.send("native.later", queue=queue)

    assert result.get(timeout=30) == "done"
    first, second = [a for a in worker.attempts() if a["id"] == result.id]
    assert second["t"] >= datetime.fromisoformat(second["eta"]).timestamp() >= first["t"] + 2
    assert second["queue"] == queue  # its own route back, not the delay topology's
    deaths = {d["queue"] for d in second["headers"]["x-death"]}
    assert deaths == {f"{workers.broker.prefix}_celery_delayed_{level}" for level in (1,)}
    assert "Direct exchanges are not supported" not in worker.output_text()
