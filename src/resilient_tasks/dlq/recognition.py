"""What is a dead letter: telling the messages of a queue apart.

A dead letter is an envelope (schema ``resilient_tasks.dead_letter/1``) or a task message the
broker dead-lettered for a failure. Anything else in a dead-letter queue (a live task message, a
message that is not Celery's) is not, and the tools that change things refuse a queue that
holds one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from resilient_tasks._delayed_rabbitmq import TOPOLOGY_EXCHANGE
from resilient_tasks.envelope import broker_dead_letter_envelope, is_envelope

from .model import DeadLetter, _json_body

if TYPE_CHECKING:
    from .readers import _Message

# Queues a delayed message waits in until it is due, and dies in ("expired") on its way to the
# queue it is meant for: Celery's and Kombu's native delayed delivery. A task message whose last
# death was there is a live task on its way, not a dead letter.


def _letter(queue: str, message: _Message, patterns: tuple[str, ...]) -> DeadLetter | None:
    """``message`` as a dead letter; ``None`` when it is not one.

    A dead letter is an envelope (schema ``resilient_tasks.dead_letter/1``) or a task message
    the broker dead-lettered: a protocol-2 task message whose last ``x-death`` is a failure.
    A task message without ``x-death`` is a live task; so is one whose last death was its
    expiry in a delay queue (it waited there until due, and is on its way to its queue)."""
    decoded = _json_body(message.body, message.content_type, message.content_encoding)
    if is_envelope(decoded):
        return DeadLetter(queue, decoded)
    if _is_task(message) and _last_death(message) is not None:
        return DeadLetter(
            queue, broker_dead_letter_envelope(message, decoded, patterns), from_broker=True
        )
    return None


def _is_task(message: _Message) -> bool:
    return "task" in message.headers and "id" in message.headers  # Celery's protocol 2


def _last_death(message: _Message) -> Mapping[str, Any] | None:
    """The newest ``x-death`` entry of a message the broker dead-lettered for a failure;
    ``None`` for any other message (a delayed message's expiry in a delay queue included)."""
    deaths = message.headers.get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], Mapping):
        return None
    death = deaths[0]
    delayed = death.get("reason") == "expired" and any(
        isinstance(name, str) and TOPOLOGY_EXCHANGE.fullmatch(name)
        for name in (death.get("queue"), death.get("exchange"))
    )
    return None if delayed else death


def _described(message: _Message) -> str:
    """What a message that is not a dead letter is, for an error that names it."""
    if _is_task(message):
        what = f"a task message {message.headers.get('task')}[{message.headers.get('id')}]"
        return what if "x-death" not in message.headers else f"{what} on its way from a delay"
    return f"a message of {len(message.body)} bytes ({message.content_type or 'no content type'})"
