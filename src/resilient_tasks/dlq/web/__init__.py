"""The dead-letter console: :class:`~resilient_tasks.dlq.DeadLetters` as server-rendered pages.

``celery -A proj dlq web`` serves it on ``127.0.0.1:5590``; :func:`make_app` returns the same
WSGI application for a Django or Flask project to mount behind its own login. It needs the
``web`` extra (``pip install 'resilient-tasks[web]'``: Jinja2 and Werkzeug).

Pages: the counts (``/``), the list with filters (``/letters``), one dead letter with its
attempts and traceback (``/letters/<id>``), and replay and purge of one or of a filtered set
(``/replay``, ``/purge``): a GET shows what would be done and asks, a POST does it.

Security, whatever the mount:

* every change is a POST with a CSRF token (an HMAC of a per-browser cookie under a secret of
  the process: "signed double submit"); a POST without a valid one is refused with 403;
* with a ``token``, every request needs it: ``Authorization: Bearer <token>``, or a cookie
  set by opening any page once with ``?token=<token>``;
* everything shown is escaped (Jinja2 autoescape: task arguments are whatever a client sent)
  and redacted as ``celery dlq show`` redacts it (:meth:`DeadLetter.redacted`);
* every response says ``Content-Security-Policy: default-src 'self'`` (no script at all, no
  inline style), ``X-Frame-Options: DENY`` and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

try:
    import jinja2
    from werkzeug.exceptions import BadRequest, Forbidden, HTTPException, NotFound, Unauthorized
    from werkzeug.routing import Map, Rule
    from werkzeug.wrappers import Request, Response
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the dead-letter console needs the web extra: pip install 'resilient-tasks[web]'"
    ) from exc

from kombu.exceptions import OperationalError

from resilient_tasks.dlq.model import (
    REASONS,
    DeadLetter,
    DeadLetterToolError,
    PurgeReport,
    ReplayReport,
)
from resilient_tasks.dlq.tools import DeadLetters

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from celery import Celery

__all__ = ["TOKEN_ENV", "DeadLetterConsole", "loopback", "make_app"]

#: The environment variable ``celery dlq web`` reads the token from when ``--token`` is not given.
TOKEN_ENV = "RESILIENT_TASKS_WEB_TOKEN"
#: How many dead letters a list page shows at most (the rest: narrow the filters).
PAGE_LIMIT = 500
_TOKEN_COOKIE = "rt_dlq_token"
_CSRF_COOKIE = "rt_dlq_csrf"
_CSRF_FIELD = "csrf_token"
_HEADERS = {
    # No script at all; the stylesheet is a file of the console's own ('self').
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind, or a Host header's name) is this machine only.

    Example::

        >>> loopback("127.0.0.1"), loopback("localhost"), loopback("::1"), loopback("0.0.0.0")
        (True, True, True, False)
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_app(
    celery_app: Celery,
    *,
    queues: Iterable[str] | str | None = None,
    token: str | None = None,
    secret: bytes | None = None,
    allowed_hosts: Iterable[str] | None = None,
) -> DeadLetterConsole:
    """The dead-letter console of ``celery_app`` as a WSGI application.

    ``queues``: the dead-letter queues it shows (default: every one the app's tasks and routes
    imply, as :class:`DeadLetters`). ``token``: every request must carry it (a bearer token, or
    the cookie ``?token=`` sets); ``None`` leaves access to whatever the app is mounted behind.
    ``secret``: the key of the CSRF tokens (default: random, per process). ``allowed_hosts``:
    the only ``Host`` headers answered (``celery dlq web`` without a token answers loopback
    names only, against DNS rebinding); ``None`` answers any.

    Mounted under a prefix, its links and cookies keep the prefix (WSGI ``SCRIPT_NAME``).

    Example (Flask, behind the project's own login, at ``/dlq``)::

        from werkzeug.middleware.dispatcher import DispatcherMiddleware
        from resilient_tasks.dlq.web import make_app

        flask_app.wsgi_app = DispatcherMiddleware(
            flask_app.wsgi_app, {"/dlq": make_app(celery_app)}
        )
    """
    return DeadLetterConsole(
        celery_app,
        queues=queues,
        token=token,
        secret=secret,
        allowed_hosts=allowed_hosts,
    )


@dataclass(frozen=True)
class _Filters:
    """What a page was asked for: its query string (or form) filters, checked."""

    task: str | None = None
    id: str | None = None
    reason: str | None = None
    queue: str | None = None

    @classmethod
    def read(cls, values: Mapping[str, str], queues: tuple[str, ...]) -> _Filters:
        def value(name: str) -> str | None:
            text = (values.get(name) or "").strip()
            return text or None

        reason, queue = value("reason"), value("queue")
        if reason is not None and reason not in REASONS:
            raise BadRequest(f"unknown reason {reason!r}: expected one of {', '.join(REASONS)}")
        if queue is not None and queue not in queues:
            raise BadRequest(f"queue {queue!r} is not one of {', '.join(queues)}")
        return cls(task=value("task"), id=value("id"), reason=reason, queue=queue)

    @property
    def query(self) -> dict[str, str]:
        """The filters that are set, as query string values."""
        fields = {"task": self.task, "id": self.id, "reason": self.reason, "queue": self.queue}
        return {name: text for name, text in fields.items() if text is not None}

    @property
    def text(self) -> str:
        return ", ".join(f"{name} {text}" for name, text in self.query.items()) or "none"


class DeadLetterConsole:
    """The WSGI application :func:`make_app` returns (call it as ``app(environ, start_response)``).

    Example::

        console = make_app(celery_app, token="s3cr3t")
        # werkzeug.serving.run_simple("127.0.0.1", 5590, console)
    """

    def __init__(
        self,
        celery_app: Celery,
        *,
        queues: Iterable[str] | str | None = None,
        token: str | None = None,
        secret: bytes | None = None,
        allowed_hosts: Iterable[str] | None = None,
    ) -> None:
        if token is not None and not token.strip():
            raise ValueError("token is empty: give a secret, or None for no token")
        self.celery_app = celery_app
        self.letters = DeadLetters(celery_app, queues)
        self.token = token
        self.allowed_hosts = None if allowed_hosts is None else frozenset(allowed_hosts)
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._templates = jinja2.Environment(
            loader=jinja2.PackageLoader("resilient_tasks.dlq.web", "templates"),
            autoescape=True,  # every value of an envelope is a client's, shown as text
            undefined=jinja2.StrictUndefined,
        )
        self._css = files(__package__).joinpath("console.css").read_bytes()
        connection = celery_app.connection_for_read()
        self._broker_errors: tuple[type[BaseException], ...] = (
            OperationalError,
            *connection.connection_errors,
            *connection.channel_errors,
        )
        self._routes = Map(
            [
                Rule("/", endpoint="stats", methods=["GET"]),
                Rule("/letters", endpoint="letters", methods=["GET"]),
                Rule("/letters/<path:task_id>", endpoint="letter", methods=["GET"]),
                Rule("/replay", endpoint="replay", methods=["GET", "POST"]),
                Rule("/purge", endpoint="purge", methods=["GET", "POST"]),
                Rule("/console.css", endpoint="css", methods=["GET"]),
            ],
            strict_slashes=False,
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        try:
            response = self._respond(request)
        except HTTPException as exc:
            response = self._error(request, exc.code or 500, exc.description or exc.name)
        for name, value in _HEADERS.items():
            response.headers[name] = value
        return response(environ, start_response)

    # -- access ------------------------------------------------------------------------------

    def _respond(self, request: Request) -> Response:
        if self.allowed_hosts is not None and request.host.rsplit(":", 1)[0].strip("[]") not in (
            self.allowed_hosts
        ):
            raise BadRequest(f"this console does not answer for host {request.host!r}")
        login = self._login(request)
        if login is not None:
            return login
        adapter = self._routes.bind_to_environ(request.environ)
        endpoint, values = adapter.match()
        if request.method == "POST":
            self._check_csrf(request)
        handler: Callable[..., Response] = getattr(self, f"_page_{endpoint}")
        return handler(request, adapter, **values)

    def _login(self, request: Request) -> Response | None:
        """``None`` when the request may go on; otherwise the response (a 401, or the redirect
        that sets the token cookie and drops ``?token=`` from the address)."""
        if self.token is None:
            return None
        given = request.args.get("token")
        if given is not None:
            if not self._is_token(given):
                raise Unauthorized("wrong token")
            query = {k: v for k, v in request.args.items(multi=True) if k != "token"}
            target = request.base_url + ("?" + urlencode(query) if query else "")
            response = Response(status=303, headers={"Location": target})
            self._set_cookie(request, response, _TOKEN_COOKIE, given)
            return response
        bearer = request.headers.get("Authorization", "")
        if bearer.startswith("Bearer ") and self._is_token(bearer[len("Bearer ") :].strip()):
            return None
        if self._is_token(request.cookies.get(_TOKEN_COOKIE, "")):
            return None
        raise Unauthorized(
            "this console needs its token: open it once as ?token=<token>, or send "
            "Authorization: Bearer <token>"
        )

    def _is_token(self, given: str) -> bool:
        assert self.token is not None
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _set_cookie(self, request: Request, response: Response, name: str, value: str) -> None:
        """A cookie of the console's own: under its mount only, out of scripts' and other
        sites' reach, and over HTTPS only where the console is served so."""
        response.set_cookie(
            name,
            value,
            path=(request.script_root or "") + "/",
            httponly=True,
            samesite="Strict",
            secure=request.is_secure,
        )

    def _csrf_for(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()

    def _check_csrf(self, request: Request) -> None:
        nonce = request.cookies.get(_CSRF_COOKIE, "")
        given = request.form.get(_CSRF_FIELD, "")
        if not nonce or not hmac.compare_digest(given.encode(), self._csrf_for(nonce).encode()):
            raise Forbidden("missing or wrong CSRF token: reload the page and confirm again")

    # -- rendering ---------------------------------------------------------------------------

    def _render(
        self, request: Request, adapter: Any, template: str, status: int = 200, **context: Any
    ) -> Response:
        nonce = request.cookies.get(_CSRF_COOKIE) or secrets.token_urlsafe(24)

        def url(endpoint: str, **values: Any) -> str:
            return str(adapter.build(endpoint, {k: v for k, v in values.items() if v}))

        shared = {
            "url": url,
            "csrf_token": self._csrf_for(nonce),
            "queues": self.letters.queues,
            "reasons": REASONS,
        }
        html = self._templates.get_template(template).render({**shared, **context})
        response = Response(html, status=status, mimetype="text/html")
        if request.cookies.get(_CSRF_COOKIE) != nonce:
            self._set_cookie(request, response, _CSRF_COOKIE, nonce)
        return response

    def _error(self, request: Request, status: int, message: str) -> Response:
        adapter = self._routes.bind_to_environ(request.environ)
        try:
            # Who has not shown the token yet (401), or came by another host name, is not
            # told which queues there are.
            hidden = {"queues": ()} if status in (400, 401) else {}
            return self._render(
                request, adapter, "error.html", status, code=status, message=message, **hidden
            )
        except Exception:  # the error page itself failed: plain text, still escaped by nature
            return Response(message, status=status, mimetype="text/plain")

    def _letters(self, filters: _Filters) -> DeadLetters:
        if filters.queue is None:
            return self.letters
        return DeadLetters(self.celery_app, [filters.queue])

    def _run(self, call: Callable[[], Any]) -> Any:
        """Call the dead-letter tools; their mistakes and the broker's become error pages."""
        try:
            return call()
        except DeadLetterToolError as exc:
            raise _Problem(409, str(exc)) from exc
        except self._broker_errors as exc:
            raise _Problem(503, f"broker error: {exc}") from exc

    # -- pages -------------------------------------------------------------------------------

    def _page_css(self, request: Request, adapter: Any) -> Response:
        return Response(self._css, mimetype="text/css")

    def _page_stats(self, request: Request, adapter: Any) -> Response:
        others: list[tuple[str, str]] = []
        counted = self._run(lambda: self.letters.stats(others=lambda q, m: others.append((q, m))))
        return self._render(request, adapter, "stats.html", stats=counted, others=others)

    def _page_letters(self, request: Request, adapter: Any) -> Response:
        filters = _Filters.read(request.args, self.letters.queues)
        others: list[tuple[str, str]] = []
        found = self._run(
            lambda: self._letters(filters).list(
                task=filters.task,
                id=filters.id,
                reason=filters.reason,
                limit=PAGE_LIMIT + 1,
                others=lambda q, m: others.append((q, m)),
            )
        )
        return self._render(
            request,
            adapter,
            "letters.html",
            letters=found[:PAGE_LIMIT],
            more=len(found) > PAGE_LIMIT,
            limit=PAGE_LIMIT,
            filters=filters,
            others=others,
        )

    def _page_letter(self, request: Request, adapter: Any, task_id: str) -> Response:
        found: list[DeadLetter] = self._run(lambda: self.letters.list(id=task_id))
        if not found:
            raise NotFound(f"no dead letter of task {task_id} in {', '.join(self.letters.queues)}")
        shown = [_Shown.of(letter, self.letters.redact_patterns) for letter in found]
        return self._render(request, adapter, "letter.html", shown=shown, task_id=task_id)

    def _page_replay(self, request: Request, adapter: Any) -> Response:
        return self._change(request, adapter, "replay")

    def _page_purge(self, request: Request, adapter: Any) -> Response:
        return self._change(request, adapter, "purge")

    def _change(self, request: Request, adapter: Any, action: str) -> Response:
        """GET: what ``action`` would do, and a form to confirm; POST: do it, to at most as
        many dead letters as the confirmation counted (``expected``)."""
        source = request.form if request.method == "POST" else request.args
        filters = _Filters.read(source, self.letters.queues)
        letters = self._letters(filters)
        task, task_id, reason = filters.task, filters.id, filters.reason
        if request.method == "GET":
            preview: ReplayReport | None = None
            matching: list[DeadLetter] = self._run(
                lambda: letters.list(task=task, id=task_id, reason=reason)
            )
            if action == "replay" and matching:
                preview = self._run(
                    lambda: letters.replay(task=task, id=task_id, reason=reason, dry_run=True)
                )
            return self._render(
                request,
                adapter,
                "confirm.html",
                action=action,
                filters=filters,
                matching=matching[:20],
                count=len(matching),
                preview=preview,
            )
        try:
            expected = int(request.form.get("expected", ""))
        except ValueError:
            raise BadRequest("expected: the count the confirmation showed is missing") from None
        if expected < 1:
            raise BadRequest("expected: nothing to do (the confirmation counted none)")
        report: ReplayReport | PurgeReport
        if action == "replay":
            report = self._run(
                lambda: letters.replay(task=task, id=task_id, reason=reason, limit=expected)
            )
        else:
            report = self._run(
                lambda: letters.purge(task=task, id=task_id, reason=reason, limit=expected)
            )
        return self._render(
            request, adapter, "done.html", action=action, filters=filters, report=report
        )


class _Problem(HTTPException):
    """An error page with the dead-letter tools' own message (409) or the broker's (503)."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code


@dataclass(frozen=True)
class _Shown:
    """One dead letter as its page shows it: the redacted envelope, taken apart."""

    letter: DeadLetter
    envelope: Mapping[str, Any]

    @classmethod
    def of(cls, letter: DeadLetter, patterns: Iterable[str]) -> _Shown:
        return cls(letter, letter.redacted(patterns))

    def _part(self, name: str) -> Mapping[str, Any]:
        part = self.envelope.get(name)
        return part if isinstance(part, Mapping) else {}

    @property
    def task(self) -> Mapping[str, Any]:
        return self._part("task")

    @property
    def exception(self) -> Mapping[str, Any]:
        return self._part("exception")

    @property
    def attempts(self) -> list[Mapping[str, Any]]:
        attempts = self.envelope.get("attempts")
        return [a for a in attempts if isinstance(a, Mapping)] if isinstance(attempts, list) else []

    def dumped(self, value: Any) -> str:
        return json.dumps(value, default=str)

    @property
    def document(self) -> str:
        return json.dumps(self.envelope, indent=2, default=str)
