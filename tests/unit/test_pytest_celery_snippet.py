"""The pytest-celery setup of docs/howto/testing.md ("With pytest-celery") works, without Docker.

The page's four files (the worker's Dockerfile, the tasks module, ``conftest.py`` and the tests)
are taken from the page as written, each block named by its first line. pytest runs the page's
tests in a folder holding those files, with pytest-celery's plugin on as in a team's project.
One more ``conftest.py``, beside the tests, stands in for what needs Docker: the brokers and
backend become the in-memory ones, and ``celery_setup``'s worker is the ``app.py`` that
pytest-celery generates for the worker container from the page's fixtures (the volume of
``default_worker_initial_content``, with the environment of ``default_worker_env``), run by an
in-process worker on the queue the container's worker would consume.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support.project import run_pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "howto" / "testing.md"
SECTION = re.compile(r"^## With pytest-celery\n(?P<text>.*?)(?=^## |\Z)", re.DOTALL | re.MULTILINE)
FILE = re.compile(r"```(?:python|dockerfile)\n# (?P<path>\S+)\n(?P<body>.*?)```", re.DOTALL)

pytest.importorskip("pytest_celery", reason="pytest-celery is in the test extra")

NO_DOCKER = '''
"""celery_setup without Docker: the worker container's generated app.py, in this process."""

import importlib
import sys
from types import SimpleNamespace

import pytest
from celery.contrib.testing.worker import start_worker

from resilient_tasks import ResilientTask


@pytest.fixture
def celery_worker_cluster_config():
    """The in-memory broker and result backend, in place of the broker and backend containers."""
    return {
        "celery_broker_cluster_config": {"urls": ["memory://"], "host_urls": ["memory://"]},
        "celery_backend_cluster_config": {
            "urls": ["cache+memory://"],
            "host_urls": ["cache+memory://"],
        },
    }


@pytest.fixture
def default_worker_app(default_worker_app):
    """The settings pytest-celery copies into the worker's app.py: poll the in-memory broker
    often, so the worker stops at once at teardown."""
    default_worker_app.conf.broker_transport_options = {"polling_interval": 0.05}
    return default_worker_app


@pytest.fixture
def celery_setup(
    celery_setup_app,
    default_worker_initial_content,
    default_worker_env,
    default_worker_container_cls,
    default_worker_tasks,
    tmp_path,
    monkeypatch,
):
    volume = tmp_path / "app"  # the worker container's /app
    for name, content in default_worker_initial_content.items():
        (volume / name).parent.mkdir(parents=True, exist_ok=True)
        (volume / name).write_bytes(content)
    for name, value in default_worker_env.items():
        if name.startswith("CELERY_"):
            monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(volume))
    monkeypatch.delitem(sys.modules, "app", raising=False)
    worker_app = importlib.import_module("app").app  # what `celery -A app worker` loads
    celery_setup_app.set_current()

    ours = [m.__name__ for m in default_worker_tasks if not m.__name__.startswith("pytest_celery")]
    tasks = [t for t in worker_app.tasks.values() if type(t).__module__ in ours]
    assert tasks, f"the worker's app has no task from {ours}"
    assert all(isinstance(t, ResilientTask) for t in tasks), tasks

    queue = default_worker_container_cls.worker_queue()
    with start_worker(worker_app, pool="solo", perform_ping_check=False, queues=[queue]):
        yield SimpleNamespace(
            app=celery_setup_app,
            worker=SimpleNamespace(worker_queue=queue, app=worker_app),
        )
'''


def files() -> dict[str, str]:
    (section,) = SECTION.finditer(PAGE.read_text(encoding="utf-8"))
    return {m["path"]: f"# {m['path']}\n{m['body']}" for m in FILE.finditer(section["text"])}


def test_the_section_gives_the_image_the_tasks_the_fixtures_and_the_tests() -> None:
    assert sorted(files()) == [
        "tests/billing_tasks.py",
        "tests/conftest.py",
        "tests/test_billing.py",
        "tests/worker/Dockerfile",
    ]


def test_the_image_installs_the_library_and_the_conftest_builds_that_image() -> None:
    page = files()
    installs = re.findall(r"^RUN pip install (.*)$", page["tests/worker/Dockerfile"], re.MULTILINE)
    (built,) = re.findall(r"\bbuild\(path=\"([^\"]+)\"", page["tests/conftest.py"])

    assert any("resilient-tasks" in line.split() for line in installs)
    assert built == "tests/worker"


def test_the_documented_tests_pass_on_the_generated_worker(tmp_path: Path) -> None:
    page = files()
    for path, text in page.items():
        if path != "tests/test_billing.py":
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(text, encoding="utf-8")
    here = tmp_path / "tests" / "no_docker"  # below the page's conftest.py, which still applies
    here.mkdir()
    (here / "conftest.py").write_text(NO_DOCKER, encoding="utf-8")
    (here / "test_billing.py").write_text(page["tests/test_billing.py"], encoding="utf-8")

    run = run_pytest(tmp_path, "tests/no_docker")

    tests = page["tests/test_billing.py"].count("\ndef test_")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert f"{tests} passed" in run.stdout
