"""``celery dlq``: list, show, count, replay and purge dead letters from the command line.

Registered through the ``celery.commands`` entry point, so it runs with the app of ``-A``::

    celery -A proj dlq list    [--queue Q]... [--task NAME] [--id ID] [--reason R] [--limit N]
                               [--json]
    celery -A proj dlq show    ID [--queue Q]...
    celery -A proj dlq stats   [--queue Q]... [--json]
    celery -A proj dlq replay  [--queue Q]... [--task NAME] [--id ID] [--reason R] [--limit N]
                               [--dry-run] [--to-queue Q] [--allow-pickle]
    celery -A proj dlq purge   [--queue Q]... [--task NAME] [--id ID] [--reason R] [--limit N]
                               [--yes]
    celery -A proj dlq web     [--queue Q]... [--host 127.0.0.1] [--port 5590] [--token T]

Every command is a thin layer over :class:`resilient_tasks.dlq.DeadLetters`; everything it
prints is redacted (:meth:`resilient_tasks.dlq.DeadLetter.redacted`). A mistake is an error,
never an empty answer. Exit status: 0 when the command did what it was asked, 1 when it did not
(a ``--queue`` the broker does not have, an ``--id`` that matches nothing, a queue that holds
messages that are not dead letters, a refused or failed replay, a broker error, an aborted
purge), 2 for a usage error (an unknown option or ``--reason``, ``--limit 0``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import click
from kombu.exceptions import OperationalError

from .delayed import delayed_stats
from .dlq import (
    REASONS,
    DeadLetter,
    DeadLetters,
    DeadLetterStats,
    DeadLetterToolError,
    NotADeadLetterQueue,
    Outcome,
    PurgeReport,
    ReplayError,
    ReplayReport,
)

__all__ = ["delayed", "dlq"]

_F = TypeVar("_F", bound=Callable[..., Any])
_COLUMNS = ("ID", "TASK", "REASON", "EXCEPTION", "DEAD-LETTERED AT", "ATTEMPTS", "REDELIVERED")
# How many tasks, reasons and exception types `dlq stats` shows (--json has them all).
_TOP = 10


def _queue_option(f: _F) -> _F:
    option = click.option(
        "--queue",
        "-Q",
        "queues",
        multiple=True,
        metavar="QUEUE",
        help="A dead-letter queue (repeatable). Default: every one the app's task routes imply.",
    )
    return option(f)


def _filter_options(f: _F) -> _F:
    options = (
        click.option(
            "--task", metavar="NAME", help="Only this task (a name or a glob: 'billing.*')."
        ),
        click.option("--id", "task_id", metavar="ID", help="Only the task with this id."),
        click.option(
            "--reason",
            type=click.Choice(REASONS),
            help="Only this reason (the broker's: expired, rejected, maxlen, delivery_limit).",
        ),
        click.option(
            "--limit", type=click.IntRange(min=1), metavar="N", help="At most N dead letters."
        ),
    )
    for option in reversed(options):
        f = option(f)
    return _queue_option(f)


@contextmanager
def _errors(letters: DeadLetters) -> Iterator[None]:
    """Broker trouble ends the command with a message (exit status 1), not a traceback."""
    connection = letters.app.connection_for_read()
    broker_errors = (OperationalError, *connection.connection_errors, *connection.channel_errors)
    try:
        yield
    except ReplayError as exc:
        raise click.ClickException(
            f"{exc}\nReplayed {exc.report.replayed}; the others stay in the dead-letter queue."
        ) from exc
    except NotADeadLetterQueue as exc:
        report = exc.report
        done = "Nothing was changed."
        if isinstance(report, ReplayReport) and report.replayed and not report.dry_run:
            done = f"Replayed {_plural(report.replayed, 'dead letter')} before it."
        elif isinstance(report, PurgeReport) and report.purged:
            done = f"Purged {_plural(report.purged, 'dead letter')} before it."
        raise click.ClickException(f"{exc}. {done}") from exc
    except DeadLetterToolError as exc:
        raise click.ClickException(str(exc)) from exc
    except broker_errors as exc:
        raise click.ClickException(f"broker error: {exc}") from exc


def _dead_letters(ctx: click.Context, queues: Sequence[str]) -> DeadLetters:
    app = getattr(ctx.obj, "app", None)
    if app is None:
        raise click.UsageError("run it as a Celery sub-command: celery -A proj dlq ...")
    app.loader.import_default_modules()  # a Django project's tasks, as `celery worker` does
    try:
        return DeadLetters(app, queues or None)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def _queues_text(letters: DeadLetters) -> str:
    return ", ".join(letters.queues)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@click.group(name="dlq")
def dlq() -> None:
    """Dead letters: list, show, count, replay and purge tasks that failed for good.

    Dead letters are read without being consumed; a replay publishes each message with the
    broker's confirm before it removes it. Everything printed is redacted.

    Example:

    \b
        celery -A proj dlq stats
        celery -A proj dlq list --task billing.sync_invoice
        celery -A proj dlq replay --reason retries_exhausted --dry-run
        celery -A proj dlq replay --reason retries_exhausted
    """


@dlq.command(name="list")
@_filter_options
@click.option("--json", "as_json", is_flag=True, help="One redacted envelope per line.")
@click.pass_context
def list_(
    ctx: click.Context,
    queues: tuple[str, ...],
    task: str | None,
    task_id: str | None,
    reason: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List dead letters, oldest first (nothing is consumed).

    ATTEMPTS counts the attempts recorded; REDELIVERED how often the message came back after
    its worker was lost (a run that recorded no attempt). Exits 1 if --id matches nothing or a
    queue holds messages that are not dead letters (they are not listed).
    """
    letters = _dead_letters(ctx, queues)
    with _errors(letters):
        found, others = _listed(letters, task, task_id, reason, limit)
    if as_json:
        for letter in found:
            click.echo(json.dumps(letter.redacted(letters.redact_patterns), default=str))
    elif not found and not others:  # a queue of other messages is no all-clear
        click.echo(f"No dead letters in {_queues_text(letters)}.")
    else:
        click.echo(_table([_row(letter) for letter in found]))
        click.echo(f"\n{_plural(len(found), 'dead letter')} in {_queues_text(letters)}.")
    _fail_on_others(ctx, others)
    if task_id is not None and not found:
        click.echo(f"No dead letter of task {task_id} in {_queues_text(letters)}.", err=True)
        ctx.exit(1)


