"""A circuit breaker and a retry budget shared by two workers, on RabbitMQ and Redis.

The state lives in Redis: the broker's when it is Redis, else ``resilient_tasks_state_url``
(the loopback Redis here). Each test names its own breaker and budget and deletes their state.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apps.base import read_log
from resilient_tasks._fleet_state import RedisStore
from resilient_tasks.delayed import delayed_stats
from support.brokers import REDIS_URL, Broker
from support.servers import persistent_redis
from support.worker import WorkerRunner

APP = "apps.protect_app"
pytestmark = pytest.mark.worker
BOTH = pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)


@pytest.fixture
def names(broker: Broker) -> Iterator[dict[str, Any]]:
    """The test's breaker and budget, and settings that share their state between workers;
    their keys are deleted afterwards."""
    breaker, budget = f"{broker.prefix}-payments", f"{broker.prefix}-budget"
    state_url = broker.url if broker.kind == "redis" else REDIS_URL
    settings = {"test_breaker": breaker, "test_budget": budget}
    if broker.kind != "redis":
        settings["resilient_tasks_state_url"] = state_url
    yield {"breaker": breaker, "budget": budget, "settings": settings}
    store = RedisStore(state_url)
    store.forget(breakers=(breaker,), budgets=(budget,))
    store.client.close()


@BOTH
@pytest.mark.timeout(240)
def test_an_open_breaker_spares_a_dependency_that_is_down(
    workers: WorkerRunner, names: dict[str, Any], tmp_path: Path
) -> None:
    settings = names["settings"]
    first = workers.start(APP, settings=settings)
    second = workers.start(APP, queues=[first.queue], settings=settings)
    flag, calls = tmp_path / "payments-down", tmp_path / "calls.log"
    flag.touch()

    results = [first.send("protect.charge", str(flag), str(calls))
               for _ in range(200)]  # fmt: skip
    time.sleep(20.0)  # the outage
    calls_while_down = len(read_log(calls))
    # The deferred tasks wait on the broker, not in a worker's memory: in the delay queues
    # (RabbitMQ, the test's own topology) or the sorted set (Redis), or back in their queue.
    stats = delayed_stats(first.client)
    rabbitmq = first.client.connection_for_write().transport.driver_type == "amqp"
    delayed = sum(q.waiting for q in stats if rabbitmq or q.queue == first.queue)
    with first.client.connection_for_read() as connection:
        try:
            ready = connection.default_channel.queue_declare(first.queue, passive=True)[1]
        except connection.channel_errors:  # Redis: an empty queue is no queue
            ready = 0
    assert delayed + ready >= 140, f"{delayed} delayed, {ready} in the queue"
    flag.unlink()

    assert [r.get(timeout=120) for r in results] == ["paid"] * 200
    # A few dozen calls reached the dependency while it was down: the first failures up to
    # minimum_calls, what was already running, and one probe per reset_timeout.
    assert calls_while_down <= 60, f"{calls_while_down} calls while down"
    time.sleep(2.0)  # a second run, if any, would have happened by now
    log = read_log(calls)
    succeeded = [c for c in log if c["up"]]
    assert len(succeeded) == 200, f"{len(succeeded)} successful calls for 200 tasks"
    assert first.drain(f"{first.queue}.dlq") == []
    deferred = [a for a in first.attempts() if a["headers"].get("resilient_deferrals")]
    assert deferred, "no task was deferred"
    assert max(a["retries"] for a in first.attempts()) < 9  # deferrals spent no retries
    output = first.output_text() + second.output_text()
    assert output.count(f"circuit breaker {names['breaker']!r} opened") >= 1
    assert f"circuit breaker {names['breaker']!r} closed" in output


@BOTH
@pytest.mark.timeout(240)
def test_a_retry_budget_caps_the_fleets_retries(
    workers: WorkerRunner, names: dict[str, Any]
) -> None:
    settings = names["settings"]
    first = workers.start(APP, settings=settings)
    workers.start(APP, queues=[first.queue], settings=settings)

    results = [first.send("protect.flaky") for _ in range(200)]
    letters = first.dead_letters(200, timeout=120)

    assert len({r.id for r in results}) == 200
    assert {e["task"]["id"] for e in letters} == {r.id for r in results}  # none lost
    reasons = Counter(e["reason"] for e in letters)
    assert set(reasons) <= {"retry_budget_exhausted", "retries_exhausted"}, reasons
    attempts = first.attempts()
    retries = sum(1 for a in attempts if a["retries"] > 0)
    # 10 % of 200 first attempts plus 0.1/s over the 60 s window: 26 retries at most, where
    # 9 each (1,800) would have been made without the budget.
    assert 20 <= retries <= 26, f"{retries} retries"
    assert len(attempts) == 200 + retries


def said(worker: Any, text: str) -> list[str]:
    """The worker's WARNING lines that say ``text``."""
    return [line for line in worker.output_text().splitlines()
            if text in line and "WARNING" in line]  # fmt: skip


@pytest.mark.parametrize("broker", ["filesystem", "rabbitmq"], indirect=True)
@pytest.mark.timeout(240)
def test_the_state_store_going_away_stops_no_work(
    workers: WorkerRunner, names: dict[str, Any], tmp_path: Path
) -> None:
    with persistent_redis(tmp_path / "state") as store:
        settings = {**names["settings"], "resilient_tasks_state_url": store.url}
        first = workers.start(APP, settings=settings)
        second = workers.start(APP, queues=[first.queue], settings=settings)
        flag, calls = tmp_path / "payments-down", tmp_path / "calls.log"

        def run(count: int) -> None:
            results = []
            for _ in range(count):  # over a few seconds: every process meets the store
                results.append(first.send("protect.mixed", str(flag), str(calls)))
                time.sleep(0.05)
            assert [r.get(timeout=60) for r in results] == ["paid"] * count

        run(50)
        store.stop()
        run(50)
        # Said once per worker at most (its main process and pool processes each notice it).
        down = [said(w, "does not answer") for w in (first, second)]
        assert all(len(lines) <= 1 for lines in down), down
        assert any(down), "no worker said the store went away"
        assert "circuit breakers and retry budgets are off" in [*down[0], *down[1]][0]

        store.start()
        time.sleep(6.0)  # the store is tried again 5 s after it failed
        run(50)
        back = [said(w, "are back on") for w in (first, second)]
        assert all(len(lines) <= 1 for lines in back), back
        assert any(back), "no worker said the store is back"
    runs = Counter(a["id"] for a in first.attempts())
    assert sorted(runs.values()) == [1] * 150  # each ran once, none lost
    assert first.drain(f"{first.queue}.dlq") == []
