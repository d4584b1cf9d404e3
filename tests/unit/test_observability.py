"""Events, contextvars, the correlation header and the testing helpers, in one process.

Tasks run eagerly (``task.apply()``), which fires the same Celery signals as a worker; the
main-process occurrences (dead letters, hard limits, lost workers) are sent as the worker's
``ResilientRequest`` sends them, with a real ``celery.worker.request.Request``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import celery
import pytest
import structlog
from billiard.einfo import ExceptionInfo
from celery import Celery, Task, signals
from celery.app.task import Context
from celery.contrib.testing.mocks import TaskMessage
from celery.exceptions import NotRegistered, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.worker.request import Request

from resilient_tasks import ResilientTask, RetryMixin, RetryPolicy, _events, observability, policy
from resilient_tasks.observability import (
    CONTEXT_KEYS,
    CORRELATION_HEADER,
    EVENTS,
    FLEET_EVENTS,
    ObservabilityMixin,
)
from resilient_tasks.testing import CapturedEvents, capture_events
from support.project import run_pytest

app = Celery("observability-tests", set_as_current=False)
app.conf.task_default_queue = "billing"
seen: dict[str, Any] = {}

IDENTITY = {*CONTEXT_KEYS, "hostname"}


@app.task(name="obs.add")
def add(x: int, y: int) -> int:
    seen["context"] = structlog.contextvars.get_contextvars()
    return x + y


@app.task(name="obs.boom")
def boom() -> None:
    raise KeyError("no such customer")


@app.task(
    base=ResilientTask,
    bind=True,
    name="obs.flaky",
    retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=3, backoff=60),
)
def flaky(self: Task) -> str:
    if self.request.retries == 0:
        raise ConnectionError("upstream reset")
    return "done"


@app.task(name="obs.secretive")
def secretive(card: str, password: str = "", **options: Any) -> str:
    return f"token-{password}"


@app.task(bind=True, name="obs.parent")
def parent(self: Task) -> str:
    seen["parent_context"] = structlog.contextvars.get_contextvars()
    add.apply((1, 2), task_id="child-1")
    seen["after_child"] = structlog.contextvars.get_contextvars()
    return str(self.request.id)


@app.task(name="obs.publishes")
def publishes(unbind: bool = False) -> dict[str, Any]:
    if unbind:
        structlog.contextvars.unbind_contextvars("correlation_id")
    headers: dict[str, Any] = {}
    signals.before_task_publish.send(sender="obs.add", headers=headers)
    return headers


class Observed(ObservabilityMixin, Task):  # type: ignore[misc]
    pass


@app.task(base=Observed, name="obs.observed")
def observed() -> dict[str, Any]:
    return structlog.contextvars.get_contextvars()


class Consumer:
    """Stands for the worker's consumer, which sends task_rejected and task_unknown."""

    hostname = "w1@host"


def worker_request(
    task: Task,
    task_id: str,
    *,
    retries: int = 0,
    queue: str = "billing",
    **headers: Any,
) -> Request:
    """A worker-side Request for ``task``, as the worker's main process builds it."""
    message = TaskMessage(
        task.name, id=task_id, retries=retries, root_id=task_id, parent_id=None, **headers
    )
    message.delivery_info = {"exchange": "", "routing_key": queue}
    message.properties = {"correlation_id": task_id}
    return Request(message, app=app, task=task, hostname="w1@host")


@pytest.fixture
def connected() -> Iterator[None]:
    observability.connect()
    yield
    observability.disconnect()


@pytest.fixture
def events(connected: None) -> Iterator[CapturedEvents]:
    with capture_events() as captured:
        yield captured


