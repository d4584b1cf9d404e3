"""A worker for the delayed-delivery tests (``apps.delayed_tasks``)."""

from __future__ import annotations

from apps.base import make_app
from apps.delayed_tasks import define

app = make_app(__name__)
tasks = define(app)
