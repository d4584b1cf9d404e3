"""The task's ``Request`` in the worker's main process: where each outcome is handed to the
module of its concern.

Celery builds one :class:`celery.worker.request.Request` per message in the main process and
calls its ``on_timeout`` / ``on_failure`` when an attempt ends badly, before it acknowledges the
message. :class:`ResilientRequest` only dispatches:

* a retry the pool child handed over: published by :func:`resilient_tasks.retry.publish_retry`;
* a hard time limit or a lost worker: settled by :mod:`resilient_tasks.timelimit`;
* a terminal failure: dead-lettered by :func:`resilient_tasks.deadletter.dead_letter`, for the
  reason :func:`resilient_tasks.retry.give_up_reason` gives;

so that the message is acknowledged only once its envelope, or its retry, is on the broker.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded, WorkerLostError
from celery.worker import state
from celery.worker.request import Request

from . import breaker, deadletter, retry, timelimit
from ._delayed_rabbitmq import arrivals, restore_route

__all__ = ["ResilientRequest"]

logger = logging.getLogger(__name__)

_tokens = itertools.count()

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
      (:class:`~resilient_tasks.retry.HandedOverRetry`), with publisher confirms, before
      Celery acknowledges the message: a child killed in between cannot leave the retry and the
      unacknowledged original both running (:mod:`resilient_tasks.retry`);
    * settles a **hard time limit** once, on every Celery version: one retry if the task's
      policy retries ``TimeLimitExceeded``, else one dead letter (reason ``hard_time_limit``);
      the task's ``on_failure`` and ``task_failure`` run once, and the message is acknowledged
      whatever ``acks_on_failure_or_timeout`` / ``acks_on_timeout`` say, so it never comes
      back in a loop (:mod:`resilient_tasks.timelimit`);
    * counts **lost workers** (the pool child died) in the message's ``resilient_redeliveries``
      header (or RabbitMQ's ``x-delivery-count``, whichever is higher): the message is
      republished with the count raised, and once it has come back ``max_redeliveries`` times
      it is dead-lettered (reason ``worker_lost``) instead of run again.

    A task that needs its own request class subclasses this one. The ``exc_info`` its
    ``on_failure`` receives for a failure in the pool child has the exception and the
    traceback as text (``exc_info.traceback``), but no traceback objects (``exc_info.tb`` is
    ``None``): the child keeps those (see :mod:`resilient_tasks._einfo`).

    Example::

        from resilient_tasks.worker import ResilientRequest

        class AuditedRequest(ResilientRequest):
            def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
                audit(self.id)
                return super().on_failure(exc_info, send_failed_event, return_ok)
    """

    #: Set once this message's outcome is settled (republished, retried or dead-lettered).
    _resilient_settled = False
    #: Read by :class:`~resilient_tasks.RetryMixin` in the pool child: retries are published
    #: here, by :meth:`on_failure`, before the message is acknowledged.
    publishes_retries = True

    #: What identifies this message if it came through RabbitMQ's delay queues.
    _resilient_arrival: tuple[Any, ...] | None = None

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        # A message delayed on RabbitMQ arrives from the delay topology's exchange: Celery
        # reads the route it was published with (for a retry's route) from delivery_info.
        if restore_route(message):
            self._resilient_arrival = arrivals.key(message)
            self._resilient_token = next(_tokens)
        super().__init__(message, *args, **kwargs)

    #: Set once this message was found to be a second copy, or was deferred by its task's
    #: open circuit breaker (see :meth:`revoked`): it is settled, and does not run.
    _resilient_copy = False
    #: Set once the task's circuit breaker was asked about this message.
    _resilient_admitted = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Celery's worker makes a subclass per task whose on_success does not call ours: the
        # success is reported to the task's circuit breaker around it.
        own = cls.__dict__.get("on_success")
        if own is not None and not getattr(own, "_resilient_reports", False):
            setattr(cls, "on_success", _reporting_success(own))  # noqa: B010

    def on_success(self, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        if not failed__retval__runtime[0]:  # a failure goes on to on_failure
            breaker.report(self, None)
        return super().on_success(failed__retval__runtime, **kwargs)

    def revoked(self) -> bool:
        # Celery asks this before it hands the message to the pool (its execute_using_pool,
        # which Celery's worker replaces with its own for each task, calls nothing else of
        # ours): the place to drop a second copy of a delayed message (see
        # resilient_tasks._delayed_rabbitmq.Arrivals), and to ask the circuit breaker.
        if self._resilient_copy:
            return True
        arrival = self._resilient_arrival
        if arrival is not None and arrivals.is_copy(arrival, self._resilient_token):
            logger.warning("resilient_tasks: %s[%s] arrived twice from RabbitMQ's delay queues "
                           "(at-least-once dead-lettering); the copy is dropped",
                           self.name, self.id)  # fmt: skip
            self._resilient_arrival = None
            self._resilient_copy = True
            # Forget this copy only: the first, with the same id, may still be running.
            if state.requests.get(self.id) is self:
                del state.requests[self.id]
            state.reserved_requests.discard(self)
            state.active_requests.discard(self)
            self.acknowledge()
            return True
        if super().revoked():
            return True
        if not self._resilient_admitted and state.requests.get(self.id) is self:
            # Asked once, as the message goes to the pool (Celery's execute_using_pool asks
            # here first; the strategy asks before the message is reserved, for an expiring
            # task, which is not yet the time to ask): a task whose circuit breaker is open is
            # deferred on the broker instead, and settled (resilient_tasks.breaker).
            self._resilient_admitted = True
            if not breaker.admit(self):
                self._resilient_copy = True
                return True
        return False

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        if not soft:
            breaker.report(self, TimeLimitExceeded(timeout))
        if soft or not timelimit.handles_losses(self.task):
            return super().on_timeout(soft, timeout)
        return timelimit.settle_hard_time_limit(self, timeout)

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
        breaker.report(self, exc)
        celery_on_failure = functools.partial(
            super().on_failure, exc_info, send_failed_event, return_ok
        )
        if isinstance(exc, retry.HandedOverRetry):
            # Published, then Celery goes on (records the retry, acknowledges the message):
            # at once, or when RabbitMQ confirms it (resilient_tasks.publish.ConfirmPipeline).
            self._resilient_settled = True
            retry.publish_retry_then(self, exc, celery_on_failure)
            return None
        task = self.task
        if timelimit.handles_losses(task) and not state.should_terminate:
            if isinstance(exc, TimeLimitExceeded):
                return timelimit.settle_hard_time_limit(self, exc.args[0] if exc.args else None)
            if isinstance(exc, WorkerLostError) and not (
                self._already_revoked or self._already_cancelled or self._succeeded_before()
            ):
                return timelimit.settle_worker_lost(self, exc, exc_info, celery_on_failure)
        if not getattr(task, "dead_letter", False) or isinstance(exc, _NOT_TERMINAL):
            return super().on_failure(exc_info, send_failed_event, return_ok)
        reason = retry.give_up_reason(self, exc, exc_info)
        self._resilient_settled = True
        deadletter.dead_letter_then(self, exc, exc_info, reason, celery_on_failure)
        return None

    def terminate(self, pool: Any, signal: Any = None) -> Any:
        if self._resilient_settled:
            # The pool process is done with this message, whose outcome is being settled (its
            # publish awaiting a confirm): killing that process would kill another task.
            return None
        return super().terminate(pool, signal)

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> Any:
        if self._resilient_settled:
            return None  # as in terminate
        return super().cancel(pool, signal, emit_retry)

    def _succeeded_before(self) -> bool:
        stored = getattr(self, "_success_was_stored", None)  # Celery >= 5.6
        return bool(stored()) if stored else False


def _reporting_success(on_success: Any) -> Any:
    @functools.wraps(on_success)
    def reporting(self: Any, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        if not failed__retval__runtime[0]:
            breaker.report(self, None)
        return on_success(self, failed__retval__runtime, **kwargs)

    reporting._resilient_reports = True  # type: ignore[attr-defined]
    return reporting


def _unwrap(exc: BaseException) -> BaseException:
    if isinstance(exc, ExceptionWithTraceback):  # how a pool child's exception arrives
        inner: BaseException = exc.exc
        return inner
    return exc