def every_event() -> None:
    """Make each of the eleven events happen once."""
    add.apply((1, 2), task_id="ok-1")  # started, succeeded
    boom.apply(task_id="boom-1")  # started, failed
    failing = worker_request(boom, "main-1", retries=2)
    _events.emit(
        "task_retry_scheduled",
        task=flaky,
        request=Context(id="retry-1", task="obs.flaky", retries=0),
        attempt=None,
        delay=0.5,
        exception=ConnectionError("reset"),
    )
    _events.emit(
        "task_dead_lettered",
        request=failing,
        reason="permanent",
        queue="billing.dlq",
        exception=LookupError("gone"),
        envelope={"task": {"kwargs": {"password": "hunter2"}}},
    )
    _events.emit(
        "task_soft_time_limit",
        task=boom,
        request=Context(id="soft-1", task="obs.boom"),
        exception=SoftTimeLimitExceeded(),
    )
    _events.emit(
        "task_hard_time_limit",
        request=worker_request(boom, "hard-1"),
        timeout=1.0,
        exception=TimeLimitExceeded(1.0),
    )
    _events.emit(
        "task_deferred",
        request=worker_request(boom, "deferred-0"),
        breaker="payments",
        delay=3.0,
        deferrals=1,
    )
    _events.emit(
        "retry_budget_exhausted",
        task=flaky,
        request=Context(id="budget-1", task="obs.flaky", retries=1),
        budget="obs.flaky",
        attempts=10,
        retries=2,
        allowed=2.0,
        exception=ConnectionError("reset"),
    )
    _events.emit(
        "task_worker_lost",
        request=worker_request(boom, "lost-1"),
        redeliveries=0,
        max_redeliveries=3,
        exception=RuntimeError("lost"),
    )
    signals.task_revoked.send(
        sender=add,
        request=Context(id="revoked-1", task="obs.add", root_id="revoked-1"),
        terminated=False,
        signum=None,
        expired=True,
    )
    consumer = Consumer()
    signals.task_rejected.send(
        sender=consumer,
        message=SimpleNamespace(
            headers={"id": "rejected-1", "task": "obs.add", "retries": 1},
            delivery_info={"routing_key": "billing"},
        ),
        exc=ValueError("bad body"),
    )
    signals.task_unknown.send(
        sender=consumer,
        message=SimpleNamespace(
            headers={"id": "unknown-1", "task": "obs.nope"},
            delivery_info={"routing_key": "billing"},
        ),
        exc=NotRegistered("obs.nope"),
        name="obs.nope",
        id="unknown-1",
    )


# -- connect ---------------------------------------------------------------------------------------


def test_connect_twice_logs_each_event_once() -> None:
    observability.connect()
    observability.connect()
    try:
        with capture_events() as events:
            add.apply((1, 2))
    finally:
        observability.disconnect()

    assert events.names() == ["task_started", "task_succeeded"]


def test_connect_twice_registers_one_receiver_and_one_listener(connected: None) -> None:
    observability.connect()

    assert _events.listeners.count(observability._on_library_event) == 1
    prerun = [r for r in signals.task_prerun.receivers if "resilient_tasks" in str(r[0])]
    assert len(prerun) == 1


def test_disconnect_stops_events_and_bindings() -> None:
    observability.connect()
    observability.disconnect()

    with structlog.testing.capture_logs() as logs:
        add.apply((1, 2))

    assert logs == []
    assert "task_id" not in seen["context"]
    assert observability._on_library_event not in _events.listeners


def test_connect_configures_neither_structlog_nor_logging(connected: None) -> None:
    config = dict(structlog.get_config())
    handlers = list(logging.getLogger().handlers)

    add.apply((1, 2))

    assert dict(structlog.get_config()) == config
    assert logging.getLogger().handlers == handlers


# -- the events ------------------------------------------------------------------------------------


def test_the_event_table_is_the_documented_one() -> None:
    assert dict(EVENTS) == {
        "task_started": "info",
        "task_succeeded": "info",
        "task_retry_scheduled": "warning",
        "task_failed": "error",
        "task_dead_lettered": "error",
        "task_soft_time_limit": "warning",
        "task_hard_time_limit": "warning",
        "task_worker_lost": "warning",
        "task_revoked": "warning",
        "task_rejected": "warning",
        "task_unknown": "error",
        "task_deferred": "info",
        "retry_budget_exhausted": "warning",
    }
    assert dict(FLEET_EVENTS) == {
        "circuit_opened": "warning",
        "circuit_half_open": "info",
        "circuit_closed": "info",
        "state_store_unavailable": "warning",
        "state_store_available": "info",
    }


def test_fleet_events_name_their_breaker_and_each_deferral_is_logged(connected: None) -> None:
    with structlog.testing.capture_logs() as logs:
        _events.emit("circuit_opened", breaker="payments", calls=20, failures=11,
                     reset_timeout=30.0, shared=True)  # fmt: skip
        _events.emit("state_store_unavailable", store="redis://h:6379/0",
                     exception=ConnectionError("refused"))  # fmt: skip
        for deferrals in (1, 2):
            _events.emit("task_deferred", request=worker_request(boom, "deferred-1"),
                         breaker="payments", delay=3.2, deferrals=deferrals)  # fmt: skip

    opened, unavailable, *deferred = logs
    assert (opened["event"], opened["breaker"], opened["failures"]) == ("circuit_opened",
                                                                       "payments", 11)  # fmt: skip
    assert opened["log_level"] == "warning"
    assert (unavailable["store"], unavailable["exception_type"]) == (
        "redis://h:6379/0",
        "ConnectionError",
    )
    assert [(d["task_id"], d["deferrals"]) for d in deferred] == [("deferred-1", 1),
                                                                  ("deferred-1", 2)]  # fmt: skip


