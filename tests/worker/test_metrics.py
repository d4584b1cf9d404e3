"""The worker's Prometheus endpoint (``resilient_tasks_metrics_port``) on a real prefork worker:
known work, scraped over HTTP, counted exactly, the pool children's counts included."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.worker import Worker, WorkerRunner

APP = "apps.metrics_app"
pytestmark = pytest.mark.worker

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> Samples:
    """Every sample the endpoint serves, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def counts(samples: Samples) -> Samples:
    """The counters and the histogram's count and sum (rounded), without the buckets."""
    return {
        key: round(value, 6)
        for key, value in samples.items()
        if key[0].startswith("resilient_tasks_")
        and key[0].endswith(("_total", "_seconds_count", "_seconds_sum"))
    }


def wait_for_counts(worker: Worker, port: int, expected: Samples, timeout: float = 60) -> Samples:
    """Scrape until the counts are ``expected`` (or the deadline passes); return the last."""
    seen: Samples = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = counts(scrape(port))
        if seen == expected:
            break
        time.sleep(0.2)
    assert seen == expected, worker.output_text()[-3000:]
    return seen


def pool_children(worker: Worker) -> set[int]:
    """The worker's pool processes, whichever of its threads forked them (without an event
    loop, billiard's supervisor thread replaces the children)."""
    found: set[int] = set()
    for children in Path(f"/proc/{worker.process.pid}/task").glob("*/children"):
        with suppress(OSError):
            found.update(int(pid) for pid in children.read_text().split())
    return found


def task(name: str) -> tuple[tuple[str, str], ...]:
    return (("task", name),)


def start(workers: WorkerRunner, port: int, **settings: Any) -> Worker:
    return workers.start(APP, settings={"resilient_tasks_metrics_port": port, **settings})


def test_the_endpoint_counts_the_work_of_every_pool_child(workers: WorkerRunner) -> None:
    port = free_port()
    worker = start(workers, port)
    results = [worker.send("metrics.ok") for _ in range(4)]
    results += [worker.send("metrics.flaky", 2) for _ in range(3)]
    for _ in range(2):
        worker.send("metrics.doomed")

    for result in results:
        assert result.get(timeout=60, interval=0.05) == "done"
    expected = {
        ("resilient_tasks_task_attempts_total", task("metrics.ok")): 4,
        ("resilient_tasks_task_attempts_total", task("metrics.flaky")): 9,
        ("resilient_tasks_task_attempts_total", task("metrics.doomed")): 2,
        ("resilient_tasks_task_retries_total", task("metrics.flaky")): 6,
        ("resilient_tasks_retry_delay_seconds_count", task("metrics.flaky")): 6,
        ("resilient_tasks_retry_delay_seconds_sum", task("metrics.flaky")): 1.2,
        (
            "resilient_tasks_task_dead_letters_total",
            (("reason", "permanent"), ("task", "metrics.doomed")),
        ): 2,
    }
    wait_for_counts(worker, port, expected)
    # Both children ran tasks: the sum is over processes, not one child's view.
    pids = {attempt["pid"] for attempt in worker.attempts()}
    assert len(pids) == 2
    # The dead-letter queue's depth, measured on the broker at scrape time.
    depth = ("resilient_tasks_dead_letter_queue_depth", (("queue", f"{worker.queue}.dlq"),))
    worker.wait_for(lambda: scrape(port).get(depth) == 2, what="a DLQ depth of 2")
    assert len(worker.dead_letters(2)) == 2
    assert counts(scrape(port)) == expected  # nothing counted twice meanwhile

    # The worker removes the directory its processes counted in when it exits.
    found = re.search(r"counted in (\S+)\)", worker.output_text())
    assert found is not None
    directory = Path(found.group(1))
    assert directory.is_dir()
    workers.stop(worker)
    assert worker.process.returncode == 0
    assert not directory.exists()


def test_delayed_messages_waiting_on_the_broker_are_a_gauge(workers: WorkerRunner) -> None:
    port = free_port()
    worker = start(workers, port)
    worker.send("metrics.later")
    retried = ("resilient_tasks_task_retries_total", task("metrics.later"))
    worker.wait_for(lambda: scrape(port).get(retried) == 1, what="the retry counted")

    def waiting() -> float:
        samples = scrape(port)
        return sum(
            v for (name, _), v in samples.items() if name == "resilient_tasks_delayed_messages"
        )

    if workers.broker.kind == "filesystem":  # the worker holds its delayed messages itself
        assert waiting() == 0
    else:
        worker.wait_for(lambda: waiting() == 1, what="one delayed message waiting")


def test_replaced_pool_children_lose_no_counts(workers: WorkerRunner) -> None:
    port = free_port()
    # Every child exits after one task and is replaced by a new one.
    worker = start(workers, port, worker_max_tasks_per_child=1)
    first = pool_children(worker)
    for result in [worker.send("metrics.ok") for _ in range(6)]:
        assert result.get(timeout=60, interval=0.05) == "done"
    assert worker.send("metrics.flaky", 1).get(timeout=60, interval=0.05) == "done"
    expected = {
        ("resilient_tasks_task_attempts_total", task("metrics.ok")): 6,
        ("resilient_tasks_task_attempts_total", task("metrics.flaky")): 2,
        ("resilient_tasks_task_retries_total", task("metrics.flaky")): 1,
        ("resilient_tasks_retry_delay_seconds_count", task("metrics.flaky")): 1,
        ("resilient_tasks_retry_delay_seconds_sum", task("metrics.flaky")): 0.2,
    }
    wait_for_counts(worker, port, expected)
    assert len({attempt["pid"] for attempt in worker.attempts()}) == 8  # a new child each time
    worker.wait_for(lambda: len(pool_children(worker)) == 2, what="two pool children")
    assert not first & pool_children(worker)

    if workers.broker.kind == "filesystem":
        # Without an event loop (this transport), billiard's children share one task queue
        # whose lock an idle child may hold while it waits: killing it would hang the pool.
        return
    # A child killed outright is replaced too: its counts stay.
    victim = min(pool_children(worker))
    os.kill(victim, signal.SIGKILL)
    worker.wait_for(
        lambda: len(pool_children(worker) - {victim}) == 2, what="the killed child replaced"
    )
    assert counts(scrape(port)) == expected
    assert worker.send("metrics.ok").get(timeout=60, interval=0.05) == "done"
    expected[("resilient_tasks_task_attempts_total", task("metrics.ok"))] = 7
    wait_for_counts(worker, port, expected)


def test_nothing_is_served_without_the_setting(workers: WorkerRunner) -> None:
    port = free_port()
    worker = workers.start(APP)

    assert worker.send("metrics.ok").get(timeout=60, interval=0.05) == "done"

    with pytest.raises(urllib.error.URLError):
        scrape(port)
    assert "Prometheus metrics on" not in worker.output_text()
