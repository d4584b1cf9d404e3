"""The give-up reason of an exception that could not carry it back from the pool child.

The child marks the exception with its reason (resilient_tasks._reason); Celery sends back a
stand-in for an exception it cannot pickle, and the mark is lost. The worker's main process
(ResilientRequest) then makes the child's decision again. These tests run a task through
Celery's own tracer, as a pool child does, pickle what the tracer returns, as the pool does,
and hand it to a ResilientRequest in place of the main process.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from billiard.einfo import ExceptionInfo
from celery import Celery, Task
from celery.app.trace import build_tracer
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from celery.utils.serialization import UnpickleableExceptionWrapper
from kombu.message import Message
from kombu.serialization import dumps

from resilient_tasks import (
    DeadLetterMixin,
    Permanent,
    ResilientTask,
    RetryPolicy,
    _reason,
    deadletter,
    observability,
    retry,
)
from resilient_tasks.history import HEADER, Attempt, History
from resilient_tasks.policy import Reason
from resilient_tasks.testing import capture_events
from resilient_tasks.worker import ResilientRequest, _unwrap


class NeedsTwo(Exception):
    """Cannot be unpickled (``__init__`` takes two arguments): Celery sends back an
    ``UnpickleableExceptionWrapper``."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"error {code}: {detail}")
        self.code = code


class FlakyNeedsTwo(ConnectionError):
    """The same, transient: Celery sends back the nearest base class that pickles
    (``ConnectionError``)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"error {code}: {detail}")
        self.code = code


class Terse(ConnectionError):
    """Pickles, but without its ``__dict__`` (so without the mark)."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (type(self), self.args)


class NoNew(Exception):
    """An exception class nothing can instantiate without its own arguments."""

    def __new__(cls, *args: Any) -> NoNew:
        if len(args) != 3:
            raise TypeError("three arguments, please")
        return super().__new__(cls, *args)


TRANSIENT = RetryPolicy(retry_on=(ConnectionError,), max_attempts=3, backoff=0)


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("recovery", set_as_current=False)
    app.finalize()
    yield app
    app.close()


def raising(app: Celery, exc: BaseException, base: type = ResilientTask, **options: Any) -> Any:
    @app.task(base=base, bind=True, name=f"recovery.{len(app.tasks)}", shared=False, **options)
    def task(self: Task) -> None:
        raise exc

    return task


def headers_for(task: Any, retries: int, history: History | None = None) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "lang": "py", "task": task.name, "id": f"id-{task.name}", "root_id": None,
        "parent_id": None, "group": None, "retries": retries, "eta": None, "expires": None,
        "argsrepr": "()", "kwargsrepr": "{}", "origin": "test",
    }  # fmt: skip
    if history is not None:
        headers[HEADER] = history.encode()
    return headers


def traced(task: Any, headers: dict[str, Any]) -> Any:
    """Run ``task`` as a pool child does: what its tracer returns (the value, or the failure's
    ``ExceptionInfo``)."""
    request = {**headers, "delivery_info": {"routing_key": "celery"}, "hostname": "w1@host"}
    tracer = build_tracer(task.name, task, app=task.app, eager=False, propagate=False)
    return tracer(headers["id"], [], {}, request)[0]


def in_the_child(task: Any, headers: dict[str, Any]) -> ExceptionInfo:
    """Run ``task`` as a pool child does and return its failure as the main process gets it."""
    einfo = traced(task, headers)
    assert isinstance(einfo, ExceptionInfo), einfo
    restored: ExceptionInfo = pickle.loads(pickle.dumps(einfo))  # across the pool's pipe
    return restored


def in_the_main_process(
    task: Any, headers: dict[str, Any], einfo: ExceptionInfo
) -> tuple[BaseException, Reason]:
    """Hand the failure to a ResilientRequest: what it would dead-letter, and why."""
    seen: list[tuple[BaseException, Reason]] = []

    def capture(
        self: ResilientRequest,
        exc: BaseException,
        exc_info: ExceptionInfo,
        reason: Reason,
        then: Any,
    ) -> None:
        seen.append((exc, reason))  # and not ``then()``: as if it was requeued

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(deadletter, "dead_letter_then", capture)
        request = ResilientRequest(_message(headers), app=task.app, task=task, hostname="w1@h")
        request.on_failure(einfo)
    assert len(seen) == 1
    return seen[0]


