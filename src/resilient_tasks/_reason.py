"""The give-up reason travels from the pool child to the main process on the exception itself.

The child, which made the retry decision, stores the reason in the exception's ``__dict__``;
Celery pickles the exception (with its ``__dict__``) back to the worker's main process, where
the dead-letter envelope is built. An exception that cannot carry it (``__slots__``, or one Celery
had to wrap because it cannot be pickled) reads back as ``"exception"``.
"""

from __future__ import annotations

from contextlib import suppress
from typing import cast

from .policy import Reason

_ATTRIBUTE = "_resilient_tasks_reason"


def mark(exc: BaseException, reason: Reason) -> None:
    """Record why ``exc`` ended the task."""
    with suppress(AttributeError):  # an exception type with __slots__ has no __dict__
        exc.__dict__[_ATTRIBUTE] = reason


def reason_of(exc: BaseException) -> Reason:
    """The reason :func:`mark` recorded, or ``"exception"``."""
    return cast(Reason, getattr(exc, "__dict__", {}).get(_ATTRIBUTE, "exception"))
