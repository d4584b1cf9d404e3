"""resilient-tasks on RabbitMQ: one dead-letter queue for every failure, and a replay.

Run it (RabbitMQ on 127.0.0.1:5672 as guest/guest, or set ``CELERY_BROKER_URL``)::

    python examples/rabbitmq.py

It starts a real ``celery worker`` (prefork pool) and tells one story:

1. The task queue is declared with RabbitMQ's own dead-lettering pointing at the queue the
   library dead-letters into (``with_dead_lettering``): a quorum queue with a delivery limit
   (a classic queue on Celery < 5.5, which cannot consume quorum queues). The worker declares
   the dead-letter queue when it starts (``declare_dead_letter_queues``).
2. ``sync_invoice(42)``: the billing API is down. Three attempts, then the library
   dead-letters the task, with the story of its attempts (reason ``retries_exhausted``).
3. ``import_row(...)``: the importer does not know the row's format and rejects the message
   (``Reject(requeue=False)``). Celery sees no failure; RabbitMQ dead-letters the raw message
   itself (its ``x-death`` header says ``rejected``) into the same queue.
4. Both are listed from that one queue, then the causes are fixed and both are replayed
   (``DeadLetters(...).replay()``): they run again, with the same task ids, and succeed.
5. Everything the example created on the broker is deleted.

The queue names are unique per run (``EXAMPLE_QUEUE`` sets them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import celery
from celery import Celery, Task, signals
from celery.exceptions import Reject
from celery.result import AsyncResult
from celery.utils.log import get_task_logger
from embedded_worker import (
    forget,
    report_ready_in,
    start_worker,
    stop_worker,
    wait_for_dead_letters,
)
from kombu import Exchange, Queue
from kombu.utils.url import maybe_sanitize_url

from resilient_tasks import ResilientTask, RetryPolicy
from resilient_tasks.dlq import DeadLetter, DeadLetters
from resilient_tasks.rabbitmq import declare_dead_letter_queues, with_dead_lettering

# The worker subprocess imports this module too; the parent passes the folder and queue on.
MADE_FOLDER = not os.environ.get("EXAMPLE_DIR")
FOLDER = Path(os.environ.get("EXAMPLE_DIR") or tempfile.mkdtemp(prefix="rt-rabbitmq-"))
report_ready_in(FOLDER)  # the worker imports this module too
os.environ["EXAMPLE_DIR"] = str(FOLDER)
QUEUE = os.environ.setdefault("EXAMPLE_QUEUE", f"billing-{uuid.uuid4().hex[:8]}")
DEAD_LETTERS = f"{QUEUE}.dlq"
BROKER = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("CELERY_RESULT_BACKEND", f"file://{FOLDER / 'results'}")
# Celery consumes quorum queues from 5.5 on (earlier versions set a global QoS they refuse).
QUORUM = tuple(int(part) for part in celery.__version__.split(".")[:2]) >= (5, 5)
# The two problems of this story; the worker looks at these files on every attempt.
BILLING_API_DOWN = FOLDER / "billing-api-down"
IMPORTER_KNOWS_SEMICOLONS = FOLDER / "importer-knows-semicolons"

app = Celery("rabbitmq_example", broker=BROKER, backend=BACKEND)
app.conf.update(
    task_default_queue=QUEUE,
    # RabbitMQ dead-letters what it rejects, expires or stops (x-delivery-limit) into
    # "{queue}.dlq": the queue the library sends its envelopes to. A topic exchange, because
    # Celery's native delayed delivery (retries with a countdown on quorum queues) needs one.
    task_queues=with_dead_lettering(
        [Queue(QUEUE, Exchange(QUEUE, type="topic"), routing_key=QUEUE)],
        queue_type="quorum" if QUORUM else "classic",
        delivery_limit=5 if QUORUM else None,
    ),
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,
    worker_prefetch_multiplier=1,
    worker_log_format="    worker | %(message)s",
    worker_task_log_format="    worker | %(task_name)s: %(message)s",
)
(FOLDER / "results").mkdir(parents=True, exist_ok=True)
log = get_task_logger(__name__)


@signals.worker_init.connect
def _declare_dead_letter_queues(sender: Any, **_: object) -> None:
    """RabbitMQ drops what it dead-letters into a missing queue: declare them first."""
    declare_dead_letter_queues(sender.app)


@app.task(
    base=ResilientTask,
    bind=True,
    name="billing.sync_invoice",
    retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=3, backoff=1),
)
def sync_invoice(self: Task, invoice_id: int) -> str:
    """Push an invoice to the billing API, which is down until the file says otherwise."""
    log.info("attempt %d: pushing invoice %d", self.request.retries + 1, invoice_id)
    if BILLING_API_DOWN.exists():
        raise ConnectionError("billing API unreachable")
    return f"invoice {invoice_id} synced"


@app.task(base=ResilientTask, bind=True, name="billing.import_row")
def import_row(self: Task, row: str) -> dict[str, Any]:
    """Parse a bank statement row; reject the message when the format is unknown."""
    separator = ";" if IMPORTER_KNOWS_SEMICOLONS.exists() else ","
    fields = row.split(separator)
    if len(fields) != 3:
        log.info("cannot parse %r: rejecting the message", row)
        raise Reject(f"unknown row format: {row!r}", requeue=False)
    invoice, amount, currency = fields
    return {"invoice": invoice, "amount": float(amount), "currency": currency}


def describe(letter: DeadLetter) -> str:
    envelope = letter.envelope
    if letter.from_broker:
        (death, *_) = envelope["broker"]["x-death"]
        return f"dead-lettered by RabbitMQ (x-death: {death['reason']} in {death['queue']})"
    exception = envelope["exception"]
    return (
        f"dead-lettered by the worker after {letter.attempts} attempts: "
        f"{exception['type']}: {exception['message']}"
    )


def delayed_delivery_exists() -> bool:
    """Whether Celery's native delayed-delivery exchange exists (Celery >= 5.5 makes it for
    quorum queues); the example removes it at the end only if it made it."""
    with app.connection_for_write() as conn:
        try:
            conn.default_channel.exchange_declare(
                "celery_delayed_delivery", "topic", durable=True, passive=True
            )
        except conn.channel_errors:
            return False
    return True


def delete_from_broker(remove_delayed_delivery: bool) -> None:
    """Leave the broker as we found it: the queue, its dead-letter queue and, if this run
    created it and nothing else uses it, Celery's delayed-delivery topology."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        channel.queue_delete(QUEUE)
        channel.exchange_delete(QUEUE)
        channel.queue_delete(DEAD_LETTERS)
        removed = [f"queue and exchange {QUEUE}", f"queue {DEAD_LETTERS}"]
        if remove_delayed_delivery:
            for level in range(28):
                name = f"celery_delayed_{level}"
                _, waiting, _ = channel.queue_declare(name, passive=True)
                if not waiting:  # messages another app delayed in the meantime stay
                    channel.queue_delete(name)
                    channel.exchange_delete(name)
            channel.exchange_delete("celery_delayed_delivery")
            removed.append("celery_delayed_* (Celery's delayed delivery, made by this run)")
    if MADE_FOLDER:
        shutil.rmtree(FOLDER, ignore_errors=True)
    print("deleted from the broker: " + ", ".join(removed))


