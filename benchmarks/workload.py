"""Benchmarks on a real prefork worker: success and failure throughput, replay, retry storm.

How a run is timed (the same for every variant):

1. the run's messages are published to a fresh queue *before* any worker consumes it;
2. a ``celery worker -P prefork -c 2`` is started on that queue (its start-up is not timed);
3. every task body counts itself in a memory-mapped slot file (``apps.bench_app.tick``: a
   write to shared memory, no broker, no result backend, so the clock costs every variant the
   same, and little); the run starts at the first task's tick;
4. a success run ends at the last task's tick; a failure run ends when the dead-letter queue
   holds every envelope (polled every 20 ms: the envelope is published by the worker's main
   process after the task body, so the body's tick would stop the clock too early).

Throughput is tasks / (end - start). The worker runs at ``--loglevel=WARNING`` (Celery's
per-task INFO lines would cost the same for every variant and hide the library's share) with
Celery's default prefetch (4 per process).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from resilient_tasks.delayed import delayed_stats
from support.brokers import Broker, make_broker
from support.worker import Worker, WorkerRunner

APP = "apps.bench_app"
CONCURRENCY = 2
#: Celery's own default; the test harness uses 1, which would measure round trips instead.
PREFETCH = 4
POLL = 0.02
#: The slot file layout of ``apps.bench_app``: first tick, latest tick, ticks.
SLOT = struct.Struct("=ddq")


class BrokerUnavailable(Exception):
    """The broker does not answer; its benchmarks are skipped."""


@dataclass
class Slots:
    """What the pool processes' slot files say: tasks run, first and latest tick."""

    count: int
    first: float
    last: float


def read_slots(folder: Path) -> Slots:
    count, first, last = 0, float("inf"), 0.0
    for path in folder.glob("slot-*"):
        data = path.read_bytes()
        if len(data) != SLOT.size:
            continue
        f, latest, n = SLOT.unpack(data)
        if n:
            count += n
            first, last = min(first, f), max(last, latest)
    return Slots(count, first, last)


def rss_kib(pid: int) -> int:
    """VmRSS of one process, in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def depth(connection: Any, queue: str) -> int:
    """Messages ready in ``queue`` (0 if it does not exist)."""
    probe = DepthProbe(connection, queue)
    try:
        return probe()
    finally:
        probe.close()


class DepthProbe:
    """Counts the messages ready in one queue, again and again, on one channel of an open
    connection: polling every 20 ms with a new connection each time would cost the broker a
    handshake 50 times a second, during the very run being timed."""

    def __init__(self, connection: Any, queue: str) -> None:
        self._connection = connection
        self._queue = queue
        self._channel: Any = None

    def __call__(self) -> int:
        """Messages ready in the queue now (0 while it does not exist)."""
        if self._channel is None:
            self._channel = self._connection.channel()
        if hasattr(self._channel, "_size"):  # Kombu's virtual transports (Redis): 0 if absent
            return int(self._channel._size(self._queue))
        try:
            return int(self._channel.queue_declare(queue=self._queue, passive=True).message_count)
        except self._connection.channel_errors:  # no such queue yet: the broker closed the channel
            self.close()
            return 0

    def close(self) -> None:
        if self._channel is not None:
            with suppress(Exception):
                self._channel.close()
            self._channel = None


class Site:
    """One broker, and the workers and queues of the benchmarks that run on it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.tmp = Path(tempfile.mkdtemp(prefix=f"rt-bench-{kind}-"))
        try:
            self.broker: Broker = make_broker(kind, self.tmp)
        except (Exception, pytest.skip.Exception) as exc:  # the harness skips a broker that is down
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise BrokerUnavailable(str(exc)) from None
        self.runner = WorkerRunner(self.broker, self.tmp)
        self.loglevel = "WARNING"
        self._runs = 0

    def close(self) -> None:
        self.runner.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def overrides(self, folder: Path, events: bool | str) -> dict[str, Any]:
        return {
            "worker_prefetch_multiplier": PREFETCH,
            "result_backend": None,
            "bench_dir": str(folder),
            "bench_events": events,
        }

    def client(self, queue: str, overrides: dict[str, Any]) -> Celery:
        client = Celery(f"bench-client-{queue}", set_as_current=False)
        client.conf.update(self.runner.settings(queue, **overrides))
        return client

    @contextmanager
    def run(self, label: str, *, events: bool | str = False) -> Iterator[Run]:
        """A fresh queue, slot folder and client; the worker is started by :meth:`Run.start`."""
        self._runs += 1
        queue = self.broker.queue_name(f"{label}{self._runs}")
        folder = self.tmp / f"slots-{label}{self._runs}"
        folder.mkdir()
        overrides = self.overrides(folder, events)
        run = Run(self, queue, folder, overrides, self.client(queue, overrides))
        self.runner.queues.add(queue)
        try:
            yield run
        finally:
            if run.worker is not None:
                self.runner.stop(run.worker, timeout=5)
            run.client.close()
            self.broker.cleanup([queue])