def test_each_event_is_logged_through_structlog_at_its_level(connected: None) -> None:
    with structlog.testing.capture_logs() as logs:
        every_event()

    logged = {entry["event"]: entry["log_level"] for entry in logs}
    assert logged == dict(EVENTS)
    assert all(entry["event"] in EVENTS for entry in logs)


def test_task_succeeded_carries_the_seconds_since_task_started(events: CapturedEvents) -> None:
    add.apply((1, 2), task_id="timed-1")

    started, succeeded = events
    assert (started["event"], succeeded["event"]) == ("task_started", "task_succeeded")
    assert "runtime" not in started
    assert isinstance(succeeded["runtime"], float)
    assert 0 <= succeeded["runtime"] < 5


def test_info_events_filtered_out_are_not_logged_and_the_rest_are(connected: None) -> None:
    config = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        with structlog.testing.capture_logs() as logs:
            add.apply((1, 2), task_id="quiet-1")
            boom.apply(task_id="quiet-2")
    finally:
        structlog.configure(**config)

    assert [(entry["event"], entry["task_id"]) for entry in logs] == [("task_failed", "quiet-2")]
    assert "task_id" not in structlog.contextvars.get_contextvars()


def test_a_postrun_without_its_prerun_still_logs_task_succeeded(events: CapturedEvents) -> None:
    # A receiver connected mid-run (or a signal sent by hand) sees a postrun it never bound.
    signals.task_postrun.send(
        sender=add,
        task_id="orphan-1",
        task=add,
        args=(),
        kwargs={},
        retval=3,
        state="SUCCESS",
    )

    (event,) = events
    assert (event["event"], event["task_id"], event["task_name"]) == (
        "task_succeeded",
        "orphan-1",
        "obs.add",
    )
    assert "runtime" not in event


@pytest.mark.parametrize(
    "as_source",
    [
        pytest.param(lambda fields: SimpleNamespace(**fields), id="object-with-attributes"),
        # a mapping is a message's headers: the correlation header is one of its keys
        pytest.param(
            lambda fields: MappingProxyType({**fields, **fields["headers"]}),
            id="mapping-not-a-dict",
        ),
    ],
)
def test_an_event_reads_its_identity_from_any_request_like_source(
    events: CapturedEvents, as_source: Any
) -> None:
    fields = {
        "id": "src-1",
        "task": "obs.boom",
        "retries": "2",
        "delivery_info": {"routing_key": "billing"},
        "root_id": "root-1",
        "parent_id": "parent-1",
        "hostname": "w9@host",
        "headers": {observability.CORRELATION_HEADER: "corr-1"},
    }

    _events.emit(
        "task_soft_time_limit",
        task=boom,
        request=as_source(fields),
        exception=SoftTimeLimitExceeded(),
    )

    (event,) = events
    assert {key: event[key] for key in (*IDENTITY, "parent_id", "correlation_id", "hostname")} == {
        "task_id": "src-1",
        "task_name": "obs.boom",
        "attempt": 3,
        "queue": "billing",
        "root_id": "root-1",
        "parent_id": "parent-1",
        "correlation_id": "corr-1",
        "hostname": "w9@host",
    }


def test_every_event_carries_the_task_identity(events: CapturedEvents) -> None:
    every_event()

    assert sorted(set(events.names())) == sorted(EVENTS)
    for event in events:
        assert set(event) >= IDENTITY, event["event"]
        assert event["task_id"]
        assert event["task_name"]
        assert event["attempt"] >= 1


def test_a_worker_side_event_reads_the_worker_request(events: CapturedEvents) -> None:
    request = worker_request(boom, "dl-1", retries=2, queue="invoices")

    _events.emit(
        "task_dead_lettered",
        request=request,
        reason="retries_exhausted",
        queue="invoices.dlq",
        exception=ConnectionError("down"),
        envelope={},
    )

    (event,) = events
    assert event == {
        "event": "task_dead_lettered",
        "log_level": "error",
        "task_id": "dl-1",
        "task_name": "obs.boom",
        "attempt": 3,
        "queue": "invoices",
        "root_id": "dl-1",
        "parent_id": None,
        "correlation_id": "dl-1",
        "hostname": "w1@host",
        "reason": "retries_exhausted",
        "dead_letter_queue": "invoices.dlq",
        "exception": "ConnectionError: down",
        "exception_type": "ConnectionError",
        "traceback": None,
    }


