"""The dead-letter console as a WSGI application (werkzeug's test client), on the filesystem
transport in the test's folder: access (token, CSRF, host), escaping and redaction, the pages,
replay and purge after a confirmation, a mount under a prefix; and ``celery dlq web``'s refusal
to serve another address without a token. The real browser: test_browser.py."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client, TestResponse

from resilient_tasks import ResilientTask
from resilient_tasks.cli import dlq
from resilient_tasks.dev.filesystem import TRANSPORT, transport_options
from resilient_tasks.dlq import DeadLetters
from resilient_tasks.dlq.web import make_app
from resilient_tasks.envelope import FailedMessage, build_envelope
from resilient_tasks.history import Attempt, History
from resilient_tasks.publish import publish_envelope

XSS = "<script>alert(1)</script>"


def noop(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Celery]:
    """A client app on a filesystem broker of the test's own; its task implies ``jobs.dlq``."""
    celery_app = Celery("web-test", set_as_current=False)
    celery_app.conf.update(
        broker_url="filesystem://localhost/",
        broker_transport=TRANSPORT,
        broker_transport_options=transport_options(tmp_path / "broker"),
        task_default_queue="jobs",
    )
    for name in ("web.export", "web.login"):
        celery_app.task(base=ResilientTask, name=name, shared=False)(noop)
    yield celery_app
    celery_app.close()


def bury(
    app: Celery,
    name: str,
    *args: Any,
    reason: Any = "permanent",
    error: BaseException | None = None,
    **kwargs: Any,
) -> str:
    """Publish the envelope a worker would for task ``name`` failing for good; return its id."""
    task_id = str(uuid.uuid4())
    error = error or KeyError("no such customer")
    body = [list(args), kwargs, {}]
    failed = FailedMessage(
        task_id=task_id,
        task_name=name,
        args=args,
        kwargs=kwargs,
        headers={"id": task_id, "task": name, "argsrepr": repr(args), "kwargsrepr": repr(kwargs)},
        properties={},
        body=json.dumps(body).encode(),
        content_type="application/json",
        content_encoding="utf-8",
        routing_key="jobs",
    )
    now = datetime.now(timezone.utc)
    history = History().record(Attempt.failed(1, error, hostname="w1", delay=0.5, at=now))
    envelope = build_envelope(
        failed,
        reason=reason,
        exception=error,
        traceback="Traceback (most recent call last):\n  ...\nKeyError: 'no such customer'",
        history=history,
        final=Attempt.failed(2, error, hostname="w1", delay=None, at=now),
        dead_lettered_at=now,
    )
    publish_envelope(app, "jobs.dlq", envelope)
    return task_id


def html(response: TestResponse) -> str:
    return response.get_data(as_text=True)


def csrf(response: TestResponse) -> str:
    found = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html(response))
    assert found, html(response)
    return found.group(1)


def form(response: TestResponse) -> dict[str, str]:
    """The hidden fields of the confirmation form."""
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html(response)))


def test_the_counts_page_counts_by_task_reason_and_exception(app: Celery) -> None:
    bury(app, "web.export", 1)
    bury(app, "web.export", 2, reason="retries_exhausted", error=ConnectionError("down"))
    bury(app, "web.login", 3)

    page = html(Client(make_app(app)).get("/"))

    assert "3 dead letters in 1 queue" in page
    assert re.search(r"web\.export</a></td>\s*<td class=\"num\">2</td>", page)
    assert "retries_exhausted" in page
    assert "ConnectionError" in page


def test_the_list_filters_by_task_and_reason(app: Celery) -> None:
    export = bury(app, "web.export", 1)
    exhausted = bury(app, "web.export", 2, reason="retries_exhausted")
    login = bury(app, "web.login", 3)
    client = Client(make_app(app))

    assert all(i in html(client.get("/letters")) for i in (export, exhausted, login))
    by_task = html(client.get("/letters?task=web.exp*"))
    assert export in by_task
    assert exhausted in by_task
    assert login not in by_task
    by_reason = html(client.get("/letters?task=web.export&reason=retries_exhausted"))
    assert exhausted in by_reason
    assert export not in by_reason


def test_an_unknown_reason_or_queue_is_an_error_not_an_empty_list(app: Celery) -> None:
    client = Client(make_app(app))

    assert client.get("/letters?reason=nope").status_code == 400
    response = client.get("/letters?queue=billing")
    assert response.status_code == 400
    assert "queue &#39;billing&#39; is not one of jobs.dlq" in html(response)


def test_a_script_argument_is_shown_as_text_everywhere(app: Celery) -> None:
    task_id = bury(app, "web.export", XSS, note=XSS)
    client = Client(make_app(app))

    for path in ("/", "/letters", f"/letters/{task_id}", f"/purge?id={task_id}"):
        page = html(client.get(path))
        assert "<script" not in page, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html(client.get(f"/letters/{task_id}"))


def test_secrets_are_redacted_as_the_cli_shows_them(app: Celery) -> None:
    task_id = bury(app, "web.login", "alice", password="hunter2", api_key="s3cr3t")

    page = html(Client(make_app(app)).get(f"/letters/{task_id}"))

    assert "hunter2" not in page
    assert "s3cr3t" not in page
    assert "[REDACTED]" in page
    cli = CliRunner().invoke(dlq, ["show", task_id], obj=type("Ctx", (), {"app": app})())
    assert "hunter2" not in cli.output
    assert "[REDACTED]" in cli.output


