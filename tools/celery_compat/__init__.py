"""Celery's own unit tests on ``ResilientTask``: ``nox -s celery-compat`` (see ``run.py``)."""