def test_a_dead_letter_carries_the_traceback_of_its_envelope(events: CapturedEvents) -> None:
    request = worker_request(boom, "dl-2", retries=0, queue="invoices")
    trace = 'Traceback (most recent call last):\n  File "t.py", line 1\nKeyError: 1\n'

    _events.emit(
        "task_dead_lettered",
        request=request,
        reason="exception",
        queue="invoices.dlq",
        exception=KeyError(1),
        envelope={"exception": {"traceback": trace}},
    )

    (event,) = events
    assert event["traceback"] == trace.rstrip()
    assert event["exception"] == "KeyError: 1"


def test_a_retry_carries_its_delay_and_exception(events: CapturedEvents) -> None:
    flaky.apply(task_id="flaky-1")

    assert events.names() == [
        "task_started",
        "task_retry_scheduled",
        "task_started",
        "task_succeeded",
    ]
    retry = events.named("task_retry_scheduled")[0]
    assert retry["attempt"] == 1
    assert retry["delay"] == 60.0
    assert retry["exception"] == "ConnectionError: upstream reset"
    assert [e["attempt"] for e in events.named("task_started")] == [1, 2]


def test_a_failure_carries_its_reason(events: CapturedEvents) -> None:
    boom.apply(task_id="boom-2")

    (failed,) = events.named("task_failed")
    assert failed["reason"] == "exception"
    assert failed["exception"] == "KeyError: 'no such customer'"
    assert failed["log_level"] == "error"


