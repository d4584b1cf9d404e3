"""Benchmarks of resilient-tasks against plain Celery: ``nox -s bench`` (``python -m benchmarks``).

Not part of the test run: they print and record figures and assert nothing about time. They
reuse the test suite's worker harness (``tests/support``) and task apps (``tests/apps``), so the
``tests`` folder is put on the import path here.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
