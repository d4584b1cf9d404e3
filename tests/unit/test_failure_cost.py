"""What a failure costs on its way from the pool child to the worker's main process.

A pool child sends its main process the failed task's ``ExceptionInfo``, whose traceback billiard
copies frame by frame with each frame's whole bytecode position table. The library's frame in
that traceback (its one ``__call__``) must stay small: every failure and every retry pays for it
twice, pickled in the child and unpickled in the main process, which is single-threaded and sets
the pace of the whole worker.
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.app.trace import build_tracer, reset_worker_optimizations, setup_worker_optimizations

from resilient_tasks import Permanent, ResilientTask, RetryPolicy

#: The most the library may add to a failed task's result, in pickled bytes (a plain task's is
#: about 34 KB, nearly all of it the position table of Celery's own tracer frame; the
#: library's frame added 5 KB before it was cut down).
MOST_ADDED_BYTES = 2_000


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("failure-cost", set_as_current=False)
    app.conf.update(broker_url="memory://", result_backend=None, task_ignore_result=True)
    setup_worker_optimizations(app, "cost@localhost")
    try:
        yield app
    finally:
        reset_worker_optimizations(app)


def _traced_failure(app: Celery, task: Any) -> Any:
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
    return tracer(task_id, (1,), {}, request)


def test_the_library_adds_little_to_what_a_failure_sends_the_main_process(app: Celery) -> None:
    def body(n: int) -> None:
        raise Permanent(LookupError(f"record {n} is gone"))

    plain = app.task(name="cost.plain", shared=False, acks_late=True)(body)
    resilient = app.task(
        base=ResilientTask,
        name="cost.resilient",
        shared=False,
        retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=3),
    )(body)
    app.finalize()

    sizes = {}
    for name in (plain.name, resilient.name):
        result = _traced_failure(app, app.tasks[name])
        assert isinstance(result.retval.exception, Permanent)  # it failed, as the worker sees
        sizes[name] = len(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))

    added = sizes["cost.resilient"] - sizes["cost.plain"]
    assert added <= MOST_ADDED_BYTES, sizes
