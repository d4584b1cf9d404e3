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
