"""Private brokers a test may stop and start: a ``redis-server`` with an fsync-always
append-only file, and a RabbitMQ node of its own, each on a free loopback port with its data in
the test's folder. Nothing else uses them, so a test can restart them under its workers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with Connection(url, connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def _missing(*programs: str) -> None:
    absent = [p for p in programs if shutil.which(p) is None]
    if absent:
        reason = f"{', '.join(absent)} not installed here"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
        pytest.skip(reason)


@dataclass
class PrivateServer:
    """A broker of the test's own: ``restart()`` stops it cleanly and starts it again on the
    same data, after ``outage`` seconds down."""

    url: str
    _start: Any
    _stop: Any

    def stop(self) -> None:
        self._stop()

    def start(self) -> None:
        self._start()
        wait_until_up(self.url)

    def restart(self, outage: float = 3.0) -> None:
        self._stop()
        time.sleep(outage)
        self._start()
        wait_until_up(self.url)


@contextmanager
def persistent_redis(folder: Path) -> Iterator[PrivateServer]:
    """A private redis-server with ``--appendonly yes --appendfsync always``."""
    _missing("redis-server", "redis-cli")
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port),
        "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", str(folder),
        "--pidfile", str(folder / "redis.pid"), "--logfile", str(folder / "redis.log"),
    ]  # fmt: skip

    def start() -> None:
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def stop(how: str = "save") -> None:
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", how],
                       timeout=30, check=False, capture_output=True)  # fmt: skip

    server = PrivateServer(f"redis://127.0.0.1:{port}/0", start, stop)
    start()
    wait_until_up(server.url)
    try:
        yield server
    finally:
        stop("nosave")


def _processes_of(node: str) -> set[int]:
    """The processes whose environment names the RabbitMQ node ``node``."""
    marker = f"RABBITMQ_NODENAME={node}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
    return found


@contextmanager
def private_rabbitmq() -> Iterator[PrivateServer]:
    """A RabbitMQ node of its own (no plugins), its data in a new folder under the system's
    temporary folder (the server may run as its own user, who cannot reach pytest's): about
    10 s to start."""
    _missing("rabbitmq-server")
    port, dist = free_port(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="rt-rabbitmq-"))
    (folder / "log").mkdir(exist_ok=True)
    (folder / "mnesia").mkdir(exist_ok=True)
    (folder / "plugins").write_text("[].\n")
    (folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n")
    # The server runs as its own user where the package installs one: it writes here.
    with suppress(KeyError, PermissionError, LookupError):
        shutil.chown(folder, "rabbitmq")
        for path in folder.rglob("*"):
            shutil.chown(path, "rabbitmq")
    node = f"rt-{port}@localhost"
    env = {
        **os.environ,
        "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_DIST_PORT": str(dist),
        "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
        "RABBITMQ_LOG_BASE": str(folder / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "plugins"),
    }
    process: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        with (folder / "out.txt").open("ab") as out:
            node = subprocess.Popen(
                ["rabbitmq-server"], env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        process.append(node)

    def stop() -> None:
        # The start script starts the node in a session of its own (it switches to its
        # user): find the node's processes by the name in their environment.
        running = process.pop()
        ours = _processes_of(node) | {running.pid}
        for pid in ours:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)  # a clean stop: what is durable is kept
        deadline = time.monotonic() + 60
        while (alive := _processes_of(node)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in alive:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            running.wait(10)

    server = PrivateServer(f"amqp://guest:guest@127.0.0.1:{port}//", start, stop)
    start()
    try:
        wait_until_up(server.url, timeout=120)
        yield server
    finally:
        if process:
            stop()
        shutil.rmtree(folder, ignore_errors=True)
