"""A worker for the expiry tests (``apps.expires_tasks``), logging the library's events as JSON."""

from __future__ import annotations

from apps.base import make_app
from apps.expires_tasks import define
from resilient_tasks import observability

app = make_app(__name__)
observability.configure_logging(json=True)
observability.connect()
tasks = define(app)
