"""The worker-side half of the library: what runs in the worker's main process.

Celery builds one :class:`celery.worker.request.Request` per message in the main process and
calls its ``on_failure`` when the task failed, before it acknowledges the message.
:class:`ResilientRequest` (the ``Request`` class of every task built on
:class:`~resilient_tasks.DeadLetterMixin`) dead-letters a terminal failure there, and publishes
a retry the pool child asked for there, so that the message is acknowledged only once its
envelope, or its retry, is on the broker.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery import Signature, signals
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded, WorkerLostError
from celery.utils.serialization import UnpickleableExceptionWrapper
from celery.worker import state
from celery.worker.request import Request
from celery.worker.state import task_ready

from . import _events, _reason
from .classify import TRANSIENT_ERRORS
from .deadletter import confirmed_producer, publish_envelope
from .envelope import (
    DELAY_PREFIX,
    SCHEMA,
    FailedMessage,
    body_field,
    build_envelope,
    jsonable,
    redact_patterns,
)
from .history import HEADER, Attempt, History, exception_type_name
from .hooks import FailureHooksMixin, details_from_worker, give_up
from .policy import AttemptState, GiveUp, Reason, RetryIn, decide
from .retry import PublishedByTheWorker, RetryMixin, without_x_death

__all__ = ["REDELIVERIES", "ResilientRequest", "redeliveries"]

logger = logging.getLogger(__name__)

#: The message header that counts how often a message came back after losing its worker.
REDELIVERIES = "resilient_redeliveries"
# Not failures of the task (control flow), or failures handled elsewhere.
_NOT_TERMINAL = (Retry, Ignore, Reject, WorkerLostError, TimeLimitExceeded, SystemExit,
                 KeyboardInterrupt, MemoryError)  # fmt: skip


class ResilientRequest(Request):  # type: ignore[misc]
    """Celery's ``Request`` that settles every terminal outcome before the acknowledgement.

    Set as ``Request`` by :class:`~resilient_tasks.DeadLetterMixin` (so by
    :class:`~resilient_tasks.ResilientTask`). In the worker's main process it:

    * dead-letters a terminal failure before Celery acknowledges the message
      (:mod:`resilient_tasks.deadletter`);
    * publishes the retry the pool child raised
      (:class:`~resilient_tasks.retry.PublishedByTheWorker`), with publisher confirms, before
      Celery acknowledges the message: a child killed in between cannot leave the retry and the
      unacknowledged original both running;
    * settles a **hard time limit** once, on every Celery version: one retry if the task's
      policy retries ``TimeLimitExceeded``, else one dead letter (reason ``hard_time_limit``);
      the task's ``on_failure`` and ``task_failure`` run once, and the message is acknowledged
      whatever ``acks_on_failure_or_timeout`` / ``acks_on_timeout`` say, so it never comes
      back in a loop;
    * counts **lost workers** (the pool child died) in the message's ``resilient_redeliveries``
      header (or RabbitMQ's ``x-delivery-count``, whichever is higher): the message is
      republished with the count raised, and once it has come back ``max_redeliveries`` times
      it is dead-lettered (reason ``worker_lost``) instead of run again.

    A task that needs its own request class subclasses this one. The ``exc_info`` its
    ``on_failure`` receives for a failure in the pool child has the exception and the
    traceback as text (``exc_info.traceback``), but no traceback objects (``exc_info.tb`` is
    ``None``): the child keeps those (see :mod:`resilient_tasks._einfo`).

    Example::

        from resilient_tasks.request import ResilientRequest

        class AuditedRequest(ResilientRequest):
            def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
                audit(self.id)
                return super().on_failure(exc_info, send_failed_event, return_ok)
    """

    _resilient_settled = False
    #: Read by :class:`~resilient_tasks.RetryMixin` in the pool child: retries are published
    #: here, by :meth:`on_failure`, before the message is acknowledged.
    publishes_retries = True

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        if soft or not _handles_losses(self.task):
            return super().on_timeout(soft, timeout)
        return self._settle_hard_time_limit(timeout)

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        if self._resilient_settled:
            # Billiard can report a lost worker before it reads the result the child had
            # already written: the message was settled then (republished, or dead-lettered),
            # so this later outcome is the superseded run's and must not be dead-lettered too.
            logger.debug("resilient_tasks: %s[%s] was settled already; ignoring a later "
                         "outcome of the same run", self.name, self.id)  # fmt: skip
            return None
        exc = _unwrap(exc_info.exception)
        if isinstance(exc, PublishedByTheWorker) and not self._publish_retry(exc):
            return None
        task = self.task
        if _handles_losses(task) and not state.should_terminate:
            if isinstance(exc, TimeLimitExceeded):
                return self._settle_hard_time_limit(exc.args[0] if exc.args else None)
            if isinstance(exc, WorkerLostError) and not (
                self._already_revoked or self._already_cancelled or self._succeeded_before()
            ):
                return self._settle_worker_lost(exc, exc_info, send_failed_event, return_ok)
        if not getattr(task, "dead_letter", False) or isinstance(exc, _NOT_TERMINAL):
            return super().on_failure(exc_info, send_failed_event, return_ok)
        if not self._dead_letter(exc, exc_info, self._give_up_reason(exc, exc_info)):
            return None
        return super().on_failure(exc_info, send_failed_event, return_ok)

    # -- terminal failures ----------------------------------------------------------------

    def _give_up_reason(self, exc: BaseException, exc_info: ExceptionInfo) -> Reason:
        """Why the task gave up: the reason its pool child recorded on the exception, else the
        child's decision made again here.

        The child's mark is lost when Celery had to send back a stand-in for an exception it
        cannot pickle (see :mod:`resilient_tasks._reason`). What the decision looked at is here
        too: the task's ``retry_policy`` (or Celery's ``autoretry_for`` / ``max_retries``), the
        attempt number and the history from the message, and the exception as raised, rebuilt
        from the class the ``ExceptionInfo`` names. Pickle drops the exception's chain, so a
        match through ``__cause__`` / ``__context__`` cannot be repeated; nor can one by a
        predicate reading attributes the stand-in lost. Never raises: ``"exception"`` when the
        decision cannot be repeated.
        """
        reason = _reason.recorded(exc)
        if reason is not None:
            return reason
        try:
            return self._decide_again(_reason.as_raised(exc, getattr(exc_info, "type", None)))
        except Exception:
            logger.warning("resilient_tasks: could not tell why %s[%s] gave up; dead-lettering "
                           "it with reason 'exception'", self.name, self.id,
                           exc_info=True)  # fmt: skip
            return "exception"

    def _decide_again(self, exc: BaseException) -> Reason:
        """The reason :class:`~resilient_tasks.RetryMixin` gives a terminal failure ``exc``."""
        task = self.task
        if not isinstance(task, RetryMixin):  # nothing decided in the child: nothing to repeat
            return "exception"
        decision = self._decision(exc)
        if decision is None:  # no policy: Celery's own retry options decided
            task.request_stack.push(self._context)
            try:
                reason: Reason = task._celery_reason(exc)
            finally:
                task.request_stack.pop()
            return reason
        # A retry here means the child saw what this process cannot (the exception's chain, a
        # jittered delay past max_elapsed): why it gave up is unknown.
        return decision.reason if isinstance(decision, GiveUp) else "exception"

    def _dead_letter(self, exc: BaseException, exc_info: ExceptionInfo, reason: Reason) -> bool:
        """Publish the envelope; on failure requeue (acks_late) and return False."""
        task = self.task
        envelope = _envelope_or_bare(
            lambda: self._envelope(exc, exc_info, reason), self.message, self.id, self.name, exc,
            reason,
        )  # fmt: skip
        source = envelope["task"]["queue"]
        queue = task.dead_letter_queue_for(source)
        try:
            publish_envelope(task.app, queue, envelope, source)
        except Exception:
            logger.exception(
                "resilient_tasks: could not dead-letter %s[%s] to %r; %s. Envelope: %r",
                self.name,
                self.id,
                queue,
                "the message is requeued"
                if task.acks_late
                else "acks_late is off, so the message was already acknowledged and this log "
                "line is all that remains",
                envelope,
            )
            if task.acks_late:
                task_ready(self)
                self.reject(requeue=True)
                return False
            return True
        _events.emit(
            "task_dead_lettered",
            request=self,
            reason=reason,
            queue=queue,
            exception=exc,
            envelope=envelope,
        )
        return True

    def _fail_for_good(self, exc: BaseException, reason: Reason) -> None:
        """Settle a failure Celery saw outside the task: handlers, envelope, result, hooks,
        ack."""
        _reason.mark(exc, reason)  # so task_failed, sent below, names the same reason
        einfo = _exception_info(exc)
        task = self.task
        if isinstance(task, FailureHooksMixin):
            history = History.from_headers(self.message.headers).record(self._final_attempt(exc))
            give_up(task, details_from_worker(self, exc, reason, history))
        if getattr(task, "dead_letter", False) and not self._dead_letter(exc, einfo, reason):
            return
        task.backend.mark_as_failure(self.id, exc, request=self._context, store_result=True)
        try:
            task.on_failure(exc, self.id, self.args, self.kwargs, einfo)
        except Exception:
            logger.exception("on_failure of %s[%s] raised", self.name, self.id)
        task.request_stack.push(self._context)
        try:
            signals.task_failure.send(
                sender=task,
                task_id=self.id,
                exception=exc,
                args=self.args,
                kwargs=self.kwargs,
                traceback=einfo.traceback,
                einfo=einfo,
            )
        finally:
            task.request_stack.pop()
        self.acknowledge()

    # -- retries -------------------------------------------------------------------------

    def _publish_retry(self, retry: PublishedByTheWorker) -> bool:
        """Publish the retry the pool child raised (with confirms); False when it could not be
        published and the message was settled otherwise: requeued when the broker could not be
        reached (with ``acks_late``), else failed for good (dead-lettered, reason
        ``exception``, the publish error as the exception)."""
        task = self.task
        try:
            signature = Signature.from_dict(dict(retry.sig), app=task.app)
            with confirmed_producer(task.app) as producer:
                signature.apply_async(producer=producer)
        except Exception as error:
            requeue = bool(task.acks_late) and TRANSIENT_ERRORS(error)
            logger.exception("resilient_tasks: could not publish the retry of %s[%s]; %s",
                             self.name, self.id, "the message is requeued" if requeue
                             else "failing it for good")  # fmt: skip
            task_ready(self)
            self._resilient_settled = True
            if requeue:
                self.reject(requeue=True)
            else:
                self._fail_for_good(error, "exception")
            return False
        return True

    # -- hard time limits -------------------------------------------------------------------

    def _settle_hard_time_limit(self, timeout: float | None) -> None:
        if self._resilient_settled:  # billiard reports a hard limit twice
            return
        self._resilient_settled = True
        task_ready(self)
        exc = TimeLimitExceeded(timeout)
        logger.error("Hard time limit (%ss) exceeded for %s[%s]", timeout, self.name, self.id)
        _events.emit("task_hard_time_limit", request=self, timeout=timeout, exception=exc)
        decision = self._decision(exc)
        if isinstance(decision, RetryIn):
            self._retry_from_worker(exc, decision.delay)
            return
        self._fail_for_good(exc, decision.reason if decision else "hard_time_limit")

    def _retry_from_worker(self, exc: BaseException, delay: float) -> None:
        context = self._context
        attempt = Attempt.failed(
            int(context.retries or 0) + 1,
            exc,
            hostname=self.hostname or socket.gethostname(),
            delay=delay,
            at=self._started(),
        )
        history = History.from_headers(self.message.headers).record(attempt)
        headers = {**without_x_death(context.headers), HEADER: history.encode()}
        if not self._republish(headers, countdown=delay, retries=int(context.retries or 0) + 1):
            return
        _events.emit(
            "task_retry_scheduled", request=self, attempt=attempt, delay=delay, exception=exc
        )
        self.task.backend.mark_as_retry(self.id, exc, request=context)
        self.acknowledge()

    # -- lost workers -------------------------------------------------------------------------

    def _settle_worker_lost(
        self,
        exc: BaseException,
        exc_info: ExceptionInfo,
        send_failed_event: bool,
        return_ok: bool,
    ) -> Any:
        task = self.task
        self._resilient_settled = True
        _reason.mark(exc, "worker_lost")  # what task_failed says, if it ends the task
        if not (task.acks_late and task.reject_on_worker_lost):
            # Celery acknowledges and fails it; it will not come back, so dead-letter it too.
            if getattr(task, "dead_letter", False) and not self._dead_letter(
                exc, exc_info, "worker_lost"
            ):
                return None
            return super().on_failure(exc_info, send_failed_event, return_ok)
        task_ready(self)
        returned = redeliveries(self.message.headers)
        _events.emit(
            "task_worker_lost",
            request=self,
            redeliveries=returned,
            max_redeliveries=task.max_redeliveries,
            exception=exc,
        )
        if returned >= task.max_redeliveries:
            logger.error(
                "resilient_tasks: %s[%s] lost its worker %d times (max_redeliveries=%d); "
                "dead-lettering it instead of running it again",
                self.name,
                self.id,
                returned + 1,
                task.max_redeliveries,
            )
            self._fail_for_good(exc, "worker_lost")
            return None
        logger.warning(
            "resilient_tasks: %s[%s] lost its worker; redelivery %d of %d",
            self.name,
            self.id,
            returned + 1,
            task.max_redeliveries,
        )
        headers = {**without_x_death(self._context.headers), REDELIVERIES: returned + 1}
        if self._republish(headers):
            self.acknowledge()
        return None

    # -- helpers ----------------------------------------------------------------------------

    def _republish(
        self, headers: dict[str, Any], countdown: float | None = None, retries: int | None = None
    ) -> bool:
        """Publish this task again (same id, queue, priority, links) with ``headers``, with
        publisher confirms; on failure requeue the original and return False."""
        options: dict[str, Any] = {"headers": headers}
        if countdown is not None:
            options["countdown"] = countdown
        if retries is not None:
            options["retries"] = retries
        task = self.task
        try:
            signature = task.signature_from_request(
                self._context, self.args, self.kwargs, **options
            )
            with confirmed_producer(task.app) as producer:
                signature.apply_async(producer=producer)
        except Exception:
            logger.exception(
                "resilient_tasks: could not republish %s[%s]; the message is requeued",
                self.name,
                self.id,
            )
            self.reject(requeue=True)
            return False
        return True

    def _succeeded_before(self) -> bool:
        stored = getattr(self, "_success_was_stored", None)  # Celery >= 5.6
        return bool(stored()) if stored else False

    def _final_attempt(self, exc: BaseException) -> Attempt:
        return Attempt.failed(
            int(self._context.retries or 0) + 1,
            exc,
            hostname=self.hostname or socket.gethostname(),
            delay=None,
            at=self._started(),
        )

    def _started(self) -> datetime:
        now = datetime.now(timezone.utc)
        return datetime.fromtimestamp(self.time_start, timezone.utc) if self.time_start else now

    def _decision(self, exc: BaseException) -> RetryIn | GiveUp | None:
        """The task's retry policy's decision on this attempt failing with ``exc``; ``None``
        without a policy."""
        policy = getattr(self.task, "retry_policy", None)
        return decide(policy, self._attempt_state(exc)) if policy else None

    def _attempt_state(self, exc: BaseException) -> AttemptState:
        context = self._context
        return AttemptState.starting_at(
            task_name=self.name,
            task_id=self.id,
            attempt=int(context.retries or 0) + 1,
            exception=exc,
            history=History.from_headers(self.message.headers),
            started=self._started(),
            now=datetime.now(timezone.utc),
        )

    def _envelope(
        self, exc: BaseException, exc_info: ExceptionInfo, reason: Reason
    ) -> dict[str, Any]:
        message = self.message
        context: Mapping[str, Any] = self.request_dict
        failed = _failed_message(message, self.id, self.name, self.args, self.kwargs)
        # A stand-in Celery sent back for an exception it could not pickle is described as the
        # class the task raised, with the stand-in's arguments.
        raised = _reason.as_raised(exc, getattr(exc_info, "type", None))
        final = self._final_attempt(raised)
        patterns = redact_patterns(self.task.app)
        return build_envelope(
            failed,
            reason=reason,
            exception=raised,
            exception_type=_type_name(raised),
            traceback=str(exc_info.traceback or ""),
            history=History.from_headers(message.headers),
            final=final,
            dead_lettered_at=datetime.now(timezone.utc),
            canvas=_canvas(context, self._payload),
            redact_patterns=patterns,
        )


def redeliveries(headers: Mapping[str, Any] | None) -> int:
    """How often a message has come back after losing its worker.

    The higher of the library's ``resilient_redeliveries`` header and RabbitMQ's
    ``x-delivery-count`` (quorum queues), so a worker that died whole is counted too where the
    broker counts.

    Example::

        >>> redeliveries({"resilient_redeliveries": 2}), redeliveries({"x-delivery-count": 4})
        (2, 4)
    """
    headers = headers or {}
    counts = [headers.get(REDELIVERIES), headers.get("x-delivery-count")]
    return max(
        (int(c) for c in counts if isinstance(c, int) and not isinstance(c, bool)), default=0
    )


def _failed_message(
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
        exchange=_own_exchange(delivery.get("exchange") or ""),
        routing_key=_own_routing_key(delivery),
        priority=properties.get("priority", delivery.get("priority")),
    )


def _envelope_or_bare(
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
        return _bare_envelope(message, task_id, task_name, exc, reason)


def _bare_envelope(
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
            "queue": _own_routing_key(delivery),
            "exchange": _own_exchange(delivery.get("exchange") or ""),
            "routing_key": _own_routing_key(delivery),
        },
        "exception": {"type": _type_name(exc), "message": "", "traceback": ""},
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


def _own_exchange(exchange: str) -> str:
    return "" if exchange.startswith("celery_delayed") else exchange


def _own_routing_key(delivery: Mapping[str, Any]) -> str:
    routing_key = str(delivery.get("routing_key") or "")
    if str(delivery.get("exchange") or "").startswith("celery_delayed"):
        return DELAY_PREFIX.sub("", routing_key, count=1)
    return routing_key


def _handles_losses(task: Any) -> bool:
    return hasattr(task, "max_redeliveries")


def _exception_info(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


def _unwrap(exc: BaseException) -> BaseException:
    if isinstance(exc, ExceptionWithTraceback):  # how a pool child's exception arrives
        inner: BaseException = exc.exc
        return inner
    return exc


def _type_name(exc: BaseException) -> str:
    if isinstance(exc, UnpickleableExceptionWrapper):
        return f"{exc.exc_module}.{exc.exc_cls_name}"
    return exception_type_name(exc)


def _canvas(context: Mapping[str, Any], payload: Any) -> dict[str, Any]:
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
