"""The exception chain, walked one way for the retry policy and the transient-error classifier.

A failure is rarely alone: ``raise ... from`` and ``except`` blocks link it to the failures
behind it, and libraries wrap the socket error that really happened. Both the policy's
``retry_on`` / ``give_up_on`` and :data:`~resilient_tasks.TRANSIENT_ERRORS` look along that
chain, through :func:`exception_chain`, and test each link with :func:`matches`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeAlias

__all__ = ["MAX_LINKS", "Matcher", "Predicate", "exception_chain", "matches"]

#: A predicate over an exception: ``True`` means "this one matches".
Predicate: TypeAlias = Callable[[BaseException], bool]
#: What ``retry_on`` / ``give_up_on`` hold: exception types and/or predicates.
Matcher: TypeAlias = "type[BaseException] | Predicate"
#: The most links a chain is followed for: a cycle or a runaway wrapper stops there.
MAX_LINKS = 32


def _nothing_wrapped(exc: BaseException) -> Iterable[object]:
    return ()


def exception_chain(
    exc: BaseException, *, wrapped: Callable[[BaseException], Iterable[object]] = _nothing_wrapped
) -> Iterator[BaseException]:
    """``exc`` then its causes and contexts (``__cause__`` first), each once, at most 32.

    A context hidden by ``raise ... from None`` is not followed, as Python's own traceback does.
    ``wrapped`` names further exceptions a link holds (an attribute, an argument); they are
    visited after its cause and context.

    Example::

        >>> try:
        ...     try:
        ...         raise ConnectionResetError("peer")
        ...     except ConnectionResetError as inner:
        ...         raise RuntimeError("sync failed") from inner
        ... except RuntimeError as outer:
        ...     [type(e).__name__ for e in exception_chain(outer)]
        ['RuntimeError', 'ConnectionResetError']
    """
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending and len(seen) < MAX_LINKS:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        # Pushed last is visited first: the cause, then the context, then what the link wraps.
        context = None if current.__suppress_context__ else current.__context__
        for linked in (*wrapped(current), context, current.__cause__):
            if isinstance(linked, BaseException) and id(linked) not in seen:
                pending.append(linked)


def matches(matcher: Matcher, exc: BaseException) -> bool:
    """Whether ``exc`` is an instance of the type ``matcher``, or the predicate says so.

    A predicate that raises propagates: each caller says what that means.
    """
    if isinstance(matcher, type):
        return isinstance(exc, matcher)
    return bool(matcher(exc))
