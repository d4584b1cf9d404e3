"""The billing app's tasks: ``@shared_task`` with ``base=ResilientTask``, and nothing else
changed. ``celery -A proj worker`` finds them through ``app.autodiscover_tasks()``."""

import smtplib

from celery import shared_task
from celery.utils.log import get_task_logger

from resilient_tasks import TRANSIENT_ERRORS, ResilientTask, RetryPolicy
from resilient_tasks.history import History

log = get_task_logger(__name__)

#: Network hiccups and timeouts are retried; a wrong password or a bad request is not.
POLICY = RetryPolicy(retry_on=TRANSIENT_ERRORS, max_attempts=3, backoff=0.5)


@shared_task(base=ResilientTask, bind=True, retry_policy=POLICY)
def sync_invoice(self, invoice_id):
    """The billing API drops the first connection, then answers."""
    attempt = self.request.retries + 1
    log.info("attempt %d: pushing invoice %d", attempt, invoice_id)
    if attempt == 1:
        raise ConnectionResetError(104, "Connection reset by peer")
    (earlier,) = History.from_headers(self.request.headers).attempts
    return (
        f"invoice {invoice_id} synced on attempt {attempt} (attempt {earlier.number}: "
        f"{earlier.exception_type}, retried after {earlier.delay:g}s)"
    )


@shared_task(base=ResilientTask, bind=True, retry_policy=POLICY)
def send_reminder(self, invoice_id, smtp_password):
    """The mail server refuses the login: not transient, so it is dead-lettered at once."""
    attempt = self.request.retries + 1
    log.info("attempt %d: sending the reminder for invoice %d", attempt, invoice_id)
    raise smtplib.SMTPAuthenticationError(535, b"5.7.8 Authentication credentials invalid")
