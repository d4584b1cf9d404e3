"""resilient-tasks in workflows: a chain stops at its dead-lettered step, a group loses only the
member that failed, and a replay picks the workflow up where it stopped.

Run it::

    python examples/canvas.py

It starts a real ``celery worker`` (prefork pool) on Kombu's filesystem transport in a temporary
folder (no server needed; set ``CELERY_BROKER_URL`` to use yours) and runs:

* a **chain** ``reserve_stock(7) | charge_card() | send_receipt() | ship()``: the card is
  declined (``Permanent``), so the chain stops there, as Celery's chains stop at any failure.
  The dead letter's ``canvas.chain_remaining`` lists the steps that did not run, and
  ``canvas.root_id`` names the workflow.
* a **group** of three ``thumbnail(image_id)``: image 2 is corrupt. Only that member is
  dead-lettered (with ``canvas.group_id`` and ``group_index``); the other two succeed.

Then the causes are fixed and both dead letters are replayed. The replayed ``charge_card`` is
the original message, which still carries the rest of its chain: ``send_receipt`` and ``ship``
run after it. The replayed thumbnail completes the group.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from celery import Celery, Task, chain, group
from celery.result import AsyncResult
from celery.utils.log import get_task_logger
from embedded_worker import report_ready_in, start_worker, stop_worker, wait_for_dead_letters
from kombu.utils.url import maybe_sanitize_url

from resilient_tasks import Permanent, ResilientTask
from resilient_tasks.dev import filesystem
from resilient_tasks.dlq import DeadLetters

# The worker subprocess imports this module too; the parent passes the folder and queue on.
MADE_FOLDER = not os.environ.get("EXAMPLE_DIR")
FOLDER = Path(os.environ.get("EXAMPLE_DIR") or tempfile.mkdtemp(prefix="rt-canvas-"))
report_ready_in(FOLDER)  # the worker imports this module too
os.environ["EXAMPLE_DIR"] = str(FOLDER)
QUEUE = os.environ.setdefault("EXAMPLE_QUEUE", f"shop-{uuid.uuid4().hex[:8]}")
DEAD_LETTERS = f"{QUEUE}.dlq"
BROKER = os.environ.get("CELERY_BROKER_URL", "filesystem://localhost/")
BACKEND = os.environ.get("CELERY_RESULT_BACKEND", f"file://{FOLDER / 'results'}")
# The two problems of this story; the worker looks at these files on every attempt.
CARD_DECLINED = FOLDER / "card-declined"
IMAGE_2_CORRUPT = FOLDER / "image-2-corrupt"

app = Celery("canvas", broker=BROKER, backend=BACKEND)
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


class CardDeclined(Exception):
    """The payment provider said no: retrying will not change its mind."""


@app.task(base=ResilientTask, bind=True, name="shop.reserve_stock")
def reserve_stock(self: Task, order_id: int) -> int:
    log.info("stock reserved for order %d", order_id)
    return order_id


@app.task(base=ResilientTask, bind=True, name="shop.charge_card")
def charge_card(self: Task, order_id: int) -> int:
    if CARD_DECLINED.exists():
        raise Permanent(CardDeclined(f"card for order {order_id} declined"))
    log.info("card charged for order %d", order_id)
    return order_id


@app.task(base=ResilientTask, bind=True, name="shop.send_receipt")
def send_receipt(self: Task, order_id: int) -> int:
    log.info("receipt sent for order %d", order_id)
    return order_id


@app.task(base=ResilientTask, bind=True, name="shop.ship")
def ship(self: Task, order_id: int) -> str:
    log.info("order %d shipped", order_id)
    return f"order {order_id} shipped"


@app.task(base=ResilientTask, bind=True, name="media.thumbnail")
def thumbnail(self: Task, image_id: int) -> str:
    if image_id == 2 and IMAGE_2_CORRUPT.exists():
        raise Permanent(ValueError(f"image {image_id} is not a JPEG"))
    return f"thumb-{image_id}.jpg"


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
    print(f"broker: {maybe_sanitize_url(BROKER)}   queue: {QUEUE}")
    CARD_DECLINED.touch()
    IMAGE_2_CORRUPT.touch()
    print("starting a real celery worker (prefork pool)...", flush=True)
    worker = start_worker("canvas", QUEUE, FOLDER)
    try:
        shipped = chain(reserve_stock.s(7), charge_card.s(), send_receipt.s(), ship.s())()
        charged = shipped.parent.parent  # ship <- send_receipt <- charge_card
        thumbnails = group(thumbnail.s(n) for n in (1, 2, 3))()

        failure = charged.get(timeout=60, propagate=False)
        print("\nchain reserve_stock(7) | charge_card() | send_receipt() | ship():")
        print(f"  charge_card gave up: {failure}")
        print(f"  send_receipt and ship did not run (Celery marks them {shipped.state} too)")
        outcomes = thumbnails.get(timeout=60, propagate=False)
        print("group thumbnail(1), thumbnail(2), thumbnail(3):")
        for n, outcome in zip((1, 2, 3), outcomes, strict=True):
            shown = f"gave up: {outcome}" if isinstance(outcome, Exception) else repr(outcome)
            print(f"  thumbnail({n}) -> {shown}")

        dead = DeadLetters(app, [DEAD_LETTERS])
        letters = wait_for_dead_letters(dead, 2)
        print(f"\ndead-letter queue {DEAD_LETTERS} holds {len(letters)}:")
        for letter in sorted(letters, key=lambda letter: letter.task_name or ""):
            canvas = letter.envelope["canvas"]
            print(f"  {letter.task_name}  reason={letter.reason}")
            if canvas["chain_remaining"]:
                print(f"    chain_remaining: {', '.join(canvas['chain_remaining'])}")
                first_step = shipped.parent.parent.parent.id
                print(f"    root_id is the chain's first task: {canvas['root_id'] == first_step}")
            if canvas["group_id"] is not None:
                group_id = canvas["group_id"]
                print(f"    group_index: {canvas['group_index']} of group {group_id[:8]}...")

        print("\nfixing the causes: the customer updated the card, image 2 was uploaded again")
        CARD_DECLINED.unlink()
        IMAGE_2_CORRUPT.unlink()
        # Forget the stored failures, to wait for the replayed runs below instead. (A chain's
        # last result forgets the results before it too.)
        shipped.forget()
        thumbnails.results[1].forget()
        report = dead.replay()
        print(f"replayed {report.replayed}, refused {report.refused}")
        print(f"  the chain went on from charge_card: ship -> {shipped.get(timeout=60)!r}")
        again = AsyncResult(thumbnails.results[1].id, app=app).get(timeout=60)
        complete = thumbnails.get(timeout=60)
        print(f"  the group is complete: {complete!r} (thumbnail(2) -> {again!r})")
        print(f"dead-letter queue {DEAD_LETTERS}: {dead.count()} left")
        print("stopping the worker...", flush=True)
    finally:
        stop_worker(worker)
        delete_from_broker()


if __name__ == "__main__":
    main()
