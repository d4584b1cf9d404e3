"""Tier 1: the attempt history carried in the ``resilient_history`` header, as pure logic."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone

import pytest

from resilient_tasks.history import (
    HEADER,
    MAX_KEPT_ATTEMPTS,
    MAX_MESSAGE_CHARS,
    MAX_TYPE_CHARS,
    Attempt,
    History,
    exception_type_name,
    truncate,
)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
T0_ISO = "2026-01-01T00:00:00+00:00"
MAX_HEADER_BYTES = 12 * 1024


# --- helpers -----------------------------------------------------------------------------------


def attempt(
    number: int,
    exc: BaseException | None = None,
    *,
    delay: float | None = 1.0,
    hostname: str = "celery@worker-1",
) -> Attempt:
    return Attempt.failed(
        number,
        exc if exc is not None else ConnectionError(f"reset #{number}"),
        hostname=hostname,
        delay=delay,
        at=T0 + timedelta(seconds=number),
    )


def carried(n: int, make_exc=None, *, hostname: str = "celery@worker-1") -> History:
    """The history after ``n`` failed attempts, sent through the header between each one."""
    header: object = None
    for number in range(1, n + 1):
        exc = make_exc(number) if make_exc else ConnectionError(f"reset #{number}")
        history = History.decode(header).record(attempt(number, exc, hostname=hostname))
        header = history.encode()
    return History.decode(header)


def exception_of_type(module: str, qualname: str) -> type[Exception]:
    name = qualname.rsplit(".", 1)[-1]
    return type(name, (Exception,), {"__module__": module, "__qualname__": qualname})


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


class BrokenStrAndRepr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ is broken")


# --- truncate ----------------------------------------------------------------------------------


def test_truncate_documented_example() -> None:
    assert truncate("abcdefghij", 8) == "abcde..."


@pytest.mark.parametrize("text", ["", "short", "x" * 10])
def test_truncate_leaves_text_within_the_limit_alone(text: str) -> None:
    assert truncate(text, 10) == text


@pytest.mark.parametrize("limit", [3, 4, 10, 500])
def test_truncate_cuts_long_text_to_exactly_the_limit_marking_the_cut(limit: int) -> None:
    cut = truncate("y" * 1000, limit)

    assert len(cut) == limit
    assert cut.endswith("...")


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_truncate_never_exceeds_a_limit_shorter_than_the_marker(limit: int) -> None:
    assert len(truncate("abcdef", limit)) <= limit


# --- exception_type_name -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "name"),
    [
        (ConnectionResetError(), "ConnectionResetError"),
        (KeyError("k"), "KeyError"),
        (TimeoutError(), "TimeoutError"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
    ],
)
def test_exception_type_name_of_a_builtin_has_no_module_prefix(
    exc: BaseException, name: str
) -> None:
    assert exception_type_name(exc) == name


@pytest.mark.parametrize(
    ("exc", "name"),
    [
        (json.JSONDecodeError("x", "", 0), "json.decoder.JSONDecodeError"),
        (exception_of_type("billing.errors", "Declined")(), "billing.errors.Declined"),
        (exception_of_type("billing.api", "Client.NotFound")(), "billing.api.Client.NotFound"),
    ],
)
def test_exception_type_name_of_other_types_is_module_qualified(
    exc: BaseException, name: str
) -> None:
    assert exception_type_name(exc) == name


# --- Attempt.failed ----------------------------------------------------------------------------


def test_failed_attempt_records_type_message_host_and_delay() -> None:
    recorded = Attempt.failed(3, ConnectionError("reset"), hostname="w1", delay=0.5, at=T0)

    assert recorded.number == 3
    assert recorded.exception_type == "ConnectionError"
    assert recorded.message == "reset"
    assert recorded.hostname == "w1"
    assert recorded.delay == 0.5


def test_failed_attempt_time_is_iso_utc() -> None:
    paris = timezone(timedelta(hours=1))

    recorded = Attempt.failed(
        1, ConnectionError(), hostname="w1", delay=1, at=datetime(2026, 1, 1, 1, tzinfo=paris)
    )

    assert recorded.at == T0_ISO


def test_failed_attempt_without_a_retry_has_no_delay() -> None:
    assert Attempt.failed(1, KeyError(), hostname="w1", delay=None, at=T0).delay is None


def test_failed_attempt_rounds_the_delay_to_microseconds() -> None:
    recorded = Attempt.failed(1, KeyError(), hostname="w1", delay=0.1234567891, at=T0)

    assert recorded.delay == 0.123457


def test_failed_attempt_cuts_a_long_message() -> None:
    recorded = attempt(1, ValueError("m" * 100_000))

    assert len(recorded.message) == MAX_MESSAGE_CHARS
    assert recorded.message.endswith("...")


def test_failed_attempt_cuts_a_long_type_name() -> None:
    exc = exception_of_type("pkg." * 200 + "errors", "Boom")()

    recorded = attempt(1, exc)

    assert len(recorded.exception_type) == MAX_TYPE_CHARS
    assert recorded.exception_type.startswith("pkg.pkg.")
    assert recorded.exception_type.endswith("...")


@pytest.mark.parametrize("exc_type", [BrokenStr, BrokenStrAndRepr])
def test_failed_attempt_of_an_exception_that_cannot_be_printed_is_still_recorded(
    exc_type: type[Exception],
) -> None:
    history = History().record(attempt(1, exc_type("x")))

    assert len(history.attempts) == 1
    assert history.attempts[0].exception_type.endswith(exc_type.__qualname__)
    assert exc_type.__name__ in history.attempts[0].message


def test_an_unprintable_exception_survives_the_header() -> None:
    history = History().record(attempt(1, BrokenStrAndRepr("x")))

    assert History.decode(history.encode()) == history


# --- History.record ----------------------------------------------------------------------------


def test_empty_history_has_nothing() -> None:
    history = History()

    assert history.attempts == ()
    assert history.first_attempt_at is None
    assert history.first_attempt_time() is None
    assert history.dropped == 0


def test_record_returns_a_new_history_and_leaves_the_original_alone() -> None:
    original = History().record(attempt(1))

    longer = original.record(attempt(2))

    assert [a.number for a in original.attempts] == [1]
    assert [a.number for a in longer.attempts] == [1, 2]


def test_record_sets_first_attempt_at_from_the_first_attempt() -> None:
    history = History().record(attempt(1)).record(attempt(2))

    assert history.first_attempt_at == attempt(1).at


def test_first_attempt_time_is_an_aware_datetime() -> None:
    history = History().record(Attempt.failed(1, KeyError(), hostname="w", delay=1, at=T0))

    first = history.first_attempt_time()

    assert first == T0
    assert first is not None
    assert first.tzinfo is not None


def test_nothing_is_dropped_up_to_the_limit() -> None:
    history = carried(MAX_KEPT_ATTEMPTS)

    assert len(history.attempts) == MAX_KEPT_ATTEMPTS
    assert history.dropped == 0


def test_after_100_attempts_only_max_kept_attempts_are_kept() -> None:
    assert len(carried(100).attempts) == MAX_KEPT_ATTEMPTS


def test_after_100_attempts_the_first_attempt_is_kept() -> None:
    assert carried(100).attempts[0].number == 1


def test_after_100_attempts_the_latest_attempts_are_kept() -> None:
    numbers = [a.number for a in carried(100).attempts[1:]]

    assert numbers == list(range(100 - MAX_KEPT_ATTEMPTS + 2, 101))


def test_after_100_attempts_dropped_counts_the_ones_left_out() -> None:
    assert carried(100).dropped == 100 - MAX_KEPT_ATTEMPTS


def test_after_100_attempts_first_attempt_at_is_kept() -> None:
    assert carried(100).first_attempt_at == attempt(1).at


@pytest.mark.parametrize(
    ("message", "exc_type"),
    [
        pytest.param("x" * 100_000, ConnectionError, id="ascii"),
        pytest.param(
            '{"error": "upstream timed out",\n "retry": true}\n' * 5_000,
            exception_of_type("requests.exceptions", "ConnectionError"),
            id="json-body-with-quotes-and-newlines",
        ),
        pytest.param("délai dépassé " * 10_000, TimeoutError, id="non-ascii"),
    ],
)
def test_encoded_header_stays_under_12_kib_with_huge_messages(
    message: str, exc_type: type[Exception]
) -> None:
    history = carried(100, lambda number: exc_type(message), hostname="celery@worker-17.prod")

    assert len(history.encode().encode("utf-8")) < MAX_HEADER_BYTES


def test_encoded_header_of_100_ordinary_attempts_stays_under_12_kib() -> None:
    history = carried(100, hostname="celery@worker-17.prod")

    assert len(history.encode().encode("utf-8")) < MAX_HEADER_BYTES


# --- idle_seconds ------------------------------------------------------------------------------


def test_idle_seconds_of_an_empty_history_is_zero() -> None:
    assert History().idle_seconds() == 0


def test_idle_seconds_sums_the_scheduled_delays() -> None:
    history = History().record(attempt(1, delay=1.5)).record(attempt(2, delay=2.25))

    assert history.idle_seconds() == 3.75


def test_idle_seconds_counts_an_attempt_without_delay_as_zero() -> None:
    history = History().record(attempt(1, delay=1.5)).record(attempt(2, delay=None))

    assert history.idle_seconds() == 1.5


# --- encode / decode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "history",
    [
        History(),
        History().record(attempt(1)),
        History().record(attempt(1, delay=None)),
        History().record(attempt(1, KeyError("clé supprimée ✗"))),
        History().record(attempt(1, ValueError('quote " backslash \\ newline \n nul \x00'))),
        carried(100),
    ],
    ids=["empty", "one", "terminal", "non-ascii", "escapes", "hundred-with-dropped"],
)
def test_decode_of_encode_gives_the_same_history(history: History) -> None:
    assert History.decode(history.encode()) == history


def test_encoded_header_is_a_json_string() -> None:
    encoded = History().record(attempt(1)).encode()

    assert isinstance(encoded, str)
    assert json.loads(encoded)["attempts"][0]["number"] == 1


def test_decode_accepts_the_header_as_bytes() -> None:
    history = History().record(attempt(1, KeyError("clé")))

    assert History.decode(history.encode().encode("utf-8")) == history


def test_decode_accepts_an_already_parsed_mapping() -> None:
    history = History().record(attempt(1))

    assert History.decode(json.loads(history.encode())) == history


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "not json",
        "{",
        '{"attempts": [',
        "null",
        "42",
        '"a string"',
        "[]",
        '[{"number": 1}]',
        b"",
        b"\xff\xfe\x00garbage",
        b"\x80not utf-8",
        42,
        3.5,
        True,
        ["list"],
        ("tuple",),
        object(),
        '{"attempts": 5}',
        '{"attempts": "abc"}',
        '{"attempts": ["x"]}',
        '{"attempts": [[1, 2]]}',
        '{"attempts": {"number": 1}}',
        '{"attempts": [{"number": 1}]}',
        '{"attempts": [{"number": 1, "at": "x", "hostname": "h", "exception_type": "E",'
        ' "message": "m", "delay": 1, "surprise": true}]}',
        '{"dropped": "many"}',
        '{"dropped": [1]}',
        '{"dropped": NaN}',
    ],
)
def test_decode_of_garbage_gives_an_empty_history(value: object) -> None:
    assert History.decode(value) == History()


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(
            '{"dropped": 1e400}',
            id="dropped-infinite",
        ),
        pytest.param(
            "[" * 100_000,
            id="deeply-nested",
        ),
    ],
)
def test_decode_never_raises(value: object) -> None:
    assert History.decode(value) == History()


@pytest.mark.parametrize(
    "value",
    [
        pytest.param('{"attempts": [], "first_attempt_at": null}', id="no-first-attempt"),
        pytest.param(
            json.dumps({"first_attempt_at": "yesterday"}),
            id="unparseable-first-attempt-at",
        ),
        pytest.param(
            json.dumps({"first_attempt_at": "2026-01-01T00:00:00"}),
            id="naive-first-attempt-at",
        ),
        pytest.param(
            json.dumps(
                {
                    "attempts": [
                        {
                            "number": 1,
                            "at": "not a time",
                            "hostname": "h",
                            "exception_type": "E",
                            "message": "m",
                            "delay": 1,
                        }
                    ]
                }
            ),
            id="unparseable-attempt-time",
        ),
        pytest.param(
            json.dumps(
                {
                    "first_attempt_at": T0_ISO,
                    "attempts": [
                        {
                            "number": 1,
                            "at": T0_ISO,
                            "hostname": "h",
                            "exception_type": "E",
                            "message": "m",
                            "delay": "oops",
                        }
                    ],
                }
            ),
            id="non-numeric-delay",
        ),
    ],
)
def test_a_decoded_damaged_header_is_safe_to_use(value: str) -> None:
    """A damaged header must not make a task fail: whatever decodes must be usable."""
    history = History.decode(value)

    first = history.first_attempt_time()
    assert first is None or first.tzinfo is not None
    assert history.idle_seconds() >= 0


# --- from_headers ------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [None, {}, {"other": "x"}, {HEADER: None}, {HEADER: "junk"}])
def test_headers_without_a_readable_history_give_an_empty_history(headers: dict | None) -> None:
    assert History.from_headers(headers) == History()


def test_from_headers_reads_the_resilient_history_header() -> None:
    history = History().record(attempt(1))

    assert History.from_headers({HEADER: history.encode(), "other": "x"}) == history


def test_header_name_is_resilient_history() -> None:
    assert HEADER == "resilient_history"


def test_attempt_as_dict_writes_every_field_and_reads_back() -> None:
    attempt = Attempt.failed(
        2,
        ConnectionError("reset"),
        hostname="w1",
        delay=1.5,
        at=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )

    written = attempt.as_dict()

    assert written == dataclasses.asdict(attempt)  # a field added later is written too
    assert Attempt.from_dict(json.loads(json.dumps(written))) == attempt
