"""resilient-tasks in a Django project: ``@shared_task``, Celery settings in ``settings.py``, a
worker started with ``celery -A proj worker``, a retry and a dead letter.

Run it (``pip install django`` first, or ``pip install "resilient-tasks[examples]"``)::

    python examples/django/run.py

The project is the layout of Celery's Django guide, unchanged but for the decorator:

* ``proj/settings.py``: Django's minimum and the ``CELERY_*`` settings, including
  resilient-tasks' own ``CELERY_RESILIENT_TASKS_REDACT_PATTERNS``;
* ``proj/celery.py``: ``app.config_from_object("django.conf:settings", namespace="CELERY")``
  and ``app.autodiscover_tasks()``;
* ``billing/tasks.py``: ``@shared_task(base=ResilientTask, retry_policy=...)``.

This script starts a real ``celery -A proj worker`` (prefork pool) on Kombu's filesystem
transport in a temporary folder (set ``CELERY_BROKER_URL`` to use your broker), sends two tasks
and shows what became of them: ``sync_invoice`` is retried once after a dropped connection and
succeeds; ``send_reminder`` fails to log in to the mail server, which is not a transient error,
and is dead-lettered at once, its SMTP password redacted. ``celery -A proj dlq list`` then shows
the dead letter, as it would in your project.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The worker imports this module too (--include run); the parent passes the folder and queue on.
MADE_FOLDER = not os.environ.get("EXAMPLE_DIR")
os.environ["EXAMPLE_DIR"] = os.environ.get("EXAMPLE_DIR") or tempfile.mkdtemp(prefix="rt-django-")
os.environ.setdefault("EXAMPLE_QUEUE", f"billing-{uuid.uuid4().hex[:8]}")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
FOLDER = Path(os.environ["EXAMPLE_DIR"])
sys.path.insert(1, str(HERE.parent))  # the examples' shared embedded_worker module

import django  # noqa: E402

django.setup()

from billing.tasks import send_reminder, sync_invoice  # noqa: E402
from django.conf import settings  # noqa: E402
from embedded_worker import environment, report_ready_in, start_worker, stop_worker  # noqa: E402
from kombu.utils.url import maybe_sanitize_url  # noqa: E402
from proj.celery import app  # noqa: E402

from resilient_tasks.dlq import DeadLetters  # noqa: E402

QUEUE = app.conf.task_default_queue
DEAD_LETTERS = f"{QUEUE}.dlq"


report_ready_in(FOLDER)


def celery_command(*args: str) -> str:
    """Run ``celery -A proj <args>`` as you would in the project's folder."""
    run = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "proj", *args],
        env=environment(HERE),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if run.returncode != 0:
        sys.exit(f"celery {' '.join(args)} failed:\n{run.stdout}{run.stderr}")
    return run.stdout


def delete_from_broker() -> None:
    """Leave the broker as we found it: the queue, its exchange and the dead-letter queue."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        channel.queue_delete(QUEUE)
        channel.queue_delete(DEAD_LETTERS)
        if conn.transport.driver_type == "amqp":
            channel.exchange_delete(QUEUE)
        elif conn.transport.driver_type == "redis":
            keys = list(channel.client.scan_iter(match=f"*{QUEUE}*"))
            if keys:
                channel.client.delete(*keys)
    if MADE_FOLDER:
        shutil.rmtree(FOLDER, ignore_errors=True)
    print(f"deleted from the broker: {QUEUE}, {DEAD_LETTERS}")


def main() -> None:
    print(f"Django settings: {settings.SETTINGS_MODULE}   apps: {settings.INSTALLED_APPS}")
    print(f"broker: {maybe_sanitize_url(app.conf.broker_url)}   queue: {QUEUE}")
    print(f"tasks found by autodiscover_tasks(): {sync_invoice.name}, {send_reminder.name}")
    print("starting `celery -A proj worker` (prefork pool)...", flush=True)
    # --include run: this script's report_ready_in tells it when the worker is up.
    worker = start_worker("proj", QUEUE, FOLDER, "--include", "run", env=environment(HERE))
    try:
        synced = sync_invoice.delay(42)
        reminded = send_reminder.delay(42, smtp_password="hunter2")
        print(f"\nsync_invoice(42) -> {synced.get(timeout=60)}")
        failure = reminded.get(timeout=60, propagate=False)
        print(f"send_reminder(42) failed for good: {type(failure).__name__}: {failure}")

        dead = DeadLetters(app)  # the dead-letter queues the app's routes imply
        deadline = time.monotonic() + 20
        while not (letters := dead.list()) and time.monotonic() < deadline:
            time.sleep(0.1)
        (letter,) = letters
        print(f"\n{letter.task_name} was dead-lettered to {letter.queue}: reason={letter.reason}")
        print(f"  its keyword arguments there: {letter.envelope['task']['kwargs']}")
        print(f"\n$ celery -A proj dlq list\n{celery_command('dlq', 'list')}")
        dead.purge()
        print("stopping the worker...", flush=True)
    finally:
        stop_worker(worker)
        delete_from_broker()


if __name__ == "__main__":
    main()
