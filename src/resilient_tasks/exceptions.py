"""Exceptions that users raise (``RetryAfter``, ``Permanent``) or catch (``ConfigurationError``)."""

from __future__ import annotations

from datetime import timedelta

from ._seconds import to_seconds

__all__ = ["ConfigurationError", "Permanent", "RetryAfter"]


class ConfigurationError(ValueError):
    """A task or policy option is invalid.

    Raised when a :class:`~resilient_tasks.RetryPolicy` is constructed with a bad value, or when
    a task class built on :class:`~resilient_tasks.ResilientTask` is created with a bad option:
    at import, or at the latest when the Celery app is finalized (worker start), never when the
    task first runs. The message names the task, the option and the fix.

    Example::

        >>> from resilient_tasks import ConfigurationError, RetryPolicy
        >>> try:
        ...     RetryPolicy(max_attempts=0)
        ... except ConfigurationError as exc:
        ...     print(exc)
        RetryPolicy: max_attempts must be a whole number >= 1, or None for no cap; got 0
    """


class RetryAfter(Exception):
    """Retry this task after exactly ``seconds``, e.g. a server's ``Retry-After``.

    The delay replaces the policy's computed backoff for this attempt only. The policy's
    ``max_attempts`` and ``max_elapsed`` still apply, and ``give_up_on`` / ``Permanent`` still
    win. ``RetryAfter`` asks for a retry even when ``retry_on`` does not list it: raising it is
    an explicit request. ``seconds`` may be a number (``0`` means retry at once) or a
    :class:`~datetime.timedelta`.

    Example::

        >>> from resilient_tasks import RetryAfter
        >>> exc = RetryAfter(1.5, "rate limited by the billing API")
        >>> exc.seconds
        1.5

    In a task::

        response = session.post(url)
        if response.status_code == 429:
            raise RetryAfter(float(response.headers["Retry-After"]))
    """

    def __init__(self, seconds: float | timedelta, message: str = "") -> None:
        try:
            value = to_seconds(seconds)
        except TypeError:
            message = f"RetryAfter: seconds must be a finite number, got {seconds!r}"
            raise TypeError(message) from None
        if value < 0:
            raise ValueError(f"RetryAfter: seconds must be >= 0, got {seconds!r}")
        self.seconds = value
        self.message = message
        super().__init__(self.seconds, message)

    def __str__(self) -> str:
        text = f"retry after {self.seconds:g}s"
        return f"{text}: {self.message}" if self.message else text


class Permanent(Exception):
    """Give up now: no retry, whatever ``retry_on`` says; the failure is terminal.

    Wrap the real cause so it stays visible in the result backend, the logs and (with
    dead-lettering) the dead-letter envelope. ``Permanent`` found anywhere in the exception chain
    stops retrying.

    Example::

        >>> from resilient_tasks import Permanent
        >>> try:
        ...     raise Permanent(KeyError("customer 42 was deleted"))
        ... except Permanent as exc:
        ...     print(repr(exc.cause))
        KeyError('customer 42 was deleted')

    In a task::

        try:
            customer = api.get_customer(customer_id)
        except NotFound as exc:
            raise Permanent(exc) from exc
    """

    def __init__(self, cause: BaseException | str) -> None:
        self.cause = cause
        super().__init__(cause)
        if isinstance(cause, BaseException) and self.__cause__ is None:
            self.__cause__ = cause

    def __str__(self) -> str:
        if isinstance(self.cause, BaseException):
            return f"{type(self.cause).__name__}: {self.cause}"
        return str(self.cause)
