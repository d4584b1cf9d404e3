"""Kombu's filesystem transport with atomic writes, for the embedded-worker tier.

Kombu's ``filesystem`` transport creates a message file and then writes it, and its reader moves
files away without locking, so a reader can take a half-written message: the consumer then
dies on a ``JSONDecodeError`` and the message is gone. Here a message is written under a
temporary name, which readers do not match, and renamed into place once complete
(``os.replace`` is atomic on one filesystem). Used through the ``broker_transport`` setting.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):  # type: ignore[misc]
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = f"{final}.partial"
        with open(partial, "wb") as fh:
            fh.write(str_to_bytes(dumps(payload)))
        os.replace(partial, final)


class Transport(filesystem.Transport):  # type: ignore[misc]
    Channel = Channel
