"""What ``celery dlq stats`` costs on a large dead-letter queue: ``python -m benchmarks.dlq_stats``.

Not part of ``nox -s bench``. For each broker, a dead-letter queue of its own is filled with
``--count`` envelopes as the worker publishes them (one real envelope, built with
:func:`~resilient_tasks.envelope.build_envelope` from a real task message and a real traceback,
copied with a new task id and a varied task, reason, exception type and time), then
:meth:`DeadLetters.stats() <resilient_tasks.dlq.DeadLetters.stats>` and, for comparison,
:meth:`DeadLetters.list() <resilient_tasks.dlq.DeadLetters.list>` read it (``stats``
``--rounds`` times, the best shown; ``list`` once, last), with how long after each read every
message was back in the queue, as a markdown table. On RabbitMQ 3.10 the messages ``list``
hands back (``basic.get``) take minutes to be requeued at 50,000, and the run waits for them:
``--no-list`` skips it. The queue is deleted afterwards, whatever happens. The brokers are the
test harness's (``RT_TEST_RABBITMQ_URL`` and ``RT_TEST_REDIS_URL`` override them).

Example::

    python -m benchmarks.dlq_stats --count 50000 --brokers redis,rabbitmq
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from celery import Celery

from resilient_tasks import ResilientTask
from resilient_tasks.dlq import DeadLetters
from resilient_tasks.envelope import FailedMessage, build_envelope
from resilient_tasks.history import Attempt, History
from resilient_tasks.publish import HEADER_REASON, HEADER_TASK
from support.brokers import RABBITMQ_URL, REDIS_URL

TASKS = ("billing.sync_invoice", "billing.render_pdf", "reports.daily", "crm.push_contact")
REASONS = ("retries_exhausted", "permanent", "exception", "worker_lost", "deadline_exceeded")
EXCEPTIONS = (
    "ConnectionError",
    "KeyError",
    "requests.exceptions.HTTPError",
    "billiard.exceptions.WorkerLostError",
    "resilient_tasks.exceptions.Permanent",
    "TimeoutError",
)


def _app(kind: str, queue: str) -> Celery:
    app = Celery(f"bench-dlq-stats-{kind}", set_as_current=False)
    app.conf.broker_url = RABBITMQ_URL if kind == "rabbitmq" else REDIS_URL
    app.conf.task_default_queue = queue
    app.task(base=ResilientTask, name="billing.sync_invoice", shared=False)(_never_run)
    return app


def _never_run(invoice_id: int, **options: Any) -> None:
    raise NotImplementedError


def _raised() -> tuple[BaseException, str]:
    """A real exception, three frames deep, and its traceback."""

    def fetch(url: str) -> None:
        raise ConnectionError(f"billing API down: {url} answered 503 Service Unavailable")

    def sync(n: int) -> None:
        fetch(f"https://billing.example.com/api/v2/invoices/{n}")

    try:
        sync(4711)
    except ConnectionError as exc:
        return exc, traceback.format_exc()
    raise AssertionError("unreachable")


def sample_envelope(app: Celery, queue: str) -> dict[str, Any]:
    """The envelope the worker publishes for a task that failed for good after 5 attempts."""
    task_id = str(uuid.uuid4())
    args, kwargs = (4711,), {"customer": "c-1042", "api_token": "s3cr3t", "pages": [1, 2, 3]}
    sent = app.amqp.as_task_v2(task_id, "billing.sync_invoice", args=args, kwargs=kwargs)
    exc, text = _raised()
    now = datetime.now(timezone.utc)
    history = History()
    for number in range(1, 5):
        history = history.record(
            Attempt.failed(number, exc, hostname="w1@host", delay=2.0**number, at=now)
        )
    message = FailedMessage(
        task_id=task_id,
        task_name="billing.sync_invoice",
        args=args,
        kwargs=kwargs,
        headers=sent.headers,
        properties={"correlation_id": task_id, "priority": 0, "delivery_mode": 2},
        body=json.dumps(list(sent.body)).encode(),
        content_type="application/json",
        content_encoding="utf-8",
        exchange="",
        routing_key=queue,
        priority=0,
    )
    return build_envelope(
        message,
        reason="retries_exhausted",
        exception=exc,
        traceback=text,
        history=history,
        final=Attempt.failed(5, exc, hostname="w1@host", delay=None, at=now),
        dead_lettered_at=now,
    )


def envelopes(sample: dict[str, Any], count: int) -> Iterator[dict[str, Any]]:
    """``count`` copies of ``sample``, each with its own task id, task, reason, exception type
    and time (a second apart, the oldest first)."""
    start = datetime.now(timezone.utc) - timedelta(seconds=count)
    for n in range(count):
        envelope = copy.copy(sample)
        task_id = str(uuid.uuid4())
        envelope["task"] = {**sample["task"], "id": task_id, "name": TASKS[n % len(TASKS)]}
        envelope["reason"] = REASONS[n % len(REASONS)]
        envelope["exception"] = {**sample["exception"], "type": EXCEPTIONS[n % len(EXCEPTIONS)]}
        envelope["dead_lettered_at"] = (start + timedelta(seconds=n)).isoformat()
        original = sample["original"]
        envelope["original"] = {**original, "headers": {**original["headers"], "id": task_id}}
        yield envelope


def fill(app: Celery, queue: str, count: int) -> float:
    """Publish ``count`` envelopes to ``queue`` (durable, persistent, without confirms: as
    fast as the broker takes them); return the seconds it took."""
    sample = sample_envelope(app, queue)
    began = time.perf_counter()
    with app.connection_for_write() as connection:
        producer = connection.Producer(serializer="json")
        for envelope in envelopes(sample, count):
            producer.publish(
                envelope,
                exchange="",
                routing_key=queue,
                delivery_mode=2,
                headers={HEADER_REASON: envelope["reason"], HEADER_TASK: envelope["task"]["name"]},
            )
    return time.perf_counter() - began


def declare(app: Celery, queue: str) -> None:
    with app.connection_for_write() as connection:
        if connection.transport.driver_type == "amqp":
            connection.default_channel.queue_declare(queue=queue, durable=True, auto_delete=False)


def delete(app: Celery, queue: str) -> None:
    """Remove ``queue`` and everything in it."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        if connection.transport.driver_type == "amqp":
            channel.queue_delete(queue)
        else:
            channel._purge(queue)


