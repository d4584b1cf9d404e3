"""The example Django project. Importing it loads the Celery app, so that ``@shared_task``
tasks bind to it (as Celery's Django guide sets it up)."""

from .celery import app as celery_app

__all__ = ["celery_app"]
