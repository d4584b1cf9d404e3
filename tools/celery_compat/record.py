"""pytest plugin: one outcome per test node id, as JSON lines, for ``run.py`` to compare.

Loaded with ``-p celery_compat.record`` in both runs; ``--compat-report=PATH`` names the file.
Each line is ``{"nodeid": ..., "outcome": ..., "message": ...}`` with ``outcome`` one of
``passed``, ``failed``, ``error`` (setup or teardown failed, or the module did not collect),
``skipped``, ``xfailed``, ``xpassed``. A failing subtest fails its test. The last line,
``{"session": ...}``, says which ``celery`` was imported and, in the ResilientTask run, how many
of the apps' base task classes derived from ``ResilientTask``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

RANK = {"passed": 0, "xpassed": 0, "skipped": 0, "xfailed": 0, "failed": 1, "error": 2}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--compat-report", metavar="PATH", help="write one outcome per test here")


class Recorder:
    def __init__(self, path: str) -> None:
        self.path = path
        self.results: dict[str, dict[str, str]] = {}

    def _set(self, nodeid: str, outcome: str, message: str = "") -> None:
        previous = self.results.get(nodeid)
        if previous is None or RANK[outcome] > RANK[previous["outcome"]]:
            self.results[nodeid] = {"nodeid": nodeid, "outcome": outcome, "message": message}

    @pytest.hookimpl
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._set(report.nodeid, "error", _message(report))

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        subtest = getattr(report, "context", None) is not None
        wasxfail = hasattr(report, "wasxfail")
        if report.when == "call":
            if report.passed:
                outcome = "xpassed" if wasxfail else "passed"
            elif report.skipped:
                outcome = "xfailed" if wasxfail else "skipped"
            else:
                outcome = "failed"
            if subtest and outcome != "failed":
                return  # a passing subtest says nothing about its test
            self._set(report.nodeid, outcome, _message(report) if outcome == "failed" else "")
        elif report.failed:
            self._set(report.nodeid, "error", f"{report.when}: {_message(report)}")
        elif report.skipped and report.when == "setup":
            self._set(report.nodeid, "xfailed" if wasxfail else "skipped")

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        celery = sys.modules.get("celery")
        info: dict[str, Any] = {
            "celery_file": getattr(celery, "__file__", None),
            "celery_version": getattr(celery, "__version__", None),
        }
        plugin = sys.modules.get("celery_compat.plugin")
        if plugin is not None:
            info["injected"] = dict(plugin.created)
        with open(self.path, "w", encoding="utf-8") as out:
            for result in self.results.values():
                out.write(json.dumps(result) + "\n")
            out.write(json.dumps({"session": info}) + "\n")


def _message(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The failure's last line, e.g. ``AssertionError: assert 1 == 2`` (``E`` lines if any)."""
    text = report.longreprtext or ""
    errors = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    if errors:
        return " | ".join(errors[:3])[:500]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else ""


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--compat-report")
    if path:
        config.pluginmanager.register(Recorder(path), "celery_compat_recorder")
