"""The dead-letter envelope: one JSON document per terminal failure, with its whole story.

This module owns the ``resilient_tasks.dead_letter/1`` schema, in each of its forms:
:func:`build_envelope` (the whole story), :func:`bare_envelope` (the raw message alone, when
the whole story cannot be built: see :func:`envelope_or_bare`) and
:func:`broker_dead_letter_envelope` (a message RabbitMQ dead-lettered itself, read as one).

:func:`build_envelope` is pure: it takes the failed message as the broker had it, the exception,
the attempt history and the moment, and returns the document in the
``resilient_tasks.dead_letter/1`` schema. Bounds, so an envelope is never too large to publish
and never dropped for what it carries:

* tracebacks keep their last :data:`MAX_TRACEBACK_CHARS` characters;
* argument values and exception messages that are not JSON-serialisable fall back to ``repr``,
  and every ``repr`` and string argument is cut to :data:`MAX_REPR_CHARS`;
* keyword arguments whose name matches a redaction pattern (:data:`DEFAULT_REDACT_PATTERNS`,
  case-insensitive substrings) are replaced by ``"[REDACTED]"`` in ``task.kwargs``, at any
  depth. ``original`` keeps the message exactly, because replay republishes it: protect the
  dead-letter queue as you protect the queue it serves.
"""

from __future__ import annotations

import base64
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

from celery.utils.serialization import UnpickleableExceptionWrapper

from ._delayed_rabbitmq import SENTINEL, TOPOLOGY_EXCHANGE
from .decide import Reason
from .history import MAX_MESSAGE_CHARS, Attempt, History, exception_type_name, truncate

__all__ = [
    "DEFAULT_REDACT_PATTERNS",
    "MAX_REPR_CHARS",
    "MAX_TRACEBACK_CHARS",
    "REDACTED",
    "REDACT_SETTING",
    "REPLAYED_PROPERTIES",
    "SCHEMA",
    "FailedMessage",
    "bare_envelope",
    "body_field",
    "broker_dead_letter_envelope",
    "build_envelope",
    "canvas",
    "envelope_or_bare",
    "failed_message",
    "is_envelope",
    "redact",
    "redact_patterns",
]

logger = logging.getLogger(__name__)

#: The envelope's ``schema`` field.
SCHEMA = "resilient_tasks.dead_letter/1"
#: The message properties an envelope's ``original`` keeps and a replay publishes again.
REPLAYED_PROPERTIES = ("correlation_id", "reply_to", "message_id", "type", "app_id")
#: Key fragments whose values are redacted, matched anywhere in the key, ignoring case and
#: treating ``-`` as ``_`` (so ``X-Api-Key`` matches ``api_key``).
DEFAULT_REDACT_PATTERNS: tuple[str, ...] = (
    "password",
    "passwd",
    "token",
    "secret",
    "authorization",
    "api_key",
    "apikey",
    "private_key",
    "credential",
)
#: The app setting that replaces :data:`DEFAULT_REDACT_PATTERNS`.
REDACT_SETTING = "resilient_tasks_redact_patterns"
#: What a redacted value is replaced with.
REDACTED = "[REDACTED]"
#: Tracebacks keep this many characters, from the end (where the raising line is).
MAX_TRACEBACK_CHARS = 16_000
#: Reprs of arguments and long string arguments are cut to this many characters.
MAX_REPR_CHARS = 2_000
_MAX_DEPTH = 20
#: Celery's native delayed delivery (quorum queues, Celery 5.5+) routes through
#: ``celery_delayed_*`` exchanges with 28 binary digits of the delay before the routing key.
DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")


@dataclass(frozen=True)
class FailedMessage:
    """A task message as the broker delivered it, plus what the worker decoded from it.

    Example::

        >>> msg = FailedMessage(
        ...     task_id="f7c9", task_name="billing.sync_invoice", args=(42,),
        ...     kwargs={"api_key": "s3cr3t"}, headers={"id": "f7c9"}, properties={},
        ...     body=b'[[42], {"api_key": "s3cr3t"}, {}]', content_type="application/json",
        ...     content_encoding="utf-8", exchange="", routing_key="billing")
        >>> msg.queue
        'billing'
    """

    task_id: str
    task_name: str
    args: Sequence[Any]
    kwargs: Mapping[str, Any]
    headers: Mapping[str, Any]
    properties: Mapping[str, Any]
    body: bytes | str
    content_type: str | None
    content_encoding: str | None
    exchange: str = ""
    routing_key: str = ""
    priority: int | None = None

    @property
    def queue(self) -> str:
        """The queue the message came from: its routing key, as Celery's default routing has
        it, without the delay prefix Celery's native delayed delivery (quorum queues, Celery
        5.5+) puts before it.

        Example::

            >>> FailedMessage("i", "t", (), {}, {}, {}, b"", None, None, "celery_delayed_0",
            ...               "0." * 27 + "1.billing").queue
            'billing'
        """
        return DELAY_PREFIX.sub("", self.routing_key, count=1)