def _listed(
    letters: DeadLetters,
    task: str | None,
    task_id: str | None,
    reason: str | None,
    limit: int | None,
) -> tuple[list[DeadLetter], dict[str, list[str]]]:
    """The matching dead letters, and per queue the messages found there that are not."""
    others: dict[str, list[str]] = {}
    found = letters.list(
        task=task,
        id=task_id,
        reason=reason,
        limit=limit,
        others=lambda queue, what: others.setdefault(queue, []).append(what),
    )
    return found, others


def _fail_on_others(
    ctx: click.Context, others: dict[str, list[str]], left_out: str = "not listed"
) -> None:
    """Messages that are not dead letters: name them on stderr and exit 1."""
    for queue, found in others.items():
        first = found[0] + (f" and {_plural(len(found) - 1, 'other')}" if len(found) > 1 else "")
        click.echo(
            f"Error: {queue} holds {_plural(len(found), 'message')} that "
            f"{'is' if len(found) == 1 else 'are'} not dead letters ({first}; {left_out}): "
            "is it a live task queue?",
            err=True,
        )
    if others:
        ctx.exit(1)


def _row(letter: DeadLetter) -> tuple[str, ...]:
    return (
        letter.id or "-",
        letter.task_name or "-",
        f"{letter.reason} (broker)" if letter.from_broker else letter.reason,
        letter.exception_type or "-",
        letter.dead_lettered_at or "-",
        str(letter.attempts),
        str(letter.redeliveries),
    )


