"""Where dead-lettering happens: :class:`DeadLetterMixin` forwards every terminal failure, as an
envelope (:mod:`resilient_tasks.envelope`), to a dead-letter queue on the same broker.

Both halves are here: the mixin, which the task declares, and :func:`dead_letter` /
:func:`fail_for_good`, which the worker's main process runs from the task's
``Request.on_failure`` (:mod:`resilient_tasks.worker`), where the message exactly as the broker
delivered it is at hand, and *before* Celery acknowledges it:

1. the envelope is published persistent to the dead-letter queue (declared durable), with
   publisher confirms on RabbitMQ: through the worker's
   :class:`~resilient_tasks.publish.ConfirmPipeline`, which goes on with other messages while
   the confirm is on its way, else (and whenever that fails) through Kombu's producer pool,
   waiting for it, retried by Kombu's retry policy on connection errors;
2. only once it is confirmed does Celery go on: it records FAILURE, fires ``link_error`` and
   acknowledges.

If the envelope cannot be published (a nack, a lost connection, retries spent), nothing is lost:
with ``acks_late`` (the default) the message is rejected with requeue and comes back, and the
envelope is logged at error level. With ``acks_late=False`` the message was acknowledged before
it ran, so the log line is all that remains.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from billiard.einfo import ExceptionInfo
from celery import Task, signals
from celery.worker.state import task_ready

from . import _events, _reason
from ._expiry import publishing
from .decide import Reason
from .dlq.registry import record_dead_letter_queue
from .envelope import (
    build_envelope,
    canvas,
    envelope_or_bare,
    failed_message,
    raised_type_name,
    redact_patterns,
)
from .history import Attempt, History
from .hooks import FailureHooksMixin, details_from_worker, give_up
from .options import check_before, check_bool, invalid
from .publish import ConfirmPipelineStep, pipeline_for, publish_envelope

if TYPE_CHECKING:
    from celery import Task as _TaskBase
else:
    _TaskBase = object

__all__ = [
    "DEAD_LETTER_TEMPLATE_FIELDS",
    "DeadLetterMixin",
    "dead_letter",
    "dead_letter_queue_name",
    "dead_letter_then",
    "exception_info",
    "fail_for_good",
]

logger = logging.getLogger(__name__)

#: The fields a ``dead_letter_queue`` template may use.
DEAD_LETTER_TEMPLATE_FIELDS = frozenset({"queue", "task"})


def dead_letter_queue_name(template: str, *, queue: str, task: str) -> str:
    """The dead-letter queue for a task that came from ``queue``.

    Example::

        >>> dead_letter_queue_name("{queue}.dlq", queue="billing", task="billing.sync")
        'billing.dlq'
        >>> dead_letter_queue_name("dead-letters", queue="billing", task="billing.sync")
        'dead-letters'
    """
    return template.format(queue=queue or "celery", task=task)


def _template_fields(template: str) -> set[str]:
    """The fields ``template`` names; a conversion or format spec (``{queue!r}``,
    ``{queue:>10}``) raises ``ValueError``: either would put quotes or padding in a queue name."""
    fields = set()
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if spec or conversion:
            written = (
                f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
            )
            raise ValueError(
                f"{written} formats the name; a field is written plain, as {{{field}}}"
            )
        fields.add(field)
    return fields


class DeadLetterMixin(_TaskBase):  # type: ignore[misc]
    """Forward every terminal failure, with its whole story, to a dead-letter queue.

    Combine it with ``celery.Task`` (mixins first), or use
    :class:`~resilient_tasks.ResilientTask`, which includes it.

    Options (class attributes or ``@app.task`` keywords):
        dead_letter: ``True`` (default) forwards terminal failures; ``False`` does not (the task
            then fails exactly as on a plain ``celery.Task``).
        dead_letter_queue: the queue name, or a template of it with ``{queue}`` (the queue the
            task came from, i.e. its routing key) and ``{task}`` (the task name). Default
            ``"{queue}.dlq"``.

    A terminal failure is one that will not be retried: the retry policy gave up (reason
    ``retries_exhausted``, ``deadline_exceeded``, ``permanent`` or ``exception``), Celery's own
    ``autoretry_for`` ran out, or the task raised without any retry. Retries, ``Ignore`` and
    ``Reject`` are not failures.

    The publishing happens in the worker's main process, through this mixin's ``Request`` class;
    a task that sets its own ``Request`` must subclass
    :class:`resilient_tasks.worker.ResilientRequest`. A message the worker cannot read at all
    (a corrupt body, a content type it does not accept) is dead-lettered too, by this mixin's
    ``Strategy`` (:mod:`resilient_tasks.unreadable`), where Celery would drop it.

    Its messages go without the broker TTL (AMQP ``expiration``) that Celery derives from
    ``expires``: RabbitMQ would drop an expired one unseen, its result ``PENDING`` for ever; the
    worker that receives it marks it ``REVOKED`` instead (:mod:`resilient_tasks._expiry`).

    Example::

        from celery import Celery, Task
        from resilient_tasks import DeadLetterMixin

        app = Celery("proj")

        class DeadLettering(DeadLetterMixin, Task):
            dead_letter_queue = "{queue}.failed"

        @app.task(base=DeadLettering, acks_late=True)
        def export(report_id): ...
    """

    dead_letter: bool = True
    dead_letter_queue: str = "{queue}.dlq"
    Request = "resilient_tasks.worker:ResilientRequest"
    Strategy = "resilient_tasks.unreadable:dead_lettering"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_before(cls, DeadLetterMixin, Task, "celery.Task's Request would replace its own")
        check_bool(cls, "dead_letter", allow_none=False)
        template = getattr(cls, "dead_letter_queue", None)
        if not isinstance(template, str) or not template.strip():
            raise invalid(
                cls, "dead_letter_queue", template, 'expected a queue name such as "{queue}.dlq"'
            )
        try:
            fields = _template_fields(template)
        except ValueError as exc:
            raise invalid(
                cls, "dead_letter_queue", template, f"not a valid template: {exc}"
            ) from None
        unknown = fields - DEAD_LETTER_TEMPLATE_FIELDS
        if unknown:
            raise invalid(
                cls,
                "dead_letter_queue",
                template,
                f"unknown template field {{{sorted(unknown)[0]}}}; the fields are "
                + ", ".join(f"{{{f}}}" for f in sorted(DEAD_LETTER_TEMPLATE_FIELDS)),
            )
        try:  # a format spec or conversion that only fails on a real name, e.g. {queue:d}
            dead_letter_queue_name(template, queue="billing", task="billing.sync")
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise invalid(
                cls, "dead_letter_queue", template, f"not a valid template: {exc}"
            ) from None

    @classmethod
    def on_bound(cls, app: Any) -> None:
        super().on_bound(app)
        # The worker's main process publishes retries and envelopes without waiting for each
        # confirm in turn (RabbitMQ): see resilient_tasks.publish.ConfirmPipeline.
        app.steps["consumer"].add(ConfirmPipelineStep)

    def dead_letter_queue_for(self, queue: str) -> str:
        """The dead-letter queue for a message of this task that came from ``queue``."""
        return dead_letter_queue_name(self.dead_letter_queue, queue=queue, task=self.name)

    def apply_async(self, *args: Any, **options: Any) -> Any:
        """Celery's ``apply_async``, without the broker TTL Celery derives from ``expires``: an
        expired message reaches a worker, which marks the task ``REVOKED``, instead of being
        dropped unseen by RabbitMQ (:mod:`resilient_tasks._expiry`). An ``expiration`` passed
        here is kept."""
        with publishing(self.name, options):
            return super().apply_async(*args, **options)


# -- in the worker's main process ---------------------------------------------------------------


def dead_letter(request: Any, exc: BaseException, exc_info: ExceptionInfo, reason: Reason) -> bool:
    """Publish the envelope of the terminal failure ``exc`` of the worker's ``request``; on
    failure requeue the message (``acks_late``) and return False."""
    return _published(request, exc, reason, *_prepared(request, exc, exc_info, reason))


def dead_letter_then(
    request: Any, exc: BaseException, exc_info: ExceptionInfo, reason: Reason, then: Any
) -> None:
    """:func:`dead_letter`, then ``then()`` if it was dead-lettered; through the worker's
    :class:`~resilient_tasks.publish.ConfirmPipeline` where it runs (``then`` once the confirm
    arrives), else at once."""
    queue, envelope, source = _prepared(request, exc, exc_info, reason)
    pipeline = pipeline_for(request.task.app)

    def synchronously() -> None:
        if _published(request, exc, reason, queue, envelope, source):
            then()

    if pipeline is None:
        synchronously()
        return

    def confirmed() -> None:
        record_dead_letter_queue(request.task.app, queue)  # for the tools; never raises
        _emit_dead_lettered(request, exc, reason, queue, envelope)
        then()

    app = request.task.app
    pipeline.submit(
        lambda producer: publish_envelope(app, queue, envelope, source, producer=producer),
        confirmed,
        synchronously,
        comes_back=bool(request.task.acks_late),
    )


def _prepared(
    request: Any, exc: BaseException, exc_info: ExceptionInfo, reason: Reason
) -> tuple[str, dict[str, Any], str]:
    """The dead-letter queue, the envelope and the queue the message came from."""
    envelope = envelope_or_bare(
        lambda: _envelope(request, exc, exc_info, reason), request.message, request.id,
        request.name, exc, reason,
    )  # fmt: skip
    source = envelope["task"]["queue"]
    return request.task.dead_letter_queue_for(source), envelope, source


def _published(
    request: Any,
    exc: BaseException,
    reason: Reason,
    queue: str,
    envelope: dict[str, Any],
    source: str,
) -> bool:
    task = request.task
    try:
        publish_envelope(task.app, queue, envelope, source)
    except Exception:
        logger.exception(
            "resilient_tasks: could not dead-letter %s[%s] to %r; %s. Envelope: %r",
            request.name,
            request.id,
            queue,
            "the message is requeued"
            if task.acks_late
            else "acks_late is off, so the message was already acknowledged and this log "
            "line is all that remains",
            envelope,
        )
        if task.acks_late:
            task_ready(request)
            request.reject(requeue=True)
            return False
        return True
    record_dead_letter_queue(task.app, queue)  # for the tools; never raises
    _emit_dead_lettered(request, exc, reason, queue, envelope)
    return True


def _emit_dead_lettered(
    request: Any, exc: BaseException, reason: Reason, queue: str, envelope: dict[str, Any]
) -> None:
    _events.emit(
        "task_dead_lettered",
        request=request,
        reason=reason,
        queue=queue,
        exception=exc,
        envelope=envelope,
    )


def fail_for_good(request: Any, exc: BaseException, reason: Reason) -> None:
    """Settle a failure Celery saw outside the task (a hard time limit, a lost worker, a retry
    that could not be published): handlers, envelope, result, hooks, ack."""
    _reason.mark(exc, reason)  # so task_failed, sent below, names the same reason
    einfo = exception_info(exc)
    task = request.task
    if isinstance(task, FailureHooksMixin):
        attempt = Attempt.in_worker(request, exc, delay=None)
        history = History.from_headers(request.message.headers).record(attempt)
        give_up(task, details_from_worker(request, exc, reason, history))
    if getattr(task, "dead_letter", False) and not dead_letter(request, exc, einfo, reason):
        return
    task.backend.mark_as_failure(request.id, exc, request=request._context, store_result=True)
    try:
        task.on_failure(exc, request.id, request.args, request.kwargs, einfo)
    except Exception:
        logger.exception("on_failure of %s[%s] raised", request.name, request.id)
    task.request_stack.push(request._context)
    try:
        signals.task_failure.send(
            sender=task,
            task_id=request.id,
            exception=exc,
            args=request.args,
            kwargs=request.kwargs,
            traceback=einfo.traceback,
            einfo=einfo,
        )
    finally:
        task.request_stack.pop()
    request.acknowledge()


def exception_info(exc: BaseException) -> ExceptionInfo:
    """``exc`` as Celery's ``ExceptionInfo``, with the traceback of raising it here."""
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


def _envelope(
    request: Any, exc: BaseException, exc_info: ExceptionInfo, reason: Reason
) -> dict[str, Any]:
    message = request.message
    context: Mapping[str, Any] = request.request_dict
    failed = failed_message(message, request.id, request.name, request.args, request.kwargs)
    # A stand-in Celery sent back for an exception it could not pickle is described as the
    # class the task raised, with the stand-in's arguments.
    raised = _reason.as_raised(exc, getattr(exc_info, "type", None))
    patterns = redact_patterns(request.task.app)
    return build_envelope(
        failed,
        reason=reason,
        exception=raised,
        exception_type=raised_type_name(raised),
        traceback=str(exc_info.traceback or ""),
        history=History.from_headers(message.headers),
        final=Attempt.in_worker(request, raised, delay=None),
        dead_lettered_at=datetime.now(timezone.utc),
        canvas=canvas(context, request._payload),
        redact_patterns=patterns,
    )
