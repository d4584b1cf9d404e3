"""The brokers the worker tests run on, and how each cleans up after a test.

* ``filesystem``: Kombu's filesystem transport with the library's atomic writes
  (:mod:`resilient_tasks.dev.filesystem`) in the test's temporary folder. No server.
* ``rabbitmq``: ``amqp://guest:guest@127.0.0.1:5672//`` (``RT_TEST_RABBITMQ_URL`` overrides).
* ``redis``: ``redis://127.0.0.1:6379/0`` (``RT_TEST_REDIS_URL`` overrides); under
  pytest-xdist each test process has its own database number.

A server that does not answer skips its tests with the reason, except with ``CI=true``, where it
fails them: CI must not go green by testing nothing.
"""

from __future__ import annotations

import os
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection

from resilient_tasks._delayed_rabbitmq import PREFIX_SETTING, Topology
from resilient_tasks.dev.filesystem import TRANSPORT, transport_options
from resilient_tasks.dlq.registry import (
    DEFAULT_REGISTRY,
    REGISTRY_SETTING,
    forget_dead_letter_queues,
)

RABBITMQ_URL = os.environ.get("RT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _redis_url() -> str:
    """Database 0, or under pytest-xdist database N + 1 for test process ``gwN``: a test that
    looks at the whole database (result keys, leftovers) sees only its own process's."""
    url = os.environ.get("RT_TEST_REDIS_URL")
    if url:
        return url
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    database = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    return f"redis://127.0.0.1:6379/{database}"


REDIS_URL = _redis_url()
BROKERS = ("filesystem", "rabbitmq", "redis")


@dataclass
class Broker:
    """One broker for one test: its URL, transport options and a unique name prefix."""

    kind: str
    url: str
    transport_options: dict[str, Any] = field(default_factory=dict)
    #: A Kombu transport class path replacing the URL's (``broker_transport``).
    transport: str | None = None
    prefix: str = field(default_factory=lambda: f"rt-{uuid.uuid4().hex[:10]}")
    #: Further queue and exchange names a test made the broker create (RabbitMQ).
    extra_cleanup: list[str] = field(default_factory=list)

    def queue_name(self, label: str = "q") -> str:
        """A queue name no other test uses."""
        return f"{self.prefix}-{label}"

    @property
    def settings(self) -> dict[str, Any]:
        """App settings this broker needs for one test: on RabbitMQ, a delay topology of the
        test's own (``{prefix}_celery_delayed_*``), deleted with what waits in it; on every
        broker, a dead-letter queue registry of the test's own, deleted with it."""
        delayed = {PREFIX_SETTING: self.prefix} if self.kind == "rabbitmq" else {}
        return {**delayed, REGISTRY_SETTING: self.registry}

    @property
    def registry(self) -> str:
        """The test's dead-letter queue registry (a Redis key holding the prefix, or a queue)."""
        return f"{self.prefix}-dead-letter-queues"

    def connection(self) -> Connection:
        return Connection(
            self.url, transport=self.transport, transport_options=self.transport_options
        )

    def cleanup(self, queues: list[str]) -> None:
        """Delete what this test created on the broker."""
        if self.kind == "rabbitmq":
            with self.connection() as conn:
                channel = conn.default_channel
                for name in [*queues, *self.extra_cleanup]:
                    channel.queue_delete(name)
                    channel.exchange_delete(name)
                    channel.queue_delete(f"{name}.dlq")
                    # A task sent to the dead-letter queue itself (a live task where it does
                    # not belong) makes Celery declare an exchange of its name too.
                    channel.exchange_delete(f"{name}.dlq")
                Topology(self.prefix).delete(channel)
                channel.queue_delete(self.registry)
        elif self.kind == "redis":
            with self.connection() as conn:
                client = conn.default_channel.client
                keys = list(client.scan_iter(match=f"*{self.prefix}*"))
                if keys:
                    client.delete(*keys)
        if self.kind in ("rabbitmq", "redis"):
            self._forget_in_default_registry()

    def _forget_in_default_registry(self) -> None:
        """A test that runs a worker without :attr:`settings` (the examples) records its
        dead-letter queues in the default registry: remove them, and the registry if empty."""
        app = Celery("cleanup", broker=self.url, set_as_current=False)
        try:
            forget_dead_letter_queues(app, lambda queue: self.prefix in queue)
            if self.kind == "rabbitmq":
                with self.connection() as conn, suppress(*conn.channel_errors):
                    conn.channel().queue_delete(DEFAULT_REGISTRY, if_empty=True)
        finally:
            app.close()


def _reachable(url: str) -> str | None:
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def make_broker(kind: str, tmp_path: Path) -> Broker:
    """The broker ``kind`` for one test; skips (or fails under CI=true) when it is down."""
    if kind == "filesystem":
        return Broker(
            kind,
            "filesystem://localhost/",
            transport_options(tmp_path / "broker", polling_interval=0.05),
            transport=TRANSPORT,
        )
    url = RABBITMQ_URL if kind == "rabbitmq" else REDIS_URL
    problem = _reachable(url)
    if problem is not None:
        reason = f"{kind} broker at {url} does not answer ({problem})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires every broker", pytrace=False)
        pytest.skip(reason)
    return broker_at(kind, url)


def broker_at(kind: str, url: str) -> Broker:
    """A RabbitMQ or Redis broker at ``url`` for one test (a private server's, too)."""
    broker = Broker(kind, url)
    if kind == "redis":
        # Kombu's Redis transport keeps unacked messages under global keys; give each test its own.
        broker.transport_options = {
            "unacked_key": f"{broker.prefix}-unacked",
            "unacked_index_key": f"{broker.prefix}-unacked_index",
            "unacked_mutex_key": f"{broker.prefix}-unacked_mutex",
            "polling_interval": 0.05,
        }
    return broker
