"""Which failures are transient: worth retrying, because the same call may well succeed later.

:data:`TRANSIENT_ERRORS` is a ready classifier for ``RetryPolicy(retry_on=...)``: lost, refused
and timed-out network connections, temporary DNS failures, HTTP 429/502/503/504, and broken
database and broker connections. Authentication, permission and configuration failures are not
transient, even when a library wraps them in a connection error.
:func:`retry_after_seconds` reads the wait a server asked for in an HTTP ``Retry-After`` header.

Optional libraries (requests, urllib3, httpx, redis, psycopg, psycopg2, SQLAlchemy, kombu, amqp)
are recognised only once the user's own code has imported them: their classes are looked up in
:data:`sys.modules`, never imported here. An exception of a library that is not imported cannot
exist, so nothing is missed. See ``docs/transient-errors.md`` for the full table.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Final, TypeAlias, TypeGuard

from ._chain import Matcher, exception_chain, matches

__all__ = ["MAX_RETRY_AFTER", "TRANSIENT_ERRORS", "TransientErrors", "retry_after_seconds"]

#: One link's verdict: ``True`` transient, ``False`` known permanent, ``None`` no opinion.
_Verdict: TypeAlias = "bool | None"

#: The longest wait, in seconds, :func:`retry_after_seconds` returns: 15 minutes. A retry with a
#: countdown is held unacknowledged by a worker until it is due; RabbitMQ closes the channel of a
#: delivery left unacknowledged past its ``consumer_timeout`` (30 minutes by default) and Redis
#: redelivers it after its ``visibility_timeout`` (1 hour by default). Half the smaller of the two
#: leaves room for the prefetch queue and the task's own run time. A server that asks for longer
#: is asked again after 15 minutes, and answers with a new ``Retry-After``.
MAX_RETRY_AFTER: Final = 900.0

#: ``OSError.errno`` values of a connection that was lost, refused, timed out or could not be
#: routed. Most arrive as ``ConnectionError`` / ``TimeoutError`` subclasses already; the host and
#: network ones arrive as a plain ``OSError``.
_TRANSIENT_ERRNOS: Final = frozenset(
    code
    for code in (
        getattr(errno, name, None)
        for name in (
            "ECONNRESET",
            "ECONNREFUSED",
            "ECONNABORTED",
            "ETIMEDOUT",
            "EPIPE",
            "EHOSTUNREACH",
            "EHOSTDOWN",
            "ENETUNREACH",
            "ENETDOWN",
            "ENETRESET",
        )
    )
    if code is not None
)

#: ``socket.gaierror`` codes: a resolver that could not answer now is transient; an answer that
#: the name does not exist (NXDOMAIN) or has no address is permanent: asking again gets it again.
_DNS_VERDICTS: Final[dict[int, bool]] = {
    code: verdict
    for name, verdict in (("EAI_AGAIN", True), ("EAI_NONAME", False), ("EAI_NODATA", False))
    if (code := getattr(socket, name, None)) is not None
}

_HTTP_TRANSIENT: Final = frozenset({429, 502, 503, 504})
_HTTP_PERMANENT: Final = frozenset({401, 403})
_HTTP_RETRY_AFTER: Final = frozenset({429, 503})

#: PostgreSQL SQLSTATEs of a connection the server closed, refused for now, or has no slot for.
_PG_TRANSIENT_SQLSTATES: Final = frozenset(
    {
        "57P01",  # admin_shutdown: "terminating connection due to administrator command"
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now: starting up, shutting down, in recovery
        "57P05",  # idle_session_timeout
        "53300",  # too_many_connections
    }
)
#: Lower-case fragments of libpq's (English) messages, for errors without a SQLSTATE: a failure
#: to connect is decided on the client, before the server could send one. Checked first.
_PG_PERMANENT_MESSAGES: Final = (
    "authentication failed",  # password, ident, peer, SCRAM
    "no pg_hba.conf entry",
    "no password supplied",
    "does not exist",  # role "x" does not exist, database "x" does not exist
    "is not permitted to log in",
    "permission denied",
    "name or service not known",  # NXDOMAIN
    "ssl was required",
    "ssl is not enabled",
    "certificate",
)
_PG_TRANSIENT_MESSAGES: Final = (
    "connection refused",
    "is the server running",
    "could not connect to server",
    "server closed the connection unexpectedly",
    "terminating connection",
    "timeout expired",
    "connection timed out",
    "could not receive data from server",
    "could not send data to server",
    "connection reset by peer",
    "no route to host",
    "network is unreachable",
    "the database system is",  # starting up, shutting down, in recovery mode, not accepting ...
    "too many clients",
    "remaining connection slots are reserved",
    "ssl syscall error",
    "ssl connection has been closed unexpectedly",
    "consuming input failed",
    "the connection is closed",
    "temporary failure in name resolution",
)

_DELAY_SECONDS = re.compile(r"[0-9]+")


def _library_class(module: str, name: str) -> type[BaseException] | None:
    """The exception class ``module.name`` if ``module`` is already imported, else ``None``."""
    imported = sys.modules.get(module)
    found = getattr(imported, name, None) if imported is not None else None
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def _is(exc: BaseException, module: str, *names: str) -> bool:
    """Whether ``exc`` is an instance of one of ``module``'s classes ``names`` (if imported)."""
    for name in names:
        cls = _library_class(module, name)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def _links(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps: its chain, SQLAlchemy's ``.orig`` and an exception
    passed as the first argument (as httpcore wraps socket errors)."""
    return exception_chain(exc, wrapped=_wrapped)


def _wrapped(exc: BaseException) -> tuple[object, ...]:
    """What ``exc`` wraps besides cause and context: SQLAlchemy's ``.orig``, a first argument."""
    try:
        orig = getattr(exc, "orig", None) if _is(exc, "sqlalchemy.exc", "StatementError") else None
        return (orig, exc.args[0] if exc.args else None)
    except Exception:  # an exception object with odd attributes
        return ()


def _stdlib_verdict(exc: BaseException) -> _Verdict:
    if isinstance(exc, PermissionError | ssl.SSLCertVerificationError):
        return False
    if isinstance(exc, socket.gaierror):
        return _DNS_VERDICTS.get(exc.errno) if isinstance(exc.errno, int) else None
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return None


def _http_response(exc: BaseException) -> tuple[int, Any] | None:
    """``(status, headers)`` of an HTTP error response (requests, httpx, urllib), else ``None``."""
    if _is(exc, "urllib.error", "HTTPError"):
        status, headers = getattr(exc, "code", None), getattr(exc, "headers", None)
    elif _is(exc, "requests.exceptions", "HTTPError") or _is(exc, "httpx", "HTTPStatusError"):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        headers = getattr(response, "headers", None)
    else:
        return None
    if not isinstance(status, int) or isinstance(status, bool):
        return None
    return status, headers


def _http_verdict(exc: BaseException) -> _Verdict:
    response = _http_response(exc)
    if response is not None:
        status = response[0]
        if status in _HTTP_PERMANENT:
            return False
        return True if status in _HTTP_TRANSIENT else None
    if _is(exc, "requests.exceptions", "ConnectionError", "Timeout", "ChunkedEncodingError"):
        return True
    if _is(exc, "urllib3.exceptions", "TimeoutError", "ProtocolError"):
        return True  # TimeoutError covers NewConnectionError; ProtocolError a dropped connection
    if _is(exc, "httpx", "TimeoutException", "NetworkError", "RemoteProtocolError"):
        return True
    return None


def _redis_verdict(exc: BaseException) -> _Verdict:
    # AuthenticationError and friends subclass redis' ConnectionError: test them first.
    if _is(
        exc,
        "redis.exceptions",
        "AuthenticationError",
        "AuthorizationError",
        "ExternalAuthProviderError",
    ):
        return False
    if _is(exc, "redis.exceptions", "ConnectionError", "TimeoutError"):
        return True
    return None


def _postgres_verdict(exc: BaseException) -> _Verdict:
    if not (_is(exc, "psycopg", "OperationalError") or _is(exc, "psycopg2", "OperationalError")):
        return None
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)  # psycopg, psycopg2
    if isinstance(sqlstate, str) and sqlstate:
        if sqlstate.startswith("28") or sqlstate == "3D000":  # authorization; unknown database
            return False
        if (sqlstate.startswith("08") and sqlstate != "08P01") or (
            sqlstate in _PG_TRANSIENT_SQLSTATES
        ):
            return True  # class 08: connection exception (08P01 is a protocol violation)
        return None
    message = str(exc).lower()
    if any(fragment in message for fragment in _PG_PERMANENT_MESSAGES):
        return False
    if any(fragment in message for fragment in _PG_TRANSIENT_MESSAGES):
        return True
    return None


