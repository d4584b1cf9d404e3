"""Where a delayed message of a task waits: the option, the app setting, the transport."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from resilient_tasks import ConfigurationError, ResilientTask
from resilient_tasks.delayed import DELAYED_DELIVERY_SETTING, delayed_delivery_of


def task_on(broker: str, setting: str | None = None, **options: Any) -> Any:
    app = Celery("delayed", broker=broker, set_as_current=False)
    if setting is not None:
        app.conf[DELAYED_DELIVERY_SETTING] = setting
    app.finalize()
    return app.task(base=ResilientTask, name="delayed.task", shared=False, **options)(body)


def body() -> None:
    """A task body."""


@pytest.mark.parametrize(
    ("broker", "setting", "option", "where"),
    [
        ("redis://127.0.0.1:6379/0", None, None, "broker"),
        ("redis://127.0.0.1:6379/0", "worker", None, "worker"),
        ("redis://127.0.0.1:6379/0", "worker", "broker", "broker"),
        ("redis://127.0.0.1:6379/0", None, "worker", "worker"),
        ("memory://", None, None, "worker"),
        ("memory://", "broker", None, "worker"),  # no waiting room there: Celery's ETA
        ("amqp://guest:guest@127.0.0.1:5672//", None, None, "broker"),
        ("amqp://guest:guest@127.0.0.1:5672//", "worker", None, "worker"),
    ],
)
def test_the_task_option_wins_then_the_app_setting_then_the_transport(
    broker: str, setting: str | None, option: str | None, where: str
) -> None:
    options = {} if option is None else {"delayed_delivery": option}

    assert delayed_delivery_of(task_on(broker, setting, **options)) == where


def test_a_worker_of_an_app_with_a_library_task_moves_delayed_messages() -> None:
    task = task_on("redis://127.0.0.1:6379/0")

    assert "DelayedMover" in {step.__name__ for step in task.app.steps["consumer"]}


def test_an_unknown_app_setting_is_refused_when_the_task_is_bound() -> None:
    with pytest.raises(ConfigurationError, match=r"resilient_tasks_delayed_delivery='brokr'"):
        task_on("redis://127.0.0.1:6379/0", setting="brokr")
