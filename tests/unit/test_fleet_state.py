"""The breaker's and the budget's state machines against a fake clock, in both stores: the
per-process one (Python) and Redis' Lua scripts, which must agree step for step."""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from resilient_tasks import CircuitBreaker, ConfigurationError, RetryBudget, RetryPolicy
from resilient_tasks import breaker as breaker_module
from resilient_tasks._fleet_state import FleetState, LocalStore, RedisStore
from support.brokers import REDIS_URL


def breaker(name: str | None = None, **overrides: Any) -> CircuitBreaker:
    options: dict[str, Any] = {
        "failure_threshold": 0.5,
        "minimum_calls": 4,
        "window": 10.0,
        "reset_timeout": 5.0,
    }
    return CircuitBreaker(name or f"b-{uuid.uuid4().hex[:8]}", **{**options, **overrides})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def local(clock: Clock) -> LocalStore:
    return LocalStore(clock)


def redis_store() -> RedisStore:
    store = RedisStore(REDIS_URL)
    try:
        store.client.ping()
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {REDIS_URL} does not answer ({exc}); CI=true requires it")
        pytest.skip(f"Redis at {REDIS_URL} does not answer ({exc})")
    return store


@pytest.fixture
def shared() -> Iterator[RedisStore]:
    store = redis_store()
    yield store
    keys = list(store.client.scan_iter(match="resilient_tasks:*:unit-*"))
    if keys:
        store.client.delete(*keys)
    store.client.close()


# -- the breaker -------------------------------------------------------------------------------


def test_it_opens_when_the_failed_share_reaches_the_threshold_after_minimum_calls(
    local: LocalStore,
) -> None:
    spec = breaker()
    assert local.breaker(spec, "report", failures=1).state == "closed"  # 1 call: too few
    assert local.breaker(spec, "report", successes=2).state == "closed"
    opened = local.breaker(spec, "report", failures=1)  # 2 failed of 4
    assert (opened.state, opened.transition) == ("open", "opened")
    assert (opened.calls, opened.failures) == (4, 2)
    assert opened.remaining == 5.0


def test_successes_keep_it_closed_below_the_threshold(local: LocalStore) -> None:
    spec = breaker()
    local.breaker(spec, "report", successes=10)
    for _ in range(9):
        reply = local.breaker(spec, "report", failures=1)
    assert reply.state == "closed"  # 9 of 19 failed: under half
    assert local.breaker(spec, "report", failures=1).state == "open"  # 10 of 20


def test_failures_slide_out_of_the_window(local: LocalStore, clock: Clock) -> None:
    spec = breaker()
    local.breaker(spec, "report", failures=3)
    clock.now += 10.5  # past the window: those three are gone
    reply = local.breaker(spec, "report", failures=1)
    assert (reply.state, reply.calls) == ("closed", 1)


def test_open_defers_until_reset_then_lets_one_probe_through(
    local: LocalStore, clock: Clock
) -> None:
    spec = breaker()
    local.breaker(spec, "report", failures=4)
    clock.now += 2.0
    deferred = local.breaker(spec, "admit")
    assert (deferred.action, deferred.wait) == ("defer", 3.0)
    clock.now += 3.0
    probe = local.breaker(spec, "admit")
    assert (probe.action, probe.state, probe.transition) == ("probe", "half_open", "half_open")
    other = local.breaker(spec, "admit")
    assert other.action == "defer"  # one probe at a time
    assert 1.0 <= other.wait <= 5.0


def test_a_probe_that_succeeds_closes_it_and_one_that_fails_opens_it(
    local: LocalStore, clock: Clock
) -> None:
    spec = breaker()
    local.breaker(spec, "report", failures=4)
    clock.now += 5.0
    local.breaker(spec, "admit")
    failed = local.breaker(spec, "report", probe="fail")
    assert (failed.state, failed.transition, failed.remaining) == ("open", "opened", 5.0)
    clock.now += 5.0
    local.breaker(spec, "admit")
    closed = local.breaker(spec, "report", probe="ok")
    assert (closed.state, closed.transition, closed.calls) == ("closed", "closed", 0)
    assert local.breaker(spec, "admit").action == "run"