def gives_up(task: Any, retries: int, history: History | None = None) -> tuple[Any, Reason]:
    """Run an attempt in the child, settle it in the main process: what came back, and the
    dead letter's reason."""
    headers = headers_for(task, retries, history)
    return in_the_main_process(task, headers, in_the_child(task, headers))


# -- a policy ------------------------------------------------------------------------------------


def test_a_stand_in_for_an_unpicklable_transient_failure_is_retries_exhausted(
    app: Celery,
) -> None:
    task = raising(app, FlakyNeedsTwo(503, "unavailable"), retry_policy=TRANSIENT)

    came_back, reason = gives_up(task, retries=2)

    assert type(came_back) is ConnectionError  # Celery's stand-in: the mark is gone
    assert _reason.recorded(came_back) is None
    assert reason == "retries_exhausted"


def test_an_unpickleable_exception_wrapper_is_classified_by_the_class_it_names(
    app: Celery,
) -> None:
    policy = TRANSIENT.replace(retry_on=(NeedsTwo,))
    task = raising(app, NeedsTwo(402, "payment required"), retry_policy=policy)

    came_back, reason = gives_up(task, retries=2)

    assert isinstance(came_back, UnpickleableExceptionWrapper)
    assert reason == "retries_exhausted"


def test_an_unpicklable_permanent_failure_is_permanent(app: Celery) -> None:
    task = raising(app, Permanent(NeedsTwo(404, "gone")), retry_policy=TRANSIENT)

    came_back, reason = gives_up(task, retries=0)

    assert isinstance(came_back, UnpickleableExceptionWrapper)
    assert reason == "permanent"


def test_a_stand_in_past_the_deadline_is_deadline_exceeded(app: Celery) -> None:
    policy = TRANSIENT.replace(max_attempts=None, max_elapsed=60)
    task = raising(app, FlakyNeedsTwo(503, "unavailable"), retry_policy=policy)
    an_hour_ago = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    history = History().record(
        Attempt(number=1, at=an_hour_ago, hostname="w0", exception_type="E", message="m",
                delay=0.0)
    )  # fmt: skip

    _, reason = gives_up(task, retries=1, history=history)

    assert reason == "deadline_exceeded"


def test_an_unpicklable_failure_the_policy_does_not_retry_is_exception(app: Celery) -> None:
    task = raising(app, NeedsTwo(402, "payment required"), retry_policy=TRANSIENT)

    _, reason = gives_up(task, retries=0)

    assert reason == "exception"


def test_give_up_on_wins_for_a_stand_in_too(app: Celery) -> None:
    policy = TRANSIENT.replace(give_up_on=(FlakyNeedsTwo,))
    task = raising(app, FlakyNeedsTwo(401, "unauthorised"), retry_policy=policy)

    _, reason = gives_up(task, retries=0)

    assert reason == "exception"


def test_an_exception_that_pickles_without_its_dict_is_decided_again(app: Celery) -> None:
    task = raising(app, Terse("reset"), retry_policy=TRANSIENT)

    came_back, reason = gives_up(task, retries=2)

    assert type(came_back) is Terse
    assert _reason.recorded(came_back) is None
    assert reason == "retries_exhausted"


def test_a_class_that_cannot_be_found_is_decided_on_the_stand_in(app: Celery) -> None:
    class Local(ConnectionError):  # pickles by reference neither as a class nor an instance
        def __init__(self, code: int) -> None:
            super().__init__(f"error {code}")

    task = raising(app, Local(503), retry_policy=TRANSIENT)

    came_back, reason = gives_up(task, retries=2)

    assert type(came_back) is ConnectionError
    assert reason == "retries_exhausted"


# -- no policy: Celery's own retry options -----------------------------------------------------


def test_celerys_autoretry_running_out_on_a_stand_in_is_retries_exhausted(app: Celery) -> None:
    task = raising(
        app, FlakyNeedsTwo(503, "unavailable"), autoretry_for=(ConnectionError,), max_retries=2
    )

    _, reason = gives_up(task, retries=2)

    assert reason == "retries_exhausted"
    assert task.request_stack.top is None  # the request pushed to decide again is gone


