"""A library task's message that the worker cannot read is dead-lettered, not dropped.

Celery reads a task message in the worker's main process, before any task code runs: the
task's strategy (``Task.Strategy``) decodes the body and builds the worker ``Request``. When
that fails, Celery lets the message go:

* a body it cannot decode (``kombu.exceptions.DecodeError``: corrupt JSON, a pickle whose class
  was renamed by a deploy) is acknowledged and logged at CRITICAL (``Consumer.on_decode_error``);
* a body in a content type the worker does not accept (``ContentDisallowed``) or a message with
  an ``eta`` or ``expires`` that is not a date (``InvalidTaskError``) is rejected without
  requeue (``Consumer.on_invalid_task``): gone, unless the broker dead-letters it;
* a content type the worker accepts but has no serializer for (``SerializerNotInstalled``:
  ``msgpack`` or ``yaml`` accepted, not installed) stops the worker, and the message comes back
  to stop the next one;
* a body that decodes but is not ``[args, kwargs, embed]`` is not checked at all: Celery raises
  while it builds the request, which stops the worker, or fails later and leaves the message
  unsettled (:func:`check_body`).

:func:`dead_lettering` is the ``Strategy`` of every task built on
:class:`~resilient_tasks.DeadLetterMixin`: Celery's own strategy, with one difference. Such a
message is dead-lettered as it came, with reason ``exception`` and the error that reading it
raised as the exception; the task's failure handlers and ``on_give_up`` run, its result is
marked ``FAILURE`` (so a caller waiting on it gets the error instead of waiting for ever), and
only then is it acknowledged. If the dead letter cannot be published, the message is requeued.
``celery dlq replay`` republishes it unchanged, for when a worker can read it again (the class
deployed back, the content type accepted). A task with ``dead_letter=False`` keeps Celery's
behaviour.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from celery.app.task import Context
from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default
from kombu.exceptions import ContentDisallowed, DecodeError, SerializerNotInstalled

from . import _events
from .decide import Reason
from .dlq.registry import record_dead_letter_queue
from .envelope import build_envelope, canvas, envelope_or_bare, failed_message, redact_patterns
from .history import Attempt, History
from .hooks import FailureDetails, FailureHooksMixin, give_up
from .publish import publish_envelope

__all__ = ["UNREADABLE", "check_body", "check_headers", "dead_lettering"]

logger = logging.getLogger(__name__)

#: What reading a task message raises when the worker cannot read it (see the module
#: docstring). ``SerializerNotInstalled``: an accepted content type whose serializer the worker
#: lacks (``msgpack`` or ``yaml`` not installed), which Celery's consumer lets stop the worker.
UNREADABLE = (DecodeError, ContentDisallowed, InvalidTaskError, SerializerNotInstalled)
#: The sequence types an ``args`` may be (a tuple, not ``list | tuple`` built per message).
_SEQUENCES = (list, tuple)
#: The types of a time limit in seconds.
_SECONDS = (int, float)
#: A protocol 1 body's fields that are the call's arguments, not its options.
_PROTOCOL_1_ARGUMENTS = frozenset({"args", "kwargs"})
#: A protocol 1 body's workflow options (protocol 2 carries them in the body's ``embed``).
_PROTOCOL_1_WORKFLOW = ("callbacks", "errbacks", "chord", "chain")
#: The reason of an unreadable message's dead letter.
_REASON: Reason = "exception"


def dead_lettering(task: Any, app: Any, consumer: Any, **options: Any) -> Callable[..., Any]:
    """Celery's default task strategy, except that a message the worker cannot read is
    dead-lettered before it is acknowledged (see the module docstring).

    Set as ``Strategy`` by :class:`~resilient_tasks.DeadLetterMixin`. The worker's consumer
    calls it once per task and then the handler it returns for every message of that task; a
    message that reads, which is every message but the broken ones, goes through Celery's
    strategy untouched once :func:`check_body` has seen its shape.

    Example::

        >>> from resilient_tasks import ResilientTask
        >>> ResilientTask.Strategy
        'resilient_tasks.unreadable:dead_lettering'
    """
    handle: Callable[..., Any] = default(task, app, consumer, **options)
    if not getattr(task, "dead_letter", False):
        return handle  # Celery's own strategy, exactly

    # The consumer calls it with these five arguments for every message of the task: named,
    # so that no ``**kwargs`` is packed and unpacked on the way through, on every message.
    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any) -> Any:
        try:
            if body is None:  # protocol 2: the body is decoded here (Celery decodes it next)
                check_headers(message.headers)
                check_body(message.payload)
            return handle(message, body, ack, reject, callbacks)
        except UNREADABLE as exc:
            if message.acknowledged:  # settled already: handing it to Celery would settle it
                logger.error(  # twice (MessageStateError), which stops the consumer
                    "resilient_tasks: a message of %s, settled already, raised %r",
                    task.name,
                    exc,
                    exc_info=exc,
                )
                return None
            _settle(task, consumer, message, body, exc, ack, reject)
            return None

    return task_message_handler


def check_body(body: Any) -> None:
    """Raise ``InvalidTaskError`` unless ``body``, decoded, has the shape of a Celery task
    message: ``[args, kwargs, embed]`` (protocol 2), or a mapping with ``args`` (protocol 1,
    which Celery's strategy converts and checks itself).

    Celery does not check the shape. A body of another shape (JSON ``null``, ``[1, 2]``, a
    string) makes it raise in the worker's main process while it builds the request, which stops
    the worker ("Unrecoverable error"), and the message, unacknowledged, comes back to stop the
    next one; arguments or options of the wrong type fail in ways that leave the message
    unsettled. A library task's message of the wrong shape is dead-lettered instead.

    Example::

        >>> check_body([[42], {"region": "eu"}, {"callbacks": None}])
        >>> try:
        ...     check_body([42, {}])
        ... except InvalidTaskError as exc:
        ...     print(exc)
        the body is not Celery's [args, kwargs, embed]: a list of 2
    """
    kind = type(body)
    if (kind is list or kind is tuple) and len(body) == 3:
        args, kwargs, embed = body
        if (
            (type(args) is list or isinstance(args, _SEQUENCES))
            and (type(kwargs) is dict or isinstance(kwargs, Mapping))
            and (embed is None or type(embed) is dict or isinstance(embed, Mapping))
        ):
            return
        raise InvalidTaskError(
            "the body is not Celery's [args, kwargs, embed]: they are "
            f"[{type(args).__name__}, {type(kwargs).__name__}, {type(embed).__name__}]"
        )
    if isinstance(body, Mapping) and "args" in body:
        return
    shape = (
        f"a {kind.__name__} of {len(body)}"
        if isinstance(body, _SEQUENCES)
        else f"a {kind.__name__}"
    )
    raise InvalidTaskError(f"the body is not Celery's [args, kwargs, embed]: {shape}")


def check_headers(headers: Any) -> None:
    """Raise ``InvalidTaskError`` unless the protocol 2 ``headers`` Celery reads in the worker's
    main process have the types it needs: ``id`` a task id (a non-empty string), ``timelimit``
    absent or a pair of seconds (``[soft, hard]``, either ``None``).

    Celery does not check them. An ``id`` that is a list, or a ``timelimit`` that is not a pair,
    makes it raise in the main process, which stops the worker ("Unrecoverable error"), and the
    message, unacknowledged, comes back to stop the next one. A library task's message with such
    headers is dead-lettered instead.

    Example::

        >>> check_headers({"id": "7f3c", "task": "billing.sync", "timelimit": [None, 40]})
        >>> try:
        ...     check_headers({"id": "7f3c", "timelimit": [30]})
        ... except InvalidTaskError as exc:
        ...     print(exc)
        the timelimit header is not [soft, hard] seconds: [30]
    """
    task_id = headers.get("id")
    if type(task_id) is not str or not task_id:
        raise InvalidTaskError(f"the id header is not a task id: {task_id!r}")
    limits = headers.get("timelimit")
    if limits is None:
        return
    if type(limits) in _SEQUENCES and len(limits) == 2:
        soft, hard = limits
        if (soft is None or type(soft) in _SECONDS) and (hard is None or type(hard) in _SECONDS):
            return
    raise InvalidTaskError(f"the timelimit header is not [soft, hard] seconds: {limits!r}")


def _settle(
    task: Any, consumer: Any, message: Any, body: Any, exc: Exception, ack: Any, reject: Any
) -> None:
    """Dead-letter the unreadable ``message``, then acknowledge it; requeue it if the dead
    letter cannot be published. Never raises: what escapes a strategy stops the worker."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    if isinstance(body, Mapping) and "id" not in headers:
        # Protocol 1 (which the consumer decodes before the strategy): the id, the retries and
        # the options are in the body.
        headers = {**{k: v for k, v in body.items() if k not in _PROTOCOL_1_ARGUMENTS}, **headers}
    given_id = headers.get("id")
    task_id = given_id if type(given_id) is str else ""  # none to mark a result under
    errors = consumer.connection_errors
    logger.error(
        "resilient_tasks: the worker cannot read a message of %s[%s] (%s: %s); dead-lettering it",
        task.name,
        task_id,
        type(exc).__name__,
        exc,
        exc_info=exc,
    )
    queue = None
    try:
        embed = _embed(message, body, exc)
        history, final = _attempts(headers, exc, consumer.hostname)
        envelope = _envelope(task, message, task_id, exc, history, final, embed)
        source = envelope["task"]["queue"]
        queue = task.dead_letter_queue_for(source)
        publish_envelope(task.app, queue, envelope, source)
        record_dead_letter_queue(task.app, queue)  # for the tools; never raises
    except Exception:
        logger.exception(
            "resilient_tasks: could not dead-letter the unreadable message of %s[%s] to %r; "
            "it is requeued",
            task.name,
            task_id,
            queue,
        )
        reject(logger, errors, True)
        return
    try:  # the dead letter is on the broker: whatever happens now, the message is settled
        if isinstance(task, FailureHooksMixin):
            give_up(task, _details(task, task_id, exc, history.record(final), consumer.hostname))
        _events.emit(
            "task_dead_lettered",
            request={**headers, "delivery_info": message.delivery_info},
            task=task,
            reason=_REASON,
            queue=queue,
            exception=exc,
            envelope=envelope,
        )
        _store_failure(task, message, headers, task_id, exc, embed)
    except Exception:
        logger.exception(
            "resilient_tasks: settling the dead-lettered message of %s[%s] raised",
            task.name,
            task_id,
        )
    finally:
        ack(logger, errors)


def _embed(message: Any, body: Any, exc: Exception) -> Mapping[str, Any]:
    """The body's workflow options (``chord``, ``errbacks``, ``chain``) when the body did decode
    to Celery's shape (an ``eta`` or ``expires`` that is no date), else none."""
    if isinstance(body, Mapping):  # protocol 1: decoded already, the options beside the args
        return {k: body[k] for k in _PROTOCOL_1_WORKFLOW if k in body}
    if not isinstance(exc, InvalidTaskError):
        return {}
    try:
        payload = message.payload
        check_body(payload)
        embed = payload[2]
    except Exception:
        return {}
    return embed if isinstance(embed, Mapping) else {}


def _attempts(headers: dict[str, Any], exc: Exception, hostname: str) -> tuple[History, Attempt]:
    retries = headers.get("retries")
    number = (retries if type(retries) is int and retries >= 0 else 0) + 1
    now = datetime.now(timezone.utc)
    return History.from_headers(headers), Attempt.failed(
        number, exc, hostname=hostname, delay=None, at=now
    )


def _details(
    task: Any, task_id: str, exc: Exception, history: History, hostname: str
) -> FailureDetails:
    return FailureDetails(
        task_name=task.name,
        task_id=task_id or None,
        args=(),
        kwargs=MappingProxyType({}),
        exception=exc,
        reason=_REASON,
        history=history,
        hostname=hostname,
    )


def _envelope(
    task: Any,
    message: Any,
    task_id: str,
    exc: Exception,
    history: History,
    final: Attempt,
    embed: Mapping[str, Any],
) -> dict[str, Any]:
    """The envelope: the message as it came, no arguments (they could not be read)."""
    return envelope_or_bare(
        lambda: build_envelope(
            failed_message(message, task_id, task.name, (), {}),
            reason=_REASON,
            exception=exc,
            traceback="".join(traceback.format_exception(exc)),
            history=history,
            final=final,
            dead_lettered_at=datetime.now(timezone.utc),
            canvas=canvas(message.headers or {}, [(), {}, embed]),
            redact_patterns=redact_patterns(task.app),
        ),
        message,
        task_id,
        task.name,
        exc,
        _REASON,
    )


def _store_failure(
    task: Any,
    message: Any,
    headers: dict[str, Any],
    task_id: str,
    exc: Exception,
    embed: Mapping[str, Any],
) -> None:
    """Mark the result ``FAILURE`` and tell the workflow, as Celery's ``Request.on_failure`` does
    for a task that raised: a caller waiting on it gets the error, a chord it belongs to counts
    it, the tasks chained after it fail, its ``link_error`` callbacks run. The workflow is known
    only when the body decoded (``embed``)."""
    if not task_id:
        return
    ignore_result = headers.get("ignore_result")
    if ignore_result is None:
        ignore_result = task.ignore_result
    properties = message.properties or {}
    request = Context(
        headers,
        id=task_id,
        task=task.name,
        delivery_info=message.delivery_info,
        reply_to=properties.get("reply_to"),
        correlation_id=properties.get("correlation_id") or task_id,
        chord=embed.get("chord"),
        chain=embed.get("chain"),
        errbacks=embed.get("errbacks"),
        callbacks=embed.get("callbacks"),
    )
    try:
        task.backend.mark_as_failure(
            task_id,
            exc,
            request=request,
            store_result=not ignore_result or task.store_errors_even_if_ignored,
        )
    except Exception:
        logger.exception(
            "resilient_tasks: could not store the failure of %s[%s]", task.name, task_id
        )
