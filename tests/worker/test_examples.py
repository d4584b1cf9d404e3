"""The examples run as written, and say what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import celery
import pytest

from resilient_tasks._delayed_rabbitmq import FRACTION_LEVELS, Topology
from support.brokers import Broker

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = pytest.mark.worker


@pytest.mark.usefixtures("celery_delayed_delivery")
def test_quickstart_retries_succeeds_and_gives_up(broker: Broker, tmp_path: Path) -> None:
    removing_delayed_delivery_it_makes(broker)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "QUICKSTART_"))}
    env["QUICKSTART_DIR"] = str(tmp_path)
    env["QUICKSTART_QUEUE"] = broker.queue_name("quickstart")
    if broker.kind != "filesystem":
        env["CELERY_BROKER_URL"] = broker.url

    try:
        run = subprocess.run(
            [sys.executable, str(EXAMPLES / "quickstart.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        broker.cleanup([env["QUICKSTART_QUEUE"]])

    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "retry policy: up to 5 attempts, delays [0.5, 1.0, 2.0, 4.0] s" in output
    assert "fetch_rate('EUR')    1.0842" in output
    assert "notify_partner(42)   partner notified" in output
    assert "charge_card(42)      ConnectionError: payment gateway unreachable" in output
    # The third attempt of fetch_rate read the two earlier ones from the message.
    assert "history: attempt 1 on " in output
    assert "retried after 0.50s" in output
    assert "retried after 1.00s" in output
    assert output.count("charging the card for order 42") == 3
    assert (
        "quickstart.charge_card  reason=retries_exhausted  attempts: "
        "#1 ConnectionError then 0.5s, #2 ConnectionError then 0.5s, #3 ConnectionError"
    ) in output


# -- the other examples: each run as a user runs it, then the broker is checked for leftovers --

CELERY_VERSION = tuple(int(part) for part in celery.__version__.split(".")[:2])
# Celery's levels and the library's own below a second (the examples may make both).
DELAYED_DELIVERY = [f"celery_delayed_{level}" for level in range(28)] + [
    *(Topology().fraction(ms) for ms in FRACTION_LEVELS),
    Topology().levels,
]


def run_example(script: Path, broker: Broker, tmp_path: Path, queue: str) -> str:
    """Run ``python examples/<script>`` with ``queue`` as its queue; return its output.

    A server broker is passed in ``CELERY_BROKER_URL``; the filesystem one is each example's
    default. ``TMPDIR`` is the test's own, so that a temporary folder left behind shows.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CELERY_", "EXAMPLE_", "QUICKSTART_", "DJANGO_"))
    }
    env["EXAMPLE_QUEUE"] = queue
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    if broker.kind != "filesystem":
        env["CELERY_BROKER_URL"] = broker.url
    run = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    return output


def leftovers(broker: Broker, tmp_path: Path, queue: str) -> list[str]:
    """What the example left behind: queues, exchanges, keys, temporary folders."""
    left = [str(p) for p in (tmp_path / "tmp").iterdir()]
    if broker.kind == "rabbitmq":
        with broker.connection() as conn:
            for name in (queue, f"{queue}.dlq"):
                with conn.channel() as channel:
                    try:
                        channel.queue_declare(name, passive=True)
                        left.append(f"queue {name}")
                    except conn.channel_errors:
                        pass
                with conn.channel() as channel:
                    try:
                        channel.exchange_declare(name, "direct", passive=True)
                        left.append(f"exchange {name}")
                    except conn.channel_errors:
                        pass
    elif broker.kind == "redis":
        with broker.connection() as conn:
            client = conn.default_channel.client
            left += [k.decode() for k in client.scan_iter(match=f"*{queue}*")]
    return left


def delayed_delivery_exists(broker: Broker) -> bool:
    """Whether Celery's native delayed-delivery topology is on the RabbitMQ broker."""
    with broker.connection() as conn, conn.channel() as channel:
        try:
            channel.exchange_declare("celery_delayed_delivery", "topic", passive=True)
        except conn.channel_errors:
            return False
    return True


def removing_delayed_delivery_it_makes(broker: Broker) -> None:
    """An example that retries on RabbitMQ (through the library's broker delays, with no
    prefix of the test's own) makes the broker's one ``celery_delayed_*`` topology if it is
    not there: the test removes it again (it holds the conftest's lock meanwhile)."""
    if broker.kind == "rabbitmq" and not delayed_delivery_exists(broker):
        broker.extra_cleanup += [*DELAYED_DELIVERY, "celery_delayed_delivery"]


def redis_results(broker: Broker) -> set[bytes]:
    with broker.connection() as conn:
        return set(conn.default_channel.client.scan_iter(match="celery-task-meta-*"))


