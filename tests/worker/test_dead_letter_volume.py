"""At volume: every permanent failure is dead-lettered exactly once, and replay brings it back."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

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


def successes(worker: Worker) -> Counter[str]:
    return Counter(a["id"] for a in worker.attempts() if a["task"] == "dl.sometimes")