@dataclass
class Run:
    site: Site
    queue: str
    folder: Path
    overrides: dict[str, Any]
    client: Celery
    worker: Worker | None = None

    def publish(self, task: str, count: int, start: int = 0) -> float:
        """Publish ``count`` messages of ``task`` to the run's queue; return the seconds taken."""
        began = time.perf_counter()
        with self.client.producer_or_acquire() as producer:
            self.client.amqp.queues[self.queue].bind(producer.channel).declare()
            for n in range(start, start + count):
                self.client.send_task(task, args=[n], producer=producer)
        return time.perf_counter() - began

    def start(self) -> Worker:
        self.worker = self.site.runner.start(
            APP,
            queues=[self.queue],
            concurrency=CONCURRENCY,
            settings=self.overrides,
            extra_args=(f"--loglevel={self.site.loglevel}",),
        )
        return self.worker

    def slots(self) -> Slots:
        return read_slots(self.folder)

    def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                output = self.worker.output_text()[-3000:] if self.worker else ""
                raise TimeoutError(f"{what} did not happen in {timeout:.0f} s\n{output}")
            if self.worker is not None and self.worker.process.poll() is not None:
                raise RuntimeError(f"the worker died:\n{self.worker.output_text()[-3000:]}")
            time.sleep(POLL)

    def depth(self, queue: str) -> int:
        with self.client.connection_for_read() as connection:
            return depth(connection, queue)

    def wait_for_depth(self, queue: str, count: int, timeout: float, what: str) -> float:
        """Wait until ``queue`` holds ``count`` ready messages, polling it through one
        :class:`DepthProbe` on a connection of its own; return the ``time.time()`` it did."""
        with self.client.connection_for_read() as connection:
            probe = DepthProbe(connection, queue)
            try:
                self.wait(lambda: probe() >= count, timeout, what)
                return time.time()
            finally:
                probe.close()


def _timeout(tasks: int) -> float:
    return 120 + tasks / 20


