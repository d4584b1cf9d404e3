"""Endpoints on 127.0.0.1 that fail on purpose, for raising real errors from real client libraries.

* :func:`closed_port`: a port nothing listens on (connections are refused).
* :func:`silent_listener`: a port that accepts connections and never answers (reads time out).
* :class:`HttpServer`: a threaded ``http.server`` answering ``/status/<code>`` with that status
  (and ``?retry-after=<value>`` as a ``Retry-After`` header) and ``/sleep/<seconds>`` late.
* :func:`require_server`: skip a test when a real server is down (fail it under ``CI=true``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest


def closed_port() -> int:
    """A loopback port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def silent_listener() -> Iterator[int]:
    """A loopback port whose kernel completes the TCP handshake and that never sends a byte."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port: int = listener.getsockname()[1]
        yield port


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        kind, _, argument = url.path.strip("/").partition("/")
        status = 200
        headers: dict[str, str] = {}
        if kind == "status":
            status = int(argument)
            for value in parse_qs(url.query).get("retry-after", []):
                headers["Retry-After"] = value
        elif kind == "sleep":
            time.sleep(float(argument))
        body = f"{status}\n".encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


class HttpServer:
    """A threaded HTTP/1.0 server on ``127.0.0.1:<free port>``; use as a context manager."""

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True  # a client that timed out leaves a sleeper behind
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> HttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def require_server(label: str, host: str, port: int) -> None:
    """Skip the calling test when ``host:port`` does not accept connections (fail with CI=true)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError as exc:
        reason = f"{label} at {host}:{port} does not answer ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires every server", pytrace=False)
        pytest.skip(reason)
