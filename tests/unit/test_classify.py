"""TRANSIENT_ERRORS and retry_after_seconds, specified on real errors from the real libraries.

Closed ports, a listener that never answers and a small HTTP server on loopback give real refused
connections, timeouts and HTTP statuses; the Redis, PostgreSQL and RabbitMQ servers on loopback
give real authentication and configuration failures (a server that is down skips its tests, or
fails them with ``CI=true``). Hand-built exceptions only fill in what a test cannot provoke
(an unreachable host, a broker shutting down, every SQLSTATE).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.message import Message
from email.utils import format_datetime
from urllib.parse import quote, urlsplit

import amqp
import httpx
import kombu
import kombu.exceptions
import psycopg
import psycopg.errors
import psycopg2
import pytest
import redis
import requests
import sqlalchemy
import sqlalchemy.exc
import urllib3
from redis.backoff import NoBackoff
from redis.retry import Retry

from resilient_tasks.classify import (
    MAX_RETRY_AFTER,
    TRANSIENT_ERRORS,
    TransientErrors,
    retry_after_seconds,
)
from resilient_tasks.policy import AttemptState, GiveUp, RetryIn, RetryPolicy, decide
from support.brokers import RABBITMQ_URL, REDIS_URL
from support.loopback import HttpServer, closed_port, require_server, silent_listener

POSTGRES_URL = os.environ.get("RT_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
TIMEOUT = 0.2  # seconds a client waits for the server that sleeps
SLEEP = "/sleep/1"


def chained(outer: BaseException, cause: BaseException) -> BaseException:
    """``outer`` raised ``from cause``, as a library wraps an error."""
    try:
        raise outer from cause
    except BaseException as exc:
        return exc


def raised_while_handling(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` raised in the ``except`` block that caught ``inner`` (its ``__context__``)."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 -- the implicit context is the point
    except BaseException as exc:
        return exc


# --- built-in errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionError(),
        ConnectionResetError(),
        ConnectionRefusedError(),
        ConnectionAbortedError(),
        BrokenPipeError(),
        TimeoutError(),  # also socket.timeout, its alias
    ],
    ids=repr,
)
def test_builtin_connection_and_timeout_errors_are_transient(exc: BaseException) -> None:
    assert TRANSIENT_ERRORS(exc)


@pytest.mark.parametrize(
    "name",
    [
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "ETIMEDOUT",
        "EPIPE",
        "EHOSTUNREACH",
        "EHOSTDOWN",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
    ],
)
def test_os_errors_of_a_lost_or_unroutable_connection_are_transient(name: str) -> None:
    code = getattr(errno, name)

    assert TRANSIENT_ERRORS(OSError(code, os.strerror(code)))


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOENT, "No such file or directory"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError("no errno"),
        ValueError("bad input"),
        KeyError("missing"),
        RuntimeError("bug"),
    ],
    ids=repr,
)
def test_other_errors_are_not_transient(exc: BaseException) -> None:
    assert not TRANSIENT_ERRORS(exc)


def test_connecting_to_a_closed_port_is_transient() -> None:
    with pytest.raises(ConnectionRefusedError) as raised:
        socket.create_connection(("127.0.0.1", closed_port()), timeout=1)

    assert TRANSIENT_ERRORS(raised.value)


def test_a_read_that_times_out_is_transient() -> None:
    with (
        silent_listener() as port,
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock,
        pytest.raises(socket.timeout) as raised,
    ):
        sock.recv(1)

    assert TRANSIENT_ERRORS(raised.value)


@pytest.mark.parametrize(
    "exc",
    [PermissionError(errno.EACCES, "Permission denied"), PermissionError()],
    ids=repr,
)
def test_permission_errors_are_not_transient(exc: BaseException) -> None:
    assert not TRANSIENT_ERRORS(exc)


@pytest.mark.parametrize(
    ("code", "transient"),
    [("EAI_AGAIN", True), ("EAI_NONAME", False), ("EAI_NODATA", False), ("EAI_FAIL", False)],
)
def test_dns_failures_are_transient_only_when_the_resolver_could_not_answer(
    code: str, transient: bool
) -> None:
    exc = socket.gaierror(getattr(socket, code), "resolver said no")

    assert TRANSIENT_ERRORS(exc) is transient


def resolve_invalid_name() -> socket.gaierror:
    """The resolver's real answer for a name that cannot exist (RFC 6761 ``.invalid``): NXDOMAIN
    with a resolver, EAI_AGAIN without one."""
    with pytest.raises(socket.gaierror) as raised:
        socket.getaddrinfo("resilient-tasks.invalid", 80)
    return raised.value


def test_a_real_dns_failure_is_classified_by_its_code() -> None:
    exc = resolve_invalid_name()

    assert TRANSIENT_ERRORS(exc) is (exc.errno == socket.EAI_AGAIN)


def test_a_certificate_that_fails_verification_is_not_transient() -> None:
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")
    exc = chained(requests.exceptions.SSLError("HTTPSConnectionPool: SSLError"), cause)

    assert isinstance(exc, requests.ConnectionError)
    assert not TRANSIENT_ERRORS(exc)


# --- the exception chain ------------------------------------------------------------------------


def test_a_transient_cause_makes_its_wrapper_transient() -> None:
    exc = chained(RuntimeError("sync failed"), ConnectionResetError("peer"))

    assert TRANSIENT_ERRORS(exc)


def test_an_error_raised_while_handling_a_transient_one_is_transient() -> None:
    exc = raised_while_handling(RuntimeError("cleanup failed"), TimeoutError("read"))

    assert TRANSIENT_ERRORS(exc)


def test_a_context_hidden_by_from_none_is_not_followed() -> None:
    try:
        try:
            raise ConnectionResetError("peer")
        except ConnectionResetError:
            raise RuntimeError("sync failed") from None
    except RuntimeError as raised:
        exc = raised

    assert not TRANSIENT_ERRORS(exc)


def test_a_permanent_cause_wins_over_a_transient_wrapper() -> None:
    exc = chained(ConnectionError("could not open the socket"), PermissionError("firewall"))

    assert not TRANSIENT_ERRORS(exc)


def test_a_cycle_in_the_chain_ends() -> None:
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__cause__, second.__cause__ = second, first

    assert not TRANSIENT_ERRORS(first)


# --- HTTP clients -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http() -> Iterator[HttpServer]:
    with HttpServer() as server:
        yield server


def get_with_requests(url: str) -> None:
    requests.get(url, timeout=TIMEOUT).raise_for_status()


def get_with_httpx(url: str) -> None:
    httpx.get(url, timeout=TIMEOUT).raise_for_status()


def get_with_urllib(url: str) -> None:
    urllib.request.urlopen(url, timeout=TIMEOUT).close()


def get_with_urllib3(url: str) -> None:
    urllib3.request("GET", url, timeout=TIMEOUT, retries=False)


STATUS_CLIENTS = {
    "requests": (get_with_requests, requests.HTTPError),
    "httpx": (get_with_httpx, httpx.HTTPStatusError),
    "urllib": (get_with_urllib, urllib.error.HTTPError),
}
REFUSED = {
    "requests": (get_with_requests, requests.ConnectionError),
    "httpx": (get_with_httpx, httpx.ConnectError),
    "urllib": (get_with_urllib, urllib.error.URLError),
    "urllib3": (get_with_urllib3, urllib3.exceptions.NewConnectionError),
}
TIMED_OUT = {
    "requests": (get_with_requests, requests.ReadTimeout),
    "httpx": (get_with_httpx, httpx.ReadTimeout),
    "urllib": (get_with_urllib, TimeoutError),
    "urllib3": (get_with_urllib3, urllib3.exceptions.ReadTimeoutError),
}


@pytest.mark.parametrize("client", REFUSED)
def test_an_http_request_to_a_closed_port_is_transient(client: str) -> None:
    get, error = REFUSED[client]
    with pytest.raises(error) as raised:
        get(f"http://127.0.0.1:{closed_port()}/")

    assert TRANSIENT_ERRORS(raised.value)


@pytest.mark.parametrize("client", TIMED_OUT)
def test_an_http_request_that_times_out_is_transient(client: str, http: HttpServer) -> None:
    get, error = TIMED_OUT[client]
    with pytest.raises(error) as raised:
        get(http.url(SLEEP))

    assert TRANSIENT_ERRORS(raised.value)


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (429, True),
        (502, True),
        (503, True),
        (504, True),
        (401, False),
        (403, False),
        (404, False),
        (500, False),
    ],
)
@pytest.mark.parametrize("client", STATUS_CLIENTS)
def test_an_http_error_status_is_transient_only_for_429_502_503_504(
    client: str, status: int, transient: bool, http: HttpServer
) -> None:
    get, error = STATUS_CLIENTS[client]
    with pytest.raises(error) as raised:
        get(http.url(f"/status/{status}"))

    assert TRANSIENT_ERRORS(raised.value) is transient


@pytest.mark.parametrize("status", [401, 403])
def test_an_authentication_failure_wrapped_in_a_connection_error_is_not_transient(
    status: int, http: HttpServer
) -> None:
    with pytest.raises(requests.HTTPError) as raised:
        get_with_requests(http.url(f"/status/{status}"))
    exc = chained(ConnectionError("upstream refused us"), raised.value)

    assert not TRANSIENT_ERRORS(exc)


@pytest.mark.parametrize(
    ("client", "error"),
    [("requests", requests.ConnectionError), ("httpx", httpx.ConnectError)],
)
def test_an_http_clients_dns_failure_is_classified_like_the_resolvers_answer(
    client: str, error: type[BaseException]
) -> None:
    expected = TRANSIENT_ERRORS(resolve_invalid_name())
    get = STATUS_CLIENTS[client][0]
    with pytest.raises(error) as raised:
        get("http://resilient-tasks.invalid/")

    assert TRANSIENT_ERRORS(raised.value) is expected


# --- Retry-After --------------------------------------------------------------------------------


def http_date(moment: datetime) -> str:
    return format_datetime(moment, usegmt=True)


@pytest.mark.parametrize(
    ("path", "seconds"),
    [
        ("/status/429?retry-after=120", 120.0),
        (f"/status/503?retry-after={quote(http_date(NOW + timedelta(seconds=90)))}", 90.0),
        ("/status/429?retry-after=7200", MAX_RETRY_AFTER),
        ("/status/503", None),
        ("/status/502?retry-after=30", None),
    ],
    ids=["429-seconds", "503-http-date", "429-capped", "503-no-header", "502-ignored"],
)
@pytest.mark.parametrize("client", STATUS_CLIENTS)
def test_retry_after_is_read_from_a_real_429_or_503_response(
    client: str, path: str, seconds: float | None, http: HttpServer
) -> None:
    get, error = STATUS_CLIENTS[client]
    with pytest.raises(error) as raised:
        get(http.url(path))

    assert retry_after_seconds(raised.value, now=NOW) == seconds


def http_error(status: int, retry_after: str | None) -> urllib.error.HTTPError:
    headers = Message()
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return urllib.error.HTTPError("https://api.example/", status, "status", headers, None)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        (" 30 ", 30.0),
        ("007", 7.0),
        ("900", 900.0),
        ("901", MAX_RETRY_AFTER),
        ("9" * 5000, MAX_RETRY_AFTER),
        (http_date(NOW + timedelta(seconds=42)), 42.0),
        (http_date(NOW - timedelta(hours=1)), 0.0),
        (http_date(NOW + timedelta(days=3)), MAX_RETRY_AFTER),
        ("Tuesday, 01-Jan-30 12:01:00 GMT", 60.0),  # RFC 850, obsolete but valid
        ("Tue Jan  1 12:02:00 2030", 120.0),  # asctime: no zone, which is GMT
        ("Tue, 01 Jan 2030 12:00:30 -0000", 30.0),
        ("Wed, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER),
        ("1.5", None),
        ("-1", None),
        ("soon", None),
        ("", None),
        ("Tue, 01 Jan 99999 12:00:00 GMT", None),
    ],
)
def test_retry_after_parses_seconds_and_http_dates_and_clamps_them(
    value: str, seconds: float | None
) -> None:
    assert retry_after_seconds(http_error(429, value), now=NOW) == seconds


def test_retry_after_counts_from_the_current_time_by_default() -> None:
    later = datetime.now(timezone.utc) + timedelta(seconds=60)

    seconds = retry_after_seconds(http_error(503, http_date(later)))

    assert seconds is not None
    assert 55 <= seconds <= 60


def test_retry_after_takes_a_naive_now_as_utc() -> None:
    exc = http_error(503, http_date(NOW + timedelta(seconds=10)))

    assert retry_after_seconds(exc, now=NOW.replace(tzinfo=None)) == 10.0


def test_retry_after_is_found_along_the_chain() -> None:
    exc = chained(RuntimeError("sync failed"), http_error(429, "12"))

    assert retry_after_seconds(exc) == 12.0


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError(),
        requests.HTTPError("no response attached"),
        urllib.error.HTTPError("https://api.example/", 429, "no headers", None, None),
    ],
    ids=["not-http", "requests-without-response", "urllib-without-headers"],
)
def test_retry_after_is_none_without_a_response_to_read(exc: BaseException) -> None:
    assert retry_after_seconds(exc) is None


# --- Redis --------------------------------------------------------------------------------------

REDIS = urlsplit(REDIS_URL)
NO_RETRY = Retry(NoBackoff(), 0)  # redis-py retries connection errors with backoff by default


def test_redis_connection_refused_is_transient() -> None:
    client = redis.Redis(port=closed_port(), socket_connect_timeout=1, retry=NO_RETRY)
    with pytest.raises(redis.ConnectionError) as raised:
        client.ping()

    assert TRANSIENT_ERRORS(raised.value)


def test_redis_timeout_is_transient() -> None:
    with silent_listener() as port:
        client = redis.Redis(port=port, socket_timeout=TIMEOUT, retry=NO_RETRY)
        with pytest.raises(redis.TimeoutError) as raised:
            client.ping()

    assert TRANSIENT_ERRORS(raised.value)


def test_redis_authentication_failure_is_not_transient() -> None:
    """Redis without ``requirepass`` accepts any password for its default user, so the test logs
    in as a user that does not exist: the same WRONGPASS answer a wrong password gets."""
    require_server("Redis", REDIS.hostname or "127.0.0.1", REDIS.port or 6379)
    client = redis.Redis(
        host=REDIS.hostname or "127.0.0.1",
        port=REDIS.port or 6379,
        username="resilient-tasks-nobody",
        password="wrong",
        retry=NO_RETRY,
    )
    with pytest.raises(redis.AuthenticationError) as raised:
        client.ping()

    assert isinstance(raised.value, redis.ConnectionError)
    assert not TRANSIENT_ERRORS(raised.value)


def test_kombus_wrapper_around_a_redis_authentication_failure_is_not_transient() -> None:
    require_server("Redis", REDIS.hostname or "127.0.0.1", REDIS.port or 6379)
    url = f"redis://resilient-tasks-nobody:wrong@{REDIS.hostname}:{REDIS.port or 6379}/0"
    with pytest.raises(kombu.exceptions.OperationalError) as raised:
        kombu.Connection(url, connect_timeout=1).ensure_connection(max_retries=0)

    assert not TRANSIENT_ERRORS(raised.value)


# --- PostgreSQL: psycopg (3) and psycopg2 -------------------------------------------------------

POSTGRES = urlsplit(POSTGRES_URL)
PG_HOST = POSTGRES.hostname or "127.0.0.1"
PG_PORT = POSTGRES.port or 5432
PG_USER = POSTGRES.username or "root"
PG_DATABASE = POSTGRES.path.lstrip("/") or "test"
DRIVERS = {"psycopg": psycopg, "psycopg2": psycopg2}


@pytest.fixture
def postgres() -> None:
    require_server("PostgreSQL", PG_HOST, PG_PORT)


def pg_connect(driver: str, **options: object) -> object:
    params: dict[str, object] = {
        "host": PG_HOST,
        "port": PG_PORT,
        "user": PG_USER,
        "dbname": PG_DATABASE,
        "connect_timeout": 2,
    }
    return DRIVERS[driver].connect(**{**params, **options})


def terminate(driver: str, pid: int) -> None:
    """End backend ``pid`` from a second connection, as a server restart or failover would."""
    killer = psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_DATABASE)
    with killer:
        killer.execute("SELECT pg_terminate_backend(%s)", (pid,))


@pytest.mark.parametrize("driver", DRIVERS)
def test_postgres_connection_refused_is_transient(driver: str) -> None:
    with pytest.raises(DRIVERS[driver].OperationalError) as raised:
        pg_connect(driver, port=closed_port())

    assert TRANSIENT_ERRORS(raised.value)


@pytest.mark.parametrize(
    "options",
    [
        {"dbname": "resilient_tasks_no_such_database"},
        {"user": "resilient_tasks_no_such_role"},
        {"sslmode": "require"},
    ],
    ids=["unknown-database", "unknown-role", "tls-required"],
)
@pytest.mark.parametrize("driver", DRIVERS)
def test_postgres_configuration_errors_at_connect_are_not_transient(
    driver: str, options: dict[str, object], postgres: None
) -> None:
    try:
        pg_connect(driver, **options).close()
    except DRIVERS[driver].OperationalError as exc:
        error = exc
    else:
        pytest.skip(f"the server accepted {options}")

    assert not TRANSIENT_ERRORS(error)


@pytest.mark.parametrize("driver", DRIVERS)
def test_postgres_connection_terminated_by_the_server_is_transient(
    driver: str, postgres: None
) -> None:
    connection = pg_connect(driver)
    cursor = connection.cursor()
    cursor.execute("SELECT pg_backend_pid()")
    terminate(driver, cursor.fetchone()[0])
    with pytest.raises(DRIVERS[driver].OperationalError) as raised:
        cursor.execute("SELECT 1")
    connection.close()

    assert TRANSIENT_ERRORS(raised.value)


@pytest.mark.parametrize("driver", DRIVERS)
def test_postgres_bad_sql_is_not_transient(driver: str, postgres: None) -> None:
    connection = pg_connect(driver)
    with pytest.raises(DRIVERS[driver].ProgrammingError) as raised:
        connection.cursor().execute("SELEC 1")
    connection.close()

    assert not TRANSIENT_ERRORS(raised.value)


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("57P01", True),  # admin_shutdown
        ("57P03", True),  # cannot_connect_now
        ("08006", True),  # connection_failure
        ("08001", True),  # unable to establish
        ("53300", True),  # too_many_connections
        ("28P01", False),  # invalid_password
        ("28000", False),  # invalid_authorization_specification
        ("08P01", False),  # protocol_violation
        ("40001", False),  # serialization_failure: retry the transaction, not the task
        ("57014", False),  # query_canceled (statement_timeout)
    ],
)
def test_psycopg_operational_errors_are_classified_by_sqlstate(
    sqlstate: str, transient: bool
) -> None:
    exc = psycopg.errors.lookup(sqlstate)("server said so")

    assert TRANSIENT_ERRORS(exc) is transient


@pytest.mark.parametrize(
    ("message", "transient"),
    [
        ("FATAL:  the database system is starting up", True),
        ("FATAL:  sorry, too many clients already", True),
        ("SSL SYSCALL error: EOF detected", True),
        (
            'could not translate host name "db" to address: Temporary failure in name resolution',
            True,
        ),
        ('could not translate host name "db" to address: Name or service not known', False),
        ('FATAL:  password authentication failed for user "app"', False),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.5", user "app", database "app"', False),
        ("fe_sendauth: no password supplied", False),
        ("something nobody has seen before", False),
    ],
)
def test_postgres_errors_without_a_sqlstate_are_classified_by_message(
    message: str, transient: bool
) -> None:
    assert TRANSIENT_ERRORS(psycopg2.OperationalError(message)) is transient


# --- SQLAlchemy ---------------------------------------------------------------------------------


def engine(**options: object) -> sqlalchemy.Engine:
    port = options.pop("port", PG_PORT)
    database = options.pop("database", PG_DATABASE)
    url = f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{port}/{database}"
    return sqlalchemy.create_engine(url, connect_args={"connect_timeout": 2}, **options)


def test_sqlalchemy_connection_refused_is_transient() -> None:
    with pytest.raises(sqlalchemy.exc.OperationalError) as raised:
        engine(port=closed_port()).connect()

    assert isinstance(raised.value.orig, psycopg.OperationalError)
    assert TRANSIENT_ERRORS(raised.value)


def test_sqlalchemy_unknown_database_is_not_transient(postgres: None) -> None:
    with pytest.raises(sqlalchemy.exc.OperationalError) as raised:
        engine(database="resilient_tasks_no_such_database").connect()

    assert not TRANSIENT_ERRORS(raised.value)


def test_sqlalchemy_invalidated_connection_is_transient(postgres: None) -> None:
    db = engine()
    with db.connect() as connection:
        terminate("psycopg", connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        with pytest.raises(sqlalchemy.exc.OperationalError) as raised:
            connection.exec_driver_sql("SELECT 1")
    db.dispose()

    assert raised.value.connection_invalidated
    assert TRANSIENT_ERRORS(raised.value)


def test_sqlalchemy_pool_timeout_is_transient(postgres: None) -> None:
    db = engine(pool_size=1, max_overflow=0, pool_timeout=0.05)
    with db.connect(), pytest.raises(sqlalchemy.exc.TimeoutError) as raised:
        db.connect()
    db.dispose()

    assert TRANSIENT_ERRORS(raised.value)


def test_sqlalchemy_disconnection_error_is_transient() -> None:
    assert TRANSIENT_ERRORS(sqlalchemy.exc.DisconnectionError("connection was invalidated"))


def test_sqlalchemy_statement_error_is_not_transient(postgres: None) -> None:
    db = engine()
    with db.connect() as connection, pytest.raises(sqlalchemy.exc.ProgrammingError) as raised:
        connection.exec_driver_sql("SELEC 1")
    db.dispose()

    assert not TRANSIENT_ERRORS(raised.value)


# --- kombu and amqp (RabbitMQ) ------------------------------------------------------------------

RABBITMQ = urlsplit(RABBITMQ_URL)
AMQP_HOST = f"{RABBITMQ.hostname or '127.0.0.1'}:{RABBITMQ.port or 5672}"


@pytest.fixture
def rabbitmq() -> None:
    require_server("RabbitMQ", RABBITMQ.hostname or "127.0.0.1", RABBITMQ.port or 5672)


def amqp_connect(**options: object) -> amqp.Connection:
    params: dict[str, object] = {
        "host": AMQP_HOST,
        "userid": RABBITMQ.username or "guest",
        "password": RABBITMQ.password or "guest",
        "connect_timeout": 2,
    }
    connection = amqp.Connection(**{**params, **options})
    connection.connect()
    return connection


def test_kombu_connection_refused_is_transient() -> None:
    connection = kombu.Connection(f"amqp://guest:guest@127.0.0.1:{closed_port()}//")
    with pytest.raises(kombu.exceptions.OperationalError) as raised:
        connection.ensure_connection(max_retries=0)

    assert TRANSIENT_ERRORS(raised.value)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"password": "wrong"}, amqp.exceptions.AccessRefused),
        ({"virtual_host": "/resilient-tasks-no-such-vhost"}, amqp.exceptions.NotAllowed),
    ],
    ids=["wrong-password", "unknown-vhost"],
)
def test_amqp_login_refusals_are_not_transient(
    options: dict[str, object], error: type[BaseException], rabbitmq: None
) -> None:
    with pytest.raises(error) as raised:
        amqp_connect(**options)

    assert not TRANSIENT_ERRORS(raised.value)


def test_amqp_channel_of_a_closed_connection_is_transient(rabbitmq: None) -> None:
    connection = amqp_connect()
    channel = connection.channel()
    connection.close()
    with pytest.raises(amqp.exceptions.RecoverableConnectionError) as raised:
        channel.basic_publish(amqp.Message("x"), routing_key="resilient-tasks-nowhere")

    assert TRANSIENT_ERRORS(raised.value)


def test_amqp_connection_forced_by_the_broker_is_transient() -> None:
    exc = amqp.exceptions.ConnectionForced("CONNECTION_FORCED - broker forced connection closure")

    assert TRANSIENT_ERRORS(exc)


# --- composing and using the classifier ---------------------------------------------------------


class QuotaExceeded(Exception):
    pass


def is_quota(exc: BaseException) -> bool:
    return "quota" in str(exc)


@pytest.mark.parametrize(
    "classifier",
    [
        TRANSIENT_ERRORS | QuotaExceeded,
        QuotaExceeded | TRANSIENT_ERRORS,
        TransientErrors(QuotaExceeded),
    ],
    ids=["or", "ror", "constructor"],
)
def test_an_extended_classifier_matches_the_addition_and_what_is_transient(
    classifier: TransientErrors,
) -> None:
    assert classifier(QuotaExceeded())
    assert classifier(chained(RuntimeError("sync"), QuotaExceeded()))
    assert classifier(ConnectionResetError())
    assert not classifier(KeyError())


def test_an_extended_classifier_matches_a_predicate() -> None:
    classifier = TRANSIENT_ERRORS | is_quota

    assert classifier(RuntimeError("daily quota reached"))
    assert not classifier(RuntimeError("bug"))


def test_extended_classifiers_combine() -> None:
    combined = (TRANSIENT_ERRORS | QuotaExceeded) | (TRANSIENT_ERRORS | is_quota)

    assert combined == TransientErrors(QuotaExceeded, is_quota)


def test_the_repr_names_the_classifier_and_its_additions() -> None:
    assert repr(TRANSIENT_ERRORS) == "TRANSIENT_ERRORS"
    assert repr(TRANSIENT_ERRORS | QuotaExceeded | is_quota) == (
        "TRANSIENT_ERRORS | QuotaExceeded | is_quota"
    )


def test_equal_classifiers_are_equal_and_hash_alike() -> None:
    assert TRANSIENT_ERRORS | QuotaExceeded == TRANSIENT_ERRORS | QuotaExceeded
    assert hash(TRANSIENT_ERRORS | QuotaExceeded) == hash(TransientErrors(QuotaExceeded))
    assert TRANSIENT_ERRORS | QuotaExceeded != TRANSIENT_ERRORS


@pytest.mark.parametrize("other", [42, "ConnectionError", int], ids=repr)
def test_extending_with_something_that_is_not_a_matcher_is_refused(other: object) -> None:
    with pytest.raises(TypeError):
        TRANSIENT_ERRORS | other
    with pytest.raises(TypeError, match="neither an exception type nor a predicate"):
        TransientErrors(other)


@pytest.mark.parametrize(
    ("exc", "decision"),
    [
        (ConnectionResetError(), RetryIn(2.0)),
        (PermissionError(), GiveUp("exception")),
        (KeyError("x"), GiveUp("exception")),
    ],
    ids=["transient", "permission", "bug"],
)
def test_a_retry_policy_accepts_the_classifier_as_retry_on(
    exc: BaseException, decision: RetryIn | GiveUp
) -> None:
    policy = RetryPolicy(retry_on=TRANSIENT_ERRORS, backoff=2)

    assert decide(policy, AttemptState("t", attempt=1, exception=exc)) == decision


OPTIONAL = [
    "requests",
    "urllib3",
    "httpx",
    "httpcore",
    "redis",
    "psycopg",
    "psycopg2",
    "sqlalchemy",
]
PROBE = """
import json, socket, sys
from urllib.error import HTTPError
from resilient_tasks.classify import TRANSIENT_ERRORS, retry_after_seconds
for exc in (ConnectionError(), PermissionError(), socket.gaierror(socket.EAI_AGAIN, "x"),
            RuntimeError("x"), HTTPError("http://x/", 429, "x", {"Retry-After": "1"}, None)):
    TRANSIENT_ERRORS(exc), retry_after_seconds(exc)
print(json.dumps(sorted(sys.modules)))
"""


def test_the_classifier_imports_no_optional_library() -> None:
    run = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30, check=True
    )
    imported = {name.partition(".")[0] for name in json.loads(run.stdout)}

    assert imported.isdisjoint(OPTIONAL)
