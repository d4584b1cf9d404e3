"""The queues of ``apps.native_app``, shared with the tests' client (no app is made here)."""

from __future__ import annotations

from typing import Any

from kombu import Queue

from resilient_tasks.rabbitmq import with_dead_lettering


def native_queues(settings: dict[str, Any]) -> list[Queue]:
    """The app's queues from the test's ``rt_native`` setting, dead-lettered natively."""
    return [
        *with_dead_lettering(
            [Queue(q["name"], queue_arguments=q.get("arguments")) for q in settings["classic"]]
        ),
        *with_dead_lettering(
            [Queue(name) for name in settings.get("quorum", [])],
            queue_type="quorum",
            delivery_limit=settings.get("delivery_limit"),
        ),
    ]
