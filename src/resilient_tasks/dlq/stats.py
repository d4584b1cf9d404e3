"""What the dead-letter queues hold, counted: :meth:`DeadLetters.stats` and ``celery dlq stats``.

:class:`QueueStats` counts the dead letters of one queue by task, by reason and by exception
type, with the oldest and the newest; :class:`DeadLetterStats` is the same over every queue,
with each queue's. ``_Tally`` adds dead letters up one at a time. Nothing here talks to a broker.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from .model import DeadLetter

__all__ = ["STATS_SCHEMA", "UNKNOWN", "DeadLetterStats", "QueueStats"]

#: The ``schema`` of :meth:`DeadLetterStats.as_dict` (``celery dlq stats --json``).
STATS_SCHEMA = "resilient_tasks.dlq_stats/1"
#: The key a dead letter without a task name or an exception type is counted under (a message
#: the broker dead-lettered has no exception type).
UNKNOWN = "-"


def _ranked(counts: Mapping[str, int]) -> Mapping[str, int]:
    """``counts`` as a read-only mapping, the highest count first (ties by name)."""
    return MappingProxyType(dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))))


def _nothing() -> Mapping[str, int]:
    return MappingProxyType({})


@dataclass(frozen=True, kw_only=True)
class _Counts:
    count: int = 0
    by_task: Mapping[str, int] = field(default_factory=_nothing)
    by_reason: Mapping[str, int] = field(default_factory=_nothing)
    by_exception: Mapping[str, int] = field(default_factory=_nothing)
    oldest: str | None = None
    newest: str | None = None
    others: int = 0

    def __post_init__(self) -> None:  # a plain dict given becomes read-only and ranked too
        for name in ("by_task", "by_reason", "by_exception"):
            object.__setattr__(self, name, _ranked(getattr(self, name)))

    def _fields(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "others": self.others,
            "oldest": self.oldest,
            "newest": self.newest,
            "by_task": dict(self.by_task),
            "by_reason": dict(self.by_reason),
            "by_exception": dict(self.by_exception),
        }


@dataclass(frozen=True, kw_only=True)
class QueueStats(_Counts):
    """The dead letters of one queue, counted.

    ``count`` dead letters; ``by_task``, ``by_reason`` and ``by_exception`` count them by task
    name, by reason (the envelope's, or the broker's: ``rejected``, ``expired``, ...) and by
    the final exception's type (``module.QualName``), each a read-only mapping with the highest
    count first; a dead letter without a task name or an exception type (one the broker
    dead-lettered) is counted under :data:`UNKNOWN` (``"-"``). ``oldest`` and ``newest`` are
    the earliest and the latest ``dead_lettered_at`` (ISO-8601, as the envelope has it;
    ``None`` for an empty queue). ``others`` counts the messages in the queue that are not dead
    letters (counted nowhere else: a live task queue named by mistake).

    Example::

        >>> from resilient_tasks.dlq import DeadLetter
        >>> letters = [DeadLetter("billing.dlq", {"reason": reason, "task": {"name": name},
        ...     "exception": {"type": "KeyError"}, "dead_lettered_at": at})
        ...     for reason, name, at in [
        ...         ("permanent", "billing.sync", "2026-11-21T05:40:02.118+00:00"),
        ...         ("retries_exhausted", "billing.sync", "2026-11-21T05:37:54.210+00:00"),
        ...         ("permanent", "billing.render", "2026-11-21T05:41:17+00:00")]]
        >>> queue = QueueStats.of("billing.dlq", letters)
        >>> queue.count, dict(queue.by_task), dict(queue.by_reason)
        (3, {'billing.sync': 2, 'billing.render': 1}, {'permanent': 2, 'retries_exhausted': 1})
        >>> queue.oldest, queue.newest
        ('2026-11-21T05:37:54.210+00:00', '2026-11-21T05:41:17+00:00')
    """

    queue: str

    @classmethod
    def of(cls, queue: str, letters: Iterable[DeadLetter]) -> QueueStats:
        """The counts of ``letters``, dead letters of ``queue``."""
        tally = _Tally()
        for letter in letters:
            tally.add(letter)
        return tally.queue_stats(queue)

    def as_dict(self) -> dict[str, Any]:
        """The counts as plain JSON-ready values: ``queue``, ``count``, ``others``,
        ``oldest``, ``newest``, ``by_task``, ``by_reason``, ``by_exception``.

        Example::

            >>> QueueStats(queue="billing.dlq").as_dict()["count"]
            0
        """
        return {"queue": self.queue, **self._fields()}


@dataclass(frozen=True, kw_only=True)
class DeadLetterStats(_Counts):
    """The dead letters of several queues, counted: in total (the fields of
    :class:`QueueStats`: ``count``, ``by_task``, ``by_reason``, ``by_exception``, ``oldest``,
    ``newest``, ``others``) and per queue (``queues``, in the order they were read).

    What :meth:`DeadLetters.stats` returns. ``count == 0`` is an all-clear only when ``others``
    is 0 too.

    Example::

        >>> billing = QueueStats(queue="billing.dlq", count=2, by_task={"billing.sync": 2},
        ...     oldest="2026-11-21T05:37:54+00:00", newest="2026-11-21T05:40:02+00:00")
        >>> reports = QueueStats(queue="reports.dlq", count=1, by_task={"reports.daily": 1},
        ...     oldest="2026-11-20T23:00:00+00:00", newest="2026-11-20T23:00:00+00:00")
        >>> total = DeadLetterStats.of([billing, reports])
        >>> total.count, dict(total.by_task)
        (3, {'billing.sync': 2, 'reports.daily': 1})
        >>> total.oldest, total.newest
        ('2026-11-20T23:00:00+00:00', '2026-11-21T05:40:02+00:00')
        >>> total.as_dict()["schema"], [q["queue"] for q in total.as_dict()["queues"]]
        ('resilient_tasks.dlq_stats/1', ['billing.dlq', 'reports.dlq'])
    """

    queues: tuple[QueueStats, ...] = ()

    @classmethod
    def of(cls, queues: Iterable[QueueStats]) -> DeadLetterStats:
        """The total of ``queues``, with each of them."""
        queues = tuple(queues)
        tally = _Tally()
        for queue in queues:
            tally.merge(queue)
        return cls(queues=queues, **tally.fields())

    def as_dict(self) -> dict[str, Any]:
        """A stable, JSON-ready shape (what ``celery dlq stats --json`` prints)::

            {"schema": "resilient_tasks.dlq_stats/1",
             "count": 3, "others": 0, "oldest": "...", "newest": "...",
             "by_task": {"billing.sync": 2, ...}, "by_reason": {...}, "by_exception": {...},
             "queues": [{"queue": "billing.dlq", "count": 3, ...the same keys...}, ...]}

        Example::

            >>> sorted(DeadLetterStats().as_dict())  # doctest: +NORMALIZE_WHITESPACE
            ['by_exception', 'by_reason', 'by_task', 'count', 'newest', 'oldest', 'others',
             'queues', 'schema']
        """
        return {
            "schema": STATS_SCHEMA,
            **self._fields(),
            "queues": [queue.as_dict() for queue in self.queues],
        }


class _Tally:
    """Counts dead letters one at a time (:meth:`add`, or :meth:`add_fields` with what a dead
    letter's properties would say), or whole queues' counts (:meth:`merge`)."""

    def __init__(self) -> None:
        self.count = 0
        self.others = 0
        self.tasks: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.exceptions: Counter[str] = Counter()
        self.oldest: tuple[datetime, str] | None = None
        self.newest: tuple[datetime, str] | None = None

    def add(self, letter: DeadLetter) -> None:
        self.add_fields(
            letter.task_name, letter.reason, letter.exception_type, letter.dead_lettered_at
        )

    def add_fields(
        self, task: str | None, reason: str, exception: str | None, at: str | None
    ) -> None:
        self.count += 1
        self.tasks[task or UNKNOWN] += 1
        self.reasons[reason] += 1
        self.exceptions[exception or UNKNOWN] += 1
        self._seen(at)

    def _seen(self, at: str | None) -> None:
        moment = _moment(at)
        if moment is None or at is None:
            return
        if self.oldest is None or moment < self.oldest[0]:
            self.oldest = (moment, at)
        if self.newest is None or moment > self.newest[0]:
            self.newest = (moment, at)

    def merge(self, counts: _Counts) -> None:
        self.count += counts.count
        self.others += counts.others
        self.tasks.update(counts.by_task)
        self.reasons.update(counts.by_reason)
        self.exceptions.update(counts.by_exception)
        self._seen(counts.oldest)
        self._seen(counts.newest)

    def fields(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "others": self.others,
            "by_task": _ranked(self.tasks),
            "by_reason": _ranked(self.reasons),
            "by_exception": _ranked(self.exceptions),
            "oldest": None if self.oldest is None else self.oldest[1],
            "newest": None if self.newest is None else self.newest[1],
        }

    def queue_stats(self, queue: str) -> QueueStats:
        return QueueStats(queue=queue, **self.fields())


def _moment(text: str | None) -> datetime | None:
    """An ISO-8601 time as an aware datetime (UTC when it names no zone); ``None`` if it is
    not one."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
