"""Replay: what a dead letter is republished as, and one run of :meth:`DeadLetters.replay`.

:func:`_outgoing` makes the message to publish from a dead letter's original (the attempt count
starts again, the first run's timeline and the broker's bookkeeping are dropped). A
:class:`_Replay` goes through the dead letters of each queue: it counts them, tells ``progress``
what became of each, hands the matching ones to a publisher (``publishers.py``) and removes
each from its queue once the broker has its replay.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Literal

from resilient_tasks.envelope import REPLAYED_PROPERTIES, original_body, str_or_none
from resilient_tasks.history import HEADER as HISTORY_HEADER
from resilient_tasks.timelimit import REDELIVERIES

from .model import (
    DeadLetter,
    NotADeadLetterQueue,
    ReplayError,
    ReplayReport,
)
from .publishers import _NotReplayed, _Outgoing, _Publisher
from .recognition import _described

if TYPE_CHECKING:
    from .readers import _Message, _Reader

__all__ = ["REPLAY_HEADER", "Outcome"]

#: The header a replayed message carries: how often it has been replayed.
REPLAY_HEADER = "resilient_replays"
#: What the progress callback of :meth:`DeadLetters.replay` is told about each dead letter:
#: ``replayed`` (published and removed), ``would_replay`` (a dry run), ``refused`` (left in
#: place: pickle without ``allow_pickle``, nowhere to send it, or an undecodable body) or
#: ``skipped`` (did not match).
Outcome = Literal["replayed", "would_replay", "refused", "skipped"]

# Headers that belong to the first run's timeline or to the broker's bookkeeping, dropped on replay
# (the lost-worker count too: a worker_lost dead letter has spent its max_redeliveries).
_DROPPED_HEADERS = frozenset(
    {HISTORY_HEADER, REDELIVERIES, "eta", "expires", "x-delivery-count", "redelivered"}
)
_DROPPED_HEADER_PREFIXES = ("x-death", "x-first-death", "x-last-death")
_PERSISTENT = 2


def _outgoing(letter: DeadLetter, to_queue: str | None) -> _Outgoing | None:
    """The message replay publishes for ``letter``; ``None`` when it has nowhere to go or its
    body cannot be decoded."""
    destination = ("", to_queue) if to_queue else letter.destination
    original = letter._original
    try:
        body = original_body(original)
    except (binascii.Error, ValueError):
        return None
    if destination is None:
        return None
    headers = {
        key: value
        for key, value in dict(original.get("headers") or {}).items()
        if key not in _DROPPED_HEADERS and not key.startswith(_DROPPED_HEADER_PREFIXES)
    }
    if "task" in headers or "retries" in headers:  # Celery's protocol 2: the attempt count
        headers["retries"] = 0
    previous = headers.get(REPLAY_HEADER)
    headers[REPLAY_HEADER] = (previous if isinstance(previous, int) else 0) + 1
    properties = original.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    priority = properties.get("priority", letter._task.get("priority"))
    delivery_mode = properties.get("delivery_mode")
    return _Outgoing(
        body=body,
        exchange=destination[0],
        routing_key=destination[1],
        headers=headers,
        content_type=str_or_none(original.get("content_type")) or "application/data",
        content_encoding=str_or_none(original.get("content_encoding")) or "binary",
        priority=priority if isinstance(priority, int) else None,
        delivery_mode=delivery_mode if delivery_mode in (1, 2) else _PERSISTENT,
        properties={
            key: properties[key] for key in REPLAYED_PROPERTIES if properties.get(key) is not None
        },
    )


class _Replay:
    """One run of :meth:`DeadLetters.replay`, queue by queue (:meth:`queue`): its counts (the
    :class:`ReplayReport`), what it tells ``progress``, and what becomes of each dead letter.

    ``publisher`` ``None`` is a dry run: what would be replayed is counted, nothing is
    published or removed.
    """

    def __init__(
        self,
        match: Callable[[DeadLetter], bool],
        *,
        limit: int | None,
        dry_run: bool,
        to_queue: str | None,
        allow_pickle: bool,
        progress: Callable[[DeadLetter, Outcome], None] | None,
    ) -> None:
        self.match = match
        self.limit = limit
        self.dry_run = dry_run
        self.to_queue = to_queue
        self.allow_pickle = allow_pickle
        self.progress = progress
        self.examined = self.matched = self.replayed = self.refused = 0

    def report(self) -> ReplayReport:
        """What the run has done so far."""
        return ReplayReport(
            examined=self.examined,
            matched=self.matched,
            replayed=self.replayed,
            refused=self.refused,
            dry_run=self.dry_run,
        )

    @property
    def limited(self) -> bool:
        """Whether ``limit`` dead letters have matched: the run is over."""
        return self.limit is not None and self.matched >= self.limit

    def queue(
        self,
        reader: _Reader,
        messages: Iterable[tuple[_Message, DeadLetter | None]],
        publisher: _Publisher | None,
    ) -> None:
        """Replay the dead letters among ``messages``, which ``reader`` reads. Return once every
        publish is settled, while ``reader`` can still remove the dead letters replayed.

        Raises :class:`NotADeadLetterQueue` at a message that is not a dead letter (it arrived
        after the survey: it and what follows stay), and :class:`ReplayError` for a publish
        that failed; either carries the report so far.
        """
        try:
            for message, letter in messages:
                if letter is None:
                    self._settle(publisher)  # what is in flight are dead letters
                    raise NotADeadLetterQueue(reader.queue, _described(message), self.report())
                self._letter(reader, message, letter, publisher)
                if self.limited:
                    break
            self._settle(publisher)
        except _NotReplayed as failure:
            letter = failure.letter
            raise ReplayError(
                f"could not replay {letter.task_name}[{letter.id}] from {letter.queue}: {failure}",
                self.report(),
                letter,
            ) from failure.cause

    def _letter(
        self,
        reader: _Reader,
        message: _Message,
        letter: DeadLetter,
        publisher: _Publisher | None,
    ) -> None:
        self.examined += 1
        if not self.match(letter):
            self._tell(letter, "skipped")
            return
        self.matched += 1
        outgoing = _outgoing(letter, self.to_queue)
        if outgoing is None or (letter.pickled and not self.allow_pickle):
            self.refused += 1
            self._tell(letter, "refused")
        elif publisher is None:
            self.replayed += 1
            self._tell(letter, "would_replay")
        else:
            publisher.publish(letter, outgoing, partial(self._replayed, reader, message, letter))

    def _replayed(self, reader: _Reader, message: _Message, letter: DeadLetter) -> None:
        """The broker has the replay of ``letter``: the dead letter goes."""
        reader.remove(message)
        self.replayed += 1
        self._tell(letter, "replayed")

    def _tell(self, letter: DeadLetter, outcome: Outcome) -> None:
        if self.progress is not None:
            self.progress(letter, outcome)

    @staticmethod
    def _settle(publisher: _Publisher | None) -> None:
        if publisher is not None:
            publisher.flush()
