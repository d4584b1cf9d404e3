"""The library's own occurrences, for observers: a retry scheduled, a dead letter published, a
time limit or a lost worker settled. Celery has no signal for these.

Emitting costs one truthiness check when nobody listens. A listener that raises is logged and
never disturbs the task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Listener", "emit", "listeners"]

logger = logging.getLogger(__name__)

#: ``listener(event_name, fields)``.
Listener = Callable[[str, Mapping[str, Any]], None]

#: The registered listeners; :func:`resilient_tasks.observability.connect` adds one.
listeners: list[Listener] = []


def emit(event: str, **fields: Any) -> None:
    """Tell every listener that ``event`` happened."""
    for listener in listeners:
        try:
            listener(event, fields)
        except Exception:
            logger.exception("resilient_tasks: event listener %r raised on %s", listener, event)