def test_a_probe_that_never_reports_frees_its_place_after_reset_timeout(
    local: LocalStore, clock: Clock
) -> None:
    spec = breaker(half_open_probes=2)
    local.breaker(spec, "report", failures=4)
    clock.now += 5.0
    assert [local.breaker(spec, "admit").action for _ in range(3)] == ["probe", "probe", "defer"]
    clock.now += 5.0  # both probes' workers died
    assert local.breaker(spec, "admit").action == "probe"


def test_outcomes_of_tasks_started_before_it_opened_do_not_count(local: LocalStore) -> None:
    spec = breaker()
    local.breaker(spec, "report", failures=4)
    reply = local.breaker(spec, "report", successes=50, failures=3)
    assert (reply.state, reply.calls) == ("open", 0)


def test_the_lua_script_and_the_python_agree_step_for_step(shared: RedisStore) -> None:
    rng = random.Random(7)
    for _ in range(5):
        spec = breaker(
            name=f"unit-{uuid.uuid4().hex[:8]}",
            minimum_calls=rng.randint(1, 6),
            failure_threshold=rng.choice([0.25, 0.5, 1.0]),
            half_open_probes=rng.randint(1, 3),
        )
        local, now = LocalStore(lambda: 0.0), 5000.0
        for _ in range(300):
            now += rng.choice([0.0, 0.1, 0.7, 2.5, 6.0])
            op = rng.choice(["admit", "report"])
            counts = {
                "successes": rng.choice([0, 0, 1, 3]),
                "failures": rng.choice([0, 1, 2]),
                "probe": rng.choice(["", "", "ok", "fail", "release"]),
            }
            expected = local.breaker(spec, op, now=now, **counts)
            assert shared.breaker(spec, op, now=now, **counts) == expected


# -- the budget --------------------------------------------------------------------------------


def test_a_budget_allows_its_ratio_of_first_attempts_plus_the_minimum(local: LocalStore) -> None:
    budget = RetryBudget(ratio=0.1, min_retries_per_second=0.5, window=10.0)
    local.budget(budget, "k", deposits=100, spend=False)
    granted = [local.budget(budget, "k", 0, spend=True).granted for _ in range(20)]
    assert granted.count(True) == 15  # 0.1 * 100 + 0.5 * 10


def test_a_budget_refills_as_its_retries_slide_out(local: LocalStore, clock: Clock) -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.2, window=10.0)
    assert [local.budget(budget, "k", 0, True).granted for _ in range(3)] == [True, True, False]
    clock.now += 10.5
    assert local.budget(budget, "k", 0, True).granted


def test_budgets_with_other_keys_are_apart(local: LocalStore) -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10.0)
    assert local.budget(budget, "a", 0, True).granted
    assert not local.budget(budget, "a", 0, True).granted
    assert local.budget(budget, "b", 0, True).granted


def test_the_budget_script_agrees_with_the_python(shared: RedisStore) -> None:
    rng = random.Random(11)
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0.3, window=5.0)
    key, local, now = f"unit-{uuid.uuid4().hex[:8]}", LocalStore(lambda: 0.0), 9000.0
    for _ in range(300):
        now += rng.choice([0.0, 0.05, 0.4, 1.3, 6.0])
        deposits, spend = rng.choice([0, 0, 1, 5]), rng.random() < 0.6
        expected = local.budget(budget, key, deposits, spend, now=now)
        got = shared.budget(budget, key, deposits, spend, now=now)
        assert (got.granted, got.attempts, got.retries) == (
            expected.granted,
            expected.attempts,
            expected.retries,
        )
        assert got.allowed == pytest.approx(expected.allowed)


# -- failing open ------------------------------------------------------------------------------


