"""A real ``celery worker`` subprocess for one test, and a client app that talks to it.

:class:`WorkerRunner` starts ``python -m celery -A <module> worker -P prefork`` in its own process
group on the test's own queues, waits until the worker's ``worker_ready`` signal has fired, and
on stop sends SIGTERM (Celery's warm shutdown), then SIGKILL to the whole process group if it
has not exited in time, so no test leaves a worker or a pool child behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from kombu import Queue

from apps.base import ENV_READY_FILE, ENV_SETTINGS, read_log

from .brokers import Broker

TESTS_DIR = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0
#: How long a test's explicit stop waits for a warm shutdown before SIGKILL.
STOP_TIMEOUT = 15.0
#: How long teardown waits. The test has its verdict by then, and a worker on the filesystem
#: transport only notices a signal between 2-second polls, so teardown does not wait for that.
TEARDOWN_GRACE = 1.0


@dataclass
class Worker:
    """A running worker and the client side of the test that started it."""

    process: subprocess.Popen[bytes]
    client: Celery
    queue: str
    queues: list[str]
    log: Path
    output: Path
    settings: dict[str, Any] = field(default_factory=dict)
    module: str = ""
    #: The worker's node name: remote control commands and inspections name it as their
    #: destination, or every worker with remote control on the broker (other tests') answers.
    nodename: str = ""

    def inspect(self, timeout: float = 2.0) -> Any:
        """Celery's ``inspect`` of this worker alone."""
        return self.client.control.inspect(timeout=timeout, destination=[self.nodename])

    def celery(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``celery -A <module> <args>`` as a user would, against this worker's broker."""
        env = {
            **os.environ,
            ENV_SETTINGS: json.dumps(self.settings),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])
            ),
        }
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", self.module, *args],
            env=env,
            input=input,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def attempts(self) -> list[dict[str, Any]]:
        """What each attempt recorded through ``apps.base.record``."""
        return read_log(self.log)

    def send(self, name: str, *args: Any, **options: Any) -> AsyncResult:
        """Send task ``name`` with ``args``; the attempt log is always the last argument."""
        return self.client.send_task(name, args=[*args, str(self.log)], **options)

    def signature(self, name: str, *args: Any, **options: Any) -> Any:
        return self.client.signature(name, args=[*args, str(self.log)], **options)

    def publish_raw(
        self, task: str, body: bytes, content_type: str = "application/json", **headers: Any
    ) -> str:
        """Publish a message for ``task`` to the worker's queue as a client would, but with
        ``body`` as it is and ``headers`` over Celery's protocol 2 headers; return its id."""
        task_id = str(uuid.uuid4())
        queue = self.client.amqp.queues[self.queue]
        protocol = {
            "lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
            "group": None, "retries": 0, "eta": None, "expires": None, "argsrepr": "()",
            "kwargsrepr": "{}", "origin": "test",
        }  # fmt: skip
        with self.client.producer_or_acquire() as producer:
            producer.publish(
                body,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                content_type=content_type,
                content_encoding="utf-8" if content_type == "application/json" else "binary",
                headers={**protocol, **headers},
                declare=[queue],
            )
        return task_id

    def drain(self, queue: str) -> list[Any]:
        """Consume and return every message body now in ``queue`` (e.g. a dead-letter queue)."""
        bodies = []
        with self.client.connection_for_read() as conn:
            bound = Queue(queue, durable=True).bind(conn.default_channel)
            try:
                bound.queue_declare(passive=True)  # as it is (classic or quorum), if it exists
            except conn.channel_errors:
                return bodies
            while (message := bound.get(no_ack=False)) is not None:
                bodies.append(message.decode())
                message.ack()
        return bodies

    def dead_letters(self, count: int, queue: str | None = None, timeout: float = 30) -> list[Any]:
        """Wait until ``count`` envelopes have arrived in the dead-letter queue; return them."""
        queue = queue or f"{self.queue}.dlq"
        found: list[Any] = []
        self.wait_for(
            lambda: found.extend(self.drain(queue)) or len(found) >= count,
            timeout=timeout,
            what=f"{count} dead letters in {queue} (have {len(found)})",
        )
        return found

    def pool_children(self) -> list[int]:
        """The pids of the worker's pool processes."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        return [int(p) for p in children.read_text().split()] if children.exists() else []

    def output_text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def wait_for(self, predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
        """Poll ``predicate()`` until true; fail with the worker's output when it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(
            f"timed out waiting for {what}\n--- worker output ---\n{self.output_text()[-4000:]}"
        )


