"""The tools find the dead-letter queue of a queue chosen when the task was sent
(``apply_async(queue=...)``), which no route names: a real worker records every dead-letter
queue it publishes to in the broker's registry (:mod:`resilient_tasks.dlq.registry`), and
``DeadLetters`` and ``celery dlq`` read it, on every broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Queue

from apps.base import ENV_SETTINGS
from resilient_tasks import ResilientTask
from resilient_tasks.dlq import DeadLetters, QueueNotFound, dead_letter_queues
from resilient_tasks.dlq import registry as registry_module
from resilient_tasks.dlq.registry import (
    forget_dead_letter_queues,
    recorded_dead_letter_queues,
    registry_name,
)
from support.brokers import Broker
from support.worker import TESTS_DIR, Worker, WorkerRunner

APP = "apps.tools_app"
pytestmark = pytest.mark.worker


def noop() -> None:
    pass


def client_of(worker: Worker) -> Celery:
    """The test's client app, which implies ``<queue>.dlq`` as ``apps.tools_app`` does."""
    client = worker.client
    client.task(base=ResilientTask, name="tools.export", shared=False)(noop)
    return client


def dlq_cli(worker: Worker, *args: str) -> subprocess.CompletedProcess[str]:
    """``celery -A apps.tools_app dlq *args`` on the worker's settings, as a user runs it."""
    path = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, ENV_SETTINGS: json.dumps(worker.settings), "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "dlq", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def dead_letter_at_call_time(workers: WorkerRunner, count: int = 2) -> tuple[Worker, str, str]:
    """A worker on the test's queue and on ``bulk``, and ``count`` calls of ``tools.export``
    (which always raises) sent to ``bulk`` at call time; wait until the worker dead-lettered
    them to ``bulk.dlq``. Returns the worker, its queue's DLQ and ``bulk.dlq``."""
    queue, bulk = workers.broker.queue_name(), workers.broker.queue_name("bulk")
    worker = workers.start(APP, queues=[queue, bulk])
    client = client_of(worker)
    for n in range(count):
        client.send_task("tools.export", args=[n], queue=bulk)

    def arrived() -> bool:
        letters = DeadLetters(client)
        return f"{bulk}.dlq" in letters.queues and len(letters.list()) == count

    wait_for(arrived, f"{count} dead letters in {bulk}.dlq")
    return worker, f"{queue}.dlq", f"{bulk}.dlq"


def ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    return run.stdout


def test_the_dead_letter_queue_of_a_call_time_queue_is_found_without_naming_it(
    workers: WorkerRunner,
) -> None:
    worker, routed, bulk_dlq = dead_letter_at_call_time(workers)
    client = worker.client

    letters = DeadLetters(client)
    stats = letters.stats()
    everything = json.loads(ok(dlq_cli(worker, "stats", "--json")))
    narrowed = ok(dlq_cli(worker, "stats", "--queue", routed))
    listed = ok(dlq_cli(worker, "list"))

    assert letters.queues == (routed, bulk_dlq)
    assert [(q.queue, q.count) for q in stats.queues] == [(routed, 0), (bulk_dlq, 2)]
    assert {letter.task_name for letter in letters.list()} == {"tools.export"}
    # The command's app also implies <queue>.graveyard; the recorded queue comes after those.
    counts = [(q["queue"], q["count"]) for q in everything["queues"]]
    assert counts[0] == (routed, 0)
    assert counts[-1] == (bulk_dlq, 2)
    assert bulk_dlq not in narrowed
    assert "2 dead letters in" in listed
    assert bulk_dlq in listed
    assert DeadLetters(client, [bulk_dlq]).queues == (bulk_dlq,)


