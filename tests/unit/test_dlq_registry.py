"""The registry of dead-letter queues the worker records and the tools read
(:mod:`resilient_tasks.dlq.registry`): written once per process and name, never failing a dead
letter, read back deduplicated; the tools' default queues add the recorded ones that exist.

Here without a server: the write is stubbed, or Kombu's filesystem transport is the broker.
RabbitMQ and Redis: tests/worker/test_dlq_discovery.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from resilient_tasks import ResilientTask
from resilient_tasks.dev.filesystem import TRANSPORT, transport_options
from resilient_tasks.dlq import DeadLetters, QueueNotFound, dead_letter_queues
from resilient_tasks.dlq import registry as registry_module
from resilient_tasks.dlq.registry import (
    DEFAULT_REGISTRY,
    REGISTRY_SETTING,
    RETRY_AFTER,
    forget_dead_letter_queues,
    record_dead_letter_queue,
    recorded_dead_letter_queues,
    registry_name,
)
from resilient_tasks.dlq.selection import routed_dead_letter_queues
from resilient_tasks.envelope import FailedMessage, build_envelope
from resilient_tasks.history import Attempt, History
from resilient_tasks.publish import publish_envelope


def noop() -> None:
    pass


def memory_app(**settings: Any) -> Celery:
    app = Celery("registry", broker="memory://", set_as_current=False)
    app.conf.task_default_queue = "billing"
    app.conf.update(settings)
    app.task(base=ResilientTask, name="billing.sync", shared=False)(noop)
    return app


@pytest.fixture
def filesystem_app(tmp_path: Path) -> Iterator[Celery]:
    app = Celery("registry-fs", set_as_current=False)
    app.conf.update(
        broker_url="filesystem://localhost/",
        broker_transport=TRANSPORT,
        broker_transport_options=transport_options(tmp_path / "broker"),
        task_default_queue="billing",
    )
    app.task(base=ResilientTask, name="billing.sync", shared=False)(noop)
    yield app
    app.close()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The registry writes made, instead of making them."""
    made: list[tuple[str, str]] = []
    monkeypatch.setattr(
        registry_module, "_write", lambda app, registry, queue: made.append((registry, queue))
    )
    return made


def dead_letter_to(app: Celery, queue: str) -> None:
    """Publish one envelope to ``queue``, as the worker does."""
    error = KeyError("no such customer")
    failed = FailedMessage(task_id="t-1", task_name="billing.sync", args=(), kwargs={},
                           headers={}, properties={}, body=b"[]", content_type="application/json",
                           content_encoding="utf-8", exchange="", routing_key="bulk",
                           priority=None)  # fmt: skip
    now = datetime.now(timezone.utc)
    final = Attempt.failed(1, error, hostname="test", delay=None, at=now)
    envelope = build_envelope(failed, reason="permanent", exception=error, history=History(),
                              final=final, dead_lettered_at=now)  # fmt: skip
    publish_envelope(app, queue, envelope)


# --- recording --------------------------------------------------------------------------------


def test_a_queue_is_written_once_per_process_whatever_the_number_of_dead_letters(
    writes: list[tuple[str, str]],
) -> None:
    app = memory_app()
    for _ in range(3):
        record_dead_letter_queue(app, "bulk.dlq")
    record_dead_letter_queue(app, "billing.dlq")

    assert writes == [(DEFAULT_REGISTRY, "bulk.dlq"), (DEFAULT_REGISTRY, "billing.dlq")]


