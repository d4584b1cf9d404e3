"""What every example does around its own tasks: run a real ``celery worker`` (prefork, two
processes) on the example's queue as a subprocess, wait until it is ready, stop it with Celery's
warm shutdown, and wait for dead letters to arrive. In your project, the worker is a service
(``celery -A proj worker``) and none of this is needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from celery import signals, states
from celery.result import AsyncResult

from resilient_tasks.dlq import DeadLetter, DeadLetters

HERE = Path(__file__).resolve().parent


def report_ready_in(folder: Path) -> None:
    """In the worker (which imports the example too): touch ``folder/worker.ready`` once it is
    ready to take messages."""

    def ready(**_: Any) -> None:
        (folder / "worker.ready").touch()

    signals.worker_ready.connect(ready, weak=False, dispatch_uid="examples.worker_ready")


def environment(*folders: Path) -> dict[str, str]:
    """This environment, with ``folders`` and this one first on ``PYTHONPATH``."""
    path = [str(f) for f in (*folders, HERE)] + [os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}


def start_worker(
    app: str, queue: str, folder: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``celery -A app worker`` on ``queue``; returns once it has reported ready in ``folder``."""
    cmd = [
        sys.executable, "-m", "celery", "--quiet", "-A", app, "worker", *extra,
        "-P", "prefork", "-c", "2", "-Q", queue, "--loglevel=INFO",
        "--without-heartbeat", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    worker = subprocess.Popen(cmd, env=env or environment(), start_new_session=True)
    deadline = time.monotonic() + 60
    while not (folder / "worker.ready").exists():
        if worker.poll() is not None or time.monotonic() > deadline:
            sys.exit("the worker did not start; see its output above")
        time.sleep(0.05)
    return worker


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Celery's warm shutdown (SIGTERM): running tasks finish; killed after 20 s."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def wait_for_dead_letters(dead: DeadLetters, count: int) -> list[DeadLetter]:
    """The dead letters ``dead`` reads, once there are ``count`` of them (20 s at the most)."""
    deadline = time.monotonic() + 20
    while len(letters := dead.list()) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    if len(letters) < count:
        sys.exit(f"expected {count} dead letters in {', '.join(dead.queues)}, found {len(letters)}")
    return letters


def forget(result: AsyncResult) -> None:
    """Forget the task's stored outcome, so that waiting on its id waits for its next run (a
    replay). On Celery 5.3 ``forget()`` leaves the result registered with an asynchronous result
    backend (Redis), whose next ``get()`` hands the old outcome back, and the file backend raises
    when it stored nothing (a rejected message): both are seen to here."""
    with suppress(FileNotFoundError):
        result.forget()
    result.backend.remove_pending_result(result)


def outcome_of(task_id: str, app: Any, timeout: float = 60) -> Any:
    """The stored outcome of ``task_id`` once it has one, read from the result backend itself.
    (``AsyncResult.get()`` on Celery 5.3's Redis backend can hand back an outcome it received
    earlier for the same id, before a replay.)"""
    result = AsyncResult(task_id, app=app)
    deadline = time.monotonic() + timeout
    while result.state not in states.READY_STATES:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no outcome for {task_id} within {timeout} s")
        time.sleep(0.05)
    return result.result