def _table(rows: list[tuple[str, ...]], columns: tuple[str, ...] = _COLUMNS) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(columns, *rows, strict=False)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (columns, *rows)
    )


@dlq.command()
@click.argument("task_id", metavar="ID")
@_queue_option
@click.pass_context
def show(ctx: click.Context, task_id: str, queues: tuple[str, ...]) -> None:
    """Show the dead letter of task ID as (redacted) JSON; exit 1 if there is none."""
    letters = _dead_letters(ctx, queues)
    with _errors(letters):
        found = letters.list(id=task_id)
    if not found:
        click.echo(f"No dead letter of task {task_id} in {_queues_text(letters)}.", err=True)
        ctx.exit(1)
    for letter in found:
        click.echo(json.dumps(letter.redacted(letters.redact_patterns), indent=2, default=str))


@dlq.command(name="stats")
@_queue_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document (its shape: the docs).")
@click.pass_context
def dlq_stats(ctx: click.Context, queues: tuple[str, ...], as_json: bool) -> None:
    """Count dead letters by task, reason and exception type, with the oldest and newest, per
    queue and in total (nothing is consumed).

    Exits 1 if a queue does not exist or holds messages that are not dead letters (they are
    not counted, and named on stderr).
    """
    letters = _dead_letters(ctx, queues)
    others: dict[str, list[str]] = {}
    with _errors(letters):
        counted = letters.stats(
            others=lambda queue, what: others.setdefault(queue, []).append(what)
        )
    if as_json:
        click.echo(json.dumps(counted.as_dict(), indent=2))
    elif not counted.count and not others:  # a queue of other messages is no all-clear
        click.echo(f"No dead letters in {_queues_text(letters)}.")
    else:
        click.echo(_stats_text(counted))
    _fail_on_others(ctx, others, "not counted")


def _stats_text(counted: DeadLetterStats) -> str:
    rows: list[tuple[str, ...]] = [
        (q.queue, str(q.count), q.oldest or "-", q.newest or "-") for q in counted.queues
    ]
    if len(rows) > 1:
        rows.append(("total", str(counted.count), counted.oldest or "-", counted.newest or "-"))
    parts = [_table(rows, ("QUEUE", "DEAD LETTERS", "OLDEST", "NEWEST"))]
    for title, counts in (
        ("TASK", counted.by_task),
        ("REASON", counted.by_reason),
        ("EXCEPTION", counted.by_exception),
    ):
        if counts:
            parts.append(_top(title, counts, counted.count))
    parts.append(
        f"{_plural(counted.count, 'dead letter')} in {_plural(len(counted.queues), 'queue')}."
    )
    return "\n\n".join(parts)


def _top(title: str, counts: Mapping[str, int], total: int) -> str:
    """The ``_TOP`` highest counts as a table, and a line for the rest."""
    ranked = list(counts.items())
    rows: list[tuple[str, ...]] = [
        (key, str(count), f"{100 * count / total:.0f}%") for key, count in ranked[:_TOP]
    ]
    rest = ranked[_TOP:]
    if rest:
        rest_count = sum(count for _, count in rest)
        rows.append((f"({len(rest)} more)", str(rest_count), f"{100 * rest_count / total:.0f}%"))
    return _table(rows, (title, "DEAD LETTERS", "SHARE"))


