"""Pool children killed at random lose nothing: every task succeeds or is dead-lettered, once."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter

import pytest

from support.worker import WorkerRunner

APP = "apps.timelimit_app"
TASKS = 1000
pytestmark = pytest.mark.worker


@pytest.mark.parametrize("broker", ["rabbitmq", "redis"], indirect=True)
def test_1000_tasks_with_pool_children_killed_at_random_lose_none(workers: WorkerRunner) -> None:
    worker = workers.start(APP)
    sent = {worker.send("tl.work", 0.005).id for _ in range(TASKS)}
    rng = random.Random(1234)
    dead_letters: list[dict[str, object]] = []
    kills = 0

    def done() -> set[str]:
        return {a["id"] for a in worker.attempts() if a.get("role") == "done"}

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        dead_letters += worker.drain(f"{worker.queue}.dlq")
        finished = done() | {e["task"]["id"] for e in dead_letters}  # type: ignore[index]
        if finished >= sent:
            break
        children = worker.pool_children()
        if children and kills < 40:
            os.kill(rng.choice(children), signal.SIGKILL)
            kills += 1
        # Often enough that a quick run (the 1000 tasks can settle in under 3 s) still sees
        # at least 10 kills.
        time.sleep(0.1)
    time.sleep(2)  # anything still to come (a duplicate) arrives now
    dead_letters += worker.drain(f"{worker.queue}.dlq")

    dead_lettered = Counter(e["task"]["id"] for e in dead_letters)  # type: ignore[index]
    assert kills >= 10
    assert done() | set(dead_lettered) == sent  # none lost
    assert set(dead_lettered) <= sent
    assert max(dead_lettered.values(), default=1) == 1  # none dead-lettered twice
    assert {e["reason"] for e in dead_letters} <= {"worker_lost"}
    assert worker.process.poll() is None