def redact_patterns(app: Any) -> tuple[str, ...]:
    """The redaction patterns of ``app``: its ``resilient_tasks_redact_patterns`` setting, or
    :data:`DEFAULT_REDACT_PATTERNS`.

    Example::

        >>> from celery import Celery
        >>> redact_patterns(Celery(set_as_current=False))[:2]
        ('password', 'passwd')
    """
    return tuple(app.conf.get(REDACT_SETTING) or DEFAULT_REDACT_PATTERNS)


def redact(value: Any, patterns: Iterable[str] = DEFAULT_REDACT_PATTERNS) -> Any:
    """``value`` with every mapping entry whose key matches a pattern replaced by ``REDACTED``.

    Example::

        >>> redact({"user": "ann", "Password": "hunter2", "nested": {"api_key": "k"}})
        {'user': 'ann', 'Password': '[REDACTED]', 'nested': {'api_key': '[REDACTED]'}}
    """
    lowered = tuple(_normal(p) for p in patterns)
    return _redact(value, lowered, 0)


def _normal(key: str) -> str:
    return key.lower().replace("-", "_")


def _redact(value: Any, patterns: tuple[str, ...], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {
            k: REDACTED
            if isinstance(k, str) and any(p in _normal(k) for p in patterns)
            else _redact(v, patterns, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, patterns, depth + 1) for v in value]
    return value


def jsonable(value: Any, depth: int = 0, *, limit: int | None = MAX_REPR_CHARS) -> Any:
    """``value`` as JSON can carry it: containers converted, anything else ``repr``-ed.

    Strings and reprs are cut to ``limit`` characters (``None``: kept whole, as for the
    ``original`` message, which replay must republish exactly).

    Example::

        >>> jsonable({"when": object, "ids": (1, 2), 3: float("nan")})
        {'when': "<class 'object'>", 'ids': [1, 2], '3': 'nan'}
    """
    kind = type(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return _cut(value, limit)
    if depth < _MAX_DEPTH:
        # dict and list by exact type first, before the slower ABC check (``Mapping``): an
        # envelope converts the message's headers and properties value by value.
        if kind is dict or isinstance(value, Mapping):
            return {str(k): jsonable(v, depth + 1, limit=limit) for k, v in value.items()}
        if kind is list or kind is tuple or isinstance(value, list | tuple | set | frozenset):
            return [jsonable(v, depth + 1, limit=limit) for v in value]
    if isinstance(value, bytes):
        return _cut(repr(value), limit)
    return _cut(_safe_repr(value), limit)


def _cut(text: str, limit: int | None) -> str:
    return text if limit is None else truncate(text, limit)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


def body_field(body: bytes | str, content_encoding: str | None) -> dict[str, Any]:
    """A message body as an envelope's ``original`` holds it: text, or base64 when binary.

    Example::

        >>> body_field(b"[[1], {}, {}]", "utf-8")
        {'body': '[[1], {}, {}]', 'body_encoding': 'text'}
        >>> body_field(b"\\x80\\x04", "binary")
        {'body': 'gAQ=', 'body_encoding': 'base64'}
    """
    if isinstance(body, str):
        return {"body": body, "body_encoding": "text"}
    if content_encoding in (None, "utf-8", "utf8"):
        try:
            return {"body": body.decode("utf-8"), "body_encoding": "text"}
        except UnicodeDecodeError:
            pass
    return {"body": base64.b64encode(body).decode("ascii"), "body_encoding": "base64"}


def original_body(original: Mapping[str, Any]) -> bytes:
    """The raw body an envelope's ``original`` section holds, as the broker had it.

    Example::

        >>> original_body({"body": "[[], {}, {}]", "body_encoding": "text"})
        b'[[], {}, {}]'
    """
    body = original.get("body", "")
    if original.get("body_encoding") == "base64":
        return base64.b64decode(body)
    return str(body).encode("utf-8")


def build_envelope(
    message: FailedMessage,
    *,
    reason: Reason,
    exception: BaseException | None,
    exception_type: str | None = None,
    traceback: str = "",
    history: History,
    final: Attempt,
    dead_lettered_at: datetime,
    canvas: Mapping[str, Any] | None = None,
    redact_patterns: Iterable[str] = DEFAULT_REDACT_PATTERNS,
) -> dict[str, Any]:
    """The envelope for ``message`` failing for good for ``reason``.

    ``history`` is what the message carried; ``final`` is the attempt that failed last.
    ``exception_type`` overrides the type name taken from ``exception`` (for an exception that
    crossed a process boundary as a wrapper).

    Example::

        >>> from datetime import datetime, timezone
        >>> t = datetime(2026, 1, 1, tzinfo=timezone.utc)
        >>> msg = FailedMessage("f7c9", "billing.sync", (42,), {"token": "x"}, {"id": "f7c9"},
        ...                     {}, b"[[42], {}, {}]", "application/json", "utf-8", "", "billing")
        >>> env = build_envelope(msg, reason="permanent", exception=KeyError("gone"),
        ...                      history=History(), dead_lettered_at=t,
        ...                      final=Attempt.failed(1, KeyError("gone"), hostname="w1",
        ...                                           delay=None, at=t))
        >>> env["reason"], env["task"]["kwargs"], env["exception"]["type"]
        ('permanent', {'token': '[REDACTED]'}, 'KeyError')
    """
    attempts = history.record(final)
    exc_type = exception_type or (exception_type_name(exception) if exception else "unknown")
    exc_message = "" if exception is None else _exception_message(exception)
    return {
        "schema": SCHEMA,
        "reason": reason,
        "task": {
            "id": message.task_id,
            "name": message.task_name,
            "args": jsonable(list(message.args)),
            "kwargs": jsonable(redact(dict(message.kwargs), redact_patterns)),
            "queue": message.queue,
            "exchange": message.exchange,
            "routing_key": message.routing_key,
            "priority": message.priority,
        },
        "exception": {
            "type": exc_type,
            "message": truncate(exc_message, MAX_MESSAGE_CHARS * 4),
            "traceback": _tail(traceback, MAX_TRACEBACK_CHARS),
        },
        "attempts": [a.as_dict() for a in attempts.attempts],
        "attempts_dropped": attempts.dropped,
        "first_attempt_at": attempts.first_attempt_at,
        "dead_lettered_at": _iso(dead_lettered_at),
        "canvas": jsonable(dict(canvas or {})),
        "original": {
            "headers": jsonable(dict(message.headers), limit=None),
            "properties": jsonable(
                {k: v for k, v in message.properties.items() if k != "application_headers"},
                limit=None,
            ),
            **body_field(message.body, message.content_encoding),
            "content_type": message.content_type,
            "content_encoding": message.content_encoding,
        },
    }


def _exception_message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return _safe_repr(exc)


def _tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return "...(cut)...\n" + text[-(limit - 13) :]


def is_envelope(body: object) -> bool:
    """Whether a decoded message body is a resilient-tasks dead-letter envelope.

    Example::

        >>> is_envelope({"schema": SCHEMA}), is_envelope([[], {}, {}])
        (True, False)
    """
    return isinstance(body, Mapping) and body.get("schema") == SCHEMA


# -- from a worker's message ----------------------------------------------------------------


def failed_message(
    message: Any, task_id: str, task_name: str, args: Any, kwargs: Any
) -> FailedMessage:
    """``message`` as the broker delivered it, with what the worker decoded from it."""
    delivery = message.delivery_info or {}
    properties = message.properties or {}
    return FailedMessage(
        task_id=task_id,
        task_name=task_name,
        args=args,
        kwargs=kwargs,
        headers=message.headers or {},
        properties=properties,
        body=message.body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        # A message delayed by Celery's native delayed delivery arrives through a
        # celery_delayed_* exchange: replaying it there would delay it again.
        exchange=own_exchange(delivery.get("exchange") or ""),
        routing_key=own_routing_key(delivery),
        priority=properties.get("priority", delivery.get("priority")),
    )


def envelope_or_bare(
    build: Callable[[], dict[str, Any]],
    message: Any,
    task_id: str,
    task_name: str,
    exc: BaseException,
    reason: Reason,
) -> dict[str, Any]:
    """What ``build`` returns, or, if it raises, the envelope of the raw message alone: what
    the message carries must never stop its dead-lettering."""
    try:
        return build()
    except Exception:
        logger.exception("resilient_tasks: building the envelope of %s[%s] failed; "
                         "dead-lettering a minimal one", task_name, task_id)  # fmt: skip
        return bare_envelope(message, task_id, task_name, exc, reason)


def bare_envelope(
    message: Any, task_id: str, task_name: str, exc: BaseException, reason: Reason
) -> dict[str, Any]:
    """An envelope from the raw message alone, when the full one cannot be built."""
    delivery = message.delivery_info or {}
    return {
        "schema": SCHEMA,
        "reason": reason,
        "task": {
            "id": task_id,
            "name": task_name,
            "queue": own_routing_key(delivery),
            "exchange": own_exchange(delivery.get("exchange") or ""),
            "routing_key": own_routing_key(delivery),
        },
        "exception": {"type": raised_type_name(exc), "message": "", "traceback": ""},
        "attempts": [],
        "dead_lettered_at": datetime.now(timezone.utc).isoformat(),
        "original": {
            "headers": jsonable(dict(message.headers or {}), limit=None),
            "properties": {},
            **body_field(message.body, message.content_encoding),
            "content_type": message.content_type,
            "content_encoding": message.content_encoding,
        },
    }


def own_exchange(exchange: str) -> str:
    """The exchange a message was published to, not the ``celery_delayed_*`` exchange Celery's
    native delayed delivery routed it through (replaying it there would delay it again)."""
    return "" if TOPOLOGY_EXCHANGE.fullmatch(exchange) else exchange


def own_routing_key(delivery: Mapping[str, Any]) -> str:
    """The routing key a message was published with, without the delay levels Celery's native
    delayed delivery puts in front of it."""
    routing_key = str(delivery.get("routing_key") or "")
    if TOPOLOGY_EXCHANGE.fullmatch(str(delivery.get("exchange") or "")):
        return DELAY_PREFIX.sub("", routing_key, count=1).removesuffix("." + SENTINEL)
    return routing_key


def raised_type_name(exc: BaseException) -> str:
    """The type of what was raised: the class a stand-in for an unpicklable exception names."""
    if isinstance(exc, UnpickleableExceptionWrapper):
        return f"{exc.exc_module}.{exc.exc_cls_name}"
    return exception_type_name(exc)


def canvas(context: Mapping[str, Any], payload: Any) -> dict[str, Any]:
    """Which workflow the task belonged to: its root and parent, group, and what the chain had
    left to run (it stops here)."""
    embed = payload[2] if isinstance(payload, list | tuple) and len(payload) > 2 else {}
    chain = (embed or {}).get("chain") or []
    return {
        "root_id": context.get("root_id"),
        "parent_id": context.get("parent_id"),
        "group_id": context.get("group"),
        "group_index": context.get("group_index"),
        "chain_remaining": [
            step.get("task") for step in reversed(chain) if isinstance(step, Mapping)
        ],
        "chord": bool((embed or {}).get("chord")),
    }


# -- a message the broker dead-lettered -------------------------------------------------------


def broker_dead_letter_envelope(
    message: Any, decoded: Any, patterns: tuple[str, ...]
) -> dict[str, Any]:
    """An envelope for a task message the broker dead-lettered itself (RabbitMQ's ``x-death``),
    which carries none: from its first ``x-death``, so the tools list, show and replay it like
    the worker's own dead letters.

    ``message`` has the broker message's ``headers``, ``properties``, ``body``,
    ``content_type`` and ``content_encoding``; ``decoded`` is its JSON body, decoded (anything
    else for a body that is not JSON); the keyword arguments are redacted with ``patterns``.
    The envelope's ``original`` keeps the message exactly, as the worker's own envelopes do, so
    that replay can republish it.
    """
    headers = message.headers
    deaths = headers.get("x-death")
    deaths = deaths if isinstance(deaths, list) else []
    death = deaths[0] if deaths and isinstance(deaths[0], Mapping) else {}
    routing_keys = death.get("routing-keys")
    args: Any = []
    kwargs: Any = {}
    if isinstance(decoded, list) and len(decoded) == 3:
        args, kwargs = decoded[0], decoded[1]
    history = History.from_headers(headers)
    properties = {
        key: value
        for key, value in message.properties.items()
        if key in (*REPLAYED_PROPERTIES, "priority", "delivery_mode")
    }
    reason = str(death.get("reason") or "unknown")
    return {
        "schema": SCHEMA,
        "reason": reason,
        "task": {
            "id": str_or_none(headers.get("id")),
            "name": str_or_none(headers.get("task")),
            "args": jsonable(args),
            "kwargs": jsonable(redact(kwargs, patterns)),
            "queue": str_or_none(death.get("queue")),
            "exchange": str_or_none(death.get("exchange")) if death else None,
            "routing_key": str_or_none(routing_keys[0])
            if isinstance(routing_keys, list) and routing_keys
            else None,
            "priority": properties.get("priority"),
        },
        "exception": {
            "type": None,
            "message": f"dead-lettered by the broker ({reason})",
            "traceback": "",
        },
        "attempts": [attempt.as_dict() for attempt in history.attempts],
        "attempts_dropped": history.dropped,
        "first_attempt_at": history.first_attempt_at,
        "dead_lettered_at": _exact(death.get("time")),
        "canvas": {},
        "broker": {"x-death": _exact(deaths)},
        "original": {
            "headers": _exact(headers),
            "properties": _exact(properties),
            **body_field(message.body, message.content_encoding),
            "content_type": message.content_type,
            "content_encoding": message.content_encoding,
        },
    }


def _exact(value: Any) -> Any:
    """``value`` as JSON carries it, exactly (no truncation): times as ISO-8601."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return moment.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _exact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_exact(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def str_or_none(value: object) -> str | None:
    """``value`` if it is a string, else ``None``: for fields read from a message."""
    return value if isinstance(value, str) else None