@dlq.command()
@_filter_options
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; change nothing.")
@click.option(
    "--to-queue", metavar="QUEUE", help="Publish to this queue instead of the original one."
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Also replay pickle-serialised messages (refused by default: unpickling runs code).",
)
@click.pass_context
def replay(
    ctx: click.Context,
    queues: tuple[str, ...],
    task: str | None,
    task_id: str | None,
    reason: str | None,
    limit: int | None,
    dry_run: bool,
    to_queue: str | None,
    allow_pickle: bool,
) -> None:
    """Republish dead letters to their original queue, then remove them.

    The attempt count starts again, eta and expires are dropped (they belong to the first run)
    and the resilient_replays header counts the replays. A message is removed only once the
    broker has confirmed the publish. Exits 1 if any matching dead letter was not replayed, and,
    replaying nothing, if a queue does not exist, holds messages that are not dead letters (a
    live task queue), or --id matches nothing.
    """
    letters = _dead_letters(ctx, queues)
    if to_queue in letters.queues:
        raise click.UsageError(f"--to-queue {to_queue} is one of the dead-letter queues replayed")
    notes: list[str] = []
    with _errors(letters), ExitStack() as stack:
        total = letters.count()
        label = "Dry run" if dry_run else "Replaying"
        bars: list[Any] = []  # shown from the first dead letter on: not before a refusal

        def progress(letter: DeadLetter, outcome: Outcome) -> None:
            if not bars:
                bar = click.progressbar(length=total, label=label, file=sys.stderr)
                bars.append(stack.enter_context(bar))
            bars[0].update(1)
            if outcome == "would_replay":
                notes.append(f"would replay {_describe(letter, to_queue)}")
            elif outcome == "refused":
                notes.append(f"refused {_describe(letter, to_queue)}: {_why(letter, to_queue)}")

        report = letters.replay(
            task=task,
            id=task_id,
            reason=reason,
            limit=limit,
            dry_run=dry_run,
            to_queue=to_queue,
            allow_pickle=allow_pickle,
            progress=progress,
        )
    for note in notes:
        click.echo(note)
    if dry_run:
        click.echo(
            f"Dry run: would replay {_plural(report.replayed, 'dead letter')} of "
            f"{report.matched} matching; nothing was published or removed."
        )
    else:
        click.echo(
            f"Replayed {_plural(report.replayed, 'dead letter')} of {report.matched} matching "
            f"from {_queues_text(letters)}."
        )
    if report.refused:
        stays = "it stays" if report.refused == 1 else "they stay"
        click.echo(
            f"{_plural(report.refused, 'dead letter')} refused; {stays} in the dead-letter queue.",
            err=True,
        )
        ctx.exit(1)


def _describe(letter: DeadLetter, to_queue: str | None) -> str:
    where = f"queue {to_queue!r}" if to_queue else _destination(letter)
    return f"{letter.task_name}[{letter.id}] -> {where}"


def _destination(letter: DeadLetter) -> str:
    if letter.destination is None:
        return "(unknown destination)"
    exchange, routing_key = letter.destination
    return f"exchange {exchange!r}, routing key {routing_key!r}"


def _why(letter: DeadLetter, to_queue: str | None) -> str:
    if letter.pickled:
        return "pickle-serialised (pass --allow-pickle to replay it anyway)"
    if letter.destination is None and not to_queue:
        return "its original destination is unknown (pass --to-queue)"
    return "its original message cannot be decoded"


@dlq.command()
@_filter_options
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge(
    ctx: click.Context,
    queues: tuple[str, ...],
    task: str | None,
    task_id: str | None,
    reason: str | None,
    limit: int | None,
    yes: bool,
) -> None:
    """Remove matching dead letters for good (asks first unless --yes).

    Removes nothing, and exits 1, if a queue does not exist, holds messages that are not dead
    letters (a live task queue), or --id matches nothing.
    """
    letters = _dead_letters(ctx, queues)
    with _errors(letters):
        letters.check()  # stops at the first message that is not a dead letter
        matching, others = _listed(letters, task, task_id, reason, limit)
    if others:  # arrived since the check
        _fail_on_others(ctx, others)
    if task_id is not None and not matching:
        raise click.ClickException(
            f"no dead letter of task {task_id} in {_queues_text(letters)}; nothing purged"
        )
    if not matching:
        click.echo(f"No matching dead letters in {_queues_text(letters)}; nothing purged.")
        return
    if not yes:
        click.confirm(
            f"Remove {_plural(len(matching), 'dead letter')} from {_queues_text(letters)} for "
            "good? There is no undo",
            abort=True,
        )
    with _errors(letters):  # what was counted and agreed to, not what has arrived since
        report = letters.purge(only=matching)
    gone = len(matching) - report.purged
    click.echo(
        f"Purged {_plural(report.purged, 'dead letter')} from {_queues_text(letters)}."
        + (f" {_plural(gone, 'other')} had gone meanwhile." if gone else "")
    )


