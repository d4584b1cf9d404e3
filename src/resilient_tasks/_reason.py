"""The give-up reason travels from the pool child to the main process on the exception itself.

The child, which made the retry decision, stores the reason in the exception's ``__dict__``;
Celery pickles the exception (with its ``__dict__``) back to the worker's main process, where
the dead-letter envelope is built. Some exceptions arrive without it: one Celery cannot pickle
is replaced by a stand-in (the nearest base class that pickles, or an
``UnpickleableExceptionWrapper`` naming the class), and one whose ``__reduce__`` leaves its
``__dict__`` behind loses it. :func:`recorded` tells those apart (``None``) and
:func:`as_raised` rebuilds what the task raised, so the main process can make the decision
again (:meth:`resilient_tasks.worker.ResilientRequest.on_failure`).
"""

from __future__ import annotations

import importlib
from contextlib import suppress
from typing import cast

from celery.utils.serialization import UnpickleableExceptionWrapper

from .decide import Reason

_ATTRIBUTE = "_resilient_tasks_reason"


def mark(exc: BaseException, reason: Reason) -> None:
    """Record why ``exc`` ended the task."""
    with suppress(AttributeError):  # no __dict__ to store it in
        exc.__dict__[_ATTRIBUTE] = reason


def recorded(exc: BaseException) -> Reason | None:
    """The reason :func:`mark` recorded, or ``None`` when ``exc`` carries none."""
    reason = getattr(exc, "__dict__", {}).get(_ATTRIBUTE)
    return None if reason is None else cast(Reason, reason)


def reason_of(exc: BaseException) -> Reason:
    """The reason :func:`mark` recorded, or ``"exception"``."""
    return recorded(exc) or "exception"


def as_raised(exc: BaseException, exc_type: object = None) -> BaseException:
    """What the pool child raised, as near as the worker's main process can rebuild it.

    ``exc`` is the exception that came back and ``exc_type`` the type its ``ExceptionInfo``
    names: Celery sends the raised class there whenever the class itself pickles, even when the
    instance did not. For a stand-in (see the module docstring) the result is an instance of the
    raised class, found as ``exc_type`` or by importing the module and name an
    ``UnpickleableExceptionWrapper`` holds, made without its ``__init__`` (which may be what
    could not be repeated) and given the stand-in's ``args`` (and, for a base-class stand-in,
    its attributes). Its ``__cause__`` and ``__context__`` are gone: pickle never carries them.
    ``exc`` itself when it is no stand-in, or when the class cannot be found or instantiated.
    Never raises.

    Example::

        >>> class Unpicklable(ConnectionError):
        ...     def __init__(self, code, detail):
        ...         super().__init__(f"{code}: {detail}")
        >>> stand_in = ConnectionError("503: unavailable")  # what Celery sends back instead
        >>> rebuilt = as_raised(stand_in, Unpicklable)
        >>> type(rebuilt).__name__, rebuilt.args
        ('Unpicklable', ('503: unavailable',))
    """
    try:
        cls = _raised_class(exc, exc_type)
        if cls is None or isinstance(exc, cls):
            return exc
        if isinstance(exc, UnpickleableExceptionWrapper):
            return _instance(cls, tuple(exc.exc_args or ())) or exc
        rebuilt = _instance(cls, tuple(exc.args))
        if rebuilt is None:
            return exc
        with suppress(Exception):
            rebuilt.__dict__.update(vars(exc))
        return rebuilt
    except Exception:  # whatever the classes do, the caller gets an exception back
        return exc


def _raised_class(exc: BaseException, exc_type: object) -> type[BaseException] | None:
    if isinstance(exc, UnpickleableExceptionWrapper):
        module, name = exc.exc_module, exc.exc_cls_name
        if (
            _is_exception_class(exc_type)
            and getattr(exc_type, "__module__", None) == module
            and getattr(exc_type, "__name__", None) == name
        ):
            return cast("type[BaseException]", exc_type)
        return _imported(module, name)
    if _is_exception_class(exc_type) and issubclass(cast(type, exc_type), type(exc)):
        return cast("type[BaseException]", exc_type)  # a base-class stand-in
    return None


def _imported(module: object, name: object) -> type[BaseException] | None:
    """The class ``module.name``, importing the module as unpickling it would."""
    if not (isinstance(module, str) and isinstance(name, str)):
        return None
    try:
        found = getattr(importlib.import_module(module), name)
    except Exception:
        return None
    return cast("type[BaseException]", found) if _is_exception_class(found) else None


def _is_exception_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseException)


def _instance(cls: type[BaseException], args: tuple[object, ...]) -> BaseException | None:
    """An instance of ``cls`` holding ``args``, without running ``cls.__init__``."""
    for new_args in (args, ()):
        try:
            made = cls.__new__(cls, *new_args)
        except Exception:
            continue
        if isinstance(made, cls):
            with suppress(Exception):
                made.args = args
            return made
    return None
