"""What a failure costs on its way from the pool child to the worker's main process.

A pool child returns the failed (or retried) task's ``ExceptionInfo`` to its main process.
billiard builds its traceback objects (``tb``) by copying every frame with its code's whole
bytecode position table, about 34 KB for a plain task, nearly all of it Celery's own tracer
frame. For the library's tasks:

* the ``ExceptionInfo`` leaves those objects behind when it is pickled (the main process reads
  only the exception and the traceback text), so the main process, single-threaded and setting
  the pace of the whole worker, does not unpickle them;
* the child still builds them (Celery's error log line formats them), so the library's own frame
  in them (its one ``__call__``) must stay small.
"""

from __future__ import annotations

import logging
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from billiard.einfo import ExceptionInfo
from celery import Celery
from celery.app.trace import build_tracer, reset_worker_optimizations, setup_worker_optimizations
from celery.exceptions import Retry

from resilient_tasks import Permanent, ResilientTask, RetryPolicy
from resilient_tasks.retry import HandedOverRetry

#: The most the library's frames may add to the traceback objects the child builds, in pickled
#: bytes (its frame added 5 KB before it was cut down).
MOST_ADDED_BYTES = 2_000
#: The most a library task's failure may send the main process, in pickled bytes.
MOST_SENT_BYTES = 4_000


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("failure-cost", set_as_current=False)
    app.conf.update(broker_url="memory://", result_backend=None, task_ignore_result=True)
    setup_worker_optimizations(app, "cost@localhost")
    try:
        yield app
    finally:
        reset_worker_optimizations(app)


def _body(n: int) -> None:
    raise Permanent(LookupError(f"record {n} is gone"))


def _tasks(app: Celery, body: Any = _body) -> tuple[Any, Any]:
    plain = app.task(name="cost.plain", shared=False, acks_late=True)(body)
    resilient = app.task(
        base=ResilientTask,
        name="cost.resilient",
        shared=False,
        retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=3),
    )(body)
    app.finalize()
    return app.tasks[plain.name], app.tasks[resilient.name]


def _traced(app: Celery, task: Any) -> ExceptionInfo:
    """What the pool child returns for one failed run of ``task``, as the worker traces it."""
    tracer = build_tracer(task.name, task, app=app, hostname="cost@localhost")
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task.name, args=(1,), kwargs={})
    request = {
        **message.headers,
        "delivery_info": {"exchange": "", "routing_key": "cost", "priority": 0},
        "hostname": "cost@localhost",
        "args": (1,),
        "kwargs": {},
    }
    einfo = tracer(task_id, (1,), {}, request).retval
    assert isinstance(einfo, ExceptionInfo)
    return einfo


def _sent(einfo: ExceptionInfo) -> bytes:
    return pickle.dumps(einfo, protocol=pickle.HIGHEST_PROTOCOL)


def test_a_failure_reaches_the_main_process_without_its_frames_but_with_its_text(
    app: Celery,
) -> None:
    plain, resilient = _tasks(app)
    sent = _sent(_traced(app, resilient))
    assert len(sent) <= MOST_SENT_BYTES, len(sent)
    assert len(_sent(_traced(app, plain))) > MOST_SENT_BYTES  # Celery's own, untouched

    received = pickle.loads(sent)
    assert received.tb is None
    assert isinstance(received, ExceptionInfo)
    assert received.type is Permanent
    exception = getattr(received.exception, "exc", received.exception)
    assert isinstance(exception, Permanent)
    assert "record 1 is gone" in received.traceback
    assert "in _body" in received.traceback  # the task's own frame, as text


def test_a_retry_reaches_the_main_process_without_its_frames(app: Celery) -> None:
    def flaky(n: int) -> None:
        raise ConnectionError(f"peer {n} reset")

    _, resilient = _tasks(app, flaky)
    einfo = _traced(app, resilient)
    assert issubclass(einfo.type, Retry)
    sent = _sent(einfo)
    received = pickle.loads(sent)
    assert "peer 1 reset" in received.traceback
    # The retry's message goes along, for the main process to publish; nothing else is added.
    retry = received.exception
    assert isinstance(retry, HandedOverRetry)
    signature = len(pickle.dumps(dict(retry.sig), protocol=pickle.HIGHEST_PROTOCOL))
    assert len(sent) <= MOST_SENT_BYTES + signature, (len(sent), signature)
    assert (retry.sig["task"], retry.sig["args"], retry.sig["options"]["retries"]) == (
        resilient.name, (1,), 1,
    )  # fmt: skip


def test_the_childs_error_log_line_keeps_the_whole_traceback(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    _, resilient = _tasks(app)
    with caplog.at_level(logging.ERROR, logger="celery.app.trace"):
        _traced(app, resilient)
    (record,) = [r for r in caplog.records if r.exc_info]
    text = logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]
    assert "in _body" in text
    assert "record 1 is gone" in text


def test_the_library_adds_little_to_the_frames_the_child_copies(app: Celery) -> None:
    plain, resilient = _tasks(app)
    sizes = {}
    for task in (plain, resilient):
        einfo = _traced(app, task)
        assert isinstance(getattr(einfo.exception, "exc", einfo.exception), Permanent)
        sizes[task.name] = len(pickle.dumps(_wherever(einfo.tb), protocol=pickle.HIGHEST_PROTOCOL))

    added = sizes["cost.resilient"] - sizes["cost.plain"]
    assert added <= MOST_ADDED_BYTES, sizes


def _wherever(tb: Any) -> Any:
    """``tb`` (billiard's copy of a traceback) with its file names blanked: the bytes the
    library adds should not depend on where the package is installed (a site-packages path is
    longer than a checkout's ``src``)."""
    link = tb
    while link is not None and hasattr(link, "tb_frame"):
        frame = link.tb_frame
        frame.f_code.co_filename = ""
        frame.f_globals["__file__"] = ""
        link = link.tb_next
    return tb
