"""A worker for the circuit-breaker and retry-budget tests.

The dependency is a flag file: while it exists the "payments API" is down. Each call to it is a
line in the calls log the test reads (the dependency's own view of the load it gets). The
breaker's and the budget's names come from the settings (``test_breaker``, ``test_budget``), so
each test has state of its own.
"""

from __future__ import annotations

import os

from tenacity import wait_random

from apps.base import append, make_app, record
from resilient_tasks import (
    TRANSIENT_ERRORS,
    CircuitBreaker,
    ResilientTask,
    RetryBudget,
    RetryPolicy,
)

app = make_app(__name__)

PAYMENTS = CircuitBreaker(
    app.conf.get("test_breaker", "payments"),
    failure_threshold=0.5,
    minimum_calls=10,
    window=10.0,
    reset_timeout=3.0,
)
PATIENT = RetryPolicy(retry_on=TRANSIENT_ERRORS, max_attempts=10, backoff=wait_random(0.5, 1.5))
BUDGETED = RetryPolicy(
    retry_on=(ConnectionError,),
    max_attempts=10,
    backoff=wait_random(0.2, 0.5),
    budget=RetryBudget(
        ratio=0.1, min_retries_per_second=0.1, window=60.0, key=app.conf.get("test_budget")
    ),
)


def _call_dependency(flag: str, calls: str) -> str:
    down = os.path.exists(flag)
    append(calls, up=not down, pid=os.getpid())
    if down:
        raise ConnectionRefusedError("payments API refused the connection")
    return "paid"


@app.task(base=ResilientTask, bind=True, name="protect.charge", circuit_breaker=PAYMENTS,
          retry_policy=PATIENT)  # fmt: skip
def charge(self: ResilientTask, flag: str, calls: str, log: str) -> str:
    """Call the payments API, guarded by the breaker."""
    record(self, log)
    return _call_dependency(flag, calls)


@app.task(base=ResilientTask, bind=True, name="protect.unguarded", retry_policy=PATIENT)
def unguarded(self: ResilientTask, flag: str, calls: str, log: str) -> str:
    """The same call without the breaker."""
    record(self, log)
    return _call_dependency(flag, calls)


@app.task(base=ResilientTask, bind=True, name="protect.flaky", retry_policy=BUDGETED)
def flaky(self: ResilientTask, log: str) -> str:
    """Always fails with a retryable error: 9 retries each, unless the budget says no."""
    record(self, log)
    raise ConnectionResetError("upstream reset the connection")


@app.task(base=ResilientTask, bind=True, name="protect.mixed", circuit_breaker=PAYMENTS,
          retry_policy=BUDGETED)  # fmt: skip
def mixed(self: ResilientTask, flag: str, calls: str, log: str) -> str:
    """Guarded and budgeted: for the state store going away."""
    record(self, log)
    return _call_dependency(flag, calls)
