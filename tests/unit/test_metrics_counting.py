"""resilient_tasks.metrics without a worker: the setting, what each occurrence counts, the
gauges measured at scrape time."""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from prometheus_client import CollectorRegistry

from resilient_tasks import CircuitBreaker, ConfigurationError, ResilientTask
from resilient_tasks._fleet_state import state_for
from resilient_tasks.metrics import (
    CIRCUIT_STATES,
    METRICS,
    PORT_SETTING,
    MetricsStep,
    _BrokerGauges,
    _Counts,
    _Exporter,
    metrics_port,
)


def make_app(**conf: Any) -> Celery:
    app = Celery(f"metrics-{uuid.uuid4().hex[:8]}", broker="memory://", set_as_current=False)
    app.conf.update(conf)
    return app


@pytest.fixture
def counted() -> tuple[_Counts, CollectorRegistry]:
    registry = CollectorRegistry()
    return _Counts(registry=registry), registry


# -- the setting -----------------------------------------------------------------------------------


def test_no_port_serves_nothing() -> None:
    app = make_app()

    assert metrics_port(app) is None
    assert not MetricsStep(SimpleNamespace(app=app)).include_if(SimpleNamespace(app=app))


@pytest.mark.parametrize(("value", "port"), [(9808, 9808), ("9808", 9808), (" 1 ", 1)])
def test_a_port_number_is_read(value: Any, port: int) -> None:
    assert metrics_port(make_app(**{PORT_SETTING: value})) == port


@pytest.mark.parametrize("value", ["http", 0, 65536, -1, True, 98.08, [9808]])
def test_anything_but_a_port_number_is_refused_naming_the_setting(value: Any) -> None:
    with pytest.raises(ConfigurationError, match=rf"{PORT_SETTING}=.*port number from 1 to"):
        metrics_port(make_app(**{PORT_SETTING: value}))


def test_a_port_without_prometheus_client_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)

    with pytest.raises(ConfigurationError, match=r"resilient-tasks\[prometheus\]"):
        _Exporter(make_app(), 9808)


def test_a_library_task_adds_the_metrics_step_to_its_worker() -> None:
    app = make_app()

    @app.task(base=ResilientTask)
    def noop() -> None: ...

    app.finalize()  # binds the task (what a worker does at start)
    assert MetricsStep in app.steps["worker"]


# -- what each occurrence counts -------------------------------------------------------------------


def test_every_metric_has_its_documented_name(counted: tuple[_Counts, CollectorRegistry]) -> None:
    counts, registry = counted
    counts.on_prerun(sender=SimpleNamespace(name="billing.sync"))
    counts.on_event("task_retry_scheduled", {"request": {"task": "billing.sync"}, "delay": 1.0})
    counts.on_event("task_dead_lettered", {"request": {"task": "t"}, "reason": "permanent"})
    counts.on_event("task_deferred", {"request": {"task": "t"}, "breaker": "b"})

    served = {s.name for family in registry.collect() for s in family.samples}
    documented = {name for name in METRICS if name.endswith(("_total", "_seconds"))}

    assert {name for name in documented if name.endswith("_total")} <= served
    assert "resilient_tasks_retry_delay_seconds_count" in served


def test_a_retry_counts_once_with_its_delay(counted: tuple[_Counts, CollectorRegistry]) -> None:
    counts, registry = counted
    task = SimpleNamespace(name="billing.sync")

    counts.on_event("task_retry_scheduled", {"task": task, "request": None, "delay": 2.0})
    counts.on_event("task_retry_scheduled", {"task": task, "request": None, "delay": 0.5})

    labels = {"task": "billing.sync"}
    assert registry.get_sample_value("resilient_tasks_task_retries_total", labels) == 2
    assert registry.get_sample_value("resilient_tasks_retry_delay_seconds_count", labels) == 2
    assert registry.get_sample_value("resilient_tasks_retry_delay_seconds_sum", labels) == 2.5
    le_1 = {**labels, "le": "1.0"}
    assert registry.get_sample_value("resilient_tasks_retry_delay_seconds_bucket", le_1) == 1