def test_a_forked_process_records_again(
    writes: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = memory_app()
    record_dead_letter_queue(app, "bulk.dlq")
    monkeypatch.setattr(registry_module.os, "getpid", lambda: -1)
    record_dead_letter_queue(app, "bulk.dlq")

    assert writes == [(DEFAULT_REGISTRY, "bulk.dlq")] * 2


def test_a_failed_write_is_logged_never_raised_and_tried_again_later(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = memory_app()
    tried: list[str] = []
    now = [1000.0]

    def broken(app: Celery, registry: str, queue: str) -> None:
        tried.append(queue)
        raise ConnectionError("broker gone")

    monkeypatch.setattr(registry_module, "_write", broken)
    monkeypatch.setattr(registry_module.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=registry_module.__name__):
        record_dead_letter_queue(app, "bulk.dlq")
        record_dead_letter_queue(app, "bulk.dlq")  # not again at once: no write per dead letter
        now[0] += RETRY_AFTER
        record_dead_letter_queue(app, "bulk.dlq")

    assert tried == ["bulk.dlq", "bulk.dlq"]
    assert "could not record dead-letter queue 'bulk.dlq'" in caplog.text
    assert "the dead letter itself was published" in caplog.text


def test_a_bad_registry_setting_is_logged_by_the_worker_and_refused_by_the_tools(
    writes: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    app = memory_app(**{REGISTRY_SETTING: ""})
    with caplog.at_level(logging.WARNING, logger=registry_module.__name__):
        record_dead_letter_queue(app, "bulk.dlq")

    assert writes == []
    assert REGISTRY_SETTING in caplog.text
    with pytest.raises(ValueError, match=REGISTRY_SETTING):
        registry_name(app)
    with pytest.raises(ValueError, match=REGISTRY_SETTING):
        DeadLetters(app)


def test_the_registry_is_named_by_the_setting(writes: list[tuple[str, str]]) -> None:
    app = memory_app(**{REGISTRY_SETTING: "billing.registry"})
    record_dead_letter_queue(app, "bulk.dlq")

    assert registry_name(app) == "billing.registry"
    assert writes == [("billing.registry", "bulk.dlq")]


# --- reading ----------------------------------------------------------------------------------


def test_a_transport_without_a_registry_has_the_routed_queues_only() -> None:
    app = memory_app()
    record_dead_letter_queue(app, "bulk.dlq")  # nothing to write to: no error

    assert recorded_dead_letter_queues(app) == ()
    assert dead_letter_queues(app) == routed_dead_letter_queues(app) == ("billing.dlq",)


def test_the_filesystem_registry_reads_back_each_name_once_and_drops_duplicates(
    filesystem_app: Celery,
) -> None:
    app = filesystem_app
    registry = registry_name(app)
    for queue in ("bulk.dlq", "audit.dlq", "bulk.dlq", "bulk.dlq"):
        registry_module._write(app, registry, queue)  # as three processes would

    assert recorded_dead_letter_queues(app) == ("audit.dlq", "bulk.dlq")
    assert DeadLetters(app, [registry]).count() == 2, "the duplicates were not removed"
    assert recorded_dead_letter_queues(app) == ("audit.dlq", "bulk.dlq")


def test_the_default_queues_add_recorded_ones_that_exist_and_skip_the_rest(
    filesystem_app: Celery,
) -> None:
    app = filesystem_app
    dead_letter_to(app, "bulk.dlq")
    record_dead_letter_queue(app, "bulk.dlq")
    record_dead_letter_queue(app, "gone.dlq")  # recorded, then deleted (or emptied)
    record_dead_letter_queue(app, "billing.dlq")  # routed as well: listed once

    letters = DeadLetters(app)

    assert letters.queues == ("billing.dlq", "bulk.dlq")
    assert [(q.queue, q.count) for q in letters.stats().queues] == [
        ("billing.dlq", 0),
        ("bulk.dlq", 1),
    ]
    assert DeadLetters(app, ["bulk.dlq"]).queues == ("bulk.dlq",)
    with pytest.raises(QueueNotFound, match=r"gone\.dlq"):
        DeadLetters(app, ["gone.dlq"]).count()


def test_forgetting_removes_every_recording_of_the_names_matched(filesystem_app: Celery) -> None:
    app = filesystem_app
    for queue in ("bulk.dlq", "audit.dlq", "bulk.dlq"):
        registry_module._write(app, registry_name(app), queue)

    assert forget_dead_letter_queues(app, lambda queue: queue == "bulk.dlq") == 2
    assert recorded_dead_letter_queues(app) == ("audit.dlq",)
