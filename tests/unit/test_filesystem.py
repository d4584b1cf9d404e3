"""The filesystem transport the examples and the worker tier run on: a reader polling while a
message is being written never takes it half-written, and a write that fails leaves nothing.

Kombu's own transport fails the first test: its reader takes the message file while it is still
empty and the consumer dies on a ``JSONDecodeError`` (kombu#1551).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from kombu.exceptions import ChannelError

from resilient_tasks.dev import filesystem
from resilient_tasks.dev.filesystem import Transport, transport_options


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "broker"


@pytest.fixture
def queue() -> str:
    """A queue name of this test's own: Kombu keeps the bindings it has seen per process."""
    return f"orders-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def connections(folder: Path) -> Iterator[tuple[Connection, Connection]]:
    """A producer's and a consumer's connection on one folder, as two processes would have."""
    opts = transport_options(folder)
    with (
        Connection("filesystem://", transport=Transport, transport_options=opts) as producer,
        Connection("filesystem://", transport=Transport, transport_options=opts) as consumer,
    ):
        yield producer, consumer


def test_a_reader_polling_while_a_message_is_written_finds_it_only_once_it_is_whole(
    connections: tuple[Connection, Connection], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer, consumer = connections
    inbox, outbox = consumer.SimpleQueue(queue), producer.SimpleQueue(queue)
    during_the_write: list[Any] = []
    encode = filesystem.dumps

    def encode_while_a_reader_polls(payload: Any) -> str:
        try:
            during_the_write.append(inbox.get_nowait().payload)
        except inbox.Empty:
            during_the_write.append("nothing")
        return str(encode(payload))

    monkeypatch.setattr(filesystem, "dumps", encode_while_a_reader_polls)
    outbox.put({"order": 42})
    monkeypatch.undo()

    assert during_the_write == ["nothing"]
    assert inbox.get(timeout=1).payload == {"order": 42}


def test_a_write_that_fails_raises_a_channel_error_and_leaves_no_file(
    connections: tuple[Connection, Connection],
    queue: str,
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    producer, consumer = connections
    inbox = consumer.SimpleQueue(queue)

    def disk_full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filesystem.os, "replace", disk_full)
    with pytest.raises(ChannelError, match="Cannot add file"):
        producer.SimpleQueue(queue).put({"order": 42})
    monkeypatch.undo()

    assert [f.name for f in folder.iterdir() if ".msg" in f.name] == []
    with pytest.raises(inbox.Empty):
        inbox.get_nowait()


def test_the_options_put_messages_and_control_files_in_one_folder_it_creates(
    folder: Path,
) -> None:
    opts = transport_options(folder, polling_interval=0.05)

    assert folder.is_dir()
    assert {opts["data_folder_in"], opts["data_folder_out"], opts["control_folder"]} == {
        str(folder)
    }
    assert opts["polling_interval"] == 0.05