class Unpicklable(ConnectionError):
    """An exception Celery cannot pickle (its __init__ takes two arguments): it sends a stand-in."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


@app.task(
    base=ResilientTask,
    name="obs.unpicklable",
    retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=1),
)
def unpicklable() -> None:
    raise Unpicklable(503, "unavailable")


def test_a_failure_celery_cannot_pickle_keeps_its_reason(events: CapturedEvents) -> None:
    unpicklable.apply(task_id="stand-in-1")

    (failed,) = events.named("task_failed")
    assert failed["reason"] == "retries_exhausted"


def test_a_revoked_task_says_whether_it_expired(events: CapturedEvents) -> None:
    signals.task_revoked.send(
        sender=add, request=Context(id="r-1", task="obs.add"), expired=True, terminated=False
    )

    (revoked,) = events
    assert (revoked["event"], revoked["expired"], revoked["terminated"]) == (
        "task_revoked",
        True,
        False,
    )


# -- one event per occurrence ----------------------------------------------------------------------


def test_a_failure_celery_reports_twice_is_logged_once(events: CapturedEvents) -> None:
    """Celery 5.7 fires task_failure for a plain task's hard time limit from the worker's
    ``Request.on_timeout`` (without the task's request pushed) and again from its
    ``on_failure`` (with it); both describe the same attempt."""
    request = worker_request(add, "hard-2", retries=2)
    request.on_timeout(soft=False, timeout=1.0)
    try:
        raise TimeLimitExceeded(1.0)
    except TimeLimitExceeded:
        request.on_failure(ExceptionInfo())

    (failed,) = events
    assert failed["event"] == "task_failed"
    assert (failed["attempt"], failed["queue"], failed["reason"]) == (
        3,
        "billing",
        "hard_time_limit",
    )


def test_the_same_event_of_the_next_attempt_is_logged_again(events: CapturedEvents) -> None:
    for retries in (0, 1):
        request = worker_request(boom, "again-1", retries=retries)
        _events.emit("task_hard_time_limit", request=request, timeout=1.0, exception=None)

    assert [e["attempt"] for e in events] == [1, 2]


def test_each_lost_worker_of_one_message_is_logged(events: CapturedEvents) -> None:
    for count in (0, 1):
        request = worker_request(boom, "lost-2", resilient_redeliveries=count)
        _events.emit(
            "task_worker_lost",
            request=request,
            redeliveries=count,
            max_redeliveries=3,
            exception=None,
        )

    assert [e["redeliveries"] for e in events] == [0, 1]


def test_the_memory_of_occurrences_is_bounded() -> None:
    memory = observability._Occurrences(size=3)

    firsts = [memory.first(("task_started", str(i), 0, 0)) for i in range(5)]

    assert firsts == [True] * 5
    assert len(memory._seen) == 3
    assert memory.first(("task_started", "0", 0, 0))  # forgotten, so new again
    assert not memory.first(("task_started", "4", 0, 0))


# -- contextvars -----------------------------------------------------------------------------------

#: Celery < 5.6's ``Task.apply()`` gives the eager request no ``root_id`` or ``parent_id`` (a
#: worker's request has them: tests/worker/test_events.py checks them on every version).
eager_ids = pytest.mark.skipif(
    celery.VERSION < (5, 6), reason="Celery < 5.6's Task.apply() sets no root_id or parent_id"
)


@eager_ids
def test_the_task_identity_is_bound_while_it_runs(connected: None) -> None:
    add.apply((1, 2), task_id="ctx-1")

    assert seen["context"] == {
        "task_id": "ctx-1",
        "task_name": "obs.add",
        "attempt": 1,
        "queue": None,
        "root_id": "ctx-1",
        "parent_id": None,
        "correlation_id": "ctx-1",
    }


def test_the_keys_are_restored_to_what_they_were_after_the_task(connected: None) -> None:
    tokens = structlog.contextvars.bind_contextvars(task_id="outer", request_id="req-9")
    try:
        add.apply((1, 2), task_id="ctx-2")
        boom.apply(task_id="ctx-3")
        after = structlog.contextvars.get_contextvars()
    finally:
        structlog.contextvars.reset_contextvars(**tokens)

    assert seen["context"]["task_id"] == "ctx-2"
    assert seen["context"]["request_id"] == "req-9"  # not the library's: left alone
    assert after == {"task_id": "outer", "request_id": "req-9"}


def test_a_task_run_inside_another_gets_its_own_keys_then_gives_them_back(
    connected: None,
) -> None:
    before = structlog.contextvars.get_contextvars()

    parent.apply(task_id="parent-1")

    assert seen["context"]["task_id"] == "child-1"  # its parent_id: see the test below
    assert seen["after_child"] == seen["parent_context"]
    assert seen["parent_context"]["task_id"] == "parent-1"
    assert structlog.contextvars.get_contextvars() == before


@eager_ids
def test_a_child_task_carries_its_parents_root_id(events: CapturedEvents) -> None:
    parent.apply(task_id="parent-2")

    child = [e for e in events if e["task_id"] == "child-1"]
    assert {(e["root_id"], e["parent_id"], e["correlation_id"]) for e in child} == {
        ("parent-2", "parent-2", "parent-2")
    }


@eager_ids
def test_the_correlation_id_comes_from_the_message_header(connected: None) -> None:
    add.apply((1, 2), task_id="ctx-4", headers={CORRELATION_HEADER: "req-42"})

    assert seen["context"]["correlation_id"] == "req-42"
    assert seen["context"]["root_id"] == "ctx-4"


def test_the_mixin_binds_the_identity_without_connect() -> None:
    assert not observability.is_connected()
    before = structlog.contextvars.get_contextvars()

    inside = observed.apply(task_id="mixin-1").get()

    assert {k: inside[k] for k in ("task_id", "task_name", "attempt")} == {
        "task_id": "mixin-1",
        "task_name": "obs.observed",
        "attempt": 1,
    }
    assert structlog.contextvars.get_contextvars() == before


def test_the_mixin_binds_nothing_when_the_task_is_called_as_a_function() -> None:
    assert "task_id" not in observed()


# -- nothing secret --------------------------------------------------------------------------------


def test_arguments_results_and_envelopes_are_never_logged(connected: None) -> None:
    with structlog.testing.capture_logs() as logs:
        secretive.apply(("4111-1111",), {"password": "hunter2", "api_key": "k-77"})
        secretive.apply(("4111-1111",), {"password": "hunter2"}, task_id="s-2")
        every_event()  # the dead letter's envelope holds a password

    text = json.dumps(logs, default=str)
    assert logs
    for secret in ("4111-1111", "hunter2", "k-77", "token-"):
        assert secret not in text
    assert not any({"args", "kwargs", "result", "envelope"} & set(entry) for entry in logs)


# -- the correlation header ------------------------------------------------------------------------


def publish(headers: dict[str, Any]) -> dict[str, Any]:
    signals.before_task_publish.send(sender="obs.add", headers=headers)
    return headers


def test_publishing_puts_the_bound_correlation_id_in_a_header(connected: None) -> None:
    with structlog.contextvars.bound_contextvars(correlation_id="req-7"):
        headers = publish({"id": "x"})

    assert headers[CORRELATION_HEADER] == "req-7"


def test_publishing_keeps_a_correlation_header_already_there(connected: None) -> None:
    with structlog.contextvars.bound_contextvars(correlation_id="req-7"):
        headers = publish({CORRELATION_HEADER: "upstream"})

    assert headers[CORRELATION_HEADER] == "upstream"


def test_publishing_adopts_a_plain_correlation_id_header(connected: None) -> None:
    headers = publish({"correlation_id": "from-the-web-app"})

    assert headers[CORRELATION_HEADER] == "from-the-web-app"


def test_publishing_from_a_task_carries_its_correlation_id(connected: None) -> None:
    headers = publishes.apply(task_id="pub-1", headers={CORRELATION_HEADER: "req-8"}).get()

    assert headers[CORRELATION_HEADER] == "req-8"


@eager_ids
def test_publishing_from_a_task_without_one_uses_its_root_id(connected: None) -> None:
    headers = publishes.apply((True,), task_id="pub-2").get()

    assert headers[CORRELATION_HEADER] == "pub-2"


def test_publishing_outside_any_task_adds_no_header(connected: None) -> None:
    assert CORRELATION_HEADER not in publish({"id": "x"})


# -- configure_logging -----------------------------------------------------------------------------


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


SETUP_AS_A_WORKER = """
    import logging, structlog
    from celery import Celery
    from resilient_tasks import observability

    observability.configure_logging(json={json})
    app = Celery("cfg", set_as_current=False)
    app.log.setup(loglevel="INFO")  # what `celery worker` does at start
    structlog.contextvars.bind_contextvars(task_id="t-1")
    logging.getLogger("celery.worker.strategy").info("Task %s received", "t-1")
    logging.getLogger("celery.task").warning("from the task logger")
    structlog.get_logger("proj").warning("charged", amount=3)
"""


def test_configure_logging_renders_celery_and_structlog_lines_as_json(tmp_path: Path) -> None:
    run = run_python(SETUP_AS_A_WORKER.format(json=True), tmp_path)

    lines = [json.loads(line) for line in run.stderr.splitlines()]
    assert run.returncode == 0, run.stderr
    assert [(line["logger"], line["level"], line["event"]) for line in lines] == [
        ("celery.worker.strategy", "info", "Task t-1 received"),
        ("celery.task", "warning", "from the task logger"),
        ("proj", "warning", "charged"),
    ]
    assert all(line["task_id"] == "t-1" and "timestamp" in line for line in lines)
    assert lines[2]["amount"] == 3


def test_configure_logging_without_json_renders_text(tmp_path: Path) -> None:
    run = run_python(SETUP_AS_A_WORKER.format(json=False), tmp_path)

    assert run.returncode == 0, run.stderr
    assert "charged" in run.stderr
    assert "amount=3" in run.stderr
    assert not run.stderr.lstrip().startswith("{")


def test_importing_and_connecting_never_configure_structlog(tmp_path: Path) -> None:
    run = run_python(
        """
        import structlog
        from resilient_tasks import observability
        observability.connect()
        assert not structlog.is_configured()
        """,
        tmp_path,
    )

    assert run.returncode == 0, run.stderr


def test_connect_alone_logs_through_logging_at_the_events_level(tmp_path: Path) -> None:
    run = run_python(
        """
        import logging, sys
        from resilient_tasks import _events, observability
        logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
        observability.connect()
        _events.emit("circuit_opened", breaker="crm", calls=9, failures=9)
        _events.emit("circuit_closed", breaker="crm")  # info: below basicConfig's WARNING
        print("stdout is empty", file=sys.stdout)
        """,
        tmp_path,
    )

    assert run.returncode == 0, run.stderr
    assert run.stdout == "stdout is empty\n"
    assert run.stderr.splitlines() == [
        "WARNING resilient_tasks.events circuit_opened breaker='crm' calls=9 failures=9"
    ]


def test_configure_logging_json_keeps_the_process_name_and_splits_the_traceback(
    tmp_path: Path,
) -> None:
    run = run_python(
        SETUP_AS_A_WORKER.format(json=True)
        + """
    try:
        raise KeyError("no such customer")
    except KeyError:
        logging.getLogger("celery.app.trace").exception("Task t-1 raised unexpected")
    """,
        tmp_path,
    )

    lines = [json.loads(line) for line in run.stderr.splitlines()]
    assert run.returncode == 0, run.stderr
    assert {line["process_name"] for line in lines} == {"MainProcess"}
    failed = lines[-1]
    assert failed["exception"] == "KeyError: 'no such customer'"
    assert failed["exception_type"] == "KeyError"
    assert failed["traceback"].startswith("Traceback (most recent call last):")
    assert failed["traceback"].endswith("KeyError: 'no such customer'")


# -- the testing helpers ---------------------------------------------------------------------------


def test_resilient_events_captures_what_runs_in_the_test(
    resilient_events: CapturedEvents, no_backoff: None
) -> None:
    flaky.apply(task_id="fixture-1")

    assert resilient_events.names("fixture-1") == [
        "task_started",
        "task_retry_scheduled",
        "task_started",
        "task_succeeded",
    ]
    assert resilient_events.named("task_retry_scheduled")[0]["delay"] == 0.0


def test_resilient_events_sees_a_reused_task_id_again(resilient_events: CapturedEvents) -> None:
    add.apply((1, 2), task_id="fixed-id")
    with capture_events() as again:
        add.apply((1, 2), task_id="fixed-id")

    assert again.names() == ["task_started", "task_succeeded"]


def test_dead_letters_captures_the_envelopes(dead_letters: list[dict[str, Any]]) -> None:
    _events.emit("task_dead_lettered", request=None, envelope={"reason": "permanent"})
    _events.emit("task_hard_time_limit", request=None)

    assert dead_letters == [{"reason": "permanent"}]


def test_no_backoff_turns_backoff_off_for_the_test(no_backoff: None) -> None:
    assert policy.backoff_enabled() is False


def test_the_backoff_setting_is_back_after_a_test_with_no_backoff() -> None:
    assert policy.backoff_enabled() is True


def test_the_plugin_is_registered(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.hasplugin("resilient_tasks")


USERS_TEST = """
from celery import Celery
from celery.contrib.testing.worker import start_worker

from resilient_tasks import Permanent, ResilientTask

app = Celery("users-project", broker="memory://", backend="cache+memory://")
app.conf.update(task_default_queue="billing", worker_hijack_root_logger=False,
                broker_transport_options={"polling_interval": 0.05})


@app.task(base=ResilientTask, name="billing.sync")
def sync(invoice, password=""):
    raise Permanent(LookupError(f"invoice {invoice} was deleted"))


def test_dead_lettered_in_process(resilient_events, dead_letters, no_backoff):
    with start_worker(app, pool="solo", perform_ping_check=False):
        result = sync.delay(404, password="hunter2")
        result.get(timeout=10, propagate=False)

    (envelope,) = dead_letters
    assert envelope["reason"] == "permanent"
    assert envelope["task"]["kwargs"] == {"password": "[REDACTED]"}
    assert resilient_events.names(result.id) == [
        "task_started", "task_failed", "task_dead_lettered",
    ]
    assert resilient_events.named("task_dead_lettered")[0]["dead_letter_queue"] == "billing.dlq"
"""


def test_a_users_project_gets_the_fixtures_from_the_entry_point(tmp_path: Path) -> None:
    (tmp_path / "test_users.py").write_text(USERS_TEST, encoding="utf-8")

    run = run_pytest(tmp_path, "test_users.py")

    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout


class RetryingObserved(ObservabilityMixin, RetryMixin, Task):  # type: ignore[misc]
    retry_policy = RetryPolicy(retry_on=(ConnectionError,), max_attempts=2, backoff=0.1)


@app.task(base=RetryingObserved, bind=True, name="obs.retrying_observed")
def retrying_observed(self: Task) -> dict[str, Any]:
    if self.request.retries == 0:
        raise ConnectionError("upstream reset")
    return structlog.contextvars.get_contextvars()


@pytest.mark.parametrize("plain_tasks", [True, False], ids=["connect", "library_only"])
def test_the_mixin_and_connect_together_log_once_and_restore_everything(
    plain_tasks: bool, no_backoff: None
) -> None:
    before = structlog.contextvars.get_contextvars()
    observability.connect(plain_tasks=plain_tasks)
    try:
        with capture_events() as events:
            inside = retrying_observed.apply(task_id="both-1").get()
    finally:
        observability.disconnect()

    assert events.names() == [
        "task_started",
        "task_retry_scheduled",
        "task_started",
        "task_succeeded",
    ]
    assert [e["attempt"] for e in events] == [1, 1, 2, 2]
    assert (inside["task_id"], inside["attempt"]) == ("both-1", 2)
    assert structlog.contextvars.get_contextvars() == before


class StartsItself(ResilientTask):  # type: ignore[misc]
    """A library task with a ``before_start`` of its own, which Celery runs before the call."""

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        seen["before_start"] = structlog.contextvars.get_contextvars()


@app.task(base=StartsItself, name="obs.starts_itself")
def starts_itself() -> None:
    pass


def test_a_library_tasks_keys_stay_bound_after_its_call_until_task_postrun(
    connected: None,
) -> None:
    """Celery's tracer stores the result and logs its own success line after the call and
    before ``task_postrun``: those lines carry the task's identity too."""
    after_call: list[dict[str, Any]] = []

    def record_success(**_: Any) -> None:
        after_call.append(structlog.contextvars.get_contextvars())

    signals.task_success.connect(record_success, weak=False)
    try:
        observed.apply(task_id="after-1")
    finally:
        signals.task_success.disconnect(record_success)

    assert [(c.get("task_id"), c.get("task_name")) for c in after_call] == [
        ("after-1", "obs.observed")
    ]
    assert "task_id" not in structlog.contextvars.get_contextvars()


def test_a_library_tasks_own_before_start_runs_with_its_keys_bound(
    events: CapturedEvents,
) -> None:
    starts_itself.apply(task_id="before-1")

    assert (seen["before_start"]["task_id"], seen["before_start"]["attempt"]) == ("before-1", 1)
    assert events.names() == ["task_started", "task_succeeded"]


# -- connect(plain_tasks=False) --------------------------------------------------------------------


@app.task(base=ResilientTask, name="obs.gives_up", dead_letter=False)
def gives_up() -> None:
    raise KeyError("no such customer")


@pytest.fixture
def library_only() -> Iterator[CapturedEvents]:
    observability.connect(plain_tasks=False)
    try:
        with capture_events() as captured:
            yield captured
    finally:
        observability.disconnect()


def ours(signal: Any) -> list[Any]:
    return [r for r in signal.receivers if "resilient_tasks.observability" in str(r[0])]


def test_connect_without_plain_tasks_leaves_task_prerun_and_postrun_alone() -> None:
    observability.connect(plain_tasks=False)
    try:
        left_out = (ours(signals.task_prerun), ours(signals.task_postrun))
        kept = ours(signals.task_failure)
        observability.connect()  # switches back
        switched = (ours(signals.task_prerun), ours(signals.task_postrun))
    finally:
        observability.disconnect()

    assert left_out == ([], [])
    assert len(kept) == 1
    assert [len(receivers) for receivers in switched] == [1, 1]


def test_without_plain_tasks_a_library_task_logs_its_run_with_its_keys_bound(
    library_only: CapturedEvents,
) -> None:
    before = structlog.contextvars.get_contextvars()

    inside = observed.apply(task_id="lib-1").get()

    assert library_only.names() == ["task_started", "task_succeeded"]
    assert isinstance(library_only[1]["runtime"], float)
    assert library_only[1]["task_name"] == "obs.observed"
    assert (inside["task_id"], inside["attempt"]) == ("lib-1", 1)
    assert structlog.contextvars.get_contextvars() == before


def test_without_plain_tasks_a_failure_is_no_success(library_only: CapturedEvents) -> None:
    gives_up.apply(task_id="lib-3")

    assert library_only.names("lib-3") == ["task_started", "task_failed"]
    assert "task_id" not in structlog.contextvars.get_contextvars()
    assert observability._finishing.get() is None


def test_without_plain_tasks_a_plain_task_logs_only_its_failure(
    library_only: CapturedEvents,
) -> None:
    add.apply((1, 2), task_id="plain-1")
    boom.apply(task_id="plain-2")

    assert "task_id" not in seen["context"]
    assert [(e["event"], e["task_id"]) for e in library_only] == [("task_failed", "plain-2")]


def test_without_plain_tasks_a_run_left_by_a_retry_holds_nothing_for_the_next(
    library_only: CapturedEvents,
) -> None:
    """A retried run never reaches after_return: the next run in a worker is not nested in it."""
    request = Context(id="lib-4", is_eager=False)
    observability._start_call(observability._Described(request), request)
    observed.apply(task_id="lib-5")
    after_eager = observability._finishing.get()
    observability._start_call(observability._Described(request), request)

    last = observability._finishing.get()
    assert getattr(after_eager, "task_id", None) == "lib-4"  # eager: nested in it
    assert getattr(last, "task_id", None) == "lib-4"
    assert getattr(last, "outer", "missing") is None  # in a worker: not nested in what was left
