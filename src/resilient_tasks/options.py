"""Validation of task options, run once when a task class is created.

Each mixin validates the options it owns from its ``__init_subclass__``; the helpers here build
the one kind of message they all raise: the task, the option, the value, and the fix.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping

from ._seconds import to_seconds
from .exceptions import ConfigurationError

__all__ = [
    "CELERY_TASK_OPTIONS",
    "check_before",
    "check_bool",
    "check_count",
    "check_exception_types",
    "check_hook",
    "check_no_misspelt_options",
    "check_seconds",
    "invalid",
    "task_label",
]

#: Celery's own task options, for spotting a misspelt one.
CELERY_TASK_OPTIONS = frozenset(
    {
        "acks_late",
        "acks_on_failure_or_timeout",
        "autoretry_for",
        "default_retry_delay",
        "dont_autoretry_for",
        "expires",
        "ignore_result",
        "max_retries",
        "priority",
        "queue",
        "rate_limit",
        "reject_on_worker_lost",
        "retry_backoff",
        "retry_backoff_max",
        "retry_jitter",
        "retry_kwargs",
        "retry_on_worker_lost",
        "send_events",
        "serializer",
        "soft_time_limit",
        "store_errors_even_if_ignored",
        "throws",
        "time_limit",
        "track_started",
        "trail",
        "typing",
    }
)

#: The methods a task overrides to hear of its life, which a misspelt option may mean too.
HOOKS = frozenset(
    {
        "after_return",
        "before_start",
        "on_failure",
        "on_give_up",
        "on_retry",
        "on_soft_time_limit",
        "on_success",
    }
)


def task_label(cls: type) -> str:
    """The name a message uses for a task class: its Celery name, else its dotted path."""
    name = cls.__dict__.get("name")
    if isinstance(name, str) and name:
        return name
    return f"{cls.__module__}.{cls.__qualname__}"


def invalid(cls: type, option: str, value: object, problem: str) -> ConfigurationError:
    """The error for option ``option`` of task ``cls`` holding ``value``."""
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ConfigurationError(f"task {task_label(cls)!r}: option {option}={shown}: {problem}")


def check_seconds(cls: type, option: str, *, allow_zero: bool = False) -> float | None:
    """``None``, or a finite number of seconds (or timedelta) > 0 (>= 0 with ``allow_zero``)."""
    value = getattr(cls, option, None)
    if value is None:
        return None
    bound = ">= 0" if allow_zero else "> 0"
    try:
        seconds = to_seconds(value)
    except TypeError:
        seconds = -1.0
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise invalid(cls, option, value, f"expected a number of seconds {bound}, or None")
    return seconds


def check_count(cls: type, option: str) -> None:
    """``None`` or a whole number >= 0."""
    value = getattr(cls, option, None)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(cls, option, value, "expected a whole number >= 0, or None")


def check_bool(cls: type, option: str, *, allow_none: bool = True) -> None:
    """``True`` / ``False`` (or ``None``, meaning Celery's app-wide setting)."""
    value = getattr(cls, option, None)
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        none = ", or None for the app's setting" if allow_none else ""
        raise invalid(cls, option, value, f"expected True or False{none}")


def check_exception_types(cls: type, option: str) -> tuple[type[BaseException], ...]:
    """A tuple or list of exception classes."""
    value = getattr(cls, option, None) or ()
    if not isinstance(value, list | tuple) or not all(
        isinstance(item, type) and issubclass(item, BaseException) for item in value
    ):
        raise invalid(
            cls, option, value, "expected a tuple of exception classes, e.g. (ConnectionError,)"
        )
    return tuple(value)


def check_no_misspelt_options(cls: type, known: Iterable[str]) -> None:
    """Refuse a class attribute that no base defines and that is one typo from a known option.

    Celery lets any keyword of ``@app.task`` become a task attribute, so ``retry_polcy=...`` would
    otherwise be silently ignored. Attributes far from every option name stay allowed.
    """
    known = frozenset(known)
    own: Mapping[str, object] = cls.__dict__
    # Looked up in the bases' own namespaces, never with hasattr/getattr: reading celery.Task's
    # ``app`` class property binds the class it is read on, and a bound base makes every task
    # class created from it skip Celery's first bind (annotations, its own request stack).
    inherited = {name for base in cls.__mro__[1:] for name in vars(base)}
    for attr in own:
        if attr.startswith("_") or attr in known or attr in inherited:
            continue
        close = difflib.get_close_matches(attr, known | HOOKS, n=1, cutoff=0.8)
        if close:
            raise invalid(cls, attr, own[attr], f"unknown option; did you mean {close[0]}?")


def check_hook(cls: type, hook: str, argument: str) -> None:
    """Refuse a function set as ``hook`` (in the class body, or as ``@app.task(hook=fn)``) that
    cannot be called as the method it becomes: ``hook(task, argument)``."""
    value = cls.__dict__.get(hook)
    if not inspect.isfunction(value):
        return
    try:
        inspect.signature(value).bind(cls, argument)
    except TypeError:
        raise invalid(
            cls,
            hook,
            value,
            f"a hook is called as a method, {hook}(task, {argument}), so {value.__name__} must "
            f"take (task, {argument}); or define it on a base class: "
            f"class MyTask(ResilientTask): def {hook}(self, {argument}): ...",
        ) from None


def check_before(cls: type, first: type, then: type, consequence: str) -> None:
    """Refuse a class whose MRO puts ``then`` before ``first``: ``first``'s methods would never
    run. ``consequence`` says what would go wrong."""
    mro = cls.__mro__
    if first in mro and then in mro and mro.index(then) < mro.index(first):
        raise invalid(
            cls,
            "bases",
            tuple(b.__name__ for b in cls.__bases__),
            f"{then.__name__} comes before {first.__name__}, so {consequence}; list "
            f"{first.__name__} first: class MyTask({first.__name__}, ..., {then.__name__})",
        )