@pytest.mark.parametrize("exc", [ConnectionError("reset"), FlakyNeedsTwo(503, "unavailable")])
def test_celerys_autoretry_running_out_of_retry_kwargs_max_retries_is_retries_exhausted(
    app: Celery, exc: BaseException
) -> None:
    # Celery's autoretry passes retry_kwargs to Task.retry, so max_retries there wins over the
    # task's own (3 by default): the task gives up after one retry.
    task = raising(app, exc, autoretry_for=(ConnectionError,), retry_kwargs={"max_retries": 1})

    _, reason = gives_up(task, retries=1)

    assert reason == "retries_exhausted"


def test_an_unretried_stand_in_without_a_policy_is_exception(app: Celery) -> None:
    task = raising(app, NeedsTwo(402, "payment required"))

    _, reason = gives_up(task, retries=0)

    assert reason == "exception"


def test_a_stand_in_for_a_permanent_failure_without_a_policy_is_permanent(app: Celery) -> None:
    task = raising(app, Permanent(NeedsTwo(404, "gone")))

    _, reason = gives_up(task, retries=0)

    assert reason == "permanent"


def test_a_task_without_the_retry_mixin_is_exception(app: Celery) -> None:
    base = type("DeadLettering", (DeadLetterMixin, Task), {})
    task = raising(app, Permanent(NeedsTwo(404, "gone")), base=base)
    headers = headers_for(task, retries=0)
    einfo = in_the_child(task, headers)
    request = ResilientRequest(
        _message(headers), app=task.app, task=task, hostname="w1@host"
    )  # the reason a picklable one gets too: nothing in the child decided

    assert retry.give_up_reason(request, _unwrap(einfo.exception), einfo) == "exception"


@pytest.mark.parametrize(
    ("exc", "options", "retries"),
    [
        (FlakyNeedsTwo(503, "x"), {"retry_policy": TRANSIENT}, 2),
        (NeedsTwo(402, "x"), {"retry_policy": TRANSIENT}, 0),
        (Permanent(NeedsTwo(404, "x")), {"retry_policy": TRANSIENT}, 0),
        (Terse("x"), {"retry_policy": TRANSIENT}, 2),
        (FlakyNeedsTwo(503, "x"), {"autoretry_for": (ConnectionError,), "max_retries": 1}, 1),
        (NeedsTwo(402, "x"), {}, 0),
        (Permanent(NeedsTwo(404, "x")), {}, 0),
    ],
)
def test_the_main_process_agrees_with_the_childs_mark(
    app: Celery,
    monkeypatch: pytest.MonkeyPatch,
    exc: BaseException,
    options: dict[str, Any],
    retries: int,
) -> None:
    marks: list[Reason] = []
    mark = _reason.mark

    def spy(exc: BaseException, reason: Reason) -> None:
        marks.append(reason)
        mark(exc, reason)

    monkeypatch.setattr(_reason, "mark", spy)
    task = raising(app, exc, **options)

    _, reason = gives_up(task, retries=retries)

    assert marks == [reason]


# -- what the mark says stands; the fallback never raises --------------------------------------


