"""Developer sessions: ``nox -s tests lint typecheck demo``; ``nox -s celery`` is the matrix."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
CELERY_VERSIONS = ["5.3", "5.4", "5.5", "5.6", "5.7"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite (unit, embedded worker, real brokers) on the newest Celery."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHON)
@nox.parametrize("celery", CELERY_VERSIONS)
def celery(session: nox.Session, celery: str) -> None:
    """The test suite on each supported Celery minor version: ``nox -s celery``."""
    # Each Celery minor ships with the Kombu minor of the same number; pin both as users have them.
    session.install("-e", ".[test]", f"celery=={celery}.*", f"kombu[redis]=={celery}.*")
    session.run("python", "-c", "import celery, kombu; print('celery', celery.__version__, "
                "'kombu', kombu.__version__)")  # fmt: skip
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHON, name="celery-compat")
def celery_compat(session: nox.Session) -> None:
    """Celery's own ``t/unit/tasks`` tests, plain and with ResilientTask as every app's task class.

    Downloads the source release of the installed Celery, runs the tests twice and fails on
    any test that passes on plain Celery and not with ResilientTask, unless it is listed in
    tools/celery_compat/expected_differences.txt. ``CELERY_COMPAT_SRC=<unpacked sdist>`` reuses
    a source release; ``nox -s celery-compat -- --tests t/unit/tasks/test_trace.py -- -x``
    passes options to tools/celery_compat/run.py (after a second ``--``, to pytest).
    """
    # Only what t/unit/tasks imports: pytest >= 9 has the ``subtests`` fixture built in
    # (Celery's requirements/test.txt adds pytest-subtests for that, and its CI extras).
    session.install("-e", ".", "pytest>=9")
    session.run(
        "python",
        "tools/celery_compat/run.py",
        "--cache-dir",
        str(session.cache_dir / "celery-compat"),
        *session.posargs,
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the library."""
    session.install("-e", ".", "mypy")
    session.run("mypy", "--strict", "src")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The quickstart on the embedded broker (or on $CELERY_BROKER_URL)."""
    session.install(".")
    session.run("python", "examples/quickstart.py")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site into site/, warnings as errors: ``nox -s docs``.

    Regenerates the backoff plot (docs/img/backoff.png) first; ``nox -s docs -- serve``
    previews the site instead of building it.
    """
    session.install("-e", ".[docs]")
    session.run("python", "docs/scripts/plot_backoff.py")
    if session.posargs == ["serve"]:
        session.run("mkdocs", "serve", "--strict")
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against plain Celery on the local RabbitMQ and Redis: ``nox -s bench``.

    Writes docs/benchmarks.md (figures section), docs/benchmarks.json, docs/img/benchmarks.png;
    ``nox -s bench -- --quick`` is a smoke run, ``-- --help`` lists the options. Take figures
    on a quiet machine: nothing else should use the CPUs or the brokers meanwhile.
    """
    session.install("-e", ".[test,bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python=PYTHON, name="bench-breaker")
def bench_breaker(session: nox.Session) -> None:
    """The circuit breaker's cost while closed, and an outage: ``nox -s bench-breaker``.

    ``-- --outage`` runs the outage instead and draws docs/img/breaker-outage.png; ``-- --help``
    lists the options. Needs the local Redis.
    """
    session.install("-e", ".[test,bench]")
    session.run("python", "-m", "benchmarks.breaker", *session.posargs)


@nox.session(python=["3.10", "3.11", "3.12", "3.13"])
def floor(session: nox.Session) -> None:
    """What Celery's own tracer spends on a failure against a success, per Python: ``nox -s floor``.

    The floor under the failure-path figures of ``nox -s bench`` (docs/benchmarks.md). nox looks
    for ``python3.10`` ... ``python3.13`` on the PATH; with pyenv, name them, e.g.
    ``PYENV_VERSION=3.11.7:3.10.13:3.12.1:3.13.0 nox -s floor``.
    """
    session.install("-e", ".")
    session.run("python", "-m", "benchmarks.floor", *session.posargs)


@nox.session(python=PYTHON)
def chaos(session: nox.Session) -> None:
    """The reliability suite at full size, broker restarts included: ``nox -s chaos``.

    It restarts the local RabbitMQ (``rabbitmqctl stop_app`` / ``start_app``) and Redis, so
    run it where nothing else uses them (``RT_CHAOS_RESTART=0 nox -s chaos`` leaves them out;
    ``RT_CHAOS_TASKS`` sets the workload size). Each scenario's outcome is appended to
    benchmarks/results/chaos.jsonl, for docs/reliability.md.
    """
    import os

    session.install("-e", ".[test]")
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/chaos",
        "-v",
        "-n",
        "0",  # the restarts disturb every other test that uses the broker: one at a time
        *session.posargs,
        env={
            "RT_CHAOS_RESTART": os.environ.get("RT_CHAOS_RESTART", "1"),
            "RT_CHAOS_TASKS": os.environ.get("RT_CHAOS_TASKS", "2000"),
            "RT_CHAOS_REPORT": "benchmarks/results/chaos.jsonl",
        },
    )
