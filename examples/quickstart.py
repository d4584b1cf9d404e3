"""resilient-tasks quickstart: retries with backoff on a real Celery worker, no server needed.

Run it::

    python examples/quickstart.py

It starts a real ``celery worker`` (prefork pool) on Kombu's filesystem transport in a temporary
folder, sends three tasks and shows what happens to each:

* ``fetch_rate`` fails twice with ``ConnectionError``, is retried after its backoff delays and
  succeeds on the third attempt;
* ``notify_partner`` is told by the (pretend) server to come back in 1 second (``RetryAfter``);
* ``charge_card`` keeps failing, gives up after ``max_attempts`` and lands in the dead-letter
  queue with the story of its three attempts.

Set ``CELERY_BROKER_URL`` (and optionally ``CELERY_RESULT_BACKEND``) to run the same script on
your own broker, e.g. ``CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// python
examples/quickstart.py``.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path

from celery import Celery, Task
from celery.utils.log import get_task_logger
from embedded_worker import report_ready_in, start_worker, stop_worker
from tenacity import wait_exponential

from resilient_tasks import ResilientTask, RetryAfter, RetryPolicy
from resilient_tasks.dev import filesystem
from resilient_tasks.dlq import DeadLetters
from resilient_tasks.history import History

# The worker subprocess imports this module too; the parent passes the folder and queue on.
FOLDER = Path(os.environ.get("QUICKSTART_DIR") or tempfile.mkdtemp(prefix="rt-quickstart-"))
report_ready_in(FOLDER)  # the worker imports this module too
os.environ["QUICKSTART_DIR"] = str(FOLDER)
QUEUE = os.environ.setdefault("QUICKSTART_QUEUE", f"quickstart-{uuid.uuid4().hex[:8]}")
BROKER = os.environ.get("CELERY_BROKER_URL", "filesystem://localhost/")
BACKEND = os.environ.get("CELERY_RESULT_BACKEND", f"file://{FOLDER / 'results'}")

app = Celery("quickstart", broker=BROKER, backend=BACKEND)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,
    worker_log_format="    worker | %(message)s",
    worker_task_log_format="    worker | %(task_name)s: %(message)s",
)
(FOLDER / "results").mkdir(parents=True, exist_ok=True)
if BROKER.startswith("filesystem"):  # Kombu's filesystem transport, with atomic writes
    app.conf.broker_transport = filesystem.TRANSPORT
    app.conf.broker_transport_options = filesystem.transport_options(FOLDER / "broker")
log = get_task_logger(__name__)

#: Retry connection errors up to 5 attempts in all, waiting 0.5 s, 1 s, 2 s, ... in between.
POLICY = RetryPolicy(
    retry_on=(ConnectionError,), max_attempts=5, backoff=wait_exponential(multiplier=0.5)
)


@app.task(base=ResilientTask, bind=True, retry_policy=POLICY)
def fetch_rate(self: Task, currency: str) -> float:
    """Fail twice with a connection error, then return an exchange rate."""
    attempt = self.request.retries + 1
    log.info("attempt %d: asking the rates service for %s", attempt, currency)
    if attempt < 3:
        raise ConnectionError("rates service reset the connection")
    # Every retry carried the story of the attempts before it:
    for earlier in History.from_headers(self.request.headers).attempts:
        log.info(
            "  history: attempt %d on %s failed with %s (%s), retried after %.2fs",
            earlier.number, earlier.hostname, earlier.exception_type,
            earlier.message, earlier.delay,
        )  # fmt: skip
    return 1.0842


@app.task(base=ResilientTask, bind=True, retry_policy=POLICY)
def notify_partner(self: Task, order_id: int) -> str:
    """The partner's API answers 429 with Retry-After: 1 the first time."""
    attempt = self.request.retries + 1
    log.info("attempt %d: notifying the partner of order %d", attempt, order_id)
    if attempt == 1:
        raise RetryAfter(1.0, "429 Too Many Requests, Retry-After: 1")
    return "partner notified"


@app.task(
    base=ResilientTask,
    bind=True,
    retry_policy=POLICY.replace(max_attempts=3, backoff=0.5),
)
def charge_card(self: Task, order_id: int) -> None:
    """The payment gateway never answers: give up after 3 attempts."""
    attempt = self.request.retries + 1
    log.info("attempt %d: charging the card for order %d", attempt, order_id)
    raise ConnectionError("payment gateway unreachable")


def show_dead_letters() -> None:
    """What gave up is in the dead-letter queue, with its story, ready to replay."""
    dead = DeadLetters(app, queues=[f"{QUEUE}.dlq"])
    deadline = time.monotonic() + 10  # the worker publishes it just after the result
    while not (letters := dead.list()) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"\ndead-letter queue {QUEUE}.dlq:")
    for letter in letters:
        attempts = ", ".join(
            f"#{a['number']} {a['exception_type']}"
            + (f" then {a['delay']:g}s" if a["delay"] is not None else "")
            for a in letter.envelope["attempts"]
        )
        print(f"  {letter.task_name}  reason={letter.reason}  attempts: {attempts}")
    print("  (in your project: celery -A proj dlq list | show ID | replay | purge)")


def main() -> None:
    print(f"broker: {BROKER}   queue: {QUEUE}")
    print(f"retry policy: up to {POLICY.max_attempts} attempts, delays {POLICY.delays(4)} s")
    print("starting a real celery worker (prefork pool)...", flush=True)
    worker = start_worker("quickstart", QUEUE, FOLDER)
    try:
        started = time.monotonic()
        rate = fetch_rate.delay("EUR")
        partner = notify_partner.delay(42)
        charge = charge_card.delay(42)
        outcomes = [
            ("fetch_rate('EUR')", rate.get(timeout=60)),
            ("notify_partner(42)", partner.get(timeout=60)),
            ("charge_card(42)", charge.get(timeout=60, propagate=False)),
        ]
        print(f"\nresults after {time.monotonic() - started:.1f}s:")
        for call, value in outcomes:
            failed = f"{type(value).__name__}: " if isinstance(value, Exception) else ""
            print(f"  {call:<20} {failed}{value}")
        show_dead_letters()
        print("stopping the worker...")
    finally:
        stop_worker(worker)
        if not BROKER.startswith("filesystem"):
            with app.connection_for_write() as conn:  # leave the broker as we found it
                queue = app.amqp.queues[QUEUE].bind(conn.default_channel)
                queue.declare()  # so this process knows its bindings and removes them too
                queue.delete()
                queue.exchange.delete()
                conn.default_channel.queue_delete(f"{QUEUE}.dlq")


if __name__ == "__main__":
    main()