def _sqlalchemy_verdict(exc: BaseException) -> _Verdict:
    if _is(exc, "sqlalchemy.exc", "DisconnectionError", "TimeoutError"):
        return True  # TimeoutError: no pooled connection became free in time
    if _is(exc, "sqlalchemy.exc", "DBAPIError") and getattr(exc, "connection_invalidated", False):
        return True  # the dialect recognised a disconnect
    return None  # anything else is judged by the driver's error it wraps (.orig)


def _broker_verdict(exc: BaseException) -> _Verdict:
    if _is(exc, "amqp.exceptions", "AccessRefused", "NotAllowed"):
        return False  # wrong credentials; unknown or forbidden virtual host
    if _is(exc, "amqp.exceptions", "RecoverableConnectionError"):
        return True  # includes ConnectionForced (broker shutting down) and ResourceError
    if _is(exc, "kombu.exceptions", "OperationalError"):
        return True  # kombu's wrapper for a broker connection that failed
    return None


_RULES: Final[tuple[Callable[[BaseException], _Verdict], ...]] = (
    _stdlib_verdict,
    _http_verdict,
    _redis_verdict,
    _postgres_verdict,
    _sqlalchemy_verdict,
    _broker_verdict,
)


def _verdict(exc: BaseException) -> _Verdict:
    for rule in _RULES:
        try:
            verdict = rule(exc)
        except Exception:  # an exception object with odd attributes: no opinion
            continue
        if verdict is not None:
            return verdict
    return None


