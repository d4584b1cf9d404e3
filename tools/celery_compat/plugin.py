"""pytest plugin: every Celery app's default task class is ``ResilientTask``.

Loaded with ``-p celery_compat.plugin`` (``tools/`` on ``PYTHONPATH``) by ``run.py`` for the
second run of Celery's unit tests. It sets the class attribute ``Celery.task_cls``, the default
``Celery.__init__`` falls back to when no ``task_cls=`` is given, so every app the tests create
(``celery_app``, ``TestApp``, a bare ``Celery()``) gets ``app.Task`` derived from
``ResilientTask``, as if it had been created with ``task_cls="resilient_tasks:ResilientTask"``.
An explicit ``task_cls=`` or a ``Celery`` subclass's own ``task_cls`` still wins, as it would in a
project, and ``app._custom_task_cls_used`` stays as it is on plain Celery.

It also counts the base task classes the apps create, to show the injection took effect.
"""

from __future__ import annotations

from typing import Any

import pytest

TASK_CLS = "resilient_tasks:ResilientTask"

#: Base task classes created by apps (``app.Task``), and how many derive from ResilientTask.
created = {"task_classes": 0, "resilient": 0}


def pytest_configure(config: pytest.Config) -> None:
    from celery.app.base import Celery

    from resilient_tasks import ResilientTask  # fail here, not in every test, if it cannot import

    original_create = Celery.create_task_cls

    def create_task_cls(self: Celery) -> Any:
        cls = original_create(self)
        created["task_classes"] += 1
        created["resilient"] += issubclass(cls, ResilientTask)
        return cls

    config.stash[_saved] = (Celery.__dict__["task_cls"], original_create)
    Celery.task_cls = TASK_CLS
    Celery.create_task_cls = create_task_cls


def pytest_unconfigure(config: pytest.Config) -> None:
    from celery.app.base import Celery

    saved = config.stash.get(_saved, None)
    if saved is not None:
        Celery.task_cls, Celery.create_task_cls = saved


def pytest_report_header() -> str:
    return f"celery-compat: every Celery app's default task_cls is {TASK_CLS!r}"


_saved = pytest.StashKey[tuple[Any, Any]]()
