"""Fixtures shared by every test tier.

``broker`` is parametrised over the filesystem transport (tier 2, no server) and RabbitMQ and
Redis on loopback (tier 3); ``workers`` starts real ``celery worker`` subprocesses on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.brokers import BROKERS, Broker, make_broker
from support.worker import WorkerRunner, running


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Broker:
    """One broker for this test, with its own name prefix for queues and keys."""
    return make_broker(request.param, tmp_path)


@pytest.fixture
def workers(broker: Broker, tmp_path: Path) -> Iterator[WorkerRunner]:
    """Start real prefork workers with ``workers.start("apps.module")``; all stop at teardown."""
    yield from running(broker, tmp_path)
