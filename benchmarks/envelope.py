"""What building one dead-letter envelope costs the worker's main process.

``python -m benchmarks.envelope`` (not part of ``nox -s bench``) fails a ``ResilientTask``
through Celery's tracer as a pool child does, sends its ``ExceptionInfo`` across ``pickle`` as
the pool does, and builds the envelope from it ``--count`` times, as
``ResilientRequest.on_failure`` does before the publish; it prints the time per envelope.
Times swing on a shared machine; instruction counts do not, so for a before / after
comparison count them, and subtract a run that builds none (the imports and the set-up)::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m benchmarks.envelope --count 200
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m benchmarks.envelope --count 0

(``Collected :`` on standard error is the total; the difference divided by 200 is the cost of
one envelope.)
"""

from __future__ import annotations

import argparse
import pickle
import time
import uuid
from typing import Any

from celery import Celery
from celery.app.trace import build_tracer
from kombu.message import Message
from kombu.serialization import dumps

from resilient_tasks import Permanent, ResilientTask, RetryPolicy, deadletter, retry
from resilient_tasks.worker import ResilientRequest


def failed_request() -> tuple[ResilientRequest, Any, Any]:
    """A worker request for a task that failed for good, with what its pool child sent back."""
    app = Celery("bench-envelope", set_as_current=False)
    app.conf.update(broker_url="memory://", result_backend=None, task_ignore_result=True)

    def gone(n: int) -> None:
        raise Permanent(LookupError(f"record {n} is gone"))

    task = app.task(
        base=ResilientTask,
        name="bench.failing",
        shared=False,
        retry_policy=RetryPolicy(retry_on=(ConnectionError, TimeoutError), max_attempts=5),
    )(gone)
    app.finalize()
    task = app.tasks[task.name]
    task_id = str(uuid.uuid4())
    sent = app.amqp.as_task_v2(task_id, task.name, args=(1,), kwargs={})
    delivery = {"exchange": "", "routing_key": "bench"}
    request = {**sent.headers, "delivery_info": delivery, "hostname": "w1@bench"}
    traced = build_tracer(task.name, task, app=app, eager=False, propagate=False)
    einfo = pickle.loads(pickle.dumps(traced(task_id, (1,), {}, request)[0]))  # the pool's pipe
    content_type, encoding, body = dumps(sent.body, serializer="json")
    message = Message(
        body=body,
        content_type=content_type,
        content_encoding=encoding,
        headers=sent.headers,
        delivery_info=delivery,
        properties={"priority": 0, "delivery_mode": 2, "correlation_id": task_id},
    )
    worker_request = ResilientRequest(message, app=app, task=task, hostname="w1@bench")
    exc = einfo.exception
    return worker_request, getattr(exc, "exc", exc), einfo  # unwrapped as on_failure does


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.envelope")
    parser.add_argument("--count", type=int, default=5000, help="envelopes to build")
    args = parser.parse_args(argv)
    request, exc, einfo = failed_request()
    reason = retry.give_up_reason(request, exc, einfo)
    began = time.perf_counter()
    for _ in range(args.count):
        deadletter._envelope(request, exc, einfo, reason)
    if args.count:
        seconds = time.perf_counter() - began
        print(f"{args.count} envelopes: {seconds / args.count * 1e6:.1f} us each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