#: The broker's process, by name, for its CPU time.
BROKER_PROCESS = {"rabbitmq": "beam.smp", "redis": "redis-server"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pids(kind: str) -> list[int]:
    """The local broker's processes (none for a broker without one, e.g. the filesystem)."""
    name = BROKER_PROCESS.get(kind)
    if name is None:
        return []
    found = subprocess.run(["pgrep", "-f", name], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


@contextmanager
def broker_on_own_core(kinds: list[str]) -> Iterator[str]:
    """The local brokers' processes on the last CPU core and this process (so every worker it
    starts) on the others, restored afterwards: what the worker does when the broker runs on a
    host of its own, where the broker's CPU no longer comes out of the worker's. Yields a
    sentence for the report."""
    mine = os.sched_getaffinity(0)
    cores = sorted(mine)
    if len(cores) < 2:
        raise SystemExit("--broker-own-core needs at least 2 CPU cores")
    broker_core, rest = cores[-1], cores[:-1]
    saved: dict[int, set[int]] = {}
    try:  # whatever fails midway, what was pinned is put back
        for pid in (pid for kind in kinds for pid in broker_pids(kind)):
            for task in Path(f"/proc/{pid}/task").glob("*"):  # every thread: Erlang's schedulers
                with suppress(OSError):
                    tid = int(task.name)
                    saved[tid] = os.sched_getaffinity(tid)
                    os.sched_setaffinity(tid, {broker_core})
        if not saved:
            raise SystemExit(f"--broker-own-core: no local broker process found for {kinds}")
        os.sched_setaffinity(0, set(rest))
        yield (
            f"the brokers on CPU core {broker_core} alone, the benchmark and its workers on "
            f"{', '.join(map(str, rest))}"
        )
    finally:
        os.sched_setaffinity(0, mine)
        for tid, affinity in saved.items():
            with suppress(OSError):
                os.sched_setaffinity(tid, affinity)


def success(site: Site, task: str, tasks: int, *, events: bool | str = False) -> dict[str, Any]:
    """Tasks per second of a no-op ``task`` from the first task received to the last done."""
    with site.run(task.rsplit(".", 1)[-1], events=events) as run:
        run.publish(task, tasks)
        run.start()
        run.wait(lambda: run.slots().count >= tasks, _timeout(tasks), f"{tasks} x {task}")
        slots = run.slots()
    seconds = slots.last - slots.first
    return {"task": task, "tasks": tasks, "seconds": seconds, "per_second": tasks / seconds}


def failure(
    site: Site, tasks: int, *, replay: bool = True, events: bool = False
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Dead-lettering throughput of ``tasks`` permanent failures; then, with ``replay``, the
    replay of their envelopes with publisher confirms (worker stopped, so nothing consumes)."""
    with site.run("failing", events=events) as run:
        dlq = f"{run.queue}.dlq"
        run.publish("bench.failing", tasks)
        run.start()
        ended = run.wait_for_depth(dlq, tasks, _timeout(tasks), f"{tasks} dead letters")
        slots = run.slots()
        seconds = ended - slots.first
        result = {
            "task": "bench.failing",
            "tasks": tasks,
            "seconds": seconds,
            "per_second": tasks / seconds,
            "note": f"end detected by polling the dead-letter queue every {POLL * 1000:.0f} ms",
        }
        if not replay:
            return result, None
        assert run.worker is not None
        site.runner.stop(run.worker)
        run.worker = None
        return result, _replay(run, dlq, tasks)


def _replay(run: Run, dlq: str, tasks: int) -> dict[str, Any]:
    try:
        from resilient_tasks.dlq import DeadLetters
    except ImportError as exc:  # the tools are optional for the benchmark: report, go on
        return {"skipped": f"resilient_tasks.dlq is not importable yet ({exc})"}
    letters = DeadLetters(run.client, queues=[dlq])
    began = time.perf_counter()
    report = letters.replay()
    seconds = time.perf_counter() - began
    replayed = int(report.replayed)
    back = run.depth(run.queue)
    return {
        "envelopes": tasks,
        "replayed": replayed,
        "in_task_queue_after": back,
        "seconds": seconds,
        "per_second": replayed / seconds if seconds else 0.0,
    }


def retry_storm(
    site: Site,
    tasks: int,
    warmup: int = 500,
    hold_timeout: float = 120.0,
    probes: int = 20,
    task: str = "bench.storm",
) -> dict[str, Any]:
    """Worker RSS before and after ``tasks`` tasks each scheduled to retry in an hour, and how
    long a task published after the storm waits.

    Celery keeps a countdown retry in the worker that receives it (an ETA task held in the main
    process's memory, unacknowledged, until it is due), so the main process's growth per held
    retry is the cost of parking retries in workers. The pool children grow too, by a roughly
    fixed amount (the retry path's high-water mark, the same with Celery's own autoretry), which
    is reported apart.
    The worker raises its prefetch by one for each ETA message it receives; how fast it pulls
    them in depends on the transport, so the figures are taken once the broker's queue is empty
    or after ``hold_timeout`` seconds, whichever comes first, with the number actually held.
    Then ``probes`` ordinary tasks are published behind the retries and their wait is timed.
    """
    with site.run("storm") as run:
        run.publish("bench.resilient", warmup)
        worker = run.start()
        run.wait(lambda: run.slots().count >= warmup, _timeout(warmup), "the warm-up")
        time.sleep(1.0)
        before = _memory(worker)
        published = run.publish(task, tasks, start=warmup)
        began = time.time()
        run.wait(
            lambda: run.slots().count >= warmup + tasks,
            _timeout(tasks),
            f"{tasks} first attempts",
        )
        first_attempts = time.time() - began
        deadline = time.monotonic() + hold_timeout
        while run.depth(run.queue) and time.monotonic() < deadline:
            time.sleep(0.25)
        # A retry that waits on the broker is in its waiting room, not on the queue's list.
        # (RabbitMQ counts per delay queue of the run's own topology: all of them are its.)
        amqp = run.client.connection_for_write().transport.driver_type == "amqp"
        stats = delayed_stats(run.client)
        delayed = sum(q.waiting for q in stats if amqp or q.queue == run.queue)
        waiting = run.depth(run.queue) + delayed
        held_after = time.time() - began
        time.sleep(2.0)
        after = _memory(worker)
        probe_sent = time.time()
        run.publish("bench.resilient", probes, start=warmup + tasks)
        probe_wait: float | None = None
        with suppress(TimeoutError):
            run.wait(
                lambda: run.slots().count >= warmup + tasks + probes,
                hold_timeout,
                "the probes",
            )
            probe_wait = run.slots().last - probe_sent
    held = tasks - waiting
    growth = after["total_kib"] - before["total_kib"]
    main_growth = after["main_kib"] - before["main_kib"]
    return {
        "task": task,
        "tasks": tasks,
        "countdown": 3600,
        "before": before,
        "after": after,
        "held_in_worker": held,
        "still_on_broker": waiting,
        "delayed_on_broker": delayed,
        "growth_kib": growth,
        "main_growth_kib": main_growth,
        "children_growth_kib": growth - main_growth,
        "main_bytes_per_held_task": main_growth * 1024 / held if held else None,
        "publish_seconds": published,
        "first_attempts_seconds": first_attempts,
        "seconds_until_measured": held_after,
        "probe_tasks": probes,
        "probe_wait_seconds": probe_wait,
    }


def _memory(worker: Worker) -> dict[str, Any]:
    """VmRSS of the worker's main process and pool children (median of three samples)."""
    samples = []
    for _ in range(3):
        main = rss_kib(worker.process.pid)
        children = [rss_kib(pid) for pid in worker.pool_children()]
        samples.append((main, children))
        time.sleep(0.2)
    samples.sort(key=lambda s: s[0] + sum(s[1]))
    main, children = samples[1]
    return {"main_kib": main, "children_kib": children, "total_kib": main + sum(children)}


def available(kinds: list[str]) -> tuple[dict[str, Site], dict[str, str]]:
    """A :class:`Site` for every broker that answers, and why the others were skipped."""
    sites: dict[str, Site] = {}
    skipped: dict[str, str] = {}
    for kind in kinds:
        try:
            sites[kind] = Site(kind)
        except BrokerUnavailable as exc:
            skipped[kind] = str(exc)
    return sites, skipped


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
