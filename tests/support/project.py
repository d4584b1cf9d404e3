"""Run pytest in a folder laid out as a user's project, as the user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_pytest(folder: Path, target: str) -> subprocess.CompletedProcess[str]:
    """``python -m pytest -q target`` in ``folder`` (its own rootdir and configuration)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
