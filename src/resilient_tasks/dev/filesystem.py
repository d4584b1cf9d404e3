"""Kombu's ``filesystem://`` transport with writes no reader can see half-done: a broker for
development, examples and tests that needs no server.

Kombu's own ``filesystem`` transport creates a message's file and then writes it, and its
reader moves files away without taking their lock (`kombu#1551
<https://github.com/celery/kombu/issues/1551>`_). A worker that polls while another process
writes can take the empty or partial file: the consumer dies on a ``JSONDecodeError`` and the
message is gone. With a prefork worker there are always several writers (the pool children
publishing retries, dead letters and results, and the main process), so it happens, if rarely.

:class:`Transport` writes each message under a name readers do not match and renames it into
place once complete (``os.replace`` is atomic within one filesystem), so a reader finds whole
messages or none. Everything else is Kombu's transport, unchanged: the same folders, options,
file names and polling. Workers and clients on one folder should all use it.

Example::

    from celery import Celery
    from resilient_tasks.dev.filesystem import TRANSPORT, transport_options

    app = Celery("proj", broker="filesystem://")
    app.conf.broker_transport = TRANSPORT
    app.conf.broker_transport_options = transport_options("/tmp/proj-broker")

It is not a production broker: messages live in one folder on one machine, and nothing is
redelivered if a worker dies holding one. Use RabbitMQ or Redis for that.
"""

from __future__ import annotations

import os
import uuid
from contextlib import suppress
from pathlib import Path
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps

__all__ = ["TRANSPORT", "Channel", "Transport", "transport_options"]

#: The ``broker_transport`` setting that selects :class:`Transport`.
TRANSPORT = f"{__name__}:Transport"

#: What a message file's name ends with while it is being written. The name holds no queue
#: (``.<queue>.msg``), so no version of Kombu's reader takes it: Kombu 5.3 matches any name
#: that contains ``.<queue>.msg``, later versions the part after the first dot.
_PARTIAL = ".partial"


class Channel(filesystem.Channel):
    """Kombu's filesystem channel, publishing each message with one atomic rename.

    Example::

        >>> import tempfile
        >>> from kombu import Connection
        >>> with tempfile.TemporaryDirectory() as folder, Connection(
        ...     "filesystem://", transport=Transport, transport_options=transport_options(folder)
        ... ) as conn:
        ...     queue = conn.SimpleQueue("demo")
        ...     queue.put({"hello": "world"})
        ...     queue.get(timeout=1).payload
        {'hello': 'world'}
    """

    # Kombu's two bases name the payload differently (``message``, ``payload``); it is passed
    # positionally, and named as the direct base names it.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        unique = uuid.uuid4()
        final = os.path.join(
            self.data_folder_out, f"{round(monotonic() * 1000)}_{unique}.{queue}.msg"
        )
        partial = os.path.join(self.data_folder_out, f"{unique}{_PARTIAL}")
        try:
            with open(partial, "wb") as fh:
                fh.write(str(dumps(payload)).encode())  # type: ignore[no-untyped-call]
            os.replace(partial, final)
        except OSError as exc:
            with suppress(OSError):  # the partial file may never have been created
                os.remove(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    """Kombu's filesystem transport with :class:`Channel`; select it with
    ``broker_transport = TRANSPORT`` (the broker URL stays ``filesystem://``).

    Example::

        >>> from celery import Celery
        >>> app = Celery("proj", broker="filesystem://")
        >>> app.conf.broker_transport = TRANSPORT
        >>> isinstance(app.connection_for_write().transport, Transport)
        True
    """

    Channel = Channel


def transport_options(
    folder: str | os.PathLike[str], polling_interval: float = 0.1
) -> dict[str, Any]:
    """The ``broker_transport_options`` for a broker in ``folder``, which is created if missing:
    messages and control (broadcast) files all in that one folder, read every
    ``polling_interval`` seconds (Kombu's default is one second, slow for a demo or a test).

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     opts = transport_options(folder, polling_interval=0.05)
        >>> opts["data_folder_in"] == opts["data_folder_out"] == folder
        True
        >>> opts["polling_interval"]
        0.05
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(path),
        "data_folder_out": str(path),
        "control_folder": str(path),
        "polling_interval": polling_interval,
    }
