"""How ``dlq stats`` counts dead letters: by task, reason and exception type, the oldest and the
newest, per queue and in total, from the envelopes alone (no broker here; the worker tier reads
real queues: tests/worker/test_dlq_tools.py)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from test_dlq_recognition import message  # a message as the readers hand it over

from resilient_tasks.cli import _stats_text
from resilient_tasks.dlq import (
    STATS_SCHEMA,
    UNKNOWN,
    DeadLetter,
    DeadLetterStats,
    QueueStats,
)
from resilient_tasks.dlq.recognition import _letter


def letter(
    task: str | None = "billing.sync",
    reason: str = "permanent",
    exception: str | None = "KeyError",
    at: str | None = "2026-11-21T05:40:02.118+00:00",
    queue: str = "billing.dlq",
) -> DeadLetter:
    envelope: dict[str, Any] = {
        "schema": "resilient_tasks.dead_letter/1",
        "reason": reason,
        "task": {"id": "f7c9", "name": task},
        "exception": {"type": exception, "message": "", "traceback": ""},
        "dead_lettered_at": at,
    }
    return DeadLetter(queue, envelope)


def broker_letter() -> DeadLetter:
    """A task message RabbitMQ dead-lettered itself (rejected), as the tools present it."""
    death = {"reason": "rejected", "queue": "billing", "exchange": "", "routing-keys": ["billing"],
             "time": "2026-11-21T05:41:17+00:00", "count": 1}  # fmt: skip
    found = _letter(
        "billing.dlq", message({"task": "billing.sync", "id": "a1", "x-death": [death]}), ()
    )
    assert found is not None
    assert found.from_broker
    return found


def test_counts_by_task_reason_and_exception_type() -> None:
    stats = QueueStats.of(
        "billing.dlq",
        [
            letter("billing.sync", "permanent", "KeyError"),
            letter("billing.sync", "retries_exhausted", "ConnectionError"),
            letter("billing.render", "retries_exhausted", "ConnectionError"),
            letter("billing.sync", "retries_exhausted", "ConnectionError"),
        ],
    )

    assert stats.queue == "billing.dlq"
    assert stats.count == 4
    assert dict(stats.by_task) == {"billing.sync": 3, "billing.render": 1}
    assert dict(stats.by_reason) == {"retries_exhausted": 3, "permanent": 1}
    assert dict(stats.by_exception) == {"ConnectionError": 3, "KeyError": 1}
    assert stats.others == 0


def test_counts_are_ranked_highest_first_then_by_name() -> None:
    names = ["c.task", "b.task", "a.task", "b.task", "c.task", "d.task", "c.task"]

    stats = QueueStats.of("q.dlq", [letter(task=name) for name in names])

    assert list(stats.by_task.items()) == [("c.task", 3), ("b.task", 2), ("a.task", 1),
                                           ("d.task", 1)]  # fmt: skip


def test_oldest_and_newest_compare_times_not_text() -> None:
    times = [
        "2026-11-21T05:41:17+00:00",  # whole seconds: sorts before ".000" as text, not in time
        "2026-11-21T05:41:17.500+00:00",
        "2026-11-21T07:00:00+02:00",  # 05:00 UTC: the oldest, although the largest text
        "2026-11-21T05:42:00Z",
    ]

    stats = QueueStats.of("q.dlq", [letter(at=at) for at in times])

    assert stats.oldest == "2026-11-21T07:00:00+02:00"
    assert stats.newest == "2026-11-21T05:42:00Z"


def test_a_dead_letter_without_a_time_is_counted_but_not_dated() -> None:
    stats = QueueStats.of("q.dlq", [letter(at=None), letter(at="not a time"), letter(at=None)])

    assert stats.count == 3
    assert (stats.oldest, stats.newest) == (None, None)


def test_a_broker_dead_letter_counts_under_its_reason_with_no_exception_type() -> None:
    stats = QueueStats.of("billing.dlq", [broker_letter(), letter()])

    assert dict(stats.by_reason) == {"permanent": 1, "rejected": 1}
    assert dict(stats.by_exception) == {"KeyError": 1, UNKNOWN: 1}
    assert dict(stats.by_task) == {"billing.sync": 2}
    assert stats.newest == "2026-11-21T05:41:17+00:00"


def test_a_dead_letter_without_a_task_name_counts_as_unknown() -> None:
    stats = QueueStats.of("q.dlq", [letter(task=None, exception=None)])

    assert dict(stats.by_task) == {UNKNOWN: 1}
    assert dict(stats.by_exception) == {UNKNOWN: 1}


def test_an_empty_queue_counts_nothing() -> None:
    stats = QueueStats.of("q.dlq", [])

    assert (stats.count, stats.oldest, stats.newest) == (0, None, None)
    assert dict(stats.by_task) == dict(stats.by_reason) == dict(stats.by_exception) == {}


def test_the_total_adds_up_every_queue_and_keeps_each() -> None:
    billing = QueueStats.of(
        "billing.dlq",
        [letter("billing.sync", at="2026-11-21T05:00:00+00:00"), letter("billing.sync")],
    )
    reports = QueueStats.of(
        "reports.dlq",
        [letter("reports.daily", "worker_lost", at="2026-11-22T00:00:00+00:00", queue="reports")],
    )
    empty = QueueStats.of("crm.dlq", [])

    total = DeadLetterStats.of([billing, reports, empty])

    assert [q.queue for q in total.queues] == ["billing.dlq", "reports.dlq", "crm.dlq"]
    assert total.count == 3
    assert dict(total.by_task) == {"billing.sync": 2, "reports.daily": 1}
    assert dict(total.by_reason) == {"permanent": 2, "worker_lost": 1}
    assert (total.oldest, total.newest) == ("2026-11-21T05:00:00+00:00",
                                            "2026-11-22T00:00:00+00:00")  # fmt: skip


def test_messages_that_are_not_dead_letters_are_counted_apart() -> None:
    queue = QueueStats(queue="billing", others=2)

    total = DeadLetterStats.of([queue, QueueStats.of("billing.dlq", [letter()])])

    assert (total.count, total.others) == (1, 2)


def test_the_counts_are_frozen_and_read_only() -> None:
    stats = QueueStats(queue="q.dlq", count=1, by_task={"b": 1, "a": 2})

    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.count = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.by_task["a"] = 3  # type: ignore[index]
    assert list(stats.by_task) == ["a", "b"], "a mapping given is ranked too"


def test_the_json_shape_is_stable() -> None:
    total = DeadLetterStats.of([QueueStats.of("billing.dlq", [letter(), broker_letter()])])

    shape = json.loads(json.dumps(total.as_dict()))

    keys = ["count", "others", "oldest", "newest", "by_task", "by_reason", "by_exception"]
    assert list(shape) == ["schema", *keys, "queues"]
    assert shape["schema"] == STATS_SCHEMA == "resilient_tasks.dlq_stats/1"
    assert list(shape["queues"][0]) == ["queue", *keys]
    assert shape["queues"][0]["queue"] == "billing.dlq"
    assert shape["by_exception"] == {"KeyError": 1, "-": 1}
    assert shape["count"] == shape["queues"][0]["count"] == 2


def test_the_table_shows_each_queue_the_total_and_the_top_ten() -> None:
    letters = [letter(f"task.{n:02}") for n in range(12) for _ in range(12 - n)]
    total = DeadLetterStats.of(
        [QueueStats.of("a.dlq", letters), QueueStats.of("b.dlq", [letter("task.11", at=None)])]
    )

    text = _stats_text(total)

    lines = text.splitlines()
    assert lines[0].split() == ["QUEUE", "DEAD", "LETTERS", "OLDEST", "NEWEST"]
    assert lines[1].split()[:2] == ["a.dlq", str(len(letters))]
    assert lines[2].split() == ["b.dlq", "1", "-", "-"]
    assert lines[3].split()[:2] == ["total", str(len(letters) + 1)]
    assert "task.00" in text
    assert "task.09" in text
    assert "task.10" not in text
    assert ["(2", "more)", "4", "5%"] in [line.split() for line in lines]  # task.10 and .11
    assert text.splitlines()[-1] == f"{len(letters) + 1} dead letters in 2 queues."
