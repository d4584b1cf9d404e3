"""What the dead-letter tools count as a dead letter, message by message.

``replay`` and ``purge`` refuse a queue that holds anything else (a live task queue named by
mistake), so the line must be drawn right: an envelope, or a task message the broker
dead-lettered for a failure (its newest ``x-death``), is one; a task message without
``x-death``, or one whose newest death is its expiry in a delay queue (a delayed task on its way
to its queue), is a live task.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from resilient_tasks.dlq import REASONS, DeadLetter, UnknownReason
from resilient_tasks.dlq.readers import _Message
from resilient_tasks.dlq.recognition import _letter
from resilient_tasks.dlq.selection import _check_reason

TASK_HEADERS = {"task": "billing.sync", "id": "f7c9", "retries": 0}


def message(headers: dict[str, Any], body: Any = ([1], {}, {})) -> _Message:
    return _Message(
        body=json.dumps(body).encode(),
        headers=headers,
        properties={},
        content_type="application/json",
        content_encoding="utf-8",
        exchange="",
        routing_key="billing.dlq",
        token=None,
    )


def death(reason: str, queue: str, exchange: str = "") -> dict[str, Any]:
    return {"reason": reason, "queue": queue, "exchange": exchange, "routing-keys": [queue]}


def test_an_envelope_is_a_dead_letter() -> None:
    envelope = {"schema": "resilient_tasks.dead_letter/1", "reason": "permanent", "task": {}}
    letter = _letter("billing.dlq", message({}, envelope), ())
    assert letter is not None
    assert not letter.from_broker


@pytest.mark.parametrize("reason", ["rejected", "expired", "maxlen", "delivery_limit"])
def test_a_task_message_the_broker_dead_lettered_is_a_dead_letter(reason: str) -> None:
    headers = {**TASK_HEADERS, "x-death": [death(reason, "billing")]}
    letter = _letter("billing.dlq", message(headers), ())
    assert letter is not None
    assert (letter.from_broker, letter.reason, letter.destination) == (
        True,
        reason,
        ("", "billing"),
    )


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(TASK_HEADERS, id="a live task"),
        pytest.param(
            {
                **TASK_HEADERS,
                "x-death": [death("expired", "celery_delayed_27", "celery_delayed_27")],
            },
            id="a delayed task on its way",
        ),
        pytest.param({**TASK_HEADERS, "x-death": []}, id="an empty x-death"),
        pytest.param({"x-death": [death("rejected", "billing")]}, id="no task message"),
    ],
)
def test_anything_else_is_not_a_dead_letter(headers: dict[str, Any]) -> None:
    assert _letter("billing", message(headers), ()) is None


def test_a_delayed_task_that_failed_later_is_a_dead_letter_again() -> None:
    deaths = [death("rejected", "billing"), death("expired", "celery_delayed_3")]  # newest first
    assert _letter("billing.dlq", message({**TASK_HEADERS, "x-death": deaths}), ()) is not None


def test_reasons_are_the_envelope_schemas_and_the_brokers() -> None:
    assert set(REASONS) == {
        "exception", "retries_exhausted", "deadline_exceeded", "permanent", "soft_time_limit",
        "hard_time_limit", "worker_lost", "retry_budget_exhausted",
        "expired", "rejected", "maxlen", "delivery_limit",
    }  # fmt: skip
    for reason in REASONS:
        _check_reason(reason)
    with pytest.raises(UnknownReason, match="'retries_exhuasted'"):
        _check_reason("retries_exhuasted")


def test_redeliveries_come_from_the_original_headers() -> None:
    def letter(headers: dict[str, Any]) -> DeadLetter:
        return DeadLetter("q.dlq", {"attempts": [{"number": 1}], "original": {"headers": headers}})

    assert letter({"resilient_redeliveries": 3}).redeliveries == 3
    assert letter({"x-delivery-count": 5, "resilient_redeliveries": 2}).redeliveries == 5
    assert letter({}).redeliveries == 0
    assert DeadLetter("q.dlq", {}).redeliveries == 0
