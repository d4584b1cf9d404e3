"""Declaring and calling library tasks leaves Celery's binding as Celery does it.

Celery binds each task class to its app once, when the class is created from ``@app.task``: the
first bind applies ``task_annotations``, reads the app's configuration and gives the class its
own request stack. A base class that is bound already (reading ``celery.Task.app`` binds the
class it is read on) makes every class created from it skip all of that.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, Task

from resilient_tasks import FailureDetails, ResilientTask, RetryPolicy

TRANSIENT = RetryPolicy(retry_on=(ConnectionError,), max_attempts=3, backoff=0)


def make_app(name: str, **conf: Any) -> Celery:
    app = Celery(name, set_as_current=False, task_cls="resilient_tasks:ResilientTask")
    app.conf.update(conf)
    return app


@pytest.fixture
def app() -> Iterator[Celery]:
    app = make_app("binding")
    app.finalize()
    yield app
    app.close()


def declare(app: Celery, name: str, **options: Any) -> Any:
    @app.task(name=name, shared=False, **options)
    def task() -> None:
        pass

    return task


def test_declaring_a_task_leaves_resilienttask_and_the_apps_task_unbound(app: Celery) -> None:
    declare(app, "binding.a", base=ResilientTask)
    declare(app, "binding.b")  # on the app's Task, which task_cls makes a ResilientTask

    assert "__bound__" not in ResilientTask.__dict__
    assert "__bound__" not in vars(app.Task)
    assert "request_stack" not in ResilientTask.__dict__


def test_task_annotations_apply_to_a_library_task() -> None:
    app = make_app("annotated", task_annotations={"annotated.slow": {"rate_limit": "10/s"}})
    app.finalize()
    declare(app, "annotated.first")

    slow = declare(app, "annotated.slow")

    assert slow.rate_limit == "10/s"


def test_each_app_configures_its_own_tasks() -> None:
    first, second = make_app("first"), make_app("second", task_serializer="pickle")
    first.finalize()
    second.finalize()
    declare(first, "first.task", base=ResilientTask)
    first.conf.task_ignore_result = True  # changed after the app's first task

    on_second = declare(second, "second.task", base=ResilientTask)
    later_on_first = declare(first, "first.later", base=ResilientTask)

    assert on_second.serializer == "pickle"
    assert later_on_first.ignore_result is True


def test_every_task_has_its_own_request_stack(app: Celery) -> None:
    one, two = declare(app, "binding.one"), declare(app, "binding.two")

    assert one.request_stack is not two.request_stack


@pytest.mark.skipif(
    "task_routes setting" not in inspect.getsource(Task.bind),
    reason="this Celery does not deprecate routing attributes on a task",
)
def test_celerys_warning_for_a_routing_attribute_on_a_task_is_raised(app: Celery) -> None:
    declare(app, "binding.first")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        declare(app, "binding.routed", queue="billing")

    assert any("'queue' task attribute" in str(w.message) for w in caught)


# -- a task called as a plain function inside a running task ------------------------------------


def test_a_library_task_called_inside_another_sees_its_own_request(app: Celery) -> None:
    seen: dict[str, Any] = {}

    @app.task(bind=True, name="binding.inner", shared=False, retry_policy=TRANSIENT)
    def inner(self: Task, n: int) -> int:
        seen["inner"] = (self.request.called_directly, self.request.args)
        return n + 1

    @app.task(bind=True, name="binding.outer", shared=False)
    def outer(self: Task, n: int) -> int:
        result: int = inner(n)
        return result

    assert outer.apply(args=(1,)).get() == 2
    assert seen["inner"] == (True, (1,))


def test_a_failing_library_task_called_inside_another_retries_the_outer_task_only(
    app: Celery,
) -> None:
    runs: list[tuple[str, int]] = []

    @app.task(bind=True, name="binding.flaky_inner", shared=False, retry_policy=TRANSIENT)
    def inner(self: Task) -> None:
        runs.append(("inner", self.request.retries))
        raise ConnectionError("reset")

    @app.task(bind=True, name="binding.calls_flaky", shared=False, retry_policy=TRANSIENT)
    def outer(self: Task) -> None:
        runs.append(("outer", self.request.retries))
        inner()

    result = outer.apply()

    assert result.state == "FAILURE"
    assert runs == [("outer", 0), ("inner", 0), ("outer", 1), ("inner", 0), ("outer", 2),
                    ("inner", 0)]  # fmt: skip


def test_a_task_calling_itself_sees_each_calls_arguments_and_gives_up_once(app: Celery) -> None:
    seen: list[tuple[int, Any]] = []
    given_up: list[FailureDetails] = []
    handled: list[FailureDetails] = []

    class Recursive(ResilientTask):
        def on_give_up(self, details: FailureDetails) -> None:
            given_up.append(details)

    @app.task(
        base=Recursive,
        bind=True,
        name="binding.countdown",
        shared=False,
        failure_handlers={KeyError: handled.append},
    )
    def countdown(self: Task, n: int) -> None:
        seen.append((n, list(self.request.args)))
        if n == 0:
            raise KeyError("bottom")
        countdown(n - 1)

    result = countdown.apply(args=(2,))

    assert result.state == "FAILURE"
    assert seen == [(2, [2]), (1, [1]), (0, [0])]
    assert ([d.reason for d in given_up], [d.reason for d in handled]) == (
        ["exception"],
        ["exception"],
    )
