"""The attempt history that travels with a task message.

Every retry republishes the task with one more :class:`Attempt` in the ``resilient_history``
message header, so a later attempt, the retry policy's ``max_elapsed`` and the dead-letter
envelope all see the whole story, whichever worker ran the earlier attempts.

The header is a JSON string (portable across AMQP tables, Redis and the filesystem transport)
and bounded in size:

* at most :data:`MAX_KEPT_ATTEMPTS` attempts are kept: the first one and the most recent ones;
  the number left out in between is counted in ``dropped``;
* exception messages are cut to :data:`MAX_MESSAGE_CHARS` characters, exception type names to
  :data:`MAX_TYPE_CHARS` and host names to :data:`MAX_HOSTNAME_CHARS`;
* the encoded header (ASCII JSON) is at most :data:`MAX_HEADER_BYTES` bytes: while it is larger,
  the oldest attempt after the first is dropped too (the first and the latest always stay).

So the header stays under 12 KiB however often a task is retried and whatever its exceptions
say, and ``first_attempt_at`` is kept even when early attempts are dropped.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "HEADER",
    "MAX_HEADER_BYTES",
    "MAX_HOSTNAME_CHARS",
    "MAX_KEPT_ATTEMPTS",
    "MAX_MESSAGE_CHARS",
    "MAX_TYPE_CHARS",
    "Attempt",
    "History",
    "exception_type_name",
    "run_started",
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
#: Worker host names are cut to this many characters.
MAX_HOSTNAME_CHARS = 255
#: The encoded header never exceeds this many bytes.
MAX_HEADER_BYTES = 12 * 1024
_SCHEMA = 1


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, marking the cut.

    Example::

        >>> truncate("abcdefghij", 8)
        'abcde...'
    """
    if len(text) <= limit:
        return text
    if limit < 3:
        return text[: max(0, limit)]
    return text[: limit - 3] + "..."


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
        hostname: str | None,
        delay: float | None,
        at: datetime,
    ) -> Attempt:
        """Describe attempt ``number`` that raised ``exc`` at ``at`` on ``hostname`` (``None``:
        this machine), bounded in size."""
        return cls(
            number=number,
            at=_iso(at),
            hostname=truncate(hostname or socket.gethostname(), MAX_HOSTNAME_CHARS),
            exception_type=truncate(exception_type_name(exc), MAX_TYPE_CHARS),
            message=truncate(_safe_str(exc), MAX_MESSAGE_CHARS),
            delay=None if delay is None else round(float(delay), 6),
        )

    @classmethod
    def in_worker(cls, request: Any, exc: BaseException, *, delay: float | None) -> Attempt:
        """The attempt a worker's ``Request`` (the worker's main process) ran, failed with
        ``exc``: its number from the message's ``retries``, its start from the request."""
        return cls.failed(
            int(request._context.retries or 0) + 1,
            exc,
            hostname=request.hostname,
            delay=delay,
            at=run_started(request),
        )

    def as_dict(self) -> dict[str, Any]:
        """The attempt as the dead-letter envelope and the header write it."""
        # Every field is a str, an int, a float or None: no copy needed (asdict deep-copies
        # each one: about a sixth of building a dead-letter envelope).
        return {name: getattr(self, name) for name in _ATTEMPT_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Attempt:
        """Read an attempt written by :meth:`as_dict`; ``ValueError`` if it is not one."""
        number, at, delay = data.get("number"), data.get("at"), data.get("delay")
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"attempt number {number!r}")
        if delay is not None and (
            isinstance(delay, bool) or not isinstance(delay, int | float) or not delay >= 0
        ):
            raise ValueError(f"attempt delay {delay!r}")
        return cls(
            number=number,
            at=_iso(_parse_time(at)),
            hostname=str(data.get("hostname", "")),
            exception_type=str(data.get("exception_type", "")),
            message=str(data.get("message", "")),
            delay=None if delay is None else float(delay),
        )


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
        """A new history with ``attempt`` appended, bounded as the module describes."""
        history = History(
            attempts=(*self.attempts, attempt),
            first_attempt_at=self.first_attempt_at or (self.attempts or (attempt,))[0].at,
            dropped=self.dropped,
        )
        while len(history.attempts) > 2 and (
            len(history.attempts) > MAX_KEPT_ATTEMPTS or len(history.encode()) > MAX_HEADER_BYTES
        ):
            history = history._without_second()
        return history

    def _without_second(self) -> History:
        first, _, *rest = self.attempts
        return History((first, *rest), self.first_attempt_at, self.dropped + 1)

    def first_attempt_time(self) -> datetime | None:
        """``first_attempt_at`` as an aware datetime, or ``None`` before the first failure."""
        if self.first_attempt_at is None:
            return None
        return _parse_time(self.first_attempt_at)

    def idle_seconds(self) -> float:
        """The sum of the delays scheduled between the recorded attempts."""
        return float(sum(a.delay or 0.0 for a in self.attempts))

    def encode(self) -> str:
        """The header value: compact JSON."""
        payload = {
            "v": _SCHEMA,
            "first_attempt_at": self.first_attempt_at,
            "dropped": self.dropped,
            "attempts": [a.as_dict() for a in self.attempts],
        }
        # ASCII: safe in any header encoding, even for text with lone surrogates.
        return json.dumps(payload, separators=(",", ":"))

    @classmethod
    def decode(cls, value: object) -> History:
        """Read a header value; anything unreadable gives an empty history, never an error.

        A damaged header must not make a task fail: the worst outcome is a shorter story.
        """
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        try:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, Mapping):
                return cls()
            attempts = tuple(Attempt.from_dict(a) for a in value.get("attempts") or ())
            first = value.get("first_attempt_at")
            dropped = value.get("dropped") or 0
            if isinstance(dropped, bool) or not isinstance(dropped, int) or dropped < 0:
                raise ValueError(f"dropped {dropped!r}")
            return cls(
                attempts=attempts,
                first_attempt_at=_iso(_parse_time(first))
                if first
                else (attempts[0].at if attempts else None),
                dropped=dropped,
            )
        except (TypeError, ValueError, AttributeError, OverflowError, RecursionError):
            return cls()

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any] | None) -> History:
        """The history carried by a request's or message's headers."""
        if not headers:
            return cls()
        return cls.decode(headers.get(HEADER))


def _parse_time(value: object) -> datetime:
    """An aware datetime from ISO-8601 text; a time without a zone is taken as UTC."""
    if not isinstance(value, str):
        raise ValueError(f"time {value!r}")
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not lose the attempt
        try:
            return repr(exc)
        except Exception:
            return f"<unprintable {type(exc).__name__}>"


#: The fields of :class:`Attempt`, in order, as :meth:`Attempt.as_dict` writes them.
_ATTEMPT_FIELDS = tuple(field.name for field in fields(Attempt))


def run_started(request: Any) -> datetime:
    """When a worker's ``Request`` started running (now, if it has not)."""
    started = request.time_start
    return datetime.fromtimestamp(started, timezone.utc) if started else datetime.now(timezone.utc)