@dlq.command()
@_queue_option
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=5590, show_default=True)
@click.option(
    "--token",
    envvar="RESILIENT_TASKS_WEB_TOKEN",
    metavar="TOKEN",
    help="Every request must carry it (open the console once with ?token=TOKEN). "
    "Required to bind anything but a loopback address. Env: RESILIENT_TASKS_WEB_TOKEN.",
)
@click.pass_context
def web(
    ctx: click.Context, queues: tuple[str, ...], host: str, port: int, token: str | None
) -> None:
    """Serve the dead-letter console: counts, the list with filters, each dead letter with its
    attempts and traceback, replay and purge after a confirmation (needs the web extra).

    \b
        celery -A proj dlq web                    # http://127.0.0.1:5590/
        RESILIENT_TASKS_WEB_TOKEN=... celery -A proj dlq web --host 0.0.0.0
    """
    try:
        from werkzeug.serving import make_server

        from .dlq.web import loopback, make_app
    except ImportError as exc:
        raise click.ClickException(
            "the console needs the web extra: pip install 'resilient-tasks[web]'"
        ) from exc
    if token is not None and not token.strip():
        raise click.BadParameter("an empty token protects nothing", param_hint="--token")
    if token is None and not loopback(host):
        raise click.BadParameter(
            f"{host} is reachable from other machines: give a --token (or set "
            "RESILIENT_TASKS_WEB_TOKEN), or bind 127.0.0.1",
            param_hint="--host",
        )
    letters = _dead_letters(ctx, queues)
    # Without a token only loopback Host headers are answered: a web page elsewhere cannot
    # reach the console through a DNS name it points at 127.0.0.1 (DNS rebinding).
    allowed = None if token is not None else {"localhost", "127.0.0.1", "::1", host}
    app = make_app(letters.app, queues=letters.queues, token=token, allowed_hosts=allowed)
    server = make_server(host, port, app, threaded=True)
    shown = f"[{host}]" if ":" in host else host
    click.echo(
        f"Dead-letter console for {_queues_text(letters)} on http://{shown}:{server.port}/"
        + ("  (token required)" if token else "")
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@click.group(name="delayed")
def delayed() -> None:
    """Delayed messages that wait on the broker (retries with a countdown, ``countdown=`` /
    ``eta=`` publishes of library tasks).

    Example:

    \b
        celery -A proj delayed stats
        celery -A proj delayed stats --json
    """


@delayed.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per queue.")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """How many delayed messages wait, per queue and task, and when the next is due."""
    app = getattr(ctx.obj, "app", None)
    if app is None:
        raise click.UsageError("run it as a Celery sub-command: celery -A proj delayed stats")
    try:
        waiting = delayed_stats(app)
    except OperationalError as exc:
        raise click.ClickException(f"broker error: {exc}") from exc
    if as_json:
        for queue in waiting:
            click.echo(json.dumps(dataclasses.asdict(queue)))
        return
    if not waiting:
        click.echo("No delayed messages wait on the broker.")
        return
    rows: list[tuple[str, ...]] = []
    for queue in waiting:
        tasks = ", ".join(f"{name} {count}" for name, count in sorted(queue.tasks.items()))
        rows.append((queue.queue, str(queue.waiting), queue.next_due or "-", tasks))
    click.echo(_table(rows, ("QUEUE", "WAITING", "NEXT DUE", "TASKS")))
