"""The project's Celery app: configured from Django's settings (``CELERY_*``), tasks found in
each installed app's ``tasks.py``. Nothing here is specific to resilient-tasks.

Run a worker with ``celery -A proj worker``.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
