"""The examples run as written, and say what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.brokers import Broker

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = pytest.mark.worker


def test_quickstart_retries_succeeds_and_gives_up(broker: Broker, tmp_path: Path) -> None:
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