@contextmanager
def dead_letter_queue(kind: str) -> Iterator[tuple[Celery, str]]:
    source = f"bench-dlq-stats-{uuid.uuid4().hex[:8]}"
    app = _app(kind, source)
    queue = f"{source}.dlq"
    try:
        yield app, queue
    finally:
        delete(app, queue)
        app.close()


def settle(letters: DeadLetters, count: int, timeout: float) -> float | None:
    """Seconds until the queue holds ``count`` ready messages again (the broker may still be
    taking the last publishes, which were not confirmed, or putting back what a read handed
    back); ``None`` if it does not within ``timeout``."""
    began = time.monotonic()
    while letters.count() != count:
        if time.monotonic() - began > timeout:
            return None
        time.sleep(0.1)
    return time.monotonic() - began


def timed(
    run: Callable[[], object], letters: DeadLetters, count: int, timeout: float
) -> tuple[float, float | None]:
    """How long ``run`` took, and how long after it every message was back."""
    began = time.perf_counter()
    run()
    took = time.perf_counter() - began
    return took, settle(letters, count, timeout)


def measure(kind: str, count: int, rounds: int, with_list: bool, timeout: float) -> dict[str, Any]:
    with dead_letter_queue(kind) as (app, queue):
        declare(app, queue)
        filled = fill(app, queue, count)
        letters = DeadLetters(app)
        if settle(letters, count, 120) is None:
            raise RuntimeError(f"{kind}: the queue never held the {count} envelopes published")
        stats = letters.stats()
        if stats.count != count:
            raise RuntimeError(f"{kind}: stats counted {stats.count} of {count} dead letters")
        if settle(letters, count, timeout) is None:
            raise RuntimeError(f"{kind}: the dead letters did not come back after stats")
        row: dict[str, Any] = {"broker": kind, "count": count, "fill": filled, "timeout": timeout}
        runs = [timed(letters.stats, letters, count, timeout) for _ in range(rounds)]
        print(f"{kind}: stats took {', '.join(f'{t:.2f} s' for t, _ in runs)}", flush=True)
        row["stats"] = min(took for took, _ in runs)
        backs = [back for _, back in runs]
        row["stats_back"] = None if None in backs else max(b for b in backs if b is not None)
        row["list"] = row["list_back"] = None
        if with_list and row["stats_back"] is not None:  # list last: it may not settle
            row["list"], row["list_back"] = timed(letters.list, letters, count, timeout)
            print(f"{kind}: list took {row['list']:.2f} s", flush=True)
        return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| broker | dead letters | `stats` (best) | per 1,000 | all back after `stats` "
        "| `list` (one run) | all back after `list` | filling the queue |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def back(seconds: float | None, timeout: float) -> str:
        return f"> {timeout:.0f} s" if seconds is None else f"{seconds:.1f} s"

    for row in rows:
        listed = "-" if row["list"] is None else f"{row['list']:.2f} s"
        list_back = "-" if row["list"] is None else back(row["list_back"], row["timeout"])
        lines.append(
            f"| {row['broker']} | {row['count']:,} | {row['stats']:.2f} s "
            f"| {row['stats'] / row['count'] * 1e6:.0f} ms "
            f"| {back(row['stats_back'], row['timeout'])} | {listed} | {list_back} "
            f"| {row['fill']:.1f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dlq_stats", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--count", type=int, default=50_000, help="dead letters in the queue")
    parser.add_argument("--brokers", default="redis,rabbitmq", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="runs of stats; the best is shown")
    parser.add_argument("--no-list", action="store_true", help="do not time list() too")
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=60.0,
        help="how long to wait for every message to be back in the queue after a read",
    )
    args = parser.parse_args(argv)
    rows = []
    for kind in filter(None, args.brokers.split(",")):
        print(f"{kind}: filling a dead-letter queue with {args.count:,} envelopes...", flush=True)
        rows.append(measure(kind, args.count, args.rounds, not args.no_list, args.settle_timeout))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
