"""resilient-tasks on Redis: what fails for good waits in a dead-letter list, and is replayed.

Run it (Redis on 127.0.0.1:6379, or set ``CELERY_BROKER_URL``)::

    python examples/redis_broker.py

(Not ``redis.py``: a file of that name next to the other examples would be imported instead of
the ``redis`` package by every script in this folder.)

It starts a real ``celery worker`` (prefork pool) and tells one story:

1. ``sync_invoice(42, api_key=...)``: the billing API is down. Three attempts, then the library
   dead-letters the task (reason ``retries_exhausted``) into ``<queue>.dlq``, a Redis list, as a
   JSON envelope with the story of its attempts. The API key is redacted in the envelope.
2. ``import_row(...)``: the importer does not know the row's format and gives up at once
   (``Permanent``; reason ``permanent``).
3. Both are listed and one is shown; the causes are fixed and both are replayed
   (``DeadLetters(...).replay()``): they run again, with the same task ids, and succeed.
4. Every key the example created on Redis is deleted.

Redis has no dead-lettering of its own, so every dead letter here is an envelope the worker
published. The queue names are unique per run (``EXAMPLE_QUEUE`` sets them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.result import AsyncResult
from celery.utils.log import get_task_logger
from embedded_worker import (
    forget,
    outcome_of,
    report_ready_in,
    start_worker,
    stop_worker,
    wait_for_dead_letters,
)
from kombu.utils.url import maybe_sanitize_url

from resilient_tasks import Permanent, ResilientTask, RetryPolicy
from resilient_tasks.dlq import DeadLetters

# The worker subprocess imports this module too; the parent passes the folder and queue on.
MADE_FOLDER = not os.environ.get("EXAMPLE_DIR")
FOLDER = Path(os.environ.get("EXAMPLE_DIR") or tempfile.mkdtemp(prefix="rt-redis-"))
report_ready_in(FOLDER)  # the worker imports this module too
os.environ["EXAMPLE_DIR"] = str(FOLDER)
QUEUE = os.environ.setdefault("EXAMPLE_QUEUE", f"billing-{uuid.uuid4().hex[:8]}")
DEAD_LETTERS = f"{QUEUE}.dlq"
BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
BACKEND = os.environ.get("CELERY_RESULT_BACKEND", BROKER)
# The two problems of this story; the worker looks at these files on every attempt.
BILLING_API_DOWN = FOLDER / "billing-api-down"
IMPORTER_KNOWS_SEMICOLONS = FOLDER / "importer-knows-semicolons"

app = Celery("redis_broker", broker=BROKER, backend=BACKEND)
app.conf.update(
    task_default_queue=QUEUE,
    # A message not acknowledged within the visibility timeout is delivered again. A retry waits
    # unacknowledged in a worker until it is due: keep every backoff delay well below this.
    broker_transport_options={"visibility_timeout": 3600},
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,
    worker_prefetch_multiplier=1,
    worker_log_format="    worker | %(message)s",
    worker_task_log_format="    worker | %(task_name)s: %(message)s",
)
log = get_task_logger(__name__)


@app.task(
    base=ResilientTask,
    bind=True,
    name="billing.sync_invoice",
    retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=3, backoff=0.5),
)
def sync_invoice(self: Task, invoice_id: int, api_key: str) -> str:
    """Push an invoice to the billing API, which is down until the file says otherwise."""
    log.info("attempt %d: pushing invoice %d", self.request.retries + 1, invoice_id)
    if BILLING_API_DOWN.exists():
        raise ConnectionError("billing API unreachable")
    return f"invoice {invoice_id} synced"


@app.task(base=ResilientTask, bind=True, name="billing.import_row")
def import_row(self: Task, row: str) -> dict[str, Any]:
    """Parse a bank statement row; an unknown format will not parse on a retry either."""
    separator = ";" if IMPORTER_KNOWS_SEMICOLONS.exists() else ","
    fields = row.split(separator)
    if len(fields) != 3:
        raise Permanent(ValueError(f"unknown row format: {row!r}"))
    invoice, amount, currency = fields
    return {"invoice": invoice, "amount": float(amount), "currency": currency}


def delete_from_broker(results: list[AsyncResult]) -> None:
    """Leave Redis as we found it: the queue, the dead-letter list, their bindings, results."""
    for result in results:
        result.forget()
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        keys = sorted(client.scan_iter(match=f"*{QUEUE}*"))
        if keys:
            client.delete(*keys)
    if MADE_FOLDER:
        shutil.rmtree(FOLDER, ignore_errors=True)
    print(f"deleted from Redis: {len(keys)} keys with {QUEUE} in their name, the task results")


def main() -> None:
    print(f"broker: {maybe_sanitize_url(BROKER)}   queue: {QUEUE}   dead letters: {DEAD_LETTERS}")
    BILLING_API_DOWN.touch()  # the outage
    print("starting a real celery worker (prefork pool)...", flush=True)
    worker = start_worker("redis_broker", QUEUE, FOLDER)
    results: list[AsyncResult] = []
    try:
        invoice = sync_invoice.delay(42, api_key="sk_live_4242")
        row = import_row.delay("INV-42;119.00;EUR")
        results += [invoice, row]
        for call, result in [("sync_invoice(42)", invoice), ("import_row(...)", row)]:
            failure = result.get(timeout=60, propagate=False)
            print(f"\n{call} failed for good: {type(failure).__name__}: {failure}")

        dead = DeadLetters(app, [DEAD_LETTERS])
        letters = wait_for_dead_letters(dead, 2)
        print(f"\ndead-letter queue {DEAD_LETTERS} (a Redis list) holds {len(letters)}:")
        for letter in letters:
            exception = letter.envelope["exception"]
            print(
                f"  {letter.task_name:<22} reason={letter.reason:<18} attempts={letter.attempts}"
                f"  {exception['type']}: {exception['message']}"
            )
        shown = dead.get(invoice.id)
        assert shown is not None
        task = shown.redacted(dead.redact_patterns)["task"]
        arguments = f"{json.dumps(task['args'])} {json.dumps(task['kwargs'])}"
        print(f"  {shown.task_name} arguments: {arguments}")

        print("\nfixing the causes: the billing API is back, the importer reads ';' rows")
        BILLING_API_DOWN.unlink()
        IMPORTER_KNOWS_SEMICOLONS.touch()
        for result in results:
            forget(result)  # so that waiting for the result waits for the replayed run
        report = dead.replay(
            progress=lambda letter, outcome: print(f"  {outcome} {letter.task_name}")
        )
        print(f"replayed {report.replayed}, refused {report.refused}")

        print("\nafter the replay (same task ids):")
        for call, result in [("sync_invoice(42)", invoice), ("import_row(...)", row)]:
            print(f"  {call:<20} -> {outcome_of(result.id, app)!r}")
        print(f"dead-letter queue {DEAD_LETTERS}: {dead.count()} left")
        print("stopping the worker...", flush=True)
    finally:
        stop_worker(worker)
        delete_from_broker(results)


if __name__ == "__main__":
    main()