def test_a_mark_that_came_back_is_used_as_it_is(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = raising(app, ConnectionError("reset"), retry_policy=TRANSIENT)
    headers = headers_for(task, retries=2)
    einfo = in_the_child(task, headers)
    monkeypatch.setattr(retry, "decide_for", _fails)

    _, reason = in_the_main_process(task, headers, einfo)

    assert reason == "retries_exhausted"


def test_a_decision_that_cannot_be_made_again_is_exception_and_logged(
    app: Celery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    task = raising(app, FlakyNeedsTwo(503, "unavailable"), retry_policy=TRANSIENT)
    headers = headers_for(task, retries=2)
    einfo = in_the_child(task, headers)
    monkeypatch.setattr(retry, "decide_for", _fails)

    with caplog.at_level(logging.WARNING, logger="resilient_tasks.retry"):
        _, reason = in_the_main_process(task, headers, einfo)

    assert reason == "exception"
    assert "could not tell why" in caplog.text


def test_a_policy_that_would_retry_here_is_exception(app: Celery) -> None:
    """The child gave up on what this process cannot see (say the exception's chain)."""
    policy = TRANSIENT.replace(give_up_on=(lambda e: isinstance(e.__cause__, KeyError),))
    try:
        try:
            raise KeyError("customer")
        except KeyError as cause:
            raise FlakyNeedsTwo(503, "unavailable") from cause
    except FlakyNeedsTwo as raised:
        exc = raised
    task = raising(app, exc, retry_policy=policy)

    _, reason = gives_up(task, retries=0)

    assert reason == "exception"


# -- as_raised ----------------------------------------------------------------------------------


def test_as_raised_keeps_what_is_no_stand_in() -> None:
    exc = ConnectionError("reset")

    assert _reason.as_raised(exc, ConnectionError) is exc
    assert _reason.as_raised(exc, None) is exc
    assert _reason.as_raised(exc, KeyError) is exc  # not a subclass: not a stand-in for it


def test_as_raised_rebuilds_a_base_class_stand_in_with_its_args_and_attributes() -> None:
    stand_in = ConnectionError("error 503: unavailable")
    stand_in.errno_hint = 7  # type: ignore[attr-defined]

    rebuilt = _reason.as_raised(stand_in, FlakyNeedsTwo)

    assert type(rebuilt) is FlakyNeedsTwo
    assert rebuilt.args == ("error 503: unavailable",)
    assert rebuilt.errno_hint == 7  # type: ignore[attr-defined]


def test_as_raised_finds_a_wrappers_class_by_import_when_the_type_is_lost() -> None:
    wrapper = UnpickleableExceptionWrapper.from_exception(NeedsTwo(402, "payment required"))

    rebuilt = _reason.as_raised(wrapper, Exception)  # get_pickleable_etype's fallback

    assert type(rebuilt) is NeedsTwo
    assert rebuilt.args == ("error 402: payment required",)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("no_such_module_anywhere", "Gone"),
        (__name__, "no_such_class"),
        (__name__, "TRANSIENT"),  # not an exception class
        (__name__, "NoNew"),  # cannot be instantiated without its own arguments
        (None, None),
    ],
)
def test_as_raised_keeps_a_wrapper_it_cannot_resolve(module: Any, name: Any) -> None:
    wrapper = UnpickleableExceptionWrapper(module, name, ("a",), "text")

    assert _reason.as_raised(wrapper, Exception) is wrapper


def test_reason_of_and_recorded() -> None:
    exc = KeyError("k")
    assert (_reason.recorded(exc), _reason.reason_of(exc)) == (None, "exception")

    _reason.mark(exc, "exception")
    assert (_reason.recorded(exc), _reason.reason_of(exc)) == ("exception", "exception")

    _reason.mark(exc, "permanent")
    assert pickle.loads(pickle.dumps(exc)).__dict__ == exc.__dict__
    assert _reason.reason_of(pickle.loads(pickle.dumps(exc))) == "permanent"


# -- one run, two outcomes -------------------------------------------------------------------------


@pytest.mark.parametrize("acks_late", [True, False])
def test_a_result_read_after_its_lost_worker_was_settled_is_not_dead_lettered_too(
    app: Celery, monkeypatch: pytest.MonkeyPatch, acks_late: bool
) -> None:
    # Billiard reports a killed child's job as lost before it reads the result the child had
    # already written to its pipe, and then delivers that result as well.
    task = raising(app, Permanent(NeedsTwo(404, "gone")), acks_late=acks_late)
    headers = headers_for(task, retries=0)
    failure = in_the_child(task, headers)
    republished: list[dict[str, Any]] = []
    dead_lettered: list[Reason] = []

    def republish(self: ResilientRequest, headers: dict[str, Any], **_: Any) -> bool:
        republished.append(headers)
        return True

    def dead_letter(self: ResilientRequest, exc: Any, exc_info: Any, reason: Reason) -> bool:
        dead_lettered.append(reason)
        return True

    monkeypatch.setattr(retry, "republish", republish)
    monkeypatch.setattr(deadletter, "dead_letter", dead_letter)
    monkeypatch.setattr(ResilientRequest, "acknowledge", lambda self: None)
    request = ResilientRequest(_message(headers), app=task.app, task=task, hostname="w1@host")

    request.on_failure(deadletter.exception_info(WorkerLostError("exited: SIGKILL")))
    request.on_failure(failure)

    if acks_late:  # redelivered once: the next run decides
        assert (len(republished), dead_lettered) == (1, [])
    else:  # Celery acknowledged it before it ran: dead-lettered once, as worker_lost
        assert (republished, dead_lettered) == ([], ["worker_lost"])


