"""The dead-letter envelope: complete, bounded, redacted, and never refused for its content."""

from __future__ import annotations

import base64
import json
import pickle
from collections import OrderedDict
from datetime import datetime, timezone
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest

from resilient_tasks.envelope import (
    MAX_REPR_CHARS,
    MAX_TRACEBACK_CHARS,
    REDACTED,
    SCHEMA,
    FailedMessage,
    build_envelope,
    is_envelope,
    jsonable,
    original_body,
    redact,
)
from resilient_tasks.history import Attempt, History

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
T1 = datetime(2026, 3, 1, 12, 5, tzinfo=timezone.utc)


def message(**overrides: Any) -> FailedMessage:
    fields: dict[str, Any] = {
        "task_id": "id-1",
        "task_name": "billing.sync",
        "args": (42,),
        "kwargs": {"region": "eu"},
        "headers": {"id": "id-1", "task": "billing.sync", "tenant": "acme"},
        "properties": {"priority": 5, "delivery_mode": 2},
        "body": b'[[42], {"region": "eu"}, {}]',
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "exchange": "billing",
        "routing_key": "billing",
        "priority": 5,
        **overrides,
    }
    return FailedMessage(**fields)


def envelope(msg: FailedMessage | None = None, **overrides: Any) -> dict[str, Any]:
    exc = overrides.pop("exception", ConnectionError("reset"))
    fields: dict[str, Any] = {
        "reason": "retries_exhausted",
        "exception": exc,
        "traceback": "Traceback (most recent call last):\n  ...\nConnectionError: reset",
        "history": History().record(Attempt.failed(1, exc, hostname="w1", delay=2.0, at=T0)),
        "final": Attempt.failed(2, exc, hostname="w2", delay=None, at=T1),
        "dead_lettered_at": T1,
        **overrides,
    }
    return build_envelope(msg or message(), **fields)


def test_envelope_has_every_field_of_the_schema() -> None:
    env = envelope()

    assert env["schema"] == SCHEMA
    assert env["reason"] == "retries_exhausted"
    assert env["task"] == {
        "id": "id-1", "name": "billing.sync", "args": [42], "kwargs": {"region": "eu"},
        "queue": "billing", "exchange": "billing", "routing_key": "billing", "priority": 5,
    }  # fmt: skip
    assert env["exception"]["type"] == "ConnectionError"
    assert env["exception"]["message"] == "reset"
    assert [(a["number"], a["hostname"], a["delay"]) for a in env["attempts"]] == [
        (1, "w1", 2.0),
        (2, "w2", None),
    ]
    assert env["first_attempt_at"] == "2026-03-01T12:00:00+00:00"
    assert env["dead_lettered_at"] == "2026-03-01T12:05:00+00:00"
    assert env["original"]["headers"]["tenant"] == "acme"
    assert env["original"]["properties"] == {"priority": 5, "delivery_mode": 2}


def test_envelope_is_json() -> None:
    env = envelope(message(args=(object(), b"\xff\xfe", {1, 2}), kwargs={"when": T0}))

    decoded = json.loads(json.dumps(env))

    assert decoded["task"]["args"][0].startswith("<object object at")
    assert decoded["task"]["args"][1] == "b'\\xff\\xfe'"
    assert decoded["task"]["kwargs"]["when"] == repr(T0)


def test_original_keeps_a_text_body_byte_for_byte() -> None:
    env = envelope()

    assert env["original"]["body_encoding"] == "text"
    assert original_body(env["original"]) == b'[[42], {"region": "eu"}, {}]'


def test_original_keeps_a_binary_body_as_base64() -> None:
    body = pickle.dumps(((1,), {}, {}))
    env = envelope(message(body=body, content_type="application/x-python-serialize",
                           content_encoding="binary"))  # fmt: skip

    assert env["original"]["body_encoding"] == "base64"
    assert base64.b64decode(env["original"]["body"]) == body
    assert original_body(env["original"]) == body


def test_non_utf8_text_body_falls_back_to_base64() -> None:
    env = envelope(message(body=b"\xff\xfe not utf-8"))

    assert env["original"]["body_encoding"] == "base64"
    assert original_body(env["original"]) == b"\xff\xfe not utf-8"


