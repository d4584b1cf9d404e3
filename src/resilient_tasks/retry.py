"""Where retries happen: :class:`RetryMixin` wires a :class:`~resilient_tasks.RetryPolicy` into
Celery's task call and Celery's own ``Task.retry``.

* A failed attempt of a task with a ``retry_policy`` is handed to
  :func:`~resilient_tasks.policy.decide`; a retry goes through Celery's ``Task.retry``, so
  queue, priority, custom headers, ``link`` / ``link_error``, ``root_id`` and ``parent_id``
  are kept exactly as Celery keeps them.
* Every retry, whatever asked for it (the policy, Celery's ``autoretry_for``, or a hand-written
  ``self.retry()``), records the attempt in the message's history header
  (:mod:`resilient_tasks.history`).
* Nothing is stored on the task instance: what one call needs comes from ``self.request``, the
  message headers and local variables (the attempt's start time is a context variable).
* In a worker whose ``Request`` is :class:`~resilient_tasks.worker.ResilientRequest`, the
  retry's message is published by the worker's **main process**, not the pool child: the child
  hands Celery's retry signature back with the :class:`HandedOverRetry` it raises, and the
  main process publishes it (with publisher confirms) before it acknowledges the message. A
  pool child killed between publishing a retry and reporting it would otherwise leave two
  copies of the task running: the retry it published, and the original, which comes back
  because it was never acknowledged.
"""

from __future__ import annotations

import functools
import logging
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Signature, Task
from celery.exceptions import Reject, Retry
from celery.utils.imports import symbol_by_name
from celery.worker.state import task_ready

from . import _events, _reason, budget, deadletter
from ._steps import HANDED_OVER, StepsMixin, attempt_started
from .classify import TRANSIENT_ERRORS
from .decide import AttemptState, GiveUp, Reason, RetryIn, decide_for
from .history import HEADER, Attempt, History
from .options import (
    check_before,
    check_bool,
    check_count,
    check_exception_types,
    check_seconds,
    invalid,
)
from .policy import RetryPolicy
from .publish import pipeline_for, publish_signature

__all__ = ["HandedOverRetry", "RetryMixin"]

logger = logging.getLogger(__name__)

# Celery's autoretry options, which a retry_policy replaces, and what to use instead.
_AUTORETRY_OPTIONS = {
    "autoretry_for": "list these exceptions in RetryPolicy(retry_on=...)",
    "dont_autoretry_for": "list these exceptions in RetryPolicy(give_up_on=...)",
    "retry_kwargs": "put max_retries in RetryPolicy(max_attempts=max_retries + 1) and the "
    "countdown in RetryPolicy(backoff=...)",
    "retry_backoff": "put the backoff in RetryPolicy(backoff=...)",
    "retry_backoff_max": "put the cap in the wait strategy, e.g. wait_exponential(max=...)",
    "retry_jitter": "use a jittered wait strategy, e.g. wait_random_exponential(...)",
}
# RabbitMQ's dead-lettering headers: copied onto a republished message, RabbitMQ would read the
# retry as a dead-letter cycle (Celery >= 5.5 drops them from its own retries too).
_X_DEATH_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
# Marks a class whose max_retries this mixin derived from its retry_policy.
_DERIVED = "_resilient_max_retries_from_policy"


@dataclass
class _Hold:
    """Set while :meth:`RetryMixin.retry` holds Celery's publish of a retry back for the main
    process: the task whose publish is awaited, and whether it was held."""

    task_id: str
    held: bool = False


_holding: ContextVar[_Hold | None] = ContextVar("resilient_tasks_holding", default=None)