class WorkerRunner:
    """Starts workers for one test on one broker and stops all of them at teardown."""

    def __init__(self, broker: Broker, tmp_path: Path) -> None:
        self.broker = broker
        self.tmp_path = tmp_path
        self.workers: list[Worker] = []
        self.queues: set[str] = set()
        self._count = 0
        #: What the worker's command starts with, before the interpreter (the benchmarks run it
        #: under Valgrind this way), and how long it may take to be ready.
        self.launcher: tuple[str, ...] = ()
        self.ready_timeout = READY_TIMEOUT

    def settings(self, queue: str, **overrides: Any) -> dict[str, Any]:
        results = self.tmp_path / "results"
        results.mkdir(exist_ok=True)
        return {
            "broker_url": self.broker.url,
            "broker_transport_options": self.broker.transport_options,
            **({"broker_transport": self.broker.transport} if self.broker.transport else {}),
            **self.broker.settings,
            "result_backend": f"file://{results}",
            "task_default_queue": queue,
            "worker_enable_remote_control": False,
            "broker_connection_retry_on_startup": True,
            "worker_prefetch_multiplier": 1,
            # How long Celery waits for a dead pool child's result before WorkerLostError
            # (10 s by default); the tests kill children on purpose and need not wait that long.
            "worker_lost_wait": 1.0,
            **overrides,
        }

    def start(
        self,
        module: str,
        *,
        queues: list[str] | None = None,
        concurrency: int = 2,
        pool: str = "prefork",
        settings: dict[str, Any] | None = None,
        worker_settings: dict[str, Any] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> Worker:
        """Start a worker for ``module`` on ``queues`` (default: one new queue) and wait for it.

        ``settings`` apply to the worker and the test's client; ``worker_settings`` to the worker
        only (e.g. a ``broker_write_url`` through a proxy the test cuts).
        """
        self._count += 1
        label = f"w{self._count}"
        queues = queues or [self.broker.queue_name()]
        self.queues.update(queues)
        conf = self.settings(queues[0], **(settings or {}))
        nodename = f"{self.broker.prefix}-{label}@{socket.gethostname()}"
        ready = self.tmp_path / f"{label}.ready"
        output = self.tmp_path / f"{label}.out"
        env = {
            **os.environ,
            ENV_SETTINGS: json.dumps({**conf, **(worker_settings or {})}),
            ENV_READY_FILE: str(ready),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])
            ),
        }
        cmd = [
            *self.launcher, sys.executable, "-m", "celery", "-A", module, "worker",
            "-P", pool, "-c", str(concurrency), "-Q", ",".join(queues),
            "-n", nodename,
            "--without-heartbeat", "--without-gossip", "--without-mingle",
            "--loglevel=INFO", *extra_args,
        ]  # fmt: skip
        with output.open("wb") as out:
            process = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        client = Celery(f"client-{label}")
        client.conf.update(conf)
        worker = Worker(
            process,
            client,
            queues[0],
            queues,
            self.tmp_path / f"{label}.log",
            output,
            conf,
            module,
            nodename,
        )
        self.workers.append(worker)
        deadline = time.monotonic() + self.ready_timeout
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop(worker)
                raise RuntimeError(f"worker for {module} did not start:\n{worker.output_text()}")
            time.sleep(0.02)
        return worker

    def stop(
        self, worker: Worker, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT
    ) -> None:
        """Send ``sig`` (SIGTERM: warm shutdown); SIGKILL the process group after ``timeout``."""
        process = worker.process
        if process.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(process.pid, sig)
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT)
        worker.client.close()

    def close(self) -> None:
        for worker in self.workers:
            self.stop(worker, timeout=TEARDOWN_GRACE)
        self.broker.cleanup(sorted(self.queues))


def running(broker: Broker, tmp_path: Path) -> Iterator[WorkerRunner]:
    runner = WorkerRunner(broker, tmp_path)
    try:
        yield runner
    finally:
        runner.close()
