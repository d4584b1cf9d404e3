"""The attempt history that travels with a task message.

Every retry republishes the task with one more :class:`Attempt` in the ``resilient_history``
message header, so a later attempt, the retry policy's ``max_elapsed`` and the dead-letter
envelope all see the whole story, whichever worker ran the earlier attempts.

The header is a JSON string (portable across AMQP tables, Redis and the filesystem transport)
and bounded in size:

* at most :data:`MAX_KEPT_ATTEMPTS` attempts are kept: the first one and the most recent ones;
  the number left out in between is counted in ``dropped``;
* exception messages are cut to :data:`MAX_MESSAGE_CHARS` characters and exception type names to
  :data:`MAX_TYPE_CHARS`.

So the header stays under roughly 12 KiB however often a task is retried, and
``first_attempt_at`` is kept even when early attempts are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "HEADER",
    "MAX_KEPT_ATTEMPTS",
    "MAX_MESSAGE_CHARS",
    "MAX_TYPE_CHARS",
    "Attempt",
    "History",
    "exception_type_name",
    "truncate",
]

#: The message header that carries the encoded :class:`History`.
HEADER = "resilient_history"
#: How many attempts a history keeps: the first and the latest ``MAX_KEPT_ATTEMPTS - 1``.
MAX_KEPT_ATTEMPTS = 20
#: Exception messages are cut to this many characters.
MAX_MESSAGE_CHARS = 500
#: Exception type names are cut to this many characters.
MAX_TYPE_CHARS = 200
_SCHEMA = 1


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, marking the cut.

    Example::

        >>> truncate("abcdefghij", 8)
        'abcde...'
    """
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 3)] + "..."


def exception_type_name(exc: BaseException) -> str:
    """``module.QualName`` of an exception's type (builtins without a module prefix).

    Example::

        >>> exception_type_name(ConnectionResetError())
        'ConnectionResetError'
        >>> import json
        >>> exception_type_name(json.JSONDecodeError("x", "", 0))
        'json.decoder.JSONDecodeError'
    """
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


@dataclass(frozen=True)
class Attempt:
    """One finished attempt of a task: when and where it ran, how it failed, what came next.

    ``delay`` is the number of seconds the retry was scheduled after, or ``None`` for an attempt
    that was not followed by a retry (a terminal failure).

    Example::

        >>> from datetime import datetime, timezone
        >>> a = Attempt.failed(1, ConnectionError("reset"), hostname="w1", delay=0.5,
        ...                    at=datetime(2026, 1, 1, tzinfo=timezone.utc))
        >>> a.exception_type, a.message, a.delay
        ('ConnectionError', 'reset', 0.5)
    """

    number: int
    at: str
    hostname: str
    exception_type: str
    message: str
    delay: float | None = None

    @classmethod
    def failed(
        cls,
        number: int,
        exc: BaseException,
        *,
        hostname: str,
        delay: float | None,
        at: datetime,
    ) -> Attempt:
        """Describe attempt ``number`` that raised ``exc`` at ``at``, bounded in size."""
        return cls(
            number=number,
            at=_iso(at),
            hostname=hostname,
            exception_type=truncate(exception_type_name(exc), MAX_TYPE_CHARS),
            message=truncate(_safe_str(exc), MAX_MESSAGE_CHARS),
            delay=None if delay is None else round(float(delay), 6),
        )

    def as_dict(self) -> dict[str, Any]:
        """The attempt as the dead-letter envelope and the header write it."""
        return asdict(self)


@dataclass(frozen=True)
class History:
    """All recorded attempts of one task message, oldest first. An immutable value.

    :meth:`record` returns a new history; :meth:`encode` / :meth:`decode` turn it into the
    message header and back. A message without the header (a first attempt, or a message sent
    by a plain Celery client) decodes to an empty history.

    Example::

        >>> from datetime import datetime, timezone
        >>> t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
        >>> h = History().record(Attempt.failed(1, TimeoutError("slow"), hostname="w1",
        ...                                     delay=2.0, at=t0))
        >>> History.decode(h.encode()) == h
        True
        >>> h.first_attempt_at
        '2026-01-01T00:00:00+00:00'
    """

    attempts: tuple[Attempt, ...] = ()
    first_attempt_at: str | None = None
    dropped: int = 0

    def record(self, attempt: Attempt) -> History:
        """A new history with ``attempt`` appended, keeping the first and the latest."""
        attempts = (*self.attempts, attempt)
        dropped = self.dropped
        if len(attempts) > MAX_KEPT_ATTEMPTS:
            cut = len(attempts) - MAX_KEPT_ATTEMPTS
            attempts = (attempts[0], *attempts[1 + cut :])
            dropped += cut
        return History(
            attempts=attempts,
            first_attempt_at=self.first_attempt_at or attempts[0].at,
            dropped=dropped,
        )

    def first_attempt_time(self) -> datetime | None:
        """``first_attempt_at`` as an aware datetime, or ``None`` before the first failure."""
        if self.first_attempt_at is None:
            return None
        return datetime.fromisoformat(self.first_attempt_at)

    def idle_seconds(self) -> float:
        """The sum of the delays scheduled between the recorded attempts."""
        return sum(a.delay or 0.0 for a in self.attempts)

    def encode(self) -> str:
        """The header value: compact JSON."""
        payload = {
            "v": _SCHEMA,
            "first_attempt_at": self.first_attempt_at,
            "dropped": self.dropped,
            "attempts": [a.as_dict() for a in self.attempts],
        }
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def decode(cls, value: object) -> History:
        """Read a header value; anything unreadable gives an empty history, never an error.

        A damaged header must not make a task fail: the worst outcome is a shorter story.
        """
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return cls()
        if not isinstance(value, Mapping):
            return cls()
        try:
            attempts = tuple(Attempt(**a) for a in value.get("attempts") or ())
            first = value.get("first_attempt_at")
            return cls(
                attempts=attempts,
                first_attempt_at=str(first) if first else (attempts[0].at if attempts else None),
                dropped=int(value.get("dropped") or 0),
            )
        except (TypeError, ValueError):
            return cls()

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any] | None) -> History:
        """The history carried by a request's or message's headers."""
        if not headers:
            return cls()
        return cls.decode(headers.get(HEADER))


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not lose the attempt
        try:
            return repr(exc)
        except Exception:
            return f"<unprintable {type(exc).__name__}>"
