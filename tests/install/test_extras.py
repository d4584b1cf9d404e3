"""``pip install "resilient-tasks[redis]"`` in a fresh virtual environment is all a project on
Redis needs: one line of Python there publishes a task onto a Redis queue.

Marked ``install``: it builds the package and installs it and its dependencies from the package
index (pip's cache makes a second run quick). Run it alone with
``pytest tests/install -m install``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kombu import Connection

from support.brokers import make_broker

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.install, pytest.mark.timeout(1200)]


def source_copy(tmp_path: Path) -> Path:
    """The project's sources, copied: building in place would leave ``build/`` in the checkout."""
    copy = tmp_path / "source"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, copy / name)
    shutil.copytree(
        ROOT / "src",
        copy / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"),
    )
    return copy


def run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_redis_extra_is_all_a_project_on_redis_needs(tmp_path: Path) -> None:
    broker = make_broker("redis", tmp_path)
    queue = broker.queue_name("install")
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    try:
        run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
        run(python, "-m", "pip", "install", "-q", f"{source_copy(tmp_path)}[redis]", cwd=tmp_path)

        run(
            python,
            "-c",
            "import celery, resilient_tasks; "
            f"celery.Celery(broker={broker.url!r}).send_task('install.check', queue={queue!r})",
            cwd=tmp_path,
        )

        with Connection(broker.url) as conn:
            client = conn.default_channel.client
            assert client.llen(queue) == 1
            (message,) = client.lrange(queue, 0, -1)
        assert b"install.check" in message
    finally:
        broker.cleanup([queue])