# -- one reason everywhere -----------------------------------------------------------------------


def reasons_given(
    monkeypatch: pytest.MonkeyPatch, task: Any, settle: Callable[[ResilientRequest], object]
) -> tuple[list[Reason], list[Reason]]:
    """Settle a failure in the main process with ``settle``: the reasons it dead-lettered with,
    and those its ``task_failed`` events named."""
    dead_lettered: list[Reason] = []

    def dead_letter(self: ResilientRequest, exc: Any, exc_info: Any, reason: Reason) -> bool:
        dead_lettered.append(reason)
        return True

    monkeypatch.setattr(deadletter, "dead_letter", dead_letter)
    monkeypatch.setattr(ResilientRequest, "acknowledge", lambda self: None)
    monkeypatch.setattr(task.backend, "mark_as_failure", lambda *a, **k: None)
    request = ResilientRequest(
        _message(headers_for(task, retries=0)), app=task.app, task=task, hostname="w1@host"
    )
    observability.connect()
    try:
        with capture_events() as events:
            settle(request)
    finally:
        observability.disconnect()
    return dead_lettered, [e["reason"] for e in events if e["event"] == "task_failed"]


@pytest.mark.parametrize("acks_late", [True, False])
def test_task_failed_for_a_lost_worker_names_the_reason_the_envelope_does(
    app: Celery, monkeypatch: pytest.MonkeyPatch, acks_late: bool
) -> None:
    task = raising(app, KeyError("never runs"), acks_late=acks_late, max_redeliveries=0)
    lost = deadletter.exception_info(WorkerLostError("SIGKILL"))

    given = reasons_given(monkeypatch, task, lambda request: request.on_failure(lost))

    assert given == (["worker_lost"], ["worker_lost"])


def test_task_failed_for_a_hard_time_limit_past_max_attempts_says_retries_exhausted(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = RetryPolicy(retry_on=(TimeLimitExceeded,), max_attempts=1, backoff=0)
    task = raising(app, KeyError("never runs"), retry_policy=policy)

    given = reasons_given(
        monkeypatch, task, lambda request: request.on_timeout(soft=False, timeout=1.0)
    )

    assert given == (["retries_exhausted"], ["retries_exhausted"])


# -- the envelope names what was raised ----------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "named"),
    [
        (FlakyNeedsTwo(503, "unavailable"), f"{__name__}.FlakyNeedsTwo"),  # base-class stand-in
        (NeedsTwo(402, "payment required"), f"{__name__}.NeedsTwo"),  # wrapper
        (ConnectionError("reset"), "ConnectionError"),  # no stand-in
    ],
)
def test_the_envelope_and_its_last_attempt_name_the_class_the_task_raised(
    app: Celery, exc: BaseException, named: str
) -> None:
    task = raising(app, exc, retry_policy=TRANSIENT)
    headers = headers_for(task, retries=2)
    einfo = in_the_child(task, headers)
    request = ResilientRequest(_message(headers), app=task.app, task=task, hostname="w1@host")

    came_back = _unwrap(einfo.exception)
    reason = retry.give_up_reason(request, came_back, einfo)
    envelope = deadletter._envelope(request, came_back, einfo, reason)

    assert envelope["exception"]["type"] == named
    assert envelope["attempts"][-1]["exception_type"] == named
    assert envelope["exception"]["message"] == str(exc)


# -- helpers ------------------------------------------------------------------------------------


def _message(headers: dict[str, Any]) -> Message:
    content_type, encoding, body = dumps(([], {}, {}), serializer="json")
    return Message(
        body=body,
        content_type=content_type,
        content_encoding=encoding,
        headers=headers,
        delivery_info={"exchange": "", "routing_key": "celery"},
        properties={},
    )


def _fails(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("decide was called")
