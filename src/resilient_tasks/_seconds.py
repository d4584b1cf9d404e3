"""Time is normalised once: every option or argument in seconds goes through :func:`to_seconds`."""

from __future__ import annotations

import math
from datetime import timedelta


def to_seconds(value: object) -> float:
    """A finite number of seconds from an int, a float or a timedelta.

    Raises ``TypeError`` for anything else: a bool, a string, NaN, an infinity, or an integer too
    large for a float. The sign is left for the caller to judge.

    Example::

        >>> to_seconds(timedelta(minutes=1)), to_seconds(2)
        (60.0, 2.0)
    """
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number of seconds or a timedelta, got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise TypeError(f"expected a finite number of seconds, got {value!r}")
    return seconds
