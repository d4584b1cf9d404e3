"""Dead-letter tools: list, show, count, replay and purge what failed for good.

:class:`DeadLetters` reads the dead-letter queues of an app: the envelopes
:class:`~resilient_tasks.DeadLetterMixin` publishes, and task messages the broker dead-lettered
itself (RabbitMQ's ``x-death``: expired, rejected, delivery limit), presented in the same shape.
The ``celery dlq`` command (:mod:`resilient_tasks.cli`) is a thin layer over it.

Nothing is lost, whatever happens mid-way:

* **Reading consumes nothing.** ``list``, ``get`` and ``stats`` take messages without
  acknowledging them and put every one back (on RabbitMQ with one ``basic.nack`` with requeue,
  then the channel is closed: the broker requeues them in their places); on Redis and on the
  filesystem transport the messages are read where they lie, so they never leave the queue at
  all.
* **Replay publishes first, removes second.** Each message is published to its original exchange
  and routing key with publisher confirms (on RabbitMQ, ``mandatory``: a message no queue would
  receive is an error, not a silent drop), and only once the broker has it is the dead letter
  removed. A crash in between leaves the message in both places, never in neither; a crash
  before it leaves it in the dead-letter queue (unacknowledged messages return when the
  connection dies). On RabbitMQ the messages stream in (``basic_consume``) and the publishes
  are pipelined: up to 200 go out before their confirms are awaited together, so a crash may
  leave that many in both places.
* **Only what matches is touched.** Filters (task name, task id, reason, a limit) select; every
  other message stays as it was. Each operation works on the messages the queue held when it
  started, so a replayed task that fails again is not replayed twice in one run.
* **A mistake is an error, never an empty answer.** A named queue that does not exist
  (:class:`QueueNotFound`), an ``id`` that replay or purge finds nowhere
  (:class:`DeadLetterNotFound`) and an unknown ``reason`` (:class:`UnknownReason`) raise, and
  nothing is changed. Replay and purge refuse a queue that holds anything but dead
  letters (:class:`NotADeadLetterQueue`: a live task queue named by mistake): they read every
  queue through first and change nothing if one does, and check each message again as they go.
"""

from __future__ import annotations

from .model import (
    BROKER_REASONS,
    PICKLE_CONTENT_TYPE,
    REASONS,
    DeadLetter,
    DeadLetterNotFound,
    DeadLetterToolError,
    NotADeadLetterQueue,
    PurgeReport,
    QueueNotFound,
    ReplayError,
    ReplayReport,
    UnknownReason,
)
from .replay import REPLAY_HEADER, Outcome
from .selection import dead_letter_queues
from .stats import STATS_SCHEMA, UNKNOWN, DeadLetterStats, QueueStats
from .tools import DeadLetters

__all__ = [
    "BROKER_REASONS",
    "PICKLE_CONTENT_TYPE",
    "REASONS",
    "REPLAY_HEADER",
    "STATS_SCHEMA",
    "UNKNOWN",
    "DeadLetter",
    "DeadLetterNotFound",
    "DeadLetterStats",
    "DeadLetterToolError",
    "DeadLetters",
    "NotADeadLetterQueue",
    "Outcome",
    "PurgeReport",
    "QueueNotFound",
    "QueueStats",
    "ReplayError",
    "ReplayReport",
    "UnknownReason",
    "dead_letter_queues",
]
