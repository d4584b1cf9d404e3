"""Plot two retry schedules into ``docs/img/backoff.png``: the default backoff and a
``wait_exponential``.

Run it from the repository (``nox -s docs`` does, before building the site)::

    python docs/scripts/plot_backoff.py

The schedules come from the library itself (``RetryPolicy.delays``). The default backoff has
full jitter, so the plot shows its range (``uniform(0, min(600, 2 ** (n - 1)))``) and one sample
drawn with a fixed seed; the output is the same on every run.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed

import matplotlib.pyplot as plt
from tenacity import wait_exponential

from resilient_tasks import RetryPolicy

OUTPUT = Path(__file__).resolve().parents[1] / "img" / "backoff.png"
FAILURES = 12  # attempts 1..12 fail; the delay after each


def main(output: Path = OUTPUT) -> None:
    attempts = list(range(1, FAILURES + 1))
    upper = [min(600.0, 2.0 ** (n - 1)) for n in attempts]
    random.seed(7)  # tenacity draws the jitter from the random module
    sample = RetryPolicy().delays(FAILURES)
    exponential = RetryPolicy(backoff=wait_exponential(multiplier=1, max=60)).delays(FAILURES)

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    axes.fill_between(
        attempts,
        [0.1] * FAILURES,  # the range starts at 0, below this log scale
        upper,
        step="mid",
        alpha=0.2,
        label="default: uniform(0, min(600, 2 ** (n - 1)))",
    )
    axes.plot(attempts, upper, drawstyle="steps-mid", linewidth=1)
    axes.plot(attempts, sample, "o", label="default: one sample (full jitter)")
    axes.plot(
        attempts,
        exponential,
        "s-",
        label="wait_exponential(multiplier=1, max=60): min(60, 2 ** (n - 1))",
    )
    axes.set_yscale("log")
    axes.set_ylim(0.1, 1000)
    axes.set_xticks(attempts)
    axes.set_xlabel("the attempt that failed (n)")
    axes.set_ylabel("delay before the next attempt (seconds, log scale)")
    axes.set_title("RetryPolicy backoff: RetryPolicy().delays(12) and a wait_exponential")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize="small", ncol=1)
    output.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp or software version in the file: the same schedule gives the same bytes.
    figure.savefig(output, metadata={"Software": None}, bbox_inches="tight")
    plt.close(figure)
    print(f"wrote {output}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT)
