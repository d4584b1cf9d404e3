"""Where the success path's time goes.

* :func:`attribute_inprocess`: the tracer loop of :mod:`benchmarks.inprocess` under ``cProfile``
  for the plain and the resilient task; the per-task difference of each function's own time
  says which functions the library adds or makes slower. ``cProfile`` inflates small functions,
  so the absolute figures are larger than :mod:`benchmarks.inprocess` measures; the ranking is
  what counts.
* :func:`pyinstrument_inprocess`: the resilient tracer loop under pyinstrument (statistical, low
  overhead), as text, when pyinstrument is installed (the ``bench`` extra).
* :func:`py_spy_worker`: ``py-spy record --subprocesses`` on a real worker running resilient
  no-op tasks, folded into the share of samples per process role and per frame, when py-spy is
  installed and may attach (ptrace).
"""

from __future__ import annotations

import cProfile
import os
import pstats
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .inprocess import make_app, tracer_call


def _own_time_per_task(call: Any, iterations: int) -> dict[str, float]:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(iterations):
        call()
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    result: dict[str, float] = {}
    for (filename, line, function), (_, _, tottime, _, _) in stats.items():
        key = f"{_short(filename)}:{line}({function})"
        result[key] = result.get(key, 0.0) + tottime / iterations * 1e6
    return result


def _short(filename: str) -> str:
    for marker in ("site-packages/", "src/", "lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def attribute_inprocess(iterations: int = 20_000, top: int = 12) -> dict[str, Any]:
    """The functions whose own time per task grows most from the plain to the resilient task."""
    app, tasks = make_app()
    plain = _own_time_per_task(tracer_call(app, tasks["plain"]), iterations)
    resilient = _own_time_per_task(tracer_call(app, tasks["resilient"]), iterations)
    delta = {k: resilient.get(k, 0.0) - plain.get(k, 0.0) for k in set(plain) | set(resilient)}
    ranked = sorted(delta.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return {
        "iterations": iterations,
        "profiled_us_per_task": {
            "plain": sum(plain.values()),
            "resilient": sum(resilient.values()),
        },
        "top_added_us_per_task": [{"function": k, "us": round(v, 3)} for k, v in ranked],
    }


def pyinstrument_inprocess(out: Path, iterations: int = 50_000) -> dict[str, Any]:
    try:
        from pyinstrument import Profiler
    except ImportError:
        return {"skipped": "pyinstrument is not installed (pip install -e '.[bench]')"}
    app, tasks = make_app()
    call = tracer_call(app, tasks["resilient"])
    profiler = Profiler(interval=0.0001)
    profiler.start()
    for _ in range(iterations):
        call()
    profiler.stop()
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    path = out / "profile-inprocess-resilient.txt"
    path.write_text(text, encoding="utf-8")
    return {"iterations": iterations, "text": str(path)}


def py_spy_worker(
    site: Any, tasks: int, out: Path, task: str = "bench.resilient", events: bool = True
) -> dict[str, Any]:
    """Profile a worker (main process and pool children) through a run of ``task``."""
    beside = Path(sys.executable).parent / "py-spy"
    py_spy = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if py_spy is None:
        return {"skipped": "py-spy is not installed (pip install -e '.[bench]')"}
    raw = out / f"py-spy-{site.kind}-{task.rsplit('.', 1)[-1]}.txt"
    with site.run("profiled", events=events) as run:
        worker = run.start()
        main_pid = worker.process.pid
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(worker.process.pid), "--subprocesses", "--rate",
             "200", "--format", "raw", "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(2.0)  # attaching takes a moment
        if spy.poll() is not None:
            error = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
            return {"skipped": f"py-spy could not attach: {error.strip()[-500:]}"}
        run.publish(task, tasks)
        run.wait(lambda: run.slots().count >= tasks, 120 + tasks / 20, "the profiled run")
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
    if not raw.exists():
        return {"skipped": "py-spy wrote nothing"}
    text = raw.read_text(encoding="utf-8", errors="replace")
    return {"task": task, "raw": str(raw), **fold(text, main_pid)}


def fold(raw: str, main_pid: int, top: int = 20) -> dict[str, Any]:
    """Fold py-spy's collapsed stacks (``process <pid>:"cmd";frame;...;frame count``): share of
    samples per process role and per leaf frame, and the inclusive share of the library's
    frames."""
    by_process: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    library: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # A child's stack is prefixed by its parent's process frame, then its own.
        processes = [f for f in frames if f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("process ")] or frames
        own = processes[-1] if processes else ""
        role = "main" if own.startswith(f"process {main_pid}:") else "pool child"
        total += count
        by_process[role] += count
        leaves[f"{role}: {_frame(frames[-1])}"] += count
        seen = set()
        for frame in frames:
            if "resilient_tasks" in frame:
                name = _frame(frame)
                if name not in seen:
                    seen.add(name)
                    library[f"{role}: {name}"] += count
    if not total:
        return {"samples": 0}

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"frame": k, "percent": round(100 * v / total, 2)} for k, v in counter.most_common(top)
        ]

    return {
        "samples": total,
        "by_process_percent": {k: round(100 * v / total, 2) for k, v in by_process.items()},
        "top_leaf_frames": share(leaves),
        "library_frames_inclusive": share(library),
    }


def _frame(frame: str) -> str:
    """``function (path/to/file.py:line)`` shortened to ``function (file.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").split(":")[0]
    return f"{name.strip()} ({os.path.basename(path)})" if path else name.strip()
