"""The benchmarks' outputs: JSON (raw and summary), a markdown section in ``docs/benchmarks.md``
and a chart in ``docs/img/benchmarks.png``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:begin (written by `python -m benchmarks`; edit outside these markers) -->"
END = "<!-- bench:end -->"

TARGETS = {
    "ratio": 0.97,
    "failing_vs_success": 0.5,
    "overhead_us": 15.0,
    "replay_per_second": 1000.0,
}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def quartiles(values: list[float]) -> list[float] | None:
    """The first and third quartile of ``values`` (None for fewer than four)."""
    if len(values) < 4:
        return None
    first, _, third = statistics.quantiles(values, n=4)
    return [round(first, 4), round(third, 4)]


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """The figures the docs show, from the raw results of every round."""
    throughput: dict[str, Any] = {}
    for broker, runs in raw.get("throughput", {}).items():

        def rates(label: str, runs: list[dict[str, Any]] = runs) -> list[float]:
            return [r[label]["per_second"] for r in runs if "per_second" in r.get(label, {})]

        def ratios(a: str, b: str, runs: list[dict[str, Any]] = runs) -> list[float]:
            return [r[a]["per_second"] / r[b]["per_second"] for r in runs if a in r and b in r]

        throughput[broker] = {
            "rounds": len(runs),
            "plain_per_second": median(rates("plain")),
            "resilient_per_second": median(rates("resilient")),
            "resilient_no_events_per_second": median(rates("resilient_no_events")),
            "ratio_resilient_to_plain": median(ratios("resilient", "plain")),
            "ratio_per_round": [round(x, 4) for x in ratios("resilient", "plain")],
            "ratio_quartiles": quartiles(ratios("resilient", "plain")),
            "ratio_no_events_to_plain": median(ratios("resilient_no_events", "plain")),
            "plain_events_per_second": median(rates("plain_events")),
            "ratio_resilient_to_plain_events": median(ratios("resilient", "plain_events")),
            "resilient_library_events_per_second": median(rates("resilient_library_events")),
            "ratio_library_events_to_plain": median(ratios("resilient_library_events", "plain")),
            "ratio_library_events_quartiles": quartiles(
                ratios("resilient_library_events", "plain")
            ),
            "plain_failing_per_second": median(rates("plain_failing")),
            "failing_no_dlq_per_second": median(rates("failing_no_dlq")),
            "failing_per_second": median(rates("failing")),
            "ratio_failing_to_success": median(ratios("failing", "resilient")),
            "ratio_failing_to_plain_failing": median(ratios("failing", "plain_failing")),
            "replay_per_second": median(rates("replay")),
            "replay_skipped": next(
                (r["replay"]["skipped"] for r in runs if "skipped" in r.get("replay", {})), None
            ),
        }
    inprocess = raw.get("inprocess") or {}
    return {
        "generated_at": raw["generated_at"],
        "command": raw["command"],
        "note": raw.get("note", ""),
        "machine": raw["machine"],
        "config": raw["config"],
        "targets": TARGETS,
        "throughput": throughput,
        "inprocess": {k: v for k, v in inprocess.items() if k != "samples"}
        | (
            {"events": {k: v for k, v in inprocess["events"].items() if k != "samples"}}
            if isinstance(inprocess.get("events"), dict)
            else {}
        ),
        "storm": raw.get("storm", {}),
        "retry_path": raw.get("retry_path", {}),
        "profile": raw.get("profile", {}),
        "skipped": raw.get("skipped", {}),
    }


def _n(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _mark(value: float | None, target: float, *, below: bool = False) -> str:
    if value is None:
        return ""
    ok = value <= target if below else value >= target
    return " ✅" if ok else " ❌"


def markdown(summary: dict[str, Any], chart: str | None) -> str:
    """The figures section of ``docs/benchmarks.md``: what ran, the results tables, the chart,
    then this run's per-round ratios and profiles folded away (the page explains the rest)."""
    machine, config = summary["machine"], summary["config"]
    lines = [
        f"Produced by `{summary['command']}` on {summary['generated_at'][:16].replace('T', ' ')}"
        f" UTC: {machine['cpus']} CPU cores ({machine['cpu_model']}), Python {machine['python']}, "
        f"Celery {machine['celery']}, Kombu {machine['kombu']}, brokers on loopback.",
        "",
    ]
    if config.get("placement"):
        lines += [f"CPU placement: {config['placement']}.", ""]
    if summary.get("note"):
        lines += [f"> **{summary['note']}**", ""]
    lines += [
        f"{config['tasks']} tasks per run, {config['rounds']} rounds (the order of the variants "
        f"rotated every round{_failure_rounds(config)}), "
        f"`celery worker -P prefork -c {config['concurrency']}`, prefetch "
        f"{config['prefetch']} per process, `--loglevel={config['loglevel']}`, events "
        f"{'connected' if config['events'] else 'not available'}. Medians over rounds.",
        "",
        "**Success path**, tasks a second (a *ratio* is the median over rounds of the "
        "resilient rate over the plain rate of the same round):",
        "",
        "| broker | plain tasks/s | resilient tasks/s | ratio (≥ 0.97) "
        "| resilient, events off | ratio | plain, events on | resilient / plain, both "
        "with events |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    throughput = summary["throughput"]
    for broker, t in throughput.items():
        lines.append(
            f"| {broker} | {_n(t['plain_per_second'])} | {_n(t['resilient_per_second'])} "
            f"| {_n(t['ratio_resilient_to_plain'], 3)}"
            f"{_mark(t['ratio_resilient_to_plain'], TARGETS['ratio'])} "
            f"| {_n(t['resilient_no_events_per_second'])} "
            f"| {_n(t['ratio_no_events_to_plain'], 3)} "
            f"| {_n(t.get('plain_events_per_second'))} "
            f"| {_n(t.get('ratio_resilient_to_plain_events'), 3)} |"
        )
    library = {b: t for b, t in throughput.items() if t.get("ratio_library_events_to_plain")}
    if library:
        lines += [
            "",
            "With `connect(plain_tasks=False)` (no `task_prerun` / `task_postrun` receivers): "
            + "; ".join(
                f"{broker} {_n(t['resilient_library_events_per_second'])} tasks/s, ratio "
                f"{_n(t['ratio_library_events_to_plain'], 3)}"
                f"{_mark(t['ratio_library_events_to_plain'], TARGETS['ratio'])}"
                + (
                    f" (quartiles {q[0]:.3f} and {q[1]:.3f})"
                    if (q := t.get("ratio_library_events_quartiles"))
                    else ""
                )
                for broker, t in library.items()
            )
            + ".",
        ]
    spread = [
        f"from {min(t['ratio_per_round']):.3f} to {max(t['ratio_per_round']):.3f} on {broker}"
        + (
            f" (quartiles {t['ratio_quartiles'][0]:.3f} and {t['ratio_quartiles'][1]:.3f})"
            if t.get("ratio_quartiles")
            else ""
        )
        for broker, t in throughput.items()
        if t["ratio_per_round"]
    ]
    if spread:
        lines += ["", "A single round's ratio ranged " + "; ".join(spread) + "."]
    lines += [
        "",
        "**Failure path and replay**, per second: *Celery failures* is a plain `celery.Task` "
        "that raises; *without DLQ* a `ResilientTask` raising `Permanent` with "
        "`dead_letter=False`; *dead-lettered* the same task dead-lettering, timed until the "
        "dead-letter queue holds every envelope; *replay* republishes those envelopes with "
        "publisher confirms:",
        "",
        "| broker | Celery failures/s | without DLQ/s | dead-lettered/s "
        "| vs resilient success (≥ 0.5) | vs Celery failures | replay msg/s (≥ 1000) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for broker, t in throughput.items():
        replay = t["replay_per_second"]
        replay_text = (
            f"{_n(replay)}{_mark(replay, TARGETS['replay_per_second'])}"
            if replay is not None
            else (t.get("replay_skipped") or "n/a")
        )
        lines.append(
            f"| {broker} | {_n(t['plain_failing_per_second'])} "
            f"| {_n(t.get('failing_no_dlq_per_second'))} | {_n(t['failing_per_second'])} "
            f"| {_n(t['ratio_failing_to_success'], 2)}"
            f"{_mark(t['ratio_failing_to_success'], TARGETS['failing_vs_success'])} "
            f"| {_n(t['ratio_failing_to_plain_failing'], 2)} | {replay_text} |"
        )
    inprocess = summary.get("inprocess") or {}
    if inprocess:
        us = inprocess["us_per_task"]
        lines += [
            "",
            "**In-process cost per task** (Celery's tracer, "
            f"{inprocess['iterations']:,} calls x {inprocess['repeats']} repeats, medians):",
            "",
            "| variant | µs per task |",
            "|---|---:|",
            f"| plain `celery.Task` | {_n(us['plain'], 1)} |",
            f"| plain with a pass-through `__call__` | {_n(us['custom_call'], 1)} |",
            f"| `ResilientTask` + `RetryPolicy` | {_n(us['resilient'], 1)} |",
        ]
        events = inprocess.get("events")
        if isinstance(events, dict):
            eus = events["us_per_task"]
            lines += [
                f"| plain, events on (JSON to /dev/null) | {_n(eus['plain_events'], 1)} |",
                f"| `ResilientTask`, events on (JSON to /dev/null) | "
                f"{_n(eus['resilient_events'], 1)} |",
            ]
        overhead = inprocess["library_overhead_us"]
        lines += [
            "",
            f"Library hooks: **{_n(overhead, 1)} µs per task**"
            f"{_mark(overhead, TARGETS['overhead_us'], below=True)} (target ≤ 15). A "
            "pass-through `__call__` alone costs "
            f"{_n(inprocess['custom_call_overhead_us'], 1)} µs over the plain task; the library "
            f"costs {_n(inprocess['library_own_code_us'], 1)} µs over that.",
        ]
        if isinstance(events, dict):
            lines.append(
                f"With events on: {_n(events['library_overhead_us'], 1)} µs of hooks over a plain "
                f"task that also has events on; {_n(events['vs_plain_without_events_us'], 1)} µs "
                "over a plain task without events."
            )
        elif isinstance(events, str):
            lines.append(f"Events: {events}.")
    storm = summary.get("storm") or {}
    if storm:
        lines += [
            "",
            "**Retry storm**: tasks each retried once an hour later. A `ResilientTask`'s retry "
            'waits on the broker (`delayed_delivery="broker"`); Celery\'s autoretry is an ETA '
            "message, held, unacknowledged, by the worker that receives it. *retries a second*: "
            "first attempts failed and their retries scheduled, per second; *held*: the retries "
            "the worker had pulled in when measured; *on the broker*: those waiting there; "
            "*main growth*: VmRSS growth of the worker's main process; *probe wait*: how long "
            "ordinary tasks published after the storm waited to start:",
            "",
            "| broker | tasks | retries a second | held by the worker | on the broker "
            "| main growth | probe wait |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for broker, s in storm.items():
            if "skipped" in s:
                lines.append(f"| {broker} | {s['skipped']} | | | | | |")
                continue
            wait = s["probe_wait_seconds"]
            lines.append(
                f"| {broker} | {s['tasks']:,} "
                f"| {s['tasks'] / s['first_attempts_seconds']:,.0f} "
                f"| {s['held_in_worker']:,} after "
                f"{s['seconds_until_measured']:.0f} s "
                f"| {s.get('delayed_on_broker', 0):,} "
                f"| {s['main_growth_kib'] / 1024:,.1f} MiB "
                f"| {f'{wait:.1f} s' if wait is not None else 'did not start'} |"
            )
    retry_path = summary.get("retry_path") or {}
    if retry_path:
        lines += [
            "",
            "**Retry path**, tasks a second: each task fails once and succeeds on its retry a "
            "second later (median of the rounds; *of Celery* is against Celery's own autoretry "
            "on the same broker):",
            "",
            "| broker | variant | tasks/s | of Celery |",
            "|---|---|---:|---:|",
        ]
        for name, figures in retry_path.items():
            broker, _, variant = name.partition(", ")
            lines.append(
                f"| {broker} | {variant} | {figures['median']:,.0f} "
                f"| {figures['against_celery']:.2f} |"
            )
    if summary.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in summary["skipped"].items())]
    if chart:
        lines += ["", f"![benchmarks]({chart})"]
    details = _details(summary)
    if details:
        # Folded: the raw material behind the tables, for whoever digs (a collapsed admonition,
        # pymdownx.details; its body is indented).
        lines += ["", '??? info "Rounds and profiles of this run"']
        lines += [f"    {line}" if line else "" for line in details]
    return "\n".join(lines)


def _details(summary: dict[str, Any]) -> list[str]:
    """Every round's ratio and the profiles of the run: what the results tables are read from."""
    lines: list[str] = []
    for broker, t in summary["throughput"].items():
        if not t["ratio_per_round"]:
            continue
        lines += [
            "",
            f"Ratio per round on {broker}: " + ", ".join(f"{x:.3f}" for x in t["ratio_per_round"]),
        ]
    profile = summary.get("profile") or {}
    attribution = profile.get("attribution")
    if attribution:
        lines += [
            "",
            "**What the resilient task adds per call** (cProfile own time, resilient minus "
            "plain; cProfile inflates small functions, read it as a ranking):",
            "",
            "| function | µs per task |",
            "|---|---:|",
        ]
        for row in attribution["top_added_us_per_task"][:8]:
            lines.append(f"| `{row['function']}` | {row['us']:.2f} |")
    for key, spy in profile.items():
        if not key.startswith("py_spy_"):
            continue
        if "skipped" in spy:
            lines += ["", f"py-spy ({key}): {spy['skipped']}"]
            continue
        if not spy.get("samples"):
            continue
        shares = ", ".join(f"{k} {v:.0f} %" for k, v in spy["by_process_percent"].items())
        samples = f"py-spy, {spy['samples']:,} samples: {shares}"
        heading = f"**Worker profile, {spy['task']}** ({samples})."
        if not spy["library_frames_inclusive"]:
            lines += ["", f"{heading} No sample had a library frame on its stack."]
            continue
        lines += [
            "",
            f"{heading} Library frames, inclusive share of all samples:",
            "",
            "| frame | % |",
            "|---|---:|",
        ]
        for row in spy["library_frames_inclusive"][:8]:
            lines.append(f"| `{row['frame']}` | {row['percent']:.1f} |")
    return lines[1:]  # without the blank line before the first


def write_docs(page: Path, section: str) -> None:
    """Replace the text between the markers of ``page`` (or append the markers)."""
    text = page.read_text(encoding="utf-8") if page.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    page.write_text(text, encoding="utf-8")


def chart(summary: dict[str, Any], path: Path) -> str | None:
    """Draw the chart; ``None`` if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    throughput = summary["throughput"]
    brokers = list(throughput)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    series = [
        ("plain_per_second", "plain celery.Task"),
        ("resilient_per_second", "ResilientTask (events on)"),
        ("resilient_no_events_per_second", "ResilientTask (events off)"),
        ("resilient_library_events_per_second", "ResilientTask (plain_tasks=False)"),
        ("plain_events_per_second", "plain celery.Task (events on)"),
        ("plain_failing_per_second", "Celery failures"),
        ("failing_no_dlq_per_second", "resilient failures, no DLQ"),
        ("failing_per_second", "dead-lettered"),
    ]
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        values = [throughput[b].get(key) or 0 for b in brokers]
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(brokers))], values, width, label=label)
    ax.set_xticks(range(len(brokers)), brokers)
    ax.set_ylabel("tasks per second")
    ax.set_title("Worker throughput (prefork -c 2)")
    ax.legend(fontsize=8)
    ax = axes[1]
    inprocess = summary.get("inprocess") or {}
    if inprocess:
        us = dict(inprocess["us_per_task"])
        events = inprocess.get("events")
        if isinstance(events, dict):
            us.update(events["us_per_task"])
        ax.barh(list(us), list(us.values()), color="tab:gray")
        ax.set_xlabel("µs per task (Celery tracer, one process)")
        ax.set_title("In-process cost")
        ax.invert_yaxis()
    ax = axes[2]
    replay = {b: throughput[b]["replay_per_second"] or 0 for b in brokers}
    ax.bar(list(replay), list(replay.values()), color="tab:green")
    ax.axhline(TARGETS["replay_per_second"], color="tab:red", linestyle="--", linewidth=1)
    ax.set_ylabel("messages per second")
    ax.set_title("Replay with publisher confirms")
    note = summary.get("note")
    fig.suptitle(
        f"resilient-tasks benchmarks, {summary['machine']['cpus']} cores"
        + (f" ({note})" if note else ""),
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def _failure_rounds(config: dict[str, Any]) -> str:
    rounds = config.get("failure_rounds")
    if not rounds or rounds >= config["rounds"]:
        return ""
    return f"; the failure path and replay in the first {rounds}"
