"""The Django mount of docs/dlq-tools.md, run as written: its ``urls.py`` serves the console at
/dlq/ for staff members only, with links, forms and cookies under /dlq/. In a subprocess, since
Django's settings are configured once per process."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CELERY = """
from celery import Celery
from resilient_tasks import ResilientTask
from resilient_tasks.dev.filesystem import TRANSPORT, transport_options

app = Celery("proj", set_as_current=False)
app.conf.update(broker_url="filesystem://localhost/", broker_transport=TRANSPORT,
                broker_transport_options=transport_options({folder!r}), task_default_queue="jobs")

@app.task(base=ResilientTask, name="proj.export")
def export(*args):
    raise NotImplementedError
"""

CHECK = """
import re
from datetime import datetime, timezone

import django
from django.conf import settings

settings.configure(
    SECRET_KEY="test", ROOT_URLCONF="proj.urls", ALLOWED_HOSTS=["testserver"],
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "django.contrib.admin"],
)
django.setup()

from django.contrib.auth.models import AnonymousUser
from django.test import RequestFactory

from proj.celery import app
from proj.urls import dead_letters
from resilient_tasks.dlq import DeadLetters
from resilient_tasks.envelope import FailedMessage, build_envelope
from resilient_tasks.history import Attempt, History
from resilient_tasks.publish import publish_envelope

now = datetime.now(timezone.utc)
message = FailedMessage("t-1", "proj.export", ("<b>x</b>",), {}, {"id": "t-1"}, {},
                        b'[["<b>x</b>"], {}, {}]', "application/json", "utf-8", "", "jobs")
error = NotImplementedError()
publish_envelope(app, "jobs.dlq", build_envelope(
    message, reason="permanent", exception=error, history=History(), dead_lettered_at=now,
    final=Attempt.failed(1, error, hostname="w1", delay=None, at=now)))


class Staff:
    is_active = is_staff = is_authenticated = True


def call(method, path, user=Staff(), cookies=None, **data):
    request = getattr(RequestFactory(), method)(path, data)
    request.COOKIES.update(cookies or {})
    request.META["HTTP_COOKIE"] = "; ".join(f"{k}={v}" for k, v in (cookies or {}).items())
    request.user = user
    return dead_letters(request, path=path[len("/dlq/"):])


anonymous = call("get", "/dlq/", user=AnonymousUser())
assert anonymous.status_code == 302 and "login" in anonymous["Location"], anonymous

listed = call("get", "/dlq/letters")
page = listed.content.decode()
assert listed.status_code == 200, page
assert 'href="/dlq/letters/t-1"' in page and 'href="/dlq/console.css"' in page, page
assert "&lt;b&gt;x&lt;/b&gt;" in call("get", "/dlq/letters/t-1").content.decode()
cookie = listed["Set-Cookie"]
assert "Path=/dlq/" in cookie, cookie
nonce = re.search(r"rt_dlq_csrf=([^;]+)", cookie).group(1)

ask = call("get", "/dlq/purge", cookies={"rt_dlq_csrf": nonce}, id="t-1").content.decode()
assert 'action="/dlq/purge"' in ask, ask
fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', ask))
refused = call("post", "/dlq/purge", cookies={"rt_dlq_csrf": nonce}, **{**fields, "csrf_token": ""})
assert refused.status_code == 403, refused
done = call("post", "/dlq/purge", cookies={"rt_dlq_csrf": nonce}, **fields)
assert "Purged 1" in done.content.decode(), done.content
assert DeadLetters(app).list() == []
print("ok")
"""


def django_block() -> str:
    """The ``urls.py`` of the docs' Django example, as written there."""
    text = (ROOT / "docs" / "dlq-tools.md").read_text(encoding="utf-8")
    found = re.search(r"```python\n(# proj/urls\.py.*?)```", text, re.DOTALL)
    assert found, "the Django example is gone from docs/dlq-tools.md"
    return found.group(1)


def test_the_docs_django_view_serves_the_console_under_its_prefix(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "__init__.py").write_text("")
    (project / "celery.py").write_text(CELERY.format(folder=str(tmp_path / "broker")))
    admin = (
        "from django.contrib import admin\nurlpatterns.append(re_path('^admin/', admin.site.urls))"
    )
    (project / "urls.py").write_text(django_block() + admin)  # where staff log in
    (tmp_path / "check.py").write_text(textwrap.dedent(CHECK))

    result = subprocess.run(
        [sys.executable, str(tmp_path / "check.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"