def _is_transient(exc: BaseException) -> bool:
    transient = False
    for link in _links(exc):
        verdict = _verdict(link)
        if verdict is False:
            return False
        transient = transient or verdict is True
    return transient


def _describe(matcher: Matcher) -> str:
    name = getattr(matcher, "__qualname__", None)
    return name if isinstance(name, str) else repr(matcher)


class TransientErrors:
    """A predicate ``(exc) -> bool``: is this failure transient? Use :data:`TRANSIENT_ERRORS`.

    ``exc`` is transient when it, or an exception it wraps (``__cause__``, ``__context__``,
    SQLAlchemy's ``.orig``, a first argument), is a known transient failure and none of them is a
    known permanent one: a permanent cause wins over a transient-looking wrapper, so kombu's
    ``OperationalError`` around a Redis ``AuthenticationError``, or requests' ``ConnectionError``
    around an NXDOMAIN, is not transient. Never raises for the built-in rules.

    ``classifier | other`` (or ``TransientErrors(*others)``) also matches what ``other`` matches:
    exception types and/or predicates, looked for along the same chain, without the permanent
    veto (as ``retry_on=(TRANSIENT_ERRORS, other)`` would). A predicate that raises propagates.

    Example::

        >>> from resilient_tasks.classify import TRANSIENT_ERRORS
        >>> TRANSIENT_ERRORS(ConnectionResetError()), TRANSIENT_ERRORS(PermissionError())
        (True, False)
        >>> class QuotaExceeded(Exception): ...
        >>> classifier = TRANSIENT_ERRORS | QuotaExceeded
        >>> classifier
        TRANSIENT_ERRORS | QuotaExceeded
        >>> classifier(QuotaExceeded()), classifier(KeyError())
        (True, False)

    In a task::

        retry_policy=RetryPolicy(retry_on=TRANSIENT_ERRORS | QuotaExceeded, max_attempts=5)
    """

    __slots__ = ("_also",)

    _also: tuple[Matcher, ...]

    def __init__(self, *also: Matcher) -> None:
        for matcher in also:
            if not _is_matcher(matcher):
                raise TypeError(
                    f"TransientErrors: {matcher!r} is neither an exception type nor a predicate "
                    "(a callable taking the exception and returning bool)"
                )
        self._also = also

    def __call__(self, exc: BaseException) -> bool:
        if _is_transient(exc):
            return True
        if not self._also:
            return False
        return any(matches(matcher, link) for link in _links(exc) for matcher in self._also)

    def __or__(self, other: object) -> TransientErrors:
        if isinstance(other, TransientErrors):
            return TransientErrors(*self._also, *other._also)
        if _is_matcher(other):
            return TransientErrors(*self._also, other)
        return NotImplemented

    def __ror__(self, other: object) -> TransientErrors:
        return self.__or__(other)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TransientErrors):
            return NotImplemented
        return self._also == other._also

    def __hash__(self) -> int:
        return hash((TransientErrors, self._also))

    def __repr__(self) -> str:
        return " | ".join(["TRANSIENT_ERRORS", *(_describe(matcher) for matcher in self._also)])