@pytest.mark.usefixtures("celery_delayed_delivery")
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_rabbitmq_example_dead_letters_both_ways_and_replays(
    broker: Broker, tmp_path: Path
) -> None:
    queue = broker.queue_name("billing")
    had_delayed_delivery = delayed_delivery_exists(broker)
    if not had_delayed_delivery:  # the example removes it; so does this test if it fails
        broker.extra_cleanup += [*DELAYED_DELIVERY, "celery_delayed_delivery"]
    try:
        output = run_example(EXAMPLES / "rabbitmq.py", broker, tmp_path, queue)
        left = leftovers(broker, tmp_path, queue)
        delayed_left = delayed_delivery_exists(broker) and not had_delayed_delivery
    finally:
        broker.cleanup([queue])

    queue_type = "quorum" if CELERY_VERSION >= (5, 5) else "classic"
    assert f"x-dead-letter-routing-key={queue}.dlq" in output
    assert f"x-queue-type={queue_type}" in output
    assert f"dead-letter queue {queue}.dlq holds 2:" in output
    assert (
        "billing.import_row     reason=rejected           dead-lettered by RabbitMQ "
        f"(x-death: rejected in {queue})"
    ) in output
    assert (
        "billing.sync_invoice   reason=retries_exhausted  dead-lettered by the worker after 3 "
        "attempts: ConnectionError: billing API unreachable"
    ) in output
    assert output.count("pushing invoice 42") == 4  # three attempts, then the replay
    assert "replayed 2, refused 0" in output
    assert "sync_invoice(42)                    -> 'invoice 42 synced'" in output
    assert (
        "import_row('INV-42;119.00;EUR')     -> "
        "{'invoice': 'INV-42', 'amount': 119.0, 'currency': 'EUR'}"
    ) in output
    assert f"dead-letter queue {queue}.dlq: 0 left" in output
    assert left == []
    assert not delayed_left


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_redis_example_dead_letters_envelopes_and_replays(broker: Broker, tmp_path: Path) -> None:
    queue = broker.queue_name("billing")
    results_before = redis_results(broker)
    try:
        output = run_example(EXAMPLES / "redis_broker.py", broker, tmp_path, queue)
        left = leftovers(broker, tmp_path, queue)
        results_left = redis_results(broker) - results_before
    finally:
        broker.cleanup([queue])

    assert f"dead-letter queue {queue}.dlq (a Redis list) holds 2:" in output
    assert (
        "billing.import_row     reason=permanent          attempts=1  "
        "resilient_tasks.exceptions.Permanent: ValueError: unknown row format"
    ) in output
    assert (
        "billing.sync_invoice   reason=retries_exhausted  attempts=3  "
        "ConnectionError: billing API unreachable"
    ) in output
    assert 'billing.sync_invoice arguments: [42] {"api_key": "[REDACTED]"}' in output
    assert "sk_live_4242" not in output
    assert "replayed 2, refused 0" in output
    assert "sync_invoice(42)     -> 'invoice 42 synced'" in output
    assert (
        "import_row(...)      -> {'invoice': 'INV-42', 'amount': 119.0, 'currency': 'EUR'}"
    ) in output
    assert f"dead-letter queue {queue}.dlq: 0 left" in output
    assert left == []
    assert results_left == set()


@pytest.mark.usefixtures("celery_delayed_delivery")
def test_canvas_example_stops_the_chain_keeps_the_group_and_replays(
    broker: Broker, tmp_path: Path
) -> None:
    removing_delayed_delivery_it_makes(broker)
    queue = broker.queue_name("shop")
    try:
        output = run_example(EXAMPLES / "canvas.py", broker, tmp_path, queue)
        left = leftovers(broker, tmp_path, queue)
    finally:
        broker.cleanup([queue])

    assert "charge_card gave up: CardDeclined('card for order 7 declined')" in output
    assert "card charged" not in output.split("fixing the causes")[0]
    assert "receipt sent" not in output.split("fixing the causes")[0]
    assert "thumbnail(1) -> 'thumb-1.jpg'" in output
    assert "thumbnail(2) -> gave up: ValueError('image 2 is not a JPEG')" in output
    assert "thumbnail(3) -> 'thumb-3.jpg'" in output
    assert f"dead-letter queue {queue}.dlq holds 2:" in output
    assert "chain_remaining: shop.send_receipt, shop.ship" in output
    assert "root_id is the chain's first task: True" in output
    assert "group_index: 1 of group " in output
    assert "replayed 2, refused 0" in output
    assert "the chain went on from charge_card: ship -> 'order 7 shipped'" in output
    assert ("the group is complete: ['thumb-1.jpg', 'thumb-2.jpg', 'thumb-3.jpg']") in output
    assert f"dead-letter queue {queue}.dlq: 0 left" in output
    assert left == []


@pytest.mark.usefixtures("celery_delayed_delivery")
def test_django_example_retries_dead_letters_and_lists(broker: Broker, tmp_path: Path) -> None:
    removing_delayed_delivery_it_makes(broker)
    queue = broker.queue_name("billing")
    try:
        output = run_example(EXAMPLES / "django" / "run.py", broker, tmp_path, queue)
        left = leftovers(broker, tmp_path, queue)
    finally:
        broker.cleanup([queue])

    assert (
        "tasks found by autodiscover_tasks(): billing.tasks.sync_invoice, "
        "billing.tasks.send_reminder"
    ) in output
    assert (
        "sync_invoice(42) -> invoice 42 synced on attempt 2 "
        "(attempt 1: ConnectionResetError, retried after 0.5s)"
    ) in output
    assert "send_reminder(42) failed for good: SMTPAuthenticationError" in output
    assert output.count("sending the reminder for invoice 42") == 1  # not transient: no retry
    assert (
        f"billing.tasks.send_reminder was dead-lettered to {queue}.dlq: reason=exception"
    ) in output
    assert "its keyword arguments there: {'smtp_password': '[REDACTED]'}" in output
    assert f"1 dead letter in {queue}.dlq." in output  # celery -A proj dlq list
    assert "hunter2" not in output
    assert left == []