@pytest.mark.parametrize(
    "key", ["password", "db_password", "Authorization", "api_key", "X-Api-Key", "token", "secret"]
)
def test_secret_kwargs_are_redacted(key: str) -> None:
    env = envelope(message(kwargs={key: "s3cr3t", "user": "ann"}))

    assert env["task"]["kwargs"] == {key: REDACTED, "user": "ann"}
    assert "s3cr3t" not in json.dumps(env["task"])


def test_nested_secrets_are_redacted_at_any_depth() -> None:
    kwargs = {"config": {"db": [{"password": "p"}]}, "auth": {"bearer_token": "t"}}

    assert redact(kwargs) == {"config": {"db": [{"password": REDACTED}]},
                              "auth": {"bearer_token": REDACTED}}  # fmt: skip


def test_redaction_patterns_are_configurable() -> None:
    env = envelope(message(kwargs={"ssn": "123", "password": "p"}), redact_patterns=("ssn",))

    assert env["task"]["kwargs"] == {"ssn": REDACTED, "password": "p"}


def test_huge_traceback_keeps_its_end() -> None:
    traceback = "frame\n" * 100_000 + "ValueError: the real cause"

    env = envelope(traceback=traceback)

    assert len(env["exception"]["traceback"]) <= MAX_TRACEBACK_CHARS
    assert env["exception"]["traceback"].endswith("ValueError: the real cause")


def test_huge_arguments_are_bounded() -> None:
    env = envelope(message(args=("x" * 1_000_000, [object()] * 3), kwargs={"blob": "y" * 10**6}))

    assert len(env["task"]["args"][0]) == MAX_REPR_CHARS
    assert len(env["task"]["kwargs"]["blob"]) == MAX_REPR_CHARS
    assert len(json.dumps(env)) < 100_000


def test_an_exception_with_a_broken_str_still_gets_an_envelope() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    env = envelope(exception=Broken())

    assert "Broken" in env["exception"]["type"]


def test_exception_type_can_be_given_for_a_wrapped_exception() -> None:
    env = envelope(exception=Exception("wrapped"), exception_type="payments.GatewayError")

    assert env["exception"]["type"] == "payments.GatewayError"


def test_canvas_membership_is_recorded() -> None:
    env = envelope(canvas={"root_id": "r", "group_id": "g", "chain_remaining": ["t.next"]})

    assert env["canvas"] == {"root_id": "r", "group_id": "g", "chain_remaining": ["t.next"]}


def test_deep_or_cyclic_values_do_not_break_the_envelope() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    deep: Any = "leaf"
    for _ in range(1000):
        deep = [deep]

    value = jsonable({"cyclic": cyclic, "deep": deep})

    json.dumps(value)


def test_jsonable_converts_every_kind_of_value_as_json_carries_it() -> None:
    class Text(str):
        pass

    class Count(int):
        pass

    value = {
        "none": None,
        "flag": True,
        "count": Count(3),
        "ratio": 0.5,
        "nan": float("nan"),
        "text": Text("x" * 10),
        "ordered": OrderedDict([(1, ("a", {"b": b"\x00"}))]),
        "proxy": MappingProxyType({"k": frozenset({2})}),
        "set": {7},
        "object": Decimal("1.5"),
    }

    converted = jsonable(value, limit=8)

    assert converted == {
        "none": None,
        "flag": True,
        "count": 3,
        "ratio": 0.5,
        "nan": "nan",
        "text": "xxxxx...",
        "ordered": {"1": ["a", {"b": "b'\\x00'"}]},
        "proxy": {"k": [2]},
        "set": [7],
        "object": "Decim...",
    }
    assert json.loads(json.dumps(converted)) == converted
    assert jsonable("x" * 10, limit=None) == "x" * 10


def test_is_envelope_tells_envelopes_from_task_messages() -> None:
    assert is_envelope(envelope())
    assert not is_envelope([[42], {}, {}])
    assert not is_envelope({"schema": "something/else"})


def test_original_keeps_long_headers_whole_for_an_exact_replay() -> None:
    long = "x" * (MAX_REPR_CHARS * 3)
    env = envelope(message(headers={"id": "id-1", "trace": long}))

    assert env["original"]["headers"]["trace"] == long


def test_original_drops_rabbitmqs_second_copy_of_the_headers() -> None:
    props = {"priority": 1, "application_headers": {"kwargsrepr": "{'password': 'p'}"}}

    env = envelope(message(properties=props))

    assert env["original"]["properties"] == {"priority": 1}
