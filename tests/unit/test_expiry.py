"""A library task's message carries its ``expires`` header but no broker TTL (``expiration``),
so RabbitMQ never drops it unseen: the worker that receives it marks it ``REVOKED``
(:mod:`resilient_tasks._expiry`; the real-worker test is tests/worker/test_expires.py).

Published here on Kombu's in-memory transport and read back as the broker would hold them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery, Task, chain
from celery.app.task import Context
from kombu import Queue

from resilient_tasks import DeadLetterMixin, ResilientTask
from resilient_tasks._expiry import drop_broker_expiry, publishing


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("expiry", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.task_default_queue = f"expiry-{uuid.uuid4().hex}"

    @app.task(base=ResilientTask, name="lib.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="plain.add", shared=False)
    def plain(x: int, y: int) -> int:
        return x + y

    class DeadLettering(DeadLetterMixin, Task):  # type: ignore[misc]
        pass

    @app.task(base=DeadLettering, name="mixin.add", shared=False)
    def mixin(x: int, y: int) -> int:
        return x + y

    yield app
    app.close()


def published(app: Celery) -> list[dict[str, Any]]:
    """Each message in the app's queue: task name, ``expires`` header, ``expiration`` property."""
    messages = []
    with app.connection_for_read() as conn:
        queue = Queue(app.conf.task_default_queue).bind(conn.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            messages.append(
                {
                    "task": message.headers["task"],
                    "expires": message.headers.get("expires"),
                    "expiration": message.properties.get("expiration"),
                }
            )
    return messages


def test_a_library_task_is_sent_with_its_expires_and_no_broker_ttl(app: Celery) -> None:
    app.tasks["lib.add"].apply_async((1, 1), expires=10)
    app.tasks["mixin.add"].apply_async((1, 1), expires=10)

    (lib, mixin) = published(app)

    assert lib["expires"] is not None
    assert lib["expiration"] is None
    assert (mixin["expires"] is not None, mixin["expiration"]) == (True, None)


def test_every_way_of_publishing_the_task_goes_without_the_ttl(app: Celery) -> None:
    add = app.tasks["lib.add"]
    add.s(1, 1).set(expires=10).delay()
    add.signature((1, 1), expires=10).apply_async()
    chain(add.s(1, 1), add.s(2)).apply_async(expires=10)
    app.signature("lib.add", (1, 1), expires=10).apply_async()  # a registered task by name
    add.apply_async((1, 1), expires=datetime.now(timezone.utc) + timedelta(seconds=10))

    messages = published(app)

    assert len(messages) == 5
    assert all(m["expires"] is not None and m["expiration"] is None for m in messages)


def test_a_retry_is_sent_with_the_expires_left_and_no_broker_ttl(app: Celery) -> None:
    """As Celery's ``Task.retry`` and the worker's main process (retries, redeliveries) build the
    message again: from the request, ``expires`` included."""
    add = app.tasks["lib.add"]
    expires = (datetime.now(timezone.utc) + timedelta(seconds=10)).isoformat()
    queue = app.conf.task_default_queue
    request = Context(
        id=str(uuid.uuid4()),
        args=(1, 1),
        kwargs={},
        expires=expires,
        delivery_info={"exchange": "", "routing_key": queue},
    )

    add.signature_from_request(request, retries=1, countdown=0.1).apply_async()

    (retry,) = published(app)
    assert (retry["expires"], retry["expiration"]) == (expires, None)


def test_other_messages_keep_celerys_ttl(app: Celery) -> None:
    app.tasks["plain.add"].apply_async((1, 1), expires=10)
    app.send_task("lib.add", (1, 1), expires=10)  # by name, not through the task class

    plain, by_name = published(app)

    assert plain["expiration"] == "10000"
    assert by_name["expiration"] == "10000"


def test_a_ttl_the_caller_asks_for_is_kept(app: Celery) -> None:
    add = app.tasks["lib.add"]
    add.apply_async((1, 1), expiration=5)
    add.apply_async((1, 1), expiration=5, expires=10)  # Celery's own value wins, as on Celery

    only_ttl, both = published(app)

    assert (only_ttl["expires"], only_ttl["expiration"]) == (None, "5000")
    assert both["expiration"] == "10000"


def test_a_message_without_expires_is_left_alone(app: Celery) -> None:
    app.tasks["lib.add"].apply_async((1, 1))

    (message,) = published(app)

    assert (message["expires"], message["expiration"]) == (None, None)


def test_the_receiver_acts_only_within_the_publish_of_that_task() -> None:
    def properties_after(sender: str, **extra: Any) -> dict[str, Any]:
        properties = {"expiration": 1.0}
        drop_broker_expiry(
            sender=sender, headers={"expires": "2030-01-01T00:00:00"}, properties=properties
        )
        return properties

    assert properties_after("lib.add") == {"expiration": 1.0}  # outside any publish
    with publishing("lib.add", {}):
        assert properties_after("other.task") == {"expiration": 1.0}
        assert properties_after("lib.add") == {}
    with publishing("lib.add", {"expiration": 1.0}):
        assert properties_after("lib.add") == {"expiration": 1.0}
    assert properties_after("lib.add") == {"expiration": 1.0}


def test_the_mark_is_cleared_when_the_publish_raises() -> None:
    with pytest.raises(ConnectionError), publishing("lib.add", {}):
        raise ConnectionError("broker gone")

    properties = {"expiration": 1.0}
    drop_broker_expiry(sender="lib.add", headers={"expires": "x"}, properties=properties)
    assert properties == {"expiration": 1.0}


def test_protocol_1_carries_expires_in_its_body(app: Celery) -> None:
    app.conf.task_protocol = 1
    app.tasks["lib.add"].apply_async((1, 1), expires=10)
    app.tasks["plain.add"].apply_async((1, 1), expires=10)

    with app.connection_for_read() as conn:
        queue = Queue(app.conf.task_default_queue).bind(conn.default_channel)
        lib, plain = queue.get(no_ack=True), queue.get(no_ack=True)

    assert (lib.payload["task"], lib.payload["expires"] is not None) == ("lib.add", True)
    assert lib.properties.get("expiration") is None
    assert plain.properties.get("expiration") == "10000"
