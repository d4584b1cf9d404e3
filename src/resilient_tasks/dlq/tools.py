""":class:`DeadLetters`: list, get, count, replay and purge the dead letters of an app's queues."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING

from resilient_tasks.envelope import redact_patterns

from .model import (
    DeadLetter,
    DeadLetterNotFound,
    NotADeadLetterQueue,
    PurgeReport,
    QueueNotFound,
    ReplayReport,
)
from .publishers import _publisher
from .readers import _Message, _Reader, _reader
from .recognition import _described, _letter
from .replay import Outcome, _Replay
from .selection import (
    _check_limit,
    _check_reason,
    _Filter,
    _filters_text,
    _identity,
    dead_letter_queues,
)
from .stats import DeadLetterStats, _Tally

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["DeadLetters"]


class DeadLetters:
    """The dead-letter queues of ``app``: list, get, replay and purge what is in them.

    ``queues`` names the dead-letter queues; ``None`` (the default) means every one the app's
    tasks and routes imply and every one its workers recorded writing to
    (:func:`dead_letter_queues`), and ``ValueError`` if there is none.

    The filters every operation takes: ``task`` is a task name, or a shell-style pattern of
    one (``"billing.*"``); ``id`` a task id; ``reason`` the envelope's reason, one of
    :data:`REASONS` (``permanent``, ``retries_exhausted``, ..., or the broker's: ``expired``,
    ``rejected``, ``maxlen``, ``delivery_limit``; any other raises :class:`UnknownReason`);
    ``limit`` the most dead letters to act on (``None``: all). ``None`` filters nothing.

    Every operation raises :class:`QueueNotFound` for a named queue the broker does not have
    (one the app's routes imply is empty until something fails there). :meth:`replay` and
    :meth:`purge` raise :class:`DeadLetterNotFound` for an ``id`` that matches nothing and
    :class:`NotADeadLetterQueue` for a queue that holds anything but dead letters, and then
    change nothing.

    Example::

        from resilient_tasks.dlq import DeadLetters

        letters = DeadLetters(app)                    # every dead-letter queue of the app
        for letter in letters.list(task="billing.sync_invoice", limit=20):
            print(letter.id, letter.reason, letter.exception_type, letter.attempts)

        letters.get("f7c9...")                        # one, or None
        letters.replay(reason="retries_exhausted", dry_run=True)
        report = letters.replay(reason="retries_exhausted")
        print(report.replayed, "replayed,", report.refused, "refused")
        letters.purge(task="reports.legacy_export")
    """

    def __init__(self, app: Celery, queues: Iterable[str] | str | None = None) -> None:
        self.app = app
        if isinstance(queues, str):
            queues = (queues,)
        implied = dead_letter_queues(app)
        self.queues: tuple[str, ...] = implied if queues is None else tuple(dict.fromkeys(queues))
        if not self.queues:
            raise ValueError(
                "no dead-letter queues: the app has no task with dead_letter=True "
                "(is the module that defines them imported?); name the queues explicitly"
            )
        #: The dead-letter queues the app's tasks and routes imply, and those its workers
        #: recorded that still exist: never "not found".
        self.implied: tuple[str, ...] = implied
        #: The redaction patterns :meth:`DeadLetter.redacted` should be given for this app.
        self.redact_patterns: tuple[str, ...] = redact_patterns(app)

    def exists(self, queue: str) -> bool:
        """Whether the broker has ``queue``, or the app's routes imply it as a dead-letter queue.

        * RabbitMQ (any AMQP transport): a passive ``queue.declare`` (on a channel of its own,
          since a failed one closes its channel). A declared queue exists until it is deleted,
          empty or not.
        * Redis: Kombu keeps a queue as a list, which Redis deletes once it is empty, and its
          bindings in the ``_kombu.binding.<exchange>`` sets. A queue exists if its list holds a
          message or it is bound to an exchange (a Celery task queue is bound to its exchange
          as soon as anything declares it).
        * filesystem: the same, with the message files and the exchange tables Kombu keeps in
          the control folder.

        A dead-letter queue is published to through the default exchange, which binds nothing:
        on Redis and the filesystem transport one that is empty leaves no trace. So every
        dead-letter queue the app's tasks and routes imply (:attr:`implied`) counts as existing,
        empty until something fails there; name another one only while it holds something.

        Example::

            DeadLetters(app, ["billing.dlq"]).exists("billing.dql")  # False: a typo
        """
        if queue in self.implied:
            return True
        with self._reading(queue) as reader:
            return reader.exists()

    def _check_queues(self) -> None:
        for queue in self.queues:
            if not self.exists(queue):
                raise QueueNotFound(queue, self.implied)

    def count(self) -> int:
        """How many messages the queues hold now (dead letters or not).

        Example::

            DeadLetters(app, ["billing.dlq"]).count()  # 3
        """
        self._check_queues()
        total = 0
        for queue in self.queues:
            with self._reading(queue) as reader:
                total += reader.count()
        return total

    def check(self) -> int:
        """Make sure every queue exists and holds nothing but dead letters; return how many
        dead letters they hold. Consumes nothing.

        Raises :class:`QueueNotFound` or :class:`NotADeadLetterQueue` (at the first message
        that is not a dead letter; the rest is not read).

        Example::

            DeadLetters(app, ["billing"]).check()  # NotADeadLetterQueue: a live task queue
        """
        self._check_queues()
        return self._survey(lambda letter: True)

    def _survey(self, match: Callable[[DeadLetter], bool]) -> int:
        """Read every queue through (nothing is taken); raise :class:`NotADeadLetterQueue` at
        the first message that is not a dead letter; return how many match."""
        matched = 0
        for queue in self.queues:
            with self._reading(queue, stream=True) as reader:
                for message, letter in self._messages(queue, reader):
                    if letter is None:
                        raise NotADeadLetterQueue(queue, _described(message))
                    matched += bool(match(letter))
        return matched

    def _filter_for_change(self, task: str | None, id: str | None, reason: str | None) -> _Filter:
        """The filter of a replay or a purge, once every queue is known to exist and to hold
        nothing but dead letters, and an ``id`` to match at least one: raise
        :class:`QueueNotFound`, :class:`NotADeadLetterQueue` or :class:`DeadLetterNotFound`
        before anything is changed."""
        match = _Filter(task, id, reason)
        self._check_queues()
        if not self._survey(match) and id is not None:
            raise DeadLetterNotFound(id, self.queues, _filters_text(task, reason))
        return match

    @contextmanager
    def _reading(self, queue: str, *, stream: bool = False) -> Iterator[_Reader]:
        with self.app.connection_for_read() as connection:
            reader = _reader(connection, queue, stream=stream)
            try:
                yield reader
            finally:
                reader.close()

    def _messages(
        self, queue: str, reader: _Reader
    ) -> Iterator[tuple[_Message, DeadLetter | None]]:
        """Every message of the queue, with its dead letter (``None``: it is not one)."""
        for message in reader.messages():
            yield message, _letter(queue, message, self.redact_patterns)

    def _walk(self) -> Generator[tuple[_Reader, _Message, DeadLetter | None], None, None]:
        for queue in self.queues:
            with self._reading(queue) as reader:
                for message, letter in self._messages(queue, reader):
                    yield reader, message, letter

    def list(
        self,
        *,
        task: str | None = None,
        id: str | None = None,
        reason: str | None = None,
        limit: int | None = None,
        others: Callable[[str, str], None] | None = None,
    ) -> builtins.list[DeadLetter]:
        """The dead letters that match, oldest first, queue by queue. Consumes nothing.

        A message that is not a dead letter is left where it is and not listed; ``others``, if
        given, is called with its queue and a description of it (a queue full of them is a
        live task queue, named by mistake). No match is an empty list, an unknown ``id``
        included (:meth:`replay` and :meth:`purge` raise for that).

        Example::

            for letter in DeadLetters(app).list(reason="permanent", limit=10):
                print(letter.id, letter.task_name, letter.exception_type)
        """
        _check_limit(limit)
        _check_reason(reason)
        self._check_queues()
        match = _Filter(task, id, reason)
        found: builtins.list[DeadLetter] = []
        with closing(self._walk()) as walk:
            for reader, message, letter in walk:
                if letter is None:
                    if others is not None:
                        others(reader.queue, _described(message))
                    continue
                if match(letter):
                    found.append(letter)
                    if limit is not None and len(found) >= limit:
                        break
        return found

    def stats(self, *, others: Callable[[str, str], None] | None = None) -> DeadLetterStats:
        """The dead letters counted, per queue and in total: by task, by reason and by exception
        type, with the oldest and the newest (:class:`DeadLetterStats`). Consumes nothing.

        Every queue is read through once, as :meth:`list` reads it (on RabbitMQ the messages
        stream in and are all handed back, in their places, when the queue is done). A message
        that is not a dead letter is counted in ``others`` only; ``others``, if given, is called
        with its queue and a description of it, as by :meth:`list`.

        Example::

            stats = DeadLetters(app).stats()
            print(stats.count, "dead letters; the oldest from", stats.oldest)
            for queue in stats.queues:
                print(queue.queue, queue.count, dict(queue.by_exception))
        """
        self._check_queues()
        counted = []
        for queue in self.queues:
            tally = _Tally()
            with self._reading(queue, stream=True) as reader:
                for message, letter in self._messages(queue, reader):
                    if letter is not None:
                        tally.add(letter)
                        continue
                    tally.others += 1
                    if others is not None:
                        others(queue, _described(message))
            counted.append(tally.queue_stats(queue))
        return DeadLetterStats.of(counted)

    def get(self, id: str) -> DeadLetter | None:
        """The dead letter of task ``id`` (the oldest, if there are several), or ``None``.

        Consumes nothing.

        Example::

            letter = DeadLetters(app).get("f7c9e2d0-...")
            if letter is not None:
                print(letter.redacted(DeadLetters(app).redact_patterns))
        """
        found = self.list(id=id, limit=1)
        return found[0] if found else None

    def replay(
        self,
        *,
        task: str | None = None,
        id: str | None = None,
        reason: str | None = None,
        limit: int | None = None,
        dry_run: bool = False,
        to_queue: str | None = None,
        allow_pickle: bool = False,
        progress: Callable[[DeadLetter, Outcome], None] | None = None,
    ) -> ReplayReport:
        """Republish the matching dead letters, then remove them from their queue.

        Each original message is published as it was (body, content type and encoding,
        headers, priority, persistence) to its original exchange and routing key, or with
        ``to_queue`` to that queue (through the default exchange), with these changes:

        * the attempt count starts again: Celery's ``retries`` header is 0 and the attempt
          history (``resilient_history``) is removed;
        * ``eta`` and ``expires`` are removed: they belong to the first run's timeline, and a
          replay runs now (a task that expired before it ran would otherwise be revoked again);
        * the broker's ``x-death``, ``x-first-death-*`` and ``x-last-death-*`` headers are
          removed;
        * ``resilient_replays`` counts the replays: the previous value plus one.

        The dead letter is removed only once the broker has confirmed the publish. A
        destination no queue is bound to is an error (:class:`ReplayError`): the message stays.
        On RabbitMQ up to 200 publishes go out before their confirms are awaited together, so
        ``progress`` hears of replayed dead letters a batch at a time.

        Before anything is published, every queue is read through: a queue that does not exist
        (:class:`QueueNotFound`), one that holds a message that is not a dead letter
        (:class:`NotADeadLetterQueue`) or an ``id`` that matches nothing
        (:class:`DeadLetterNotFound`) raises, and nothing is replayed. A message that is not a
        dead letter found while replaying (it arrived meanwhile) stops the replay there.

        ``dry_run``: publish nothing, remove nothing; the report counts what would be replayed.
        ``allow_pickle``: pickle-serialised messages are refused (left in place, counted in
        ``refused``) unless this is true, since unpickling runs code chosen by whoever could
        write to the queue. ``progress`` is called for every dead letter examined, with its
        :data:`Outcome`.

        Example::

            report = DeadLetters(app).replay(task="billing.*", reason="retries_exhausted")
            print(f"{report.replayed} replayed, {report.refused} refused")
        """
        _check_limit(limit)
        _check_reason(reason)
        if to_queue is not None and to_queue in self.queues:
            raise ValueError(f"to_queue {to_queue!r} is one of the dead-letter queues replayed")
        match = self._filter_for_change(task, id, reason)
        run = _Replay(
            match,
            limit=limit,
            dry_run=dry_run,
            to_queue=to_queue,
            allow_pickle=allow_pickle,
            progress=progress,
        )
        with _publisher(self.app, dry_run) as publisher:
            for queue in self.queues:
                if run.limited:
                    break
                with self._reading(queue, stream=True) as reader:
                    run.queue(reader, self._messages(queue, reader), publisher)
        return run.report()

    def purge(
        self,
        *,
        task: str | None = None,
        id: str | None = None,
        reason: str | None = None,
        limit: int | None = None,
        only: Iterable[DeadLetter] | None = None,
    ) -> PurgeReport:
        """Remove the matching dead letters for good; every other message stays.

        With no filter at all, every dead letter in the queues is removed. ``only`` removes
        exactly those dead letters (as :meth:`list` returned them, each once) that are still
        there, and nothing that arrived since: what to purge after asking someone about a list.

        Before anything is removed, every queue is read through: a queue that does not exist
        (:class:`QueueNotFound`), one that holds a message that is not a dead letter
        (:class:`NotADeadLetterQueue`: a live task queue named by mistake) or an ``id`` that
        matches nothing (:class:`DeadLetterNotFound`) raises, and nothing is removed. A message
        that is not a dead letter found while purging (it arrived meanwhile) stops the purge
        there; it is never removed.

        Example::

            report = DeadLetters(app).purge(task="reports.legacy_export")
            print(report.purged, "removed")

            shown = DeadLetters(app).list(reason="permanent")
            if input(f"remove {len(shown)}? ") == "y":
                DeadLetters(app).purge(only=shown)
        """
        _check_limit(limit)
        _check_reason(reason)
        wanted = None if only is None else [_identity(letter) for letter in only]
        match = self._filter_for_change(task, id, reason)
        examined = purged = 0
        with closing(self._walk()) as walk:
            for reader, message, letter in walk:
                if wanted is not None and not wanted:
                    break
                if letter is None:  # arrived since the survey: stop, touch nothing
                    report = PurgeReport(examined=examined, purged=purged)
                    raise NotADeadLetterQueue(reader.queue, _described(message), report)
                examined += 1
                if not match(letter):
                    continue
                if wanted is not None:
                    key = _identity(letter)
                    if key not in wanted:
                        continue
                    wanted.remove(key)
                reader.remove(message)
                purged += 1
                if limit is not None and purged >= limit:
                    break
        return PurgeReport(examined=examined, purged=purged)
