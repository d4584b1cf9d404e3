"""The worker-side half of the library: what runs in the worker's main process.

Celery builds one :class:`celery.worker.request.Request` per message in the main process and
calls its ``on_failure`` when the task failed, before it acknowledges the message.
:class:`ResilientRequest` (the ``Request`` class of every task built on
:class:`~resilient_tasks.DeadLetterMixin`) dead-letters a terminal failure there, so that the
message is acknowledged only once its envelope is on the broker.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded, WorkerLostError
from celery.utils.serialization import UnpickleableExceptionWrapper
from celery.worker.request import Request
from celery.worker.state import task_ready

from . import _reason
from .deadletter import publish_envelope
from .envelope import DEFAULT_REDACT_PATTERNS, FailedMessage, build_envelope
from .history import Attempt, History, exception_type_name

__all__ = ["ResilientRequest"]

logger = logging.getLogger(__name__)

#: The app setting that overrides :data:`~resilient_tasks.envelope.DEFAULT_REDACT_PATTERNS`.
REDACT_SETTING = "resilient_tasks_redact_patterns"
# Not failures of the task (control flow), or failures handled elsewhere.
_NOT_TERMINAL = (Retry, Ignore, Reject, WorkerLostError, TimeLimitExceeded, SystemExit,
                 KeyboardInterrupt, MemoryError)  # fmt: skip


class ResilientRequest(Request):  # type: ignore[misc]
    """Celery's ``Request`` with dead-lettering of terminal failures before the acknowledgement.

    Set as ``Request`` by :class:`~resilient_tasks.DeadLetterMixin`. A task that needs its own
    request class subclasses this one.

    Example::

        from resilient_tasks.request import ResilientRequest

        class AuditedRequest(ResilientRequest):
            def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
                audit(self.id)
                return super().on_failure(exc_info, send_failed_event, return_ok)
    """

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = _unwrap(exc_info.exception)
        task = self.task
        if not getattr(task, "dead_letter", False) or isinstance(exc, _NOT_TERMINAL):
            return super().on_failure(exc_info, send_failed_event, return_ok)
        envelope = self._envelope(exc, exc_info)
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
                else "acks_late is off, so the "
                "message was already acknowledged and this log line is all that remains",
                envelope,
            )
            if task.acks_late:
                task_ready(self)
                self.reject(requeue=True)
                return None
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def _envelope(self, exc: BaseException, exc_info: ExceptionInfo) -> dict[str, Any]:
        message = self.message
        delivery = message.delivery_info or {}
        properties = message.properties or {}
        context: Mapping[str, Any] = self.request_dict
        failed = FailedMessage(
            task_id=self.id,
            task_name=self.name,
            args=self.args,
            kwargs=self.kwargs,
            headers=message.headers or {},
            properties=properties,
            body=message.body,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            exchange=delivery.get("exchange") or "",
            routing_key=delivery.get("routing_key") or "",
            priority=properties.get("priority", delivery.get("priority")),
        )
        now = datetime.now(timezone.utc)
        started = datetime.fromtimestamp(self.time_start, timezone.utc) if self.time_start else now
        final = Attempt.failed(
            int(context.get("retries") or 0) + 1,
            exc,
            hostname=self.hostname or socket.gethostname(),
            delay=None,
            at=started,
        )
        patterns = self.task.app.conf.get(REDACT_SETTING) or DEFAULT_REDACT_PATTERNS
        return build_envelope(
            failed,
            reason=_reason.reason_of(exc),
            exception=exc,
            exception_type=_type_name(exc),
            traceback=str(exc_info.traceback or ""),
            history=History.from_headers(message.headers),
            final=final,
            dead_lettered_at=now,
            canvas=_canvas(context, self._payload),
            redact_patterns=patterns,
        )


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
