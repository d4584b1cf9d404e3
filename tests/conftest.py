"""Fixtures shared by every test tier.

``broker`` is parametrised over the filesystem transport (tier 2, no server) and RabbitMQ and
Redis on loopback (tier 3); ``workers`` starts real ``celery worker`` subprocesses on it.
"""

from __future__ import annotations

import fcntl
import tempfile
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


#: Held by the tests that make or remove the broker's one ``celery_delayed_*`` topology.
DELAYED_DELIVERY_LOCK = Path(tempfile.gettempdir()) / "resilient-tasks-celery-delayed-delivery.lock"


@pytest.fixture
def celery_delayed_delivery(broker: Broker) -> Iterator[None]:
    """Celery's delayed-delivery topology (``celery_delayed_*``, no prefix) is one per RabbitMQ
    broker: a test that makes, checks or removes it holds this lock for its whole run, workers
    and cleanup included, so that no two of them run at once. (pytest-xdist's ``xdist_group``
    does not keep them apart here: under pytest-xdist 3.8 its tests still spread over the
    test processes.)"""
    if broker.kind != "rabbitmq":
        yield
        return
    with DELAYED_DELIVERY_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
