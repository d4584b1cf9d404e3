"""The ``broker_restart`` marker: tests that stop and start the local RabbitMQ or Redis.

They disturb everything else that uses those servers, so they run only with
``RT_CHAOS_RESTART=1`` (``nox -s chaos`` sets it), on a machine where nothing else does.
"""

from __future__ import annotations

import os

import pytest

RESTART_ENV = "RT_CHAOS_RESTART"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "broker_restart: restarts the local RabbitMQ or Redis; runs only with "
        f"{RESTART_ENV}=1 (nox -s chaos)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(RESTART_ENV) == "1":
        return
    skip = pytest.mark.skip(
        reason=f"restarts a shared broker: set {RESTART_ENV}=1 (nox -s chaos) on a quiet machine"
    )
    for item in items:
        if item.get_closest_marker("broker_restart"):
            item.add_marker(skip)