class HandedOverRetry(Retry):  # type: ignore[misc]
    """Celery's ``Retry``, raised by :meth:`RetryMixin.retry` in a pool child when the worker's
    main process publishes the retry (see :mod:`resilient_tasks.retry`).

    It is Celery's exception in every other way (``isinstance(exc, Retry)`` holds, ``sig`` is
    the retry's signature), but it keeps ``sig`` when it is pickled to the main process, which
    Celery's own ``Retry`` leaves behind.

    Example::

        >>> import pickle
        >>> from celery import Celery
        >>> app = Celery(set_as_current=False)
        >>> retry = HandedOverRetry(exc=ConnectionError("reset"), when=5,
        ...                              sig=app.signature("sync", countdown=5))
        >>> pickle.loads(pickle.dumps(retry)).sig["options"]
        {'countdown': 5}
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.message, self.exc, self.when, False, self.sig)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _started(now: datetime) -> datetime:
    """When the running attempt started (``now`` outside a worker's call)."""
    started = attempt_started.get()
    return now if started is None else datetime.fromtimestamp(started, timezone.utc)


class RetryMixin(StepsMixin):
    """Retry failures as a :class:`~resilient_tasks.RetryPolicy` says, through Celery's own retry.

    Combine it with ``celery.Task`` (mixins first), or use
    :class:`~resilient_tasks.ResilientTask`, which includes it.

    Options (class attributes or ``@app.task`` keywords):
        retry_policy: a :class:`~resilient_tasks.RetryPolicy`, or ``None`` (the default) for no
            policy-driven retry. With ``None`` the task keeps Celery's own behaviour:
            ``autoretry_for``, ``retry_backoff``, ``max_retries`` and ``self.retry()`` work as
            on a plain ``celery.Task``, and each retry is still recorded in the history.

    With a policy, ``max_retries`` follows it (``max_attempts - 1``; ``None`` without a cap), so
    a hand-written ``self.retry()`` obeys the same limit; setting ``max_retries`` or
    ``autoretry_for`` beside ``retry_policy`` is refused as ambiguous.

    Example::

        from celery import Celery, Task
        from resilient_tasks import RetryMixin, RetryPolicy

        app = Celery("proj")

        class Retrying(RetryMixin, Task):
            retry_policy = RetryPolicy(retry_on=(ConnectionError,), max_attempts=3)

        @app.task(base=Retrying)
        def ping(host): ...
    """

    retry_policy: RetryPolicy | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_before(
            cls, RetryMixin, Task, "Celery's methods would shadow it and no policy applies"
        )
        policy = getattr(cls, "retry_policy", None)
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise invalid(
                cls,
                "retry_policy",
                policy,
                "expected a resilient_tasks.RetryPolicy(...), or None for no policy-driven retry",
            )
        check_count(cls, "max_retries")
        check_seconds(cls, "default_retry_delay", allow_zero=True)
        check_exception_types(cls, "autoretry_for")
        check_exception_types(cls, "dont_autoretry_for")
        check_seconds(cls, "retry_backoff_max", allow_zero=True)
        check_bool(cls, "retry_jitter")
        backoff = getattr(cls, "retry_backoff", False)
        if not isinstance(backoff, bool):
            check_seconds(cls, "retry_backoff", allow_zero=True)
        retry_kwargs = getattr(cls, "retry_kwargs", None)
        if retry_kwargs is not None and not isinstance(retry_kwargs, dict):
            raise invalid(
                cls, "retry_kwargs", retry_kwargs, "expected a dict of Task.retry options"
            )
        if policy is None:
            if "max_retries" not in cls.__dict__:
                # Not one inherited from a parent's policy: Celery's own, as on a plain Task.
                cls.max_retries = _celery_max_retries(cls)
            setattr(cls, _DERIVED, False)
            return
        _check_no_celery_retry_options(cls)
        cls.max_retries = None if policy.max_attempts is None else policy.max_attempts - 1
        setattr(cls, _DERIVED, True)

    def _step_before(self, request: Any) -> Any:
        policy = self.retry_policy
        if policy is not None and policy.budget is not None and not request.retries:
            budget.count_first_attempt(self, policy.budget)
        return super()._step_before(request)

    def _step_settle(self, exc: Exception) -> None:
        decision = decide_for(self, self._attempt_state(exc))
        if isinstance(decision, RetryIn):
            policy = self.retry_policy
            if (
                policy is None
                or policy.budget is None
                or budget.spend(self, policy.budget, self.request, exc)
            ):
                raise self.retry(exc=exc, countdown=decision.delay) from exc
            _reason.mark(exc, "retry_budget_exhausted")
            return
        _reason.mark(exc, decision.reason)

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Celery's ``Task.retry``, recording this attempt in the message's history header."""
        request = self.request
        limit = self.max_retries if max_retries is None else max_retries
        # Celery raises instead of retrying past max_retries: no retry, so no history or event.
        refused = limit is not None and request.retries + 1 > limit
        if not request.called_directly and not refused:
            countdown = _whole_seconds_if_delayed_natively(self.app, countdown)
            now = _utcnow()
            failure = exc if exc is not None else sys.exc_info()[1]
            attempt = Attempt.failed(
                request.retries + 1,
                failure if failure is not None else Retry("retry requested"),
                hostname=request.hostname,
                delay=_delay_of(countdown, eta, self.default_retry_delay, now),
                at=_started(now),
            )
            history = History.from_headers(request.headers).record(attempt)
            options["headers"] = {
                **without_x_death(request.headers),
                **(options.get("headers") or {}),
                HEADER: history.encode(),
            }
            _events.emit(
                "task_retry_scheduled",
                task=self,
                request=request,
                attempt=attempt,
                delay=attempt.delay,
                exception=failure,
            )
        # The main process publishes the retry when its Request can (a retry that does not
        # throw goes on in the task: Celery's publish stays here).
        hold = throw and not request.called_directly and not request.is_eager
        holding = _Hold(request.id) if hold and _publishes_retries(self.Request) else None
        token = _holding.set(holding) if holding is not None else None
        try:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        except Retry as retry:
            if holding is not None and holding.held:  # Celery's publish was held back
                retry.__class__ = HandedOverRetry
                # What Celery's publish takes from the task it runs in, which the main
                # process has not got.
                sent = retry.sig.options
                sent["parent_id"] = sent.get("parent_id") or request.id
                sent["root_id"] = sent.get("root_id") or request.root_id or request.id
                # Until the call ends: a body that catches it must not lose the retry.
                request.__dict__.setdefault(HANDED_OVER, []).append(retry)
            raise
        except Reject as reject:
            raise _requeue_if_broker_unreachable(reject) from reject.reason
        finally:
            if token is not None:
                _holding.reset(token)

    def apply_async(self, *args: Any, **options: Any) -> Any:
        """Celery's ``apply_async``; within :meth:`retry`, Celery's publish of the retry is held
        back for the worker's main process, which publishes it (see the module docstring)."""
        holding = _holding.get()
        if holding is not None and not holding.held and options.get("task_id") == holding.task_id:
            holding.held = True
            # What Celery's publish returns: code around it (an apply_async override) reads it.
            return self.AsyncResult(holding.task_id)
        return super().apply_async(*args, **options)

    def _step_retries_not_raised(self, request: Any, exc: Exception | None) -> None:
        """Publish here, as Celery publishes in ``Task.retry``, each retry handed to the main
        process that the call does not raise (the body caught it, or raised something else):
        the main process only publishes the retry that reaches it."""
        for retry in request.__dict__.pop(HANDED_OVER):
            if retry is exc:
                continue
            logger.info("resilient_tasks: %s[%s] did not raise the Retry of its self.retry(); "
                        "the pool child publishes the retry", self.name, request.id)  # fmt: skip
            try:
                retry.sig.apply_async()
            except Exception as error:
                reject = _requeue_if_broker_unreachable(Reject(error, requeue=False))
                if reject.requeue:  # the broker could not be reached: the message comes back
                    raise reject from error
                raise

    def _attempt_state(self, exc: BaseException) -> AttemptState:
        request = self.request
        now = _utcnow()
        return AttemptState.of_message(
            task_name=self.name,
            task_id=request.id,
            retries=request.retries,
            headers=request.headers,
            exception=exc,
            started=_started(now),
            now=now,
        )


@functools.cache
def _publishes_retries(request_class: Any) -> bool:
    """Whether the worker ``Request`` class (or its ``module:Name``) publishes the retries its
    pool child raises. Resolved once per class."""
    if isinstance(request_class, str):
        request_class = symbol_by_name(request_class)
    return bool(getattr(request_class, "publishes_retries", False))


def _requeue_if_broker_unreachable(reject: Reject) -> Reject:
    """Celery turns a retry it could not publish into ``Reject(requeue=False)``, which drops the
    message (or hands it to the broker's own dead-lettering). When the publish failed because the
    broker could not be reached, the message is requeued instead: it comes back, and is retried
    from there, once the broker answers again. Anything else is left as Celery raised it."""
    cause = reject.reason
    if reject.requeue or not requeues(cause):
        return reject
    logger.warning(
        "resilient_tasks: could not publish the retry (%s: %s); the message is requeued",
        type(cause).__name__,
        cause,
    )
    return Reject(cause, requeue=True)


def requeues(error: object, *, acks_late: bool = True) -> bool:
    """The one rule for a retry that could not be published: requeue the message (it comes
    back, and is retried from there) when the broker could not be reached, and the message is
    still unacknowledged (``acks_late``); anything else fails the task."""
    return acks_late and isinstance(error, BaseException) and TRANSIENT_ERRORS(error)


def _check_no_celery_retry_options(cls: type) -> None:
    """With a retry_policy, Celery's own retry options would be a second, conflicting policy."""
    if "max_retries" in cls.__dict__:
        raise invalid(
            cls,
            "max_retries",
            cls.__dict__["max_retries"],
            "the task also sets retry_policy; use RetryPolicy(max_attempts=...) instead "
            "(max_attempts counts the first attempt: max_retries + 1)",
        )
    for option, fix in _AUTORETRY_OPTIONS.items():
        value = getattr(cls, option, None)
        if option in cls.__dict__ or (option.endswith("autoretry_for") and value):
            raise invalid(cls, option, value, f"the task also sets retry_policy; {fix}")


def _celery_max_retries(cls: type) -> Any:
    """The max_retries the nearest base sets itself, skipping values derived from a policy."""
    for klass in cls.__mro__[1:]:
        if "max_retries" in klass.__dict__ and not klass.__dict__.get(_DERIVED, False):
            return klass.__dict__["max_retries"]
    return None


def without_x_death(headers: dict[str, Any] | None) -> dict[str, Any]:
    """``headers`` without RabbitMQ's dead-lettering headers, for a message published anew."""
    return {k: v for k, v in (headers or {}).items() if k not in _X_DEATH_HEADERS}


def _whole_seconds_if_delayed_natively(app: Any, countdown: float | None) -> float | None:
    """Celery >= 5.5 delays messages for quorum queues through RabbitMQ (native delayed
    delivery) in whole seconds and refuses a delay between 0 and 1 s, which would reject the
    retry: round such a delay up to 1 s there."""
    if countdown is None or not 0 < countdown < 1:
        return countdown
    try:
        from celery.utils.quorum_queues import detect_quorum_queues
    except ImportError:  # Celery < 5.5: no native delayed delivery
        return countdown
    connection = app.producer_pool.connections.connection
    if detect_quorum_queues(app, connection.transport.driver_type)[0]:
        return 1.0
    return countdown


def _delay_of(
    countdown: float | None, eta: datetime | None, default: float | None, now: datetime
) -> float | None:
    if countdown is not None:
        return float(countdown)
    if eta is not None:
        moment = eta if eta.tzinfo else eta.replace(tzinfo=timezone.utc)
        return max(0.0, (moment - now) / timedelta(seconds=1))
    return None if default is None else float(default)


# -- in the worker's main process ---------------------------------------------------------------


def publish_retry(request: Any, retry: HandedOverRetry) -> bool:
    """Publish the retry the pool child raised (with confirms) for the worker's ``request``;
    False when it could not be published and the message was settled otherwise: requeued
    when the broker could not be reached (:func:`requeues`), else failed for good
    (dead-lettered, reason ``exception``, the publish error as the exception)."""
    task = request.task
    try:
        publish_signature(task.app, Signature.from_dict(dict(retry.sig), app=task.app))
    except Exception as error:
        requeue = requeues(error, acks_late=bool(task.acks_late))
        logger.exception("resilient_tasks: could not publish the retry of %s[%s]; %s",
                         request.name, request.id, "the message is requeued" if requeue
                         else "failing it for good")  # fmt: skip
        task_ready(request)
        request._resilient_settled = True
        if requeue:
            request.reject(requeue=True)
        else:
            deadletter.fail_for_good(request, error, "exception")
        return False
    return True


def publish_retry_then(request: Any, retry: HandedOverRetry, then: Any) -> None:
    """:func:`publish_retry`, then ``then()`` if it was published; through the worker's
    :class:`~resilient_tasks.publish.ConfirmPipeline` where it runs (``then`` once the confirm
    arrives), else at once."""
    pipeline = pipeline_for(request.task.app)

    def synchronously() -> None:
        if publish_retry(request, retry):
            then()

    if pipeline is None:
        synchronously()
        return
    app = request.task.app
    pipeline.submit(
        lambda producer: publish_signature(
            app, Signature.from_dict(dict(retry.sig), app=app), producer=producer
        ),
        then,
        synchronously,
        comes_back=bool(request.task.acks_late),
    )


def retry_from_worker(request: Any, exc: BaseException, delay: float) -> None:
    """Retry the worker's ``request`` after ``delay`` seconds, from the main process (a hard
    time limit the policy retries): the attempt recorded, the retry published, then the ack."""
    context = request._context
    attempt = Attempt.in_worker(request, exc, delay=delay)
    history = History.from_headers(request.message.headers).record(attempt)
    headers = {**without_x_death(context.headers), HEADER: history.encode()}
    if not republish(request, headers, countdown=delay, retries=int(context.retries or 0) + 1):
        return
    _events.emit(
        "task_retry_scheduled", request=request, attempt=attempt, delay=delay, exception=exc
    )
    request.task.backend.mark_as_retry(request.id, exc, request=context)
    request.acknowledge()


def republish(
    request: Any,
    headers: dict[str, Any],
    countdown: float | None = None,
    retries: int | None = None,
) -> bool:
    """Publish the worker's ``request`` again (same id, queue, priority, links) with
    ``headers``, with publisher confirms; on failure requeue the original and return False."""
    options: dict[str, Any] = {"headers": headers}
    if countdown is not None:
        options["countdown"] = countdown
    if retries is not None:
        options["retries"] = retries
    task = request.task
    try:
        signature = task.signature_from_request(
            request._context, request.args, request.kwargs, **options
        )
        publish_signature(task.app, signature)
    except Exception:
        logger.exception(
            "resilient_tasks: could not republish %s[%s]; the message is requeued",
            request.name,
            request.id,
        )
        request.reject(requeue=True)
        return False
    return True


def give_up_reason(request: Any, exc: BaseException, exc_info: ExceptionInfo) -> Reason:
    """Why the task of the worker's ``request`` gave up: the reason its pool child recorded on
    the exception, else the child's decision made again here.

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
    task = request.task
    if not isinstance(task, RetryMixin):  # nothing decided in the child: nothing to repeat
        return "exception"
    try:
        raised = _reason.as_raised(exc, getattr(exc_info, "type", None))
        decision = decide_for(task, AttemptState.in_worker(request, raised))
    except Exception:
        logger.warning("resilient_tasks: could not tell why %s[%s] gave up; dead-lettering "
                       "it with reason 'exception'", request.name, request.id,
                       exc_info=True)  # fmt: skip
        return "exception"
    # A retry here means the child saw what this process cannot (the exception's chain, a
    # jittered delay past max_elapsed): why it gave up is unknown.
    return decision.reason if isinstance(decision, GiveUp) else "exception"