def test_a_recorded_queue_deleted_since_is_skipped_but_naming_it_is_an_error(
    workers: WorkerRunner,
) -> None:
    worker, routed, bulk_dlq = dead_letter_at_call_time(workers, count=1)
    client = worker.client
    with client.connection_for_write() as conn:
        bound = Queue(bulk_dlq, no_declare=True).bind(conn.default_channel)
        # Kombu's Redis and filesystem transports keep no unbound queue once it is empty
        # (their queue_delete only unbinds): purging is deleting.
        if workers.broker.kind == "rabbitmq":
            bound.delete()
        else:
            bound.purge()

    assert bulk_dlq in recorded_dead_letter_queues(client)
    assert DeadLetters(client).queues == (routed,)
    assert "No dead letters in" in ok(dlq_cli(worker, "stats"))
    named = dlq_cli(worker, "stats", "--queue", bulk_dlq)
    assert named.returncode != 0
    assert bulk_dlq in named.stderr
    with pytest.raises(QueueNotFound):
        DeadLetters(client, [bulk_dlq]).stats()


@pytest.mark.parametrize("broker", ["rabbitmq", "redis"], indirect=True)
def test_the_registry_holds_each_name_once_however_often_it_is_recorded(broker: Broker) -> None:
    """Every worker process records each of its dead-letter queues once; the tools read each
    name once and, on RabbitMQ, remove the duplicate recordings. On Redis the transport's
    ``global_keyprefix`` applies to the registry key."""
    options: dict[str, Any] = (
        {"global_keyprefix": f"{broker.prefix}:"} if broker.kind == "redis" else {}
    )
    app = Celery("registry", set_as_current=False)
    app.conf.update(broker.settings, broker_url=broker.url, broker_transport_options=options)
    registry = registry_name(app)
    try:
        for queue in ("bulk.dlq", "audit.dlq", "bulk.dlq", "bulk.dlq"):
            registry_module._write(app, registry, queue)  # as several processes would

        assert recorded_dead_letter_queues(app) == ("audit.dlq", "bulk.dlq")
        assert recorded_dead_letter_queues(app) == ("audit.dlq", "bulk.dlq")
        # (The app's routes imply others when a shared task of another test module is loaded.)
        listed = set(dead_letter_queues(app))
        assert not listed & {"audit.dlq", "bulk.dlq"}, "recorded queues that do not exist listed"
        with Connection(broker.url) as conn:
            if broker.kind == "rabbitmq":
                depth = conn.default_channel.queue_declare(registry, passive=True).message_count
                assert depth == 2, "the duplicate recordings were not removed"
            else:
                members = conn.default_channel.client.smembers(f"{broker.prefix}:{registry}")
                assert sorted(members) == [b"audit.dlq", b"bulk.dlq"]
        assert forget_dead_letter_queues(app, lambda queue: queue == "bulk.dlq") == 1
        assert recorded_dead_letter_queues(app) == ("audit.dlq",)
    finally:
        app.close()
        broker.cleanup([])


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_a_registry_that_cannot_be_written_costs_no_dead_letter(workers: WorkerRunner) -> None:
    """The registry queue exists with other arguments, so every recording fails
    (PRECONDITION_FAILED): the worker logs it and dead-letters as ever."""
    broker = workers.broker
    with Connection(broker.url) as conn:
        conn.default_channel.queue_declare(
            broker.registry, durable=True, arguments={"x-max-length": 1}
        )
    queue, bulk = broker.queue_name(), broker.queue_name("bulk")
    worker = workers.start(APP, queues=[queue, bulk])
    client = client_of(worker)
    for n in range(3):
        client.send_task("tools.export", args=[n], queue=bulk)

    def dead_lettered() -> bool:
        letters = DeadLetters(client, [f"{bulk}.dlq"])
        return letters.exists(f"{bulk}.dlq") and len(letters.list()) == 3

    wait_for(dead_lettered, f"3 dead letters in {bulk}.dlq")
    assert "could not record dead-letter queue" in worker.output_text()
    assert f"{bulk}.dlq" not in DeadLetters(client).queues
