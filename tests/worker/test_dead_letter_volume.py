"""At volume: every permanent failure is dead-lettered exactly once, and replay brings it back."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from resilient_tasks.publish import publish_envelope
from support.worker import Worker, WorkerRunner

APP = "apps.deadletter_app"
TASKS, FAILING = 1000, 300
pytestmark = pytest.mark.worker


@pytest.mark.parametrize("broker", ["rabbitmq", "redis"], indirect=True)
def test_1000_tasks_300_dead_lettered_once_each_then_replayed_to_success(
    workers: WorkerRunner, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.touch()  # the bug: records with n % 10 < 3 are rejected while it exists
    worker = workers.start(APP)
    sent = {worker.send("dl.sometimes", n, str(broken)).id: n for n in range(TASKS)}
    failing = {task_id for task_id, n in sent.items() if n % 10 < 3}

    envelopes = worker.dead_letters(FAILING, timeout=120)
    worker.wait_for(
        lambda: len(successes(worker)) >= TASKS - FAILING, timeout=120, what="the successes"
    )
    time.sleep(1)
    envelopes += worker.drain(f"{worker.queue}.dlq")

    assert len(envelopes) == FAILING
    assert {e["task"]["id"] for e in envelopes} == failing
    assert {e["reason"] for e in envelopes} == {"permanent"}
    assert all(len(e["attempts"]) == 1 for e in envelopes)
    assert all(e["task"]["args"][0] == sent[e["task"]["id"]] for e in envelopes)
    assert set(successes(worker)) == set(sent) - failing
    assert max(successes(worker).values()) == 1  # nothing ran twice

    # Fix the cause, then replay what failed, as an operator would.
    for envelope in envelopes:  # back into the dead-letter queue, which drain() emptied
        republish(worker, envelope)
    broken.unlink()
    replay = worker.celery("dlq", "replay", "--queue", f"{worker.queue}.dlq")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    worker.wait_for(
        lambda: set(successes(worker)) == set(sent), timeout=120, what="the replayed tasks"
    )

    replayed = [a for a in worker.attempts() if a.get("id") in failing]
    assert len(replayed) == FAILING  # each once
    assert all(a["headers"]["resilient_replays"] == 1 for a in replayed)
    assert all("resilient_history" not in a["headers"] for a in replayed)
    listing = worker.celery("dlq", "list", "--queue", f"{worker.queue}.dlq", "--json")
    assert listing.returncode == 0
    assert listing.stdout.strip() == ""  # the dead-letter queue is empty


def successes(worker: Worker) -> Counter[str]:
    return Counter(a["id"] for a in worker.attempts() if a["task"] == "dl.sometimes")


def republish(worker: Worker, envelope: dict[str, Any]) -> None:
    publish_envelope(worker.client, f"{worker.queue}.dlq", envelope, worker.queue)


@pytest.mark.parametrize("broker", ["rabbitmq", "redis"], indirect=True)
def test_a_warm_shutdown_mid_burst_dead_letters_each_failure_once(
    workers: WorkerRunner,
) -> None:
    # The main process publishes envelopes without waiting for each confirm: stopping the
    # worker (SIGTERM) while confirms are on their way must neither lose a failure nor
    # dead-letter it twice. A second worker finishes what the first left.
    worker = workers.start(APP, concurrency=2)
    sent = {worker.send("dl.permanent", n, str(worker.log)).id for n in range(400)}
    found: list[Any] = []
    worker.wait_for(
        lambda: found.extend(worker.drain(f"{worker.queue}.dlq")) or len(found) >= 60,
        what="the first 60 dead letters",
    )

    workers.stop(worker, signal.SIGTERM, timeout=120)  # a warm shutdown drains what it holds
    assert worker.process.returncode == 0  # a warm shutdown, not killed
    workers.start(APP, queues=[worker.queue])
    found += worker.dead_letters(400 - len(found), timeout=120)
    time.sleep(1.0)
    found += worker.drain(f"{worker.queue}.dlq")

    ids = Counter(e["task"]["id"] for e in found)
    assert set(ids) == sent
    assert max(ids.values()) == 1