def test_a_store_that_does_not_answer_fails_open_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_tasks._fleet_state")
    state = FleetState(RedisStore("redis://127.0.0.1:1/0"), "redis://127.0.0.1:1/0")
    spec = breaker()
    assert state.breaker(spec, "admit") is None
    assert state.budget(RetryBudget(0.1, 1, 10), "k", 1, True) is None
    assert [r.message for r in caplog.records].count(
        next(r.message for r in caplog.records if "does not answer" in r.message)
    ) == 1


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_threshold": 1.5}, "failure_threshold"),
        ({"minimum_calls": 0}, "minimum_calls"),
        ({"window": -1}, "window"),
        ({"reset_timeout": "soon"}, "reset_timeout"),
        ({"on": "ConnectionError"}, "on"),
        ({"half_open_probes": 0}, "half_open_probes"),
    ],
)
def test_a_bad_breaker_is_refused_naming_the_argument(options: dict[str, Any], named: str) -> None:
    valid = {"failure_threshold": 0.5, "minimum_calls": 5, "window": 10, "reset_timeout": 5}
    with pytest.raises(ConfigurationError, match=rf"CircuitBreaker\('pay'\): {named}"):
        CircuitBreaker("pay", **{**valid, **options})


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"min_retries_per_second": "1"}, "min_retries_per_second"),
        ({"window": 0}, "window"),
        ({"key": ""}, "key"),
    ],
)
def test_a_bad_budget_is_refused_naming_the_argument(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"RetryBudget: {named}"):
        RetryBudget(**{"ratio": 0.1, "min_retries_per_second": 1, "window": 10, **options})


def test_a_policy_refuses_a_budget_that_is_not_one() -> None:
    with pytest.raises(ConfigurationError, match="RetryPolicy: budget"):
        RetryPolicy(budget=0.1)  # type: ignore[arg-type]


# -- the worker's side: what an ending tells the breaker ------------------------------------------


class FakeRequest:
    """What :func:`resilient_tasks.breaker.admit` / ``report`` read of a worker request."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.id = uuid.uuid4().hex


def guarded_task(spec: CircuitBreaker) -> Any:
    from celery import Celery

    app = Celery(f"unit-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    return SimpleNamespace(app=app, circuit_breaker=spec, name="unit.guarded")


def half_open(spec: CircuitBreaker, task: Any) -> FakeRequest:
    """Open the breaker, let reset_timeout pass, and admit one probe."""
    from resilient_tasks._fleet_state import state_for

    state_for(task.app).store.breaker(spec, "report", failures=spec.minimum_calls)
    state_for(task.app).store.breaker(spec, "admit", now=time.monotonic() + spec.reset_timeout)
    state_for(task.app).store.breaker(spec, "report", probe="release")  # that probe is gone
    probe = FakeRequest(task)
    probe._resilient_probe = True  # type: ignore[attr-defined]
    state_for(task.app).store.breaker(spec, "admit")  # its place, as admit() takes it
    return probe


def test_a_probe_whose_process_died_frees_its_place_and_closes_nothing() -> None:
    from celery.exceptions import WorkerLostError

    from resilient_tasks._fleet_state import state_for

    spec = breaker(reset_timeout=0.01)
    task = guarded_task(spec)
    probe = half_open(spec, task)

    breaker_module.report(probe, WorkerLostError("killed"))

    reply = state_for(task.app).store.breaker(spec, "admit")
    assert (reply.state, reply.action) == ("half_open", "probe")  # not closed; the place is free


def test_a_hard_time_limit_counts_when_on_names_it() -> None:
    from celery.exceptions import TimeLimitExceeded

    from resilient_tasks._fleet_state import state_for

    spec = breaker(on=(ConnectionError, TimeLimitExceeded), minimum_calls=2)
    task = guarded_task(spec)
    for _ in range(2):
        breaker_module.report(FakeRequest(task), TimeLimitExceeded(30))
    assert state_for(task.app).store.breaker(spec, "report").state == "open"


def test_a_sentinel_broker_is_no_state_store_url() -> None:
    from celery import Celery

    from resilient_tasks._fleet_state import state_url

    app = Celery("unit-sentinel", broker="sentinel://127.0.0.1:26379", set_as_current=False)
    assert state_url(app) is None