def _is_matcher(value: object) -> TypeGuard[Matcher]:
    if isinstance(value, type):
        return issubclass(value, BaseException)
    return callable(value)


#: The ready classifier: network, timeout, temporary DNS, HTTP 429/502/503/504, and broken
#: database and broker connections; never authentication, permission or configuration failures.
TRANSIENT_ERRORS: Final = TransientErrors()


def retry_after_seconds(exc: BaseException, *, now: datetime | None = None) -> float | None:
    """The wait an HTTP 429 or 503 response asked for in its ``Retry-After`` header, or ``None``.

    Looks at ``exc`` and what it wraps for a ``requests.HTTPError``, ``httpx.HTTPStatusError`` or
    ``urllib.error.HTTPError`` with status 429 or 503 and a ``Retry-After`` that is either whole
    seconds (``"120"``) or an HTTP date (``"Wed, 21 Oct 2015 07:28:00 GMT"``, counted from
    ``now``; a date without a zone is UTC). The result is clamped to
    ``[0, MAX_RETRY_AFTER]``: a date in the past means ``0.0`` (now), a longer wait
    :data:`MAX_RETRY_AFTER`. A missing or malformed header, another status, or another
    exception gives ``None``. urllib3 raises no error that carries a response (its own ``Retry``
    honours ``Retry-After`` itself). Never raises; pure but for reading the clock without ``now``.

    Arguments:
        exc: the failure.
        now: the time to count an HTTP date from; the current time when ``None``. A naive
            datetime is taken as UTC.

    Example::

        >>> from datetime import datetime, timezone
        >>> from email.message import Message
        >>> from urllib.error import HTTPError
        >>> headers = Message()
        >>> headers["Retry-After"] = "Wed, 21 Oct 2015 07:28:00 GMT"
        >>> exc = HTTPError("https://api.example/", 503, "Service Unavailable", headers, None)
        >>> retry_after_seconds(exc, now=datetime(2015, 10, 21, 7, 27, tzinfo=timezone.utc))
        60.0
        >>> retry_after_seconds(ConnectionResetError()) is None
        True
    """
    for link in _links(exc):
        try:
            response = _http_response(link)
            if response is None or response[0] not in _HTTP_RETRY_AFTER:
                continue
            value = response[1].get("Retry-After")
        except Exception:  # headers that are not a mapping: no usable value
            continue
        seconds = _parse_retry_after(value, now)
        if seconds is not None:
            return seconds
    return None


def _parse_retry_after(value: object, now: datetime | None) -> float | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        return min(float(text), MAX_RETRY_AFTER)  # float, unlike int, takes any number of digits
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    current = now if now is not None else datetime.now(timezone.utc)
    try:
        seconds = (_as_utc(when) - _as_utc(current)).total_seconds()
    except OverflowError:
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