def test_one_dead_letter_shows_its_attempts_and_traceback(app: Celery) -> None:
    task_id = bury(app, "web.export", 7)

    page = html(Client(make_app(app)).get(f"/letters/{task_id}"))

    assert page.count('<td class="num">1</td>') >= 1
    assert "KeyError" in page
    assert "Traceback (most recent call last)" in page
    assert Client(make_app(app)).get("/letters/no-such-id").status_code == 404


def test_every_response_carries_the_security_headers(app: Celery) -> None:
    client = Client(make_app(app))

    for response in (client.get("/"), client.get("/nowhere"), client.post("/purge")):
        headers = response.headers
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        assert "script-src 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Cache-Control"] == "no-store"


def test_purge_asks_then_removes_the_one_confirmed(app: Celery) -> None:
    keep = bury(app, "web.export", 1)
    gone = bury(app, "web.export", 2)
    client = Client(make_app(app))

    ask = client.get(f"/purge?id={gone}")
    assert "Purge 1 dead letter?" in html(ask)
    assert len(DeadLetters(app).list()) == 2, "the confirmation changed something"
    done = client.post("/purge", data=form(ask))

    assert done.status_code == 200, html(done)
    assert "Purged 1 dead letter for good" in html(done)
    assert [letter.id for letter in DeadLetters(app).list()] == [keep]


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(app: Celery) -> None:
    task_id = bury(app, "web.export", 1)
    client = Client(make_app(app))
    fields = form(client.get(f"/purge?id={task_id}"))

    missing = client.post("/purge", data={**fields, "csrf_token": ""})
    forged = client.post("/purge", data={**fields, "csrf_token": "0" * 64})
    other_browser = Client(make_app(app)).post("/purge", data=fields)  # no cookie: no nonce

    assert (missing.status_code, forged.status_code, other_browser.status_code) == (403,) * 3
    assert [letter.id for letter in DeadLetters(app).list()] == [task_id]


def test_replay_of_a_filtered_set_publishes_them_to_their_queue(app: Celery) -> None:
    replayed = [bury(app, "web.export", n, reason="retries_exhausted") for n in range(2)]
    kept = bury(app, "web.login", 9)
    client = Client(make_app(app))

    ask = client.get("/replay?reason=retries_exhausted")
    assert "Replay 2 dead letters?" in html(ask)
    assert "2 would be replayed" in html(ask)
    done = client.post("/replay", data=form(ask))

    assert "Replayed 2 of 2" in html(done), html(done)
    assert [letter.id for letter in DeadLetters(app).list()] == [kept]
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue("jobs")
        ids = [queue.get(timeout=5).headers["id"] for _ in replayed]
        queue.close()
    assert sorted(ids) == sorted(replayed)


def test_with_a_token_every_request_needs_it(app: Celery) -> None:
    bury(app, "web.export", 1)
    console = make_app(app, token="tok-123")
    client = Client(console)

    assert client.get("/").status_code == 401
    assert "jobs.dlq" not in html(client.get("/letters")), "queue names shown before login"
    assert client.get("/?token=wrong").status_code == 401
    assert Client(console).get("/", headers={"Authorization": "Bearer tok-123"}).status_code == 200
    login = client.get("/letters?token=tok-123&task=web.export")
    assert login.status_code == 303
    assert login.headers["Location"].endswith("/letters?task=web.export"), "token kept in URL"
    assert client.get("/").status_code == 200  # the cookie the login set


def test_mounted_under_a_prefix_its_links_and_forms_keep_it(app: Celery) -> None:
    task_id = bury(app, "web.export", 1)

    def host(environ: Any, start_response: Any) -> list[bytes]:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"the host project"]

    client = Client(DispatcherMiddleware(host, {"/ops/dlq": make_app(app)}))
    first = client.get("/ops/dlq/letters")
    assert "Path=/ops/dlq/" in first.headers["Set-Cookie"]
    listed = html(first)

    assert f'href="/ops/dlq/letters/{task_id}"' in listed
    assert 'href="/ops/dlq/console.css"' in listed
    ask = client.get(f"/ops/dlq/purge?id={task_id}")
    assert 'action="/ops/dlq/purge"' in html(ask)
    assert "Purged 1" in html(client.post("/ops/dlq/purge", data=form(ask)))


def test_without_a_token_only_loopback_host_names_are_answered(app: Celery) -> None:
    client = Client(make_app(app, allowed_hosts={"127.0.0.1", "localhost"}))

    assert client.get("/", base_url="http://127.0.0.1:5590").status_code == 200
    assert client.get("/", base_url="http://evil.example:5590").status_code == 400


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_dlq_web_refuses_another_address_without_a_token(app: Celery, host: str) -> None:
    result = CliRunner().invoke(
        dlq, ["web", "--host", host], obj=type("Ctx", (), {"app": app})(), env={}
    )

    assert result.exit_code == 2
    assert f"Invalid value for --host: {host} is reachable from other machines" in result.output
    assert "give a --token" in result.output
