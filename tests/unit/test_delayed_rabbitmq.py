"""RabbitMQ's delay topology: the same as Kombu's native delayed delivery, and the routing of
a delayed message into the one queue it is for."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from kombu import Exchange, Queue
from kombu.transport.base import to_rabbitmq_queue_arguments

from resilient_tasks._delayed_rabbitmq import (
    ROUTE_HEADER,
    Topology,
    bindable,
    destination,
    fraction_headers,
    level_counts,
    restore_route,
    routing_key,
    split,
)

native = pytest.importorskip("kombu.transport.native_delayed_delivery")


class Recorder:
    """A channel (and connection) that records what is declared and bound."""

    def __init__(self) -> None:
        self.calls: set[tuple[Any, ...]] = set()

    def channel(self) -> Recorder:
        return self

    def prepare_queue_arguments(self, arguments: dict[str, Any], **options: Any) -> Any:
        return to_rabbitmq_queue_arguments(arguments, **options)

    def exchange_declare(self, exchange: str, type: str, durable: bool = True,
                         auto_delete: bool = False, **_: Any) -> None:  # fmt: skip
        self.calls.add(("exchange", exchange, type, durable, auto_delete))

    def queue_declare(self, queue: str, durable: bool = True, auto_delete: bool = False,
                      arguments: dict[str, Any] | None = None, **_: Any) -> Any:  # fmt: skip
        arguments = tuple(sorted((arguments or {}).items()))
        self.calls.add(("queue", queue, durable, auto_delete, arguments))
        return SimpleNamespace(queue=queue, message_count=0, consumer_count=0)

    def queue_bind(self, queue: str, exchange: str, routing_key: str, **_: Any) -> None:
        self.calls.add(("bind", queue, exchange, routing_key))

    def exchange_bind(self, destination: str, source: str, routing_key: str, **_: Any) -> None:
        self.calls.add(("e2e", destination, source, routing_key))


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_the_topology_is_the_one_kombu_declares_for_celery(queue_type: str) -> None:
    # Declared by Celery's worker (quorum queues) and by the library alike: the same names,
    # arguments and bindings, so neither conflicts with the other.
    kombu = Recorder()
    native.declare_native_delayed_delivery_exchanges_and_queues(kombu, queue_type)
    ours = Recorder()

    Topology(None, queue_type).declare(ours)

    assert len(kombu.calls) == 28 * 3 + 27 + 2  # levels, their bindings, the delivery exchange
    assert ours.calls == kombu.calls


def test_a_prefixed_topology_keeps_kombus_prefixed_names() -> None:
    kombu = Recorder()
    try:
        native.declare_native_delayed_delivery_exchanges_and_queues(kombu, "quorum", "billing")
    except TypeError:
        pytest.skip("this Kombu has no prefixed topology")
    ours = Recorder()

    Topology("billing").declare(ours)

    assert ours.calls == kombu.calls


def test_the_routing_key_is_the_delay_in_binary_then_the_queue() -> None:
    key = routing_key(5, "billing.high")

    assert key == "0." * 25 + "1.0.1.billing.high.resilient_tasks"


def test_celerys_suffix_bindings_match_no_library_key_and_no_library_binding() -> None:
    # Celery binds the shared delivery exchange with "#.<routing key>": a topic match.
    def matches(pattern: str, key: str) -> bool:
        return (
            re.fullmatch(
                pattern.replace(".", r"\.").replace("*", r"[^.]+").replace(r"#\.", r"(?:.+\.)?"),
                key,
            )
            is not None
        )

    ours = routing_key(5, "bulk.emails")
    celerys = native.calculate_routing_key(5, "bulk.emails")

    assert matches("#.bulk.emails", celerys)  # (the helper works)
    assert not matches("#.emails", ours)
    assert not matches("*." * 28 + "emails.resilient_tasks", celerys)


@pytest.mark.parametrize(
    ("delay_ms", "parts"),
    [(1, (0, 1)), (64, (0, 1)), (65, (0, 2)), (1000, (1, 0)), (1200, (1, 4)), (1961, (2, 0)),
     (59_999, (60, 0))],
)  # fmt: skip
def test_a_delay_is_split_into_seconds_and_64_ms_steps_never_early(
    delay_ms: int, parts: tuple[int, int]
) -> None:
    assert split(delay_ms) == parts
    seconds, steps = parts
    assert 0 <= seconds * 1000 + steps * 64 - delay_ms < 64


@pytest.mark.parametrize(("queue", "ok"), [("billing", True), ("a.b-c", True), ("a.*", False),
                                           ("#", False), ("", False)])  # fmt: skip
def test_only_a_queue_name_without_wildcard_words_can_be_bound(queue: str, ok: bool) -> None:
    assert bindable(queue) is ok


def app_with(*queues: Queue) -> Celery:
    app = Celery("rabbit", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
    app.conf.task_queues = list(queues)
    return app


def test_the_destination_is_the_queue_celery_declares_with_the_publish() -> None:
    billing = Queue("billing", Exchange("tasks", "direct"), routing_key="billing")
    app = app_with(Queue("emails", Exchange("tasks", "direct"), routing_key="emails"))

    assert destination(app, "tasks", "billing", [billing]) is billing
    assert destination(app, "tasks", "emails", []).name == "emails"  # a retry: from the route


def test_no_destination_when_the_route_reaches_no_known_queue_or_may_copy_it() -> None:
    # A fanout or topic exchange may copy a message to several queues: the worker holds it,
    # as Celery does, so that every copy is made.
    fanout, topic = Exchange("broadcast", "fanout"), Exchange("events", "topic")
    app = app_with(Queue("a", fanout), Queue("b", fanout), Queue("c", topic, routing_key="c"))

    assert destination(app, "tasks", "nowhere", []) is None
    assert destination(app, "broadcast", "", []) is None
    assert destination(app, "events", "c", []) is None
    assert destination(app, "", "billing", []).name == "billing"  # the default exchange


def test_a_message_through_the_topology_gets_its_own_route_back() -> None:
    message = SimpleNamespace(
        headers={ROUTE_HEADER: ["tasks", "billing"]},
        delivery_info={"exchange": "app_celery_delayed_0", "routing_key": "0.1.billing"},
    )
    elsewhere = SimpleNamespace(
        headers={ROUTE_HEADER: ["tasks", "billing"]},
        delivery_info={"exchange": "tasks", "routing_key": "emails"},
    )

    restore_route(message)
    restore_route(elsewhere)

    assert message.delivery_info == {"exchange": "tasks", "routing_key": "billing"}
    assert elsewhere.delivery_info == {"exchange": "tasks", "routing_key": "emails"}


def test_a_remainder_below_a_second_takes_the_levels_its_64_ms_steps_name() -> None:
    # 5 steps = 320 ms = 256 + 64: through those two levels, past 512 and 128; then 6 s
    # (binary 110) from the level of 4 s.
    assert fraction_headers(6, 5) == {
        "resilient_tasks_delay_512ms": "0",
        "resilient_tasks_delay_256ms": "1",
        "resilient_tasks_delay_128ms": "0",
        "resilient_tasks_delay_64ms": "1",
        "resilient_tasks_delay_level": "2",
    }
    assert fraction_headers(0, 1)["resilient_tasks_delay_level"] == "none"


def test_the_levels_below_a_second_hand_a_message_to_the_whole_second_levels() -> None:
    declared = Recorder()
    Topology("billing", "classic").declare_fractions(declared)
    queues = {call[1]: dict(call[4]) for call in declared.calls if call[0] == "queue"}
    assert {name: args["x-message-ttl"] for name, args in queues.items()} == {
        "billing_resilient_tasks_delayed_512ms": 512,
        "billing_resilient_tasks_delayed_256ms": 256,
        "billing_resilient_tasks_delayed_128ms": 128,
        "billing_resilient_tasks_delayed_64ms": 64,
    }
    # Each level dead-letters to the next, and the last to the exchange that hands the
    # message to its first whole-second level.
    assert queues["billing_resilient_tasks_delayed_64ms"]["x-dead-letter-exchange"] == (
        "billing_resilient_tasks_delayed_levels"
    )
    assert ("e2e", "billing_celery_delayed_3", "billing_resilient_tasks_delayed_levels", "") in (
        declared.calls
    )
    assert queues["billing_resilient_tasks_delayed_512ms"]["x-dead-letter-exchange"] == (
        "billing_resilient_tasks_delayed_256ms"
    )


def test_a_message_arrives_without_the_headers_that_routed_it() -> None:
    message = SimpleNamespace(
        headers={"id": "1", "resilient_tasks_delay_64ms": "1", ROUTE_HEADER: ["", "billing"]},
        delivery_info={"exchange": "resilient_tasks_delayed_64ms", "routing_key": "x"},
    )
    assert restore_route(message)
    assert "resilient_tasks_delay_64ms" not in message.headers
    assert message.delivery_info["routing_key"] == "billing"


@pytest.mark.parametrize(("seconds", "exchange"), [(1, "celery_delayed_0"), (6, "celery_delayed_2"),
                                                   (2**27, "celery_delayed_27")])  # fmt: skip
def test_a_message_starts_at_the_level_of_its_delays_highest_digit(
    seconds: int, exchange: str
) -> None:
    assert Topology().start(seconds) == exchange


def test_what_waits_is_counted_in_the_levels_below_a_second_too() -> None:
    # A delay of 2.75 s waits 512 ms and 256 ms before its 2-second level: stats, the CLI and
    # the metrics gauge would miss it there.
    from amqp.exceptions import NotFound

    app = Celery("counts", broker="memory://", set_as_current=False)
    app.conf.resilient_tasks_delayed_prefix = "t"
    topology = Topology.of(app)
    waiting = {topology.level(6): 3, topology.fraction(512): 2, topology.fraction(64): 1}

    def queue_declare(name: str, passive: bool) -> Any:
        if name not in declared:
            raise NotFound(f"no queue {name!r}")
        return SimpleNamespace(message_count=waiting.get(name, 0))

    channel = SimpleNamespace(queue_declare=queue_declare)
    declared = set(topology.queues())
    assert {q: n for q, n in level_counts(app, channel).items() if n} == waiting

    declared = set(topology.names())  # a topology declared before the levels below a second
    assert {q: n for q, n in level_counts(app, channel).items() if n} == {topology.level(6): 3}

    declared = set()
    assert level_counts(app, channel) == {}
