"""The one ``__call__`` every mixin of the library shares: what happens around a task's body.

Each mixin contributes a step (a method below, a no-op here) instead of a ``__call__`` layer of
its own, so a task built on any combination of them pays for one call frame whatever the order
of its bases, and the steps always run in the same order:

1. ``_step_bind`` (:class:`~resilient_tasks.ObservabilityMixin`): the task's identity in
   structlog's contextvars, undone by ``_step_unbind``;
2. the body; then, if it raised (``Retry``, ``Ignore`` and ``Reject`` are Celery's control flow,
   not failures):
3. ``_step_soft_time_limit`` (:class:`~resilient_tasks.TimeLimitMixin`): cleanup when the soft
   limit struck;
4. ``_step_settle`` (:class:`~resilient_tasks.RetryMixin`): the policy's decision; a retry is
   scheduled through ``Task.retry`` (which raises ``Retry``), a terminal failure is marked with
   its reason;
5. ``_step_retried`` or ``_step_gave_up`` (:class:`~resilient_tasks.FailureHooksMixin`): the hooks.

``_step_retries_not_raised`` (:class:`~resilient_tasks.RetryMixin`) runs only when the call
handed a retry to the worker's main process and that retry is not what leaves the body (the
body caught it): the retry is then published where Celery would have published it.

Under the worker's tracer the body is called as Celery calls a task without a ``__call__`` of its
own: ``self.run`` with the request the tracer pushed. ``Task.__call__`` (which pushes a second
copy of the request) runs only when the task is called as a function, or when a base class
further along the MRO has a ``__call__`` of its own, which is then called as before.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

if TYPE_CHECKING:
    from celery import Task as _TaskBase
else:
    _TaskBase = object

#: Where a retry handed to the worker's main process (see :mod:`resilient_tasks.retry`) waits,
#: in the running request, until the call ends.
HANDED_OVER = "resilient_handed_over"
#: When the running attempt started (``time.time()``), for the history and the deadline.
attempt_started: ContextVar[float | None] = ContextVar(
    "resilient_tasks_attempt_started", default=None
)
#: The id of the request whose steps are running: a task the body calls as a plain function
#: (itself, recursively) sees that same request and must be a plain call, not a second attempt.
_running_id: ContextVar[str | None] = ContextVar("resilient_tasks_running_id", default=None)
# Celery's control-flow exceptions: never a failure.
_CONTROL = (Ignore, Reject)


def _next_call_is_celerys(cls: type) -> bool:
    """Whether the first ``__call__`` after :class:`StepsMixin` in ``cls``'s MRO is
    ``celery.Task``'s own (so the body can be called directly under the tracer)."""
    mro = cls.__mro__
    for klass in mro[mro.index(StepsMixin) + 1 :]:
        if "__call__" in klass.__dict__:
            return klass is Task
    return False


class StepsMixin(_TaskBase):  # type: ignore[misc]
    """The shared ``__call__`` (see the module docstring); the base of every library mixin."""

    _step_run_directly = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._step_run_directly = _next_call_is_celerys(cls)

    @classmethod
    def on_bound(cls, app: Any) -> None:
        super().on_bound(app)
        # The worker serves Prometheus metrics if the app names a port (resilient_tasks.metrics).
        from .metrics import MetricsStep

        app.steps["worker"].add(MetricsStep)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Kept short on purpose: billiard copies the position table of every frame of a failed
        # task's traceback into what the pool child sends its main process (the bigger this
        # function's bytecode, the more every failure and retry costs), so the handling of a
        # raised exception lives in _step_raised.
        request = self.request
        if request.called_directly or request.id == _running_id.get():
            # A plain function call, outside a task or nested inside the run of this very
            # request: Celery's own (which pushes the call's own request), nothing else.
            return super().__call__(*args, **kwargs)
        body = self.run if self._step_run_directly else super().__call__
        started = self._step_before(request)
        try:
            outcome = body(*args, **kwargs)
        except Exception as exc:
            self._step_raised(exc, request)
            raise
        finally:
            self._step_after(started)
        if HANDED_OVER in request.__dict__:  # the body caught the retry it asked for
            self._step_retries_not_raised(request, None)
        return outcome

    def _step_before(self, request: Any) -> tuple[Token[float | None], Token[str | None], Any]:
        return (
            attempt_started.set(time.time()),
            _running_id.set(request.id),
            self._step_bind(request),
        )

    def _step_after(self, started: tuple[Token[float | None], Token[str | None], Any]) -> None:
        token, running, binding = started
        attempt_started.reset(token)
        _running_id.reset(running)
        if binding is not None:
            self._step_unbind(binding)

    def _step_raised(self, exc: Exception, request: Any) -> None:
        """Run the steps for an exception out of the body; return to let it propagate as it is,
        or raise the ``Retry`` the policy scheduled."""
        if HANDED_OVER in request.__dict__:
            self._step_retries_not_raised(request, exc)
        if isinstance(exc, Retry):  # the body called self.retry() itself
            if isinstance(exc.exc, SoftTimeLimitExceeded):
                self._step_soft_time_limit(exc.exc)
            self._step_retried(exc)
            return
        if isinstance(exc, _CONTROL):
            return
        if isinstance(exc, SoftTimeLimitExceeded):
            self._step_soft_time_limit(exc)
        try:
            self._step_settle(exc)
        except Retry as retry:
            self._step_retried(retry)
            raise
        self._step_gave_up(exc)

    # -- the steps (no-ops here; each mixin overrides its own) ----------------------------------

    def _step_bind(self, request: Any) -> Any:
        """Bind what the call should carry; return what :meth:`_step_unbind` needs, or None."""
        return None

    def _step_unbind(self, binding: Any) -> None:
        """Undo :meth:`_step_bind`."""

    def _step_retries_not_raised(self, request: Any, exc: Exception | None) -> None:
        """The call ends with ``exc`` (``None``: it returned) after it handed retries over in
        ``request`` (under :data:`HANDED_OVER`): settle those that are not ``exc``."""

    def _step_soft_time_limit(self, exc: SoftTimeLimitExceeded) -> None:
        """The soft time limit struck during the body."""

    def _step_settle(self, exc: Exception) -> None:
        """Decide what ``exc`` leads to: raise ``Retry`` for a retry, or return (terminal)."""

    def _step_retried(self, retry: Retry) -> None:
        """A retry was scheduled."""

    def _step_gave_up(self, exc: Exception) -> None:
        """``exc`` ends the task: no retry follows."""
