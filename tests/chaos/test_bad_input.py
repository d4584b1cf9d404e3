"""Bad input at run time, on a real worker: every message ends succeeded, retried or in the
dead-letter queue, or is refused before it is sent. Where that does not hold today, the test
proves the message is not lost (it is back on the broker once the worker stops) and then
reports the gap as an expected failure, with what happens instead.

The worker accepts JSON and pickle (``accept_content``), so both serializers can be tried.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kombu import Queue
from kombu.exceptions import EncodeError
from kombu.serialization import loads

from apps.base import read_log
from resilient_tasks.dlq import DeadLetter
from resilient_tasks.envelope import MAX_REPR_CHARS, MAX_TRACEBACK_CHARS, original_body
from support.brokers import Broker, make_broker
from support.worker import Worker, WorkerRunner

APP = "apps.chaos_app"
pytestmark = [pytest.mark.worker, pytest.mark.timeout(240)]
BOTH = pytest.mark.parametrize("broker", ["rabbitmq", "redis"], indirect=True)
PICKLE_TOO = {"accept_content": ["json", "pickle"]}


class ArrivesBroken:
    """Pickles in the client; unpickling it on the worker raises (think of a class renamed
    between two deploys)."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (int, ("not a number",))


@dataclass
class Outcome:
    """What became of one task: its recorded runs and its dead letters."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return any(r.get("role") == "done" for r in self.runs)

    @property
    def envelope(self) -> dict[str, Any]:
        assert len(self.dead_letters) == 1, f"{len(self.dead_letters)} dead letters"
        return self.dead_letters[0]


@dataclass
class Site:
    """One worker shared by the tests of a module, and every dead letter it has produced."""

    worker: Worker
    broker: Broker
    mailbox: list[dict[str, Any]] = field(default_factory=list)

    @property
    def log(self) -> str:
        return str(self.worker.log)

    def send(self, name: str, *args: Any, **options: Any) -> str:
        return str(self.worker.client.send_task(name, args=args, **options).id)

    def outcome(self, task_id: str, *, settled: bool = True, timeout: float = 30) -> Outcome:
        """Wait until ``task_id`` succeeded or was dead-lettered (``settled=False``: just wait
        ``timeout``), then half a second more for anything that would come twice."""
        deadline = time.monotonic() + timeout
        while True:
            found = self._outcome(task_id)
            if (settled and (found.done or found.dead_letters)) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        return self._outcome(task_id)

    def _outcome(self, task_id: str) -> Outcome:
        self.mailbox += self.worker.drain(f"{self.worker.queue}.dlq")
        return Outcome(
            runs=[r for r in read_log(Path(self.log)) if r.get("id") == task_id],
            dead_letters=[e for e in self.mailbox if e["task"]["id"] == task_id],
        )


@pytest.fixture(scope="module", params=["rabbitmq", "redis"])
def site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    """A worker on a queue of its own, shared by the tests of this module, per broker."""
    tmp = tmp_path_factory.mktemp(f"bad-input-{request.param}")
    broker = make_broker(request.param, tmp)
    with pytest.MonkeyPatch.context() as patch:
        if os.geteuid() == 0:  # Celery refuses to run a pickle-accepting worker as root otherwise
            patch.setenv("C_FORCE_ROOT", "1")
        runner = WorkerRunner(broker, tmp)
        try:
            yield Site(runner.start(APP, settings=PICKLE_TOO), broker)
        finally:
            runner.close()


def never_ran(site: Site, task_id: str) -> None:
    outcome = site.outcome(task_id, settled=False, timeout=1.5)
    assert not outcome.runs
    assert not outcome.dead_letters


# -- what cannot be serialised -------------------------------------------------------------------


def test_an_argument_json_cannot_carry_is_refused_by_the_client_and_nothing_is_sent(
    site: Site,
) -> None:
    task_id = str(uuid.uuid4())
    with pytest.raises(EncodeError, match="not JSON serializable"):
        site.worker.client.send_task(
            "chaos.fail", args=[object()], kwargs={"log": site.log}, task_id=task_id
        )

    never_ran(site, task_id)


def test_an_argument_pickle_cannot_carry_is_refused_by_the_client_and_nothing_is_sent(
    site: Site,
) -> None:
    task_id = str(uuid.uuid4())
    with pytest.raises(EncodeError):
        site.worker.client.send_task(
            "chaos.fail",
            args=[lambda: None],
            kwargs={"log": site.log},
            task_id=task_id,
            serializer="pickle",
        )

    never_ran(site, task_id)


def test_a_pickled_argument_the_worker_cannot_rebuild_is_dead_lettered_as_it_came(
    site: Site,
) -> None:
    """Celery's consumer would acknowledge it unread (``Consumer.on_decode_error``); the
    library's strategy dead-letters it first, body untouched, for a replay once the worker can
    rebuild the argument."""
    task_id = site.send(
        "chaos.fail", ArrivesBroken(), kwargs={"log": site.log}, serializer="pickle"
    )

    outcome = site.outcome(task_id, timeout=10)

    envelope = outcome.envelope
    assert not outcome.runs
    assert envelope["exception"]["type"] == "kombu.exceptions.DecodeError"
    assert "not a number" in envelope["exception"]["message"]
    assert envelope["original"]["content_type"] == "application/x-python-serialize"
    with pytest.raises(ValueError, match="not a number"):  # the very bytes the client sent
        pickle.loads(original_body(envelope["original"]))


def test_a_message_whose_json_body_is_corrupt_is_dead_lettered_as_it_came(site: Site) -> None:
    task_id = site.worker.publish_raw("chaos.fail", b'[[], {"log": "truncated')

    outcome = site.outcome(task_id, timeout=10)

    envelope = outcome.envelope
    assert envelope["exception"]["type"] == "kombu.exceptions.DecodeError"
    assert original_body(envelope["original"]) == b'[[], {"log": "truncated'


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_non_utf8_bytes_in_the_arguments_are_dead_lettered_and_kept_replayable(
    site: Site, serializer: str
) -> None:
    raw = b"\xff\xfe\x00caf\xe9"
    task_id = site.send("chaos.fail", raw, kwargs={"log": site.log}, serializer=serializer)

    envelope = site.outcome(task_id).envelope

    assert envelope["reason"] == "exception"
    assert envelope["task"]["args"] == [repr(raw)]
    original = envelope["original"]
    assert original["body_encoding"] == ("base64" if serializer == "pickle" else "text")
    args, kwargs, _ = loads(
        original_body(original),
        original["content_type"],
        original["content_encoding"],
        accept={"application/json", "application/x-python-serialize"},
    )
    assert args == [raw] or args == (raw,)
    assert kwargs == {"log": site.log}


def test_secrets_in_kwargs_never_reach_the_envelopes_task_kwargs_nor_what_tools_print(
    site: Site,
) -> None:
    secrets = {"password": "hunter2", "api_token": "t0k3n-x", "stripe_api_key": "sk_live_1"}
    task_id = site.send(
        "chaos.fail",
        kwargs={"log": site.log, "user": "ann", "headers": {"Authorization": "Bearer abc1"},
                **secrets},
    )  # fmt: skip

    envelope = site.outcome(task_id).envelope

    kwargs = envelope["task"]["kwargs"]
    assert kwargs["user"] == "ann"
    assert {kwargs[k] for k in secrets} == {"[REDACTED]"}
    assert kwargs["headers"] == {"Authorization": "[REDACTED]"}
    shown = json.dumps(DeadLetter(f"{site.worker.queue}.dlq", envelope).redacted())
    told = json.dumps({k: v for k, v in envelope.items() if k != "original"})
    for secret in [*secrets.values(), "Bearer abc1"]:
        assert secret not in told
        assert secret not in shown
    # By design the original message is kept exactly, for replay: protect the queue.
    assert "hunter2" in json.dumps(envelope["original"])


def test_a_lone_surrogate_in_the_arguments_fails_for_good_and_is_dead_lettered(
    site: Site,
) -> None:
    task_id = site.send("chaos.surrogate_permanent", "caf\udce9", site.log)

    envelope = site.outcome(task_id).envelope

    assert envelope["reason"] == "permanent"
    assert envelope["task"]["args"][0] == "caf\udce9"


# -- what cannot cross back from the pool child ---------------------------------------------------


def test_an_exception_that_cannot_be_unpickled_is_dead_lettered_with_its_type(
    site: Site,
) -> None:
    task_id = site.send("chaos.unpicklable", site.log)

    envelope = site.outcome(task_id).envelope

    assert envelope["exception"]["type"] == "apps.chaos_app.NeedsArgs"
    assert "payment required" in envelope["exception"]["message"]
    assert envelope["reason"] == "exception"  # nothing retries it: it just raised


def test_a_transient_exception_that_cannot_be_unpickled_is_retried_then_dead_lettered(
    site: Site,
) -> None:
    task_id = site.send("chaos.unpicklable_transient", site.log)

    outcome = site.outcome(task_id)

    envelope = outcome.envelope
    assert len(outcome.runs) == 3
    assert len(envelope["attempts"]) == 3
    # Celery sends back a stand-in (ConnectionError) that lost the reason the pool child
    # marked on the exception; the worker's main process makes the decision again.
    assert envelope["reason"] == "retries_exhausted"
    # ... and describes it as the class the task raised, not as the stand-in.
    assert envelope["exception"]["type"] == "apps.chaos_app.FlakyNeedsArgs"
    assert envelope["attempts"][-1]["exception_type"] == "apps.chaos_app.FlakyNeedsArgs"
    assert "unavailable" in envelope["exception"]["message"]


def test_a_huge_traceback_and_message_are_cut_to_size(site: Site) -> None:
    task_id = site.send("chaos.deep", 600, site.log)

    envelope = site.outcome(task_id).envelope

    exception = envelope["exception"]
    assert exception["type"] == "ValueError"
    assert len(exception["traceback"]) <= MAX_TRACEBACK_CHARS
    assert exception["traceback"].startswith("...(cut)...")
    assert len(exception["message"]) <= MAX_REPR_CHARS
    assert len(json.dumps(envelope)) < 64 * 1024


def test_a_recursion_error_is_dead_lettered(site: Site) -> None:
    task_id = site.send("chaos.recursion", site.log)

    envelope = site.outcome(task_id).envelope

    assert envelope["exception"]["type"] == "RecursionError"


# -- hooks and handlers that raise ---------------------------------------------------------------


def test_a_failure_handler_and_on_give_up_that_raise_change_nothing(site: Site) -> None:
    task_id = site.send("chaos.hooks_raise", site.log)

    outcome = site.outcome(task_id)

    roles = [r.get("role") for r in outcome.runs]
    assert "handler" in roles
    assert "on_give_up" in roles
    assert outcome.envelope["exception"]["type"] == "ValueError"
    assert outcome.envelope["exception"]["message"] == "the task's own failure"


def test_an_on_retry_hook_that_raises_does_not_stop_the_retry(site: Site) -> None:
    task_id = site.send("chaos.hooks_raise_retry", site.log)

    outcome = site.outcome(task_id)

    assert "on_retry" in [r.get("role") for r in outcome.runs]
    assert outcome.done
    assert not outcome.dead_letters


def test_celerys_own_on_failure_that_raises_still_dead_letters_once(site: Site) -> None:
    task_id = site.send("chaos.celery_on_failure_raises", site.log)

    outcome = site.outcome(task_id)

    envelope = outcome.envelope
    if envelope["exception"]["type"] != "ValueError":
        assert "the task's own failure" in envelope["exception"]["traceback"]
        pytest.xfail(
            f"masked: the envelope's exception is the hook's {envelope['exception']['type']}, "
            "the task's ValueError is only in the traceback (Celery's tracer reports what "
            "on_failure raised; the library does not isolate Celery's own hooks)"
        )


# -- headers and queues ----------------------------------------------------------------------


def test_damaged_library_headers_are_ignored(site: Site) -> None:
    task_id = site.send(
        "chaos.odd_headers",
        site.log,
        headers={"resilient_history": "{not json", "resilient_redeliveries": "many"},
    )

    outcome = site.outcome(task_id)

    assert outcome.done
    assert len(outcome.runs) == 3  # two attempts, and the success line


def test_a_dead_letter_queue_that_does_not_exist_yet_is_created_by_the_first_dead_letter(
    site: Site,
) -> None:
    queue = f"{site.worker.queue}.fresh.chaos.fresh_dlq"
    assert not site.worker.drain(queue)

    task_id = site.send("chaos.fresh_dlq", site.log)

    deadline = time.monotonic() + 30
    found: list[Any] = []
    while not found and time.monotonic() < deadline:
        found = site.worker.drain(queue)
        time.sleep(0.1)
    site.broker.extra_cleanup.append(queue)
    assert [e["task"]["id"] for e in found] == [task_id]


# -- what leaves a message unsettled today (a worker of its own each) -----------------------------


def back_on_the_broker(workers: WorkerRunner, worker: Worker, task_ids: set[str]) -> set[str]:
    """Stop ``worker``; return which of ``task_ids`` are back in its queue (consumed here)."""
    workers.stop(worker)
    found: set[str] = set()
    with worker.client.connection_for_read() as conn:
        bound = Queue(worker.queue, durable=True).bind(conn.default_channel)
        deadline = time.monotonic() + 20
        while found != task_ids and time.monotonic() < deadline:
            message = bound.get(no_ack=False)
            if message is None:
                time.sleep(0.2)
                continue
            found.add(message.headers.get("id"))
            message.ack()
    return found & task_ids


@BOTH
def test_an_envelope_that_cannot_be_built_or_routed_leaves_the_message_on_the_broker(
    workers: WorkerRunner,
) -> None:
    """Two failures the worker's main process may fail to dead-letter: a lone surrogate in an
    exception message once the attempt history holds three attempts (the history header is
    measured as UTF-8), and a ``dead_letter_queue`` template that only fails when formatted
    (when the library accepts it at all). Neither may be lost."""
    worker = workers.start(APP)
    sent = {str(worker.send("chaos.surrogate_transient", "caf\udce9").id)}
    if not _template_refused():
        sent.add(str(worker.send("chaos.bad_template").id))
    time.sleep(4)
    settled = {a["id"] for a in worker.attempts() if a.get("role") == "done"} | {
        e["task"]["id"] for e in worker.drain(f"{worker.queue}.dlq")
    }
    output = worker.output_text()

    back = back_on_the_broker(workers, worker, sent - settled)

    assert sent <= settled | back  # none lost
    if back:
        errors = {
            line.split("exception: ")[-1][:60]
            for line in output.splitlines()
            if "Pool callback raised" in line
        }
        pytest.xfail(
            "unsettled: the worker's main process raised while building or routing the "
            f"envelope ({', '.join(sorted(errors))}); the message stayed unacknowledged until "
            "the worker stopped, and comes back to fail the same way"
        )


def _template_refused() -> bool:
    from celery import Celery

    from resilient_tasks import ConfigurationError, ResilientTask

    app = Celery("probe", set_as_current=False)
    app.finalize()

    def probe() -> None:
        """A task body."""

    try:
        app.task(base=ResilientTask, name="probe.t", shared=False, dead_letter_queue="{queue:d}")(
            probe
        )
    except ConfigurationError:
        return True
    return False


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_a_dead_letter_queue_declared_with_other_arguments_loses_nothing(
    workers: WorkerRunner, broker: Broker
) -> None:
    """Operations pre-declared the dead-letter queue with a message TTL: the library's own
    declaration (durable, no arguments) is refused by RabbitMQ (PRECONDITION_FAILED)."""
    queue = broker.queue_name()
    with broker.connection() as conn:
        # Through the default exchange, as the library declares it (no exchange of its own left).
        Queue(
            f"{queue}.dlq",
            exchange="",
            routing_key=f"{queue}.dlq",
            durable=True,
            queue_arguments={"x-message-ttl": 86_400_000},
        ).bind(conn.default_channel).declare()
    worker = workers.start(APP, queues=[queue])
    task_id = str(worker.client.send_task("chaos.fail", kwargs={"log": str(worker.log)}).id)
    time.sleep(3)
    runs = len([a for a in worker.attempts() if a.get("id") == task_id])
    in_dlq = any(e["task"]["id"] == task_id for e in worker.drain(f"{queue}.dlq"))

    back = back_on_the_broker(workers, worker, {task_id})

    assert in_dlq or back == {task_id}  # not lost
    if not in_dlq:
        pytest.xfail(
            f"requeue loop: the publish fails, the message is requeued at once and runs again: "
            f"{runs} runs in 3 s (each logging the whole envelope at ERROR)"
        )
