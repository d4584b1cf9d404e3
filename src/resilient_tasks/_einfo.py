"""What a failed or retried library task sends from its pool child to the worker's main process.

For every failure and every retry, Celery's tracer returns a billiard ``ExceptionInfo`` from the
pool child: the exception, the traceback as text (``traceback``) and the traceback as objects
(``tb``). To make the objects picklable billiard copies every frame, each with its code's whole
bytecode position table (since Python 3.11), so a failure's message grows with every frame of
the stack, Celery's large tracer frame included. The main process unpickles it, and it is
single-threaded: it sets the pace of the whole worker, so what it unpickles for nothing is paid
by every task (measured in docs/benchmark-notes.md).

Nothing in the main process reads the objects: Celery's ``Request`` uses the exception and the
text, and so does :class:`~resilient_tasks.worker.ResilientRequest` for the envelope. The child
has already used them by then (the task's ``on_failure`` / ``on_retry``, ``task_failure`` /
``task_retry`` receivers and Celery's own error log line run before the result is sent). So for
the library's tasks the ``ExceptionInfo`` leaves its frames behind when it is pickled: the main
process gets ``tb = None`` and everything else unchanged. A plain ``celery.Task`` is not touched.
"""

from __future__ import annotations

from typing import Any

from billiard.einfo import ExceptionInfo
from celery import signals

from ._steps import StepsMixin

__all__ = ["SentWithoutFrames", "leave_frames_behind"]


class SentWithoutFrames(ExceptionInfo):  # type: ignore[misc]
    """A billiard ``ExceptionInfo`` that pickles without its traceback objects (``tb``).

    Everything else goes along: ``type``, ``exception``, the traceback text (``traceback``)
    and ``internal``. Where it was built it is unchanged, frames included.

    Example::

        >>> import pickle
        >>> try:
        ...     raise LookupError("record 7 is gone")
        ... except LookupError:
        ...     einfo = SentWithoutFrames()
        >>> einfo.tb is not None
        True
        >>> sent = pickle.loads(pickle.dumps(einfo))
        >>> sent.tb is None, "LookupError: record 7 is gone" in sent.traceback
        (True, True)
    """

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("tb", None)
        return state


def leave_frames_behind(sender: Any = None, einfo: Any = None, **_: Any) -> None:
    """``task_failure`` / ``task_retry`` receiver: a library task's ``ExceptionInfo`` is sent
    to the main process without its frames (see the module docstring).

    Connected when :mod:`resilient_tasks` is imported; other tasks are left as they are.

    Example::

        >>> from celery import Celery
        >>> from resilient_tasks import ResilientTask
        >>> app = Celery(set_as_current=False)
        >>> @app.task(base=ResilientTask, shared=False)
        ... def sync_invoice(invoice_id): ...
        >>> try:
        ...     raise LookupError("gone")
        ... except LookupError:
        ...     einfo = ExceptionInfo()
        >>> leave_frames_behind(sender=sync_invoice, einfo=einfo)
        >>> type(einfo).__name__
        'SentWithoutFrames'
    """
    if type(einfo) is ExceptionInfo and isinstance(sender, StepsMixin):
        einfo.__class__ = SentWithoutFrames


for _signal in (signals.task_failure, signals.task_retry):
    _signal.connect(leave_frames_behind, weak=False, dispatch_uid="resilient_tasks.einfo")
