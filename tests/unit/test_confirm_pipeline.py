"""The worker's pipelined publishes: each continuation runs when its confirm arrives, and
every other outcome (a nack, a publish that raises, a lost connection, the worker stopping
with confirms still to come) falls back to publishing again and waiting for the confirm."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from resilient_tasks.publish import ConfirmPipeline


class FakePipeline(ConfirmPipeline):
    """A pipeline whose connection is a list of published bodies."""

    def __init__(self) -> None:
        super().__init__(app=None, hub=None)  # type: ignore[arg-type]
        self.published: list[str] = []
        self.opened = 0

    def _open(self) -> Any:
        if self._producer is None:
            self.opened += 1
            self._producer = SimpleNamespace(channel=object())
            self._connection = SimpleNamespace(
                drain_events=self._nothing,
                collect=lambda: None,
                connection_errors=(ConnectionError,),
                channel_errors=(),
            )
        return self._producer

    @staticmethod
    def _nothing(timeout: float | None = None) -> None:
        raise TimeoutError


def submit(pipeline: ConfirmPipeline, name: str, log: list[str], fails: bool = False) -> None:
    def publish(producer: Any) -> None:
        if fails:
            raise ConnectionResetError("connection reset by peer")
        pipeline.published.append(name)  # type: ignore[attr-defined]
        pipeline._count_one()  # what the channel's basic_publish does for each message

    pipeline.submit(publish, lambda: log.append(f"{name} done"),
                    lambda: log.append(f"{name} again"))  # fmt: skip


def test_each_continuation_runs_when_its_confirm_arrives() -> None:
    pipeline, log = FakePipeline(), []
    for name in "abc":
        submit(pipeline, name, log)

    assert log == []  # published, none confirmed yet
    pipeline._on_ack(2, multiple=True)
    assert log == ["a done", "b done"]
    pipeline._on_ack(3)
    assert log == ["a done", "b done", "c done"]


def test_a_nacked_publish_is_published_again() -> None:
    pipeline, log = FakePipeline(), []
    submit(pipeline, "a", log)
    submit(pipeline, "b", log)

    pipeline._on_nack(1)
    pipeline._on_ack(2)

    assert log == ["a again", "b done"]


def test_a_lost_connection_hands_everything_pending_to_the_fallback() -> None:
    pipeline, log = FakePipeline(), []
    submit(pipeline, "a", log)

    submit(pipeline, "b", log, fails=True)  # the connection is gone: a's confirm with it
    submit(pipeline, "c", log)
    pipeline._on_ack(1)

    assert log == ["a again", "b again", "c done"]
    assert pipeline.opened == 2  # a new connection, whose delivery tags start again


def test_a_publish_that_fails_otherwise_goes_to_its_own_fallback_alone() -> None:
    pipeline, log = FakePipeline(), []
    submit(pipeline, "a", log)

    pipeline.submit(lambda producer: json.dumps(object()), lambda: log.append("b done"),
                    lambda: log.append("b again"))  # fmt: skip
    pipeline._on_ack(1)

    assert log == ["b again", "a done"]
    assert pipeline.opened == 1


def test_a_submit_that_publishes_two_messages_waits_for_both_confirms() -> None:
    # A task publish also sends Celery's task-sent event when task_send_sent_event is on.
    pipeline, log = FakePipeline(), []
    pipeline.submit(lambda producer: (pipeline._count_one(), pipeline._count_one()),
                    lambda: log.append("a done"), lambda: log.append("a again"))  # fmt: skip
    submit(pipeline, "b", log)

    pipeline._on_ack(1)
    assert log == []
    pipeline._on_ack(3, multiple=True)
    assert log == ["a done", "b done"]


def test_stopping_with_confirms_to_come_publishes_them_again_then_waits_for_each() -> None:
    pipeline, log = FakePipeline(), []
    pipeline.FLUSH_TIMEOUT = 0.05
    submit(pipeline, "a", log)

    pipeline.close()
    submit(pipeline, "b", log)

    assert log == ["a again", "b again"]


def test_a_continuation_that_raises_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipeline, log = FakePipeline(), []
    pipeline.submit(lambda producer: pipeline._count_one(), lambda: 1 / 0, lambda: None)
    submit(pipeline, "b", log)

    pipeline._on_ack(2, multiple=True)

    assert log == ["b done"]
    assert "ZeroDivisionError" in caplog.text


def test_a_publish_cut_after_its_message_was_counted_falls_back_once() -> None:
    pipeline, log = FakePipeline(), []

    def cut(producer: Any) -> None:
        pipeline._count_one()  # the message took a delivery tag, then the connection went
        raise ConnectionResetError("connection reset by peer")

    pipeline.submit(cut, lambda: log.append("a done"), lambda: log.append("a again"))

    assert log == ["a again"]


def test_a_channel_reopened_without_confirms_replaces_the_connection() -> None:
    pipeline, log = FakePipeline(), []
    submit(pipeline, "a", log)

    def reopened(producer: Any) -> None:
        pipeline._count_one()
        pipeline._suspect = True  # what py-amqp's reopening of a closed channel sets

    pipeline.submit(reopened, lambda: log.append("b done"), lambda: log.append("b again"))

    assert sorted(log) == ["a again", "b again"]
    assert pipeline.opened == 1
    submit(pipeline, "c", log)
    assert pipeline.opened == 2


def test_a_lost_consumer_settles_what_comes_back_and_publishes_the_rest_again() -> None:
    # acks_late: the original returns to its queue and runs again; publishing its retry or
    # envelope a second time would double it. acks_late off: it was acknowledged already.
    pipeline, log = FakePipeline(), []
    submit(pipeline, "late", log)
    pipeline.submit(lambda producer: pipeline._count_one(), lambda: log.append("early done"),
                    lambda: log.append("early again"), comes_back=False)  # fmt: skip

    pipeline.close(consumer_lost=True)

    assert sorted(log) == ["early again", "late done"]
