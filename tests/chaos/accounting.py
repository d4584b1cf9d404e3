"""Accounting for every task of a chaos run: each one must end succeeded or dead-lettered.

A run sends a mixed workload (:func:`mixed_plan`) to ``chaos.mixed``, then :func:`settle`
polls the attempt log (successes) and the dead-letter queue (envelopes) while a disruption
(killed pool children, a cut connection, a broker restart) goes on, until every task is
accounted for or time runs out. :meth:`Ledger.problems` says what is wrong, if anything.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apps.base import read_log
from support.worker import Worker, WorkerRunner

#: Where each scenario's figures are appended (JSON lines), for docs/reliability.md.
REPORT_ENV = "RT_CHAOS_REPORT"
#: The task size of the mixed workloads: small in the default test run, 2000 under nox -s chaos.
TASKS = int(os.environ.get("RT_CHAOS_TASKS", "300"))
PERMANENT, TRANSIENT, OK = "permanent", "transient", "ok"
# What a failure to reach the broker looks like in an envelope (a retry that could not be
# published during an outage fails the attempt with the publish error).
_BROKER_TROUBLE = re.compile(
    r"OperationalError|ConnectionRe(set|fused)|RecoverableConnectionError|ChannelError"
    r"|BrokenPipe|ConnectionClosed|Socket closed|timed out|Connection to broker lost",
    re.IGNORECASE,
)


def mixed_plan(tasks: int, seed: int = 20260101) -> list[tuple[int, str]]:
    """``tasks`` numbered tasks: 20 % permanent failures, 20 % transient ones, the rest fine,
    in a shuffled (reproducible) order."""
    kinds = [PERMANENT if n % 5 == 0 else TRANSIENT if n % 5 == 1 else OK for n in range(tasks)]
    plan = list(enumerate(kinds))
    random.Random(seed).shuffle(plan)
    return plan


@dataclass
class Ledger:
    """Every task sent, and what became of it."""

    sent: dict[str, tuple[int, str]] = field(default_factory=dict)
    envelopes: list[dict[str, Any]] = field(default_factory=list)
    done: Counter[str] = field(default_factory=Counter)
    #: The tasks whose body started at least once (so that reached a worker's pool).
    started: set[str] = field(default_factory=set)
    #: The attempt log the tasks write to (the first worker's, whichever worker runs them).
    log: str = ""

    @property
    def dead_lettered(self) -> Counter[str]:
        return Counter(e["task"]["id"] for e in self.envelopes)

    def ids(self, kind: str) -> set[str]:
        return {task_id for task_id, (_, k) in self.sent.items() if k == kind}

    def settled(self) -> set[str]:
        return set(self.done) | set(self.dead_lettered)

    def unsettled(self, among: set[str] | None = None) -> set[str]:
        return (set(self.sent) if among is None else among) - self.settled()

    def only(self, ids: set[str]) -> Ledger:
        """The same accounting restricted to the tasks ``ids``."""
        return Ledger(
            sent={i: v for i, v in self.sent.items() if i in ids},
            envelopes=[e for e in self.envelopes if e["task"]["id"] in ids],
            done=Counter({i: n for i, n in self.done.items() if i in ids}),
            started=self.started & ids,
            log=self.log,
        )

    def excused(self) -> list[dict[str, Any]]:
        """Envelopes of tasks that were not meant to fail, dead-lettered because a retry could
        not be published while the broker was away (reason ``exception``, the publish error as
        the exception)."""
        return [
            e
            for e in self.envelopes
            if self.sent.get(e["task"]["id"], (0, ""))[1] != PERMANENT
            and e["reason"] == "exception"
            and _BROKER_TROUBLE.search(f"{e['exception']['type']} {e['exception']['message']}")
        ]

    def lost_before_delivery(self) -> set[str]:
        """Lost tasks whose body never started: lost before they reached any worker code."""
        return self.unsettled() - self.started

    def problems(
        self, *, allowed_duplicates: int = 0, outage: bool = False, transport_losses: bool = False
    ) -> list[str]:
        """What breaks the accounting: lost tasks, tasks dead-lettered twice (beyond
        ``allowed_duplicates``), permanent failures not dead-lettered or succeeding, other tasks
        dead-lettered for anything but a lost worker (or, with ``outage``, a broker outage).

        ``transport_losses``: a task lost before its body ever started is not counted (it is in
        :meth:`figures`): Kombu's Redis transport takes a message off its list (``BRPOP``)
        before it records it as unacknowledged, so a connection cut in between loses it before
        Celery or the library sees it (celery/kombu#305, celery/celery#4354)."""
        found = []
        before_delivery = self.lost_before_delivery() if transport_losses else set()
        lost = self.unsettled() - before_delivery
        if lost:
            kinds = Counter(self.sent[i][1] for i in lost)
            found.append(f"{len(lost)} lost ({dict(kinds)}), e.g. {sorted(lost)[:3]}")
        dead = self.dead_lettered
        unknown = set(dead) - set(self.sent)
        if unknown:
            found.append(f"{len(unknown)} dead letters of tasks never sent")
        twice = {i: n for i, n in dead.items() if n > 1}
        if len(twice) > allowed_duplicates:
            found.append(f"{len(twice)} dead-lettered more than once: {list(twice.items())[:3]}")
        permanent = self.ids(PERMANENT)
        undead = permanent - set(dead) - before_delivery  # one never delivered never failed
        if undead:
            found.append(f"{len(undead)} permanent failures not dead-lettered")
        if permanent & set(self.done):
            found.append(f"{len(permanent & set(self.done))} permanent failures succeeded")
        excused = {id(e) for e in self.excused()} if outage else set()
        for envelope in self.envelopes:
            kind = self.sent.get(envelope["task"]["id"], (0, "?"))[1]
            allowed = {"permanent", "worker_lost"} if kind == PERMANENT else {"worker_lost"}
            if envelope["reason"] not in allowed and id(envelope) not in excused:
                found.append(
                    f"a {kind} task dead-lettered for {envelope['reason']}: "
                    f"{envelope['exception']['type']}: {envelope['exception']['message'][:200]}"
                )
                break
        return found

    def figures(self) -> dict[str, Any]:
        dead = self.dead_lettered
        reasons = Counter(e["reason"] for e in self.envelopes)
        return {
            "tasks": len(self.sent),
            "succeeded": len(set(self.done) & set(self.sent)),
            "succeeded_more_than_once": sum(1 for n in self.done.values() if n > 1),
            "dead_lettered": len(dead),
            "dead_lettered_more_than_once": sum(1 for n in dead.values() if n > 1),
            "reasons": dict(reasons),
            "excused_broker_outage": len(self.excused()),
            "lost": len(self.unsettled()),
            "lost_before_delivery": len(self.lost_before_delivery()),
        }


def send(worker: Worker, plan: list[tuple[int, str]], ledger: Ledger | None = None) -> Ledger:
    """Send ``plan`` to ``chaos.mixed`` through the test's client; record it in ``ledger``."""
    ledger = ledger or Ledger(log=str(worker.log))
    with worker.client.producer_or_acquire() as producer:
        for n, kind in plan:
            result = worker.client.send_task(
                "chaos.mixed", args=[n, kind, ledger.log], producer=producer
            )
            ledger.sent[result.id] = (n, kind)
    return ledger


def collect(worker: Worker, ledger: Ledger) -> None:
    """Drain the dead-letter queue and read the successes; a broker that is away is skipped."""
    with suppress(Exception):  # the broker is away: try again at the next poll
        ledger.envelopes += worker.drain(f"{worker.queue}.dlq")
    attempts = [a for a in read_log(Path(ledger.log)) if a.get("id")]
    ledger.done = Counter(a["id"] for a in attempts if a.get("role") == "done")
    ledger.started = {a["id"] for a in attempts if a.get("role") in ("started", "done")}


def settle(
    worker: Worker,
    ledger: Ledger,
    *,
    timeout: float,
    during: Callable[[], object] | None = None,
    quiet: float = 2.0,
    stall: float | None = None,
    among: set[str] | None = None,
) -> float:
    """Poll until every task is accounted for (then ``quiet`` seconds more, for duplicates to
    show), or ``timeout``, or ``stall`` seconds without progress; call ``during()`` at every
    poll. ``among``: only these tasks need to be accounted for. Returns the seconds it took."""
    began = time.monotonic()
    deadline = began + timeout
    progress, settled = began, -1
    while time.monotonic() < deadline:
        collect(worker, ledger)
        if not ledger.unsettled(among):
            break
        if len(ledger.settled()) != settled:
            progress, settled = time.monotonic(), len(ledger.settled())
        elif stall is not None and time.monotonic() - progress > stall:
            break
        if during is not None:
            during()
        time.sleep(0.25)
    took = time.monotonic() - began
    time.sleep(quiet)
    collect(worker, ledger)
    return took


def settle_or_replace(
    workers: WorkerRunner,
    worker: Worker,
    ledger: Ledger,
    *,
    timeout: float,
    during: Callable[[], object] | None = None,
    stall: float = 30.0,
    among: set[str] | None = None,
    **start: Any,
) -> tuple[Worker, float, bool]:
    """:func:`settle`; if no task settles for ``stall`` seconds (or tasks are still unaccounted
    for at ``timeout``), the worker is taken to be stuck (a consumer that never noticed its
    connection died): it is stopped and a fresh worker (started with ``start``) settles the
    rest. Returns the worker now running, the seconds it all took and whether the first
    worker had to be replaced."""
    took = settle(worker, ledger, timeout=timeout, during=during, stall=stall, among=among)
    if not ledger.unsettled(among):
        return worker, took, False
    workers.stop(worker)
    worker = workers.start("apps.chaos_app", queues=worker.queues, **start)
    rest = settle(worker, ledger, timeout=timeout, among=among, stall=max(stall, 60.0))
    return worker, took + rest, True


class Killer:
    """SIGKILLs a random pool child of ``worker`` every ``every`` seconds, ``limit`` times."""

    def __init__(self, worker: Worker, limit: int, every: float = 0.15, seed: int = 7) -> None:
        self.worker = worker
        self.limit = limit
        self.every = every
        self.kills = 0
        self._rng = random.Random(seed)
        self._next = time.monotonic() + every

    def __call__(self) -> None:
        if self.kills >= self.limit or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every
        children = self.worker.pool_children()
        if children:
            try:
                os.kill(self._rng.choice(children), signal.SIGKILL)
            except ProcessLookupError:
                return
            self.kills += 1


def record(scenario: str, **figures: Any) -> None:
    """Print a scenario's figures and append them to ``$RT_CHAOS_REPORT`` when it is set."""
    line = json.dumps({"scenario": scenario, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures})
    print(line)
    path = os.environ.get(REPORT_ENV)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