def test_a_dead_letter_counts_by_task_and_reason(
    counted: tuple[_Counts, CollectorRegistry],
) -> None:
    counts, registry = counted
    # The task's name comes from a worker Request, a task Context or a message's headers.
    request = SimpleNamespace(task_name="billing.sync", task=object())
    context = SimpleNamespace(task="billing.sync")
    headers = {"task": "billing.sync"}
    for source in (request, context, headers):
        counts.on_event(
            "task_dead_lettered", {"request": source, "reason": "permanent", "queue": "b.dlq"}
        )
    counts.on_event("task_dead_lettered", {"request": headers, "reason": "worker_lost"})

    def dead(reason: str) -> float | None:
        return registry.get_sample_value(
            "resilient_tasks_task_dead_letters_total", {"task": "billing.sync", "reason": reason}
        )

    assert dead("permanent") == 3
    assert dead("worker_lost") == 1
    assert counts.dead_letter_queues == {"b.dlq"}


def test_a_deferral_counts_by_task_and_breaker(
    counted: tuple[_Counts, CollectorRegistry],
) -> None:
    counts, registry = counted

    counts.on_event("task_deferred", {"request": {"task": "pay"}, "breaker": "psp", "delay": 3})

    labels = {"task": "pay", "breaker": "psp"}
    assert registry.get_sample_value("resilient_tasks_task_deferrals_total", labels) == 1


def test_other_events_count_nothing(counted: tuple[_Counts, CollectorRegistry]) -> None:
    counts, registry = counted

    counts.on_event("circuit_opened", {"breaker": "psp"})
    counts.on_event("task_soft_time_limit", {"request": {"task": "t"}})

    assert all(
        s.value == 0 for f in registry.collect() for s in f.samples if s.name.endswith("_total")
    )


# -- gauges measured at scrape time ----------------------------------------------------------------


def test_the_circuit_state_is_read_from_the_breakers_store() -> None:
    app = make_app()
    spec = CircuitBreaker(
        f"psp-{uuid.uuid4().hex[:8]}",
        minimum_calls=2,
        failure_threshold=0.5,
        window=60,
        reset_timeout=60,
    )

    @app.task(base=ResilientTask, circuit_breaker=spec)
    def pay() -> None: ...

    gauges = _BrokerGauges(app, _Counts(registry=CollectorRegistry()), ttl=0)

    def state() -> float:
        (family,) = [f for f in gauges.collect() if f.name == "resilient_tasks_circuit_state"]
        (sample,) = family.samples
        assert sample.labels == {"breaker": spec.name}
        return sample.value

    assert state() == CIRCUIT_STATES["closed"]
    state_for(app).breaker(spec, "report", failures=2)
    assert state() == CIRCUIT_STATES["open"]


def test_a_scrape_reuses_a_recent_measure(monkeypatch: pytest.MonkeyPatch) -> None:
    gauges = _BrokerGauges(make_app(), _Counts(registry=CollectorRegistry()), ttl=60)
    measured: list[int] = []
    monkeypatch.setattr(gauges, "measure", lambda: measured.append(1) or [])

    list(gauges.collect())
    list(gauges.collect())

    assert measured == [1]


def test_a_broker_that_cannot_be_measured_leaves_the_gauge_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gauges = _BrokerGauges(make_app(), _Counts(registry=CollectorRegistry()), ttl=0)

    def down() -> list[tuple[str, int]]:
        raise ConnectionError("broker down")

    monkeypatch.setattr(gauges, "_delayed", down)

    (family,) = [f for f in gauges.collect() if f.name == "resilient_tasks_delayed_messages"]
    assert family.samples == []


def test_the_example_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
    text = dashboard.read_text(encoding="utf-8")
    json.loads(text)  # importable JSON

    used = set(re.findall(r"resilient_tasks_[a-z_]+", text))
    served = {*METRICS, "resilient_tasks_retry_delay_seconds_bucket"}

    assert used, "the dashboard queries nothing"
    assert used <= served
