"""Settings of the example project: Django's minimum, and Celery's settings as ``CELERY_*``.

In your project the broker is your RabbitMQ or Redis (``CELERY_BROKER_URL``). Without one, this
example uses Kombu's filesystem transport (with the atomic writes of
:mod:`resilient_tasks.dev.filesystem`) in the folder ``run.py`` passes in ``EXAMPLE_DIR``, so
it runs without a server.
"""

import os
import tempfile
from pathlib import Path

from resilient_tasks.dev import filesystem

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS: list[str] = []
INSTALLED_APPS = ["billing"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

EXAMPLE_DIR = Path(
    os.environ.get("EXAMPLE_DIR") or Path(tempfile.gettempdir()) / "resilient-tasks-django-example"
)

# Celery reads every setting below through app.config_from_object(..., namespace="CELERY"):
# CELERY_TASK_DEFAULT_QUEUE is Celery's task_default_queue, and so on.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://localhost/")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", f"file://{EXAMPLE_DIR / 'results'}")
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("EXAMPLE_QUEUE", "billing")
if CELERY_BROKER_URL.startswith("filesystem"):  # Kombu's filesystem transport, atomic writes
    CELERY_BROKER_TRANSPORT = filesystem.TRANSPORT
    CELERY_BROKER_TRANSPORT_OPTIONS = filesystem.transport_options(EXAMPLE_DIR / "broker")
if CELERY_RESULT_BACKEND.startswith("file://"):
    (EXAMPLE_DIR / "results").mkdir(parents=True, exist_ok=True)

# resilient-tasks' own setting, the same way: keyword arguments whose name contains one of these
# are "[REDACTED]" in dead-letter envelopes and in everything `celery dlq` prints.
CELERY_RESILIENT_TASKS_REDACT_PATTERNS = ("password", "token", "secret", "api_key", "iban")

CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_ENABLE_REMOTE_CONTROL = False
CELERY_WORKER_LOG_FORMAT = "    worker | %(message)s"
CELERY_WORKER_TASK_LOG_FORMAT = "    worker | %(task_name)s: %(message)s"