def main() -> None:
    print(f"broker: {maybe_sanitize_url(BROKER)}")
    (queue,) = app.conf.task_queues
    arguments = ", ".join(f"{k}={v}" for k, v in sorted(queue.queue_arguments.items()))
    print(f"queue {QUEUE}: {arguments}")
    BILLING_API_DOWN.touch()  # the outage
    had_delayed_delivery = delayed_delivery_exists()
    print("starting a real celery worker (prefork pool)...", flush=True)
    worker = start_worker("rabbitmq", QUEUE, FOLDER)
    try:
        invoice = sync_invoice.delay(42)
        row = import_row.delay("INV-42;119.00;EUR")
        try:
            invoice.get(timeout=60)
        except ConnectionError as exc:
            print(f"\nsync_invoice(42) failed for good: ConnectionError: {exc}")
        print("import_row('INV-42;119.00;EUR') was rejected by the task")

        dead = DeadLetters(app, [DEAD_LETTERS])
        letters = wait_for_dead_letters(dead, 2)
        print(f"\ndead-letter queue {DEAD_LETTERS} holds {len(letters)}:")
        for letter in letters:
            print(f"  {letter.task_name:<22} reason={letter.reason:<18} {describe(letter)}")

        print("\nfixing the causes: the billing API is back, the importer reads ';' rows")
        BILLING_API_DOWN.unlink()
        IMPORTER_KNOWS_SEMICOLONS.touch()
        forget(invoice)  # so that get() waits for the replayed run, not the old failure
        forget(row)  # Celery 5.7 records a rejection without requeue as a failure too
        report = dead.replay(
            progress=lambda letter, outcome: print(f"  {outcome} {letter.task_name}")
        )
        print(f"replayed {report.replayed}, refused {report.refused}")

        print("\nafter the replay (same task ids):")
        print(f"  sync_invoice(42)                    -> {invoice.get(timeout=60)!r}")
        print(f"  import_row('INV-42;119.00;EUR')     -> {AsyncResult(row.id).get(timeout=60)!r}")
        print(f"dead-letter queue {DEAD_LETTERS}: {dead.count()} left")
        print("stopping the worker...", flush=True)
    finally:
        stop_worker(worker)
        delete_from_broker(remove_delayed_delivery=QUORUM and not had_delayed_delivery)


if __name__ == "__main__":
    main()
