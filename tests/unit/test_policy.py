"""Tier 1: RetryPolicy, decide() and the user-facing exceptions, as pure logic."""

from __future__ import annotations

import dataclasses
import itertools
import math
from datetime import datetime, timedelta, timezone

import pytest
from tenacity import RetryCallState
from tenacity.wait import (
    wait_chain,
    wait_exponential,
    wait_fixed,
    wait_incrementing,
)

from resilient_tasks.exceptions import ConfigurationError, Permanent, RetryAfter
from resilient_tasks.history import Attempt, History
from resilient_tasks.policy import (
    DEFAULT_BACKOFF,
    AttemptState,
    GiveUp,
    RetryIn,
    RetryPolicy,
    decide,
    exception_chain,
)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


# --- helpers -----------------------------------------------------------------------------------


def state(
    exception: BaseException,
    *,
    attempt: int = 1,
    elapsed: float = 0.0,
    history: History | None = None,
) -> AttemptState:
    return AttemptState(
        "tests.task",
        attempt=attempt,
        exception=exception,
        elapsed=elapsed,
        history=history if history is not None else History(),
    )


def raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    """``outer`` as raised by ``raise outer from cause`` (sets ``__cause__``)."""
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer from inner
    except BaseException as exc:
        return exc


def raised_while_handling(outer: BaseException, context: BaseException) -> BaseException:
    """``outer`` as raised inside ``except`` for ``context`` (sets ``__context__`` only)."""
    try:
        try:
            raise context
        except BaseException:
            raise outer  # noqa: B904 - an implicit __context__ is the point
    except BaseException as exc:
        return exc


def history_with_delays(*delays: float | None) -> History:
    history = History()
    for number, delay in enumerate(delays, start=1):
        history = history.record(
            Attempt.failed(
                number,
                ConnectionError("reset"),
                hostname="w1",
                delay=delay,
                at=T0 + timedelta(seconds=number),
            )
        )
    return history


def captured_call(policy_backoff_result: float, the_state: AttemptState) -> RetryCallState:
    """Run decide() with a plain-function backoff and return the RetryCallState it saw."""
    seen: list[RetryCallState] = []

    def backoff(call: RetryCallState) -> float:
        seen.append(call)
        return policy_backoff_result

    decide(RetryPolicy(retry_on=Exception, max_attempts=None, backoff=backoff), the_state)
    assert len(seen) == 1
    return seen[0]


def always_raises(exc: BaseException) -> bool:
    raise RuntimeError("predicate bug")


# --- construction and normalisation ------------------------------------------------------------


def test_default_policy_retries_connection_errors_five_times_with_default_backoff() -> None:
    policy = RetryPolicy()

    assert policy.retry_on == (ConnectionError,)
    assert policy.give_up_on == ()
    assert policy.max_attempts == 5
    assert policy.max_elapsed is None
    assert policy.backoff is DEFAULT_BACKOFF


@pytest.mark.parametrize("option", ["retry_on", "give_up_on"])
@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        (ConnectionError, (ConnectionError,)),
        (always_raises, (always_raises,)),
        ([ConnectionError, TimeoutError], (ConnectionError, TimeoutError)),
        ((TimeoutError, always_raises), (TimeoutError, always_raises)),
        ((), ()),
        ([], ()),
    ],
    ids=["single-type", "single-predicate", "list", "tuple-mixed", "empty-tuple", "empty-list"],
)
def test_matchers_are_normalised_to_a_tuple(option: str, given: object, normalised: tuple) -> None:
    policy = RetryPolicy(**{option: given})

    assert getattr(policy, option) == normalised


def test_matchers_given_as_a_set_keep_every_member() -> None:
    policy = RetryPolicy(retry_on={ConnectionError, TimeoutError})

    assert isinstance(policy.retry_on, tuple)
    assert set(policy.retry_on) == {ConnectionError, TimeoutError}


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        (30, 30.0),
        (2.5, 2.5),
        (timedelta(minutes=5), 300.0),
        (timedelta(milliseconds=1500), 1.5),
    ],
)
def test_max_elapsed_is_stored_as_float_seconds(given: object, seconds: float) -> None:
    max_elapsed = RetryPolicy(max_elapsed=given).max_elapsed

    assert isinstance(max_elapsed, float)
    assert max_elapsed == seconds


@pytest.mark.parametrize("max_attempts", [1, 2, 100, None])
def test_max_attempts_accepts_positive_whole_numbers_and_none(max_attempts: int | None) -> None:
    assert RetryPolicy(max_attempts=max_attempts).max_attempts == max_attempts


def test_policy_is_frozen() -> None:
    policy = RetryPolicy()

    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 10  # type: ignore[misc]


def test_configuration_error_is_a_value_error() -> None:
    assert issubclass(ConfigurationError, ValueError)


def test_bad_max_attempts_message_is_the_documented_one() -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy(max_attempts=0)

    assert str(info.value) == (
        "RetryPolicy: max_attempts must be a whole number >= 1, or None for no cap; got 0"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be a whole number >= 1, or None for no cap"),
        ({"max_attempts": -3}, "max_attempts must be a whole number >= 1"),
        ({"max_attempts": True}, "max_attempts must be a whole number >= 1"),
        ({"max_attempts": 2.5}, "max_attempts must be a whole number >= 1"),
        ({"max_attempts": "3"}, "max_attempts must be a whole number >= 1"),
        ({"max_elapsed": 0}, "max_elapsed must be > 0 seconds, or None for no cap"),
        ({"max_elapsed": -1}, "max_elapsed must be > 0 seconds"),
        ({"max_elapsed": timedelta(0)}, "max_elapsed must be > 0 seconds"),
        ({"max_elapsed": timedelta(seconds=-5)}, "max_elapsed must be > 0 seconds"),
        ({"max_elapsed": "60"}, "max_elapsed must be a number of seconds or a timedelta or None"),
        ({"max_elapsed": True}, "max_elapsed must be a number of seconds or a timedelta"),
        ({"max_elapsed": math.nan}, "max_elapsed must be a number of seconds or a timedelta"),
        ({"max_elapsed": math.inf}, "max_elapsed must be a number of seconds or a timedelta"),
        ({"backoff": -1}, "backoff must be >= 0 seconds"),
        ({"backoff": timedelta(seconds=-1)}, "backoff must be >= 0 seconds"),
        ({"backoff": math.nan}, "backoff must be a number of seconds or a timedelta"),
        ({"backoff": math.inf}, "backoff must be a number of seconds or a timedelta"),
        ({"backoff": "2"}, "backoff must be a tenacity wait strategy"),
        ({"backoff": None}, "backoff must be a tenacity wait strategy"),
        ({"backoff": True}, "backoff must be a tenacity wait strategy"),
        ({"backoff": wait_fixed}, "backoff must be a tenacity wait strategy"),
        ({"retry_on": "ConnectionError"}, "retry_on must be exception types and/or predicates"),
        ({"retry_on": None}, "retry_on must be exception types and/or predicates"),
        ({"retry_on": ConnectionError()}, "retry_on holds ConnectionError(), which is neither"),
        ({"retry_on": int}, "retry_on holds int, which is not an exception type"),
        ({"retry_on": (ConnectionError, dict)}, "retry_on holds dict, which is not an exception"),
        ({"retry_on": [ConnectionError, "TimeoutError"]}, "retry_on holds 'TimeoutError', which"),
        ({"retry_on": (ConnectionError(),)}, "retry_on holds ConnectionError(), which is neither"),
        ({"give_up_on": "KeyError"}, "give_up_on must be exception types and/or predicates"),
        ({"give_up_on": (str,)}, "give_up_on holds str, which is not an exception type"),
        ({"give_up_on": [KeyError()]}, "give_up_on holds KeyError(), which is neither"),
    ],
)
def test_invalid_option_raises_configuration_error_naming_it(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy(**kwargs)

    assert str(info.value).startswith("RetryPolicy: ")
    assert message in str(info.value)


# --- replace -----------------------------------------------------------------------------------


def test_replace_returns_a_changed_copy_and_leaves_the_original_alone() -> None:
    original = RetryPolicy(max_attempts=3)

    changed = original.replace(max_attempts=7)

    assert changed.max_attempts == 7
    assert original.max_attempts == 3


def test_replace_keeps_the_options_not_changed() -> None:
    backoff = wait_fixed(3)
    original = RetryPolicy(
        retry_on=TimeoutError, give_up_on=KeyError, max_attempts=3, max_elapsed=60, backoff=backoff
    )

    changed = original.replace(max_attempts=4)

    assert changed.retry_on == (TimeoutError,)
    assert changed.give_up_on == (KeyError,)
    assert changed.max_elapsed == 60.0
    assert changed.backoff is backoff


def test_replace_can_remove_the_attempt_cap() -> None:
    assert RetryPolicy(max_attempts=3).replace(max_attempts=None).max_attempts is None


def test_replace_normalises_like_the_constructor() -> None:
    changed = RetryPolicy().replace(retry_on=TimeoutError, max_elapsed=timedelta(minutes=1))

    assert changed.retry_on == (TimeoutError,)
    assert changed.max_elapsed == 60.0


def test_replace_validates_like_the_constructor() -> None:
    with pytest.raises(ConfigurationError, match="max_attempts must be a whole number >= 1"):
        RetryPolicy().replace(max_attempts=0)


def test_replace_refuses_unknown_options_naming_them() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown option\(s\) \['max_retries'\]"):
        RetryPolicy().replace(max_retries=3)


# --- delays ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        (1.5, [1.5, 1.5, 1.5]),
        (0, [0.0, 0.0, 0.0]),
        (timedelta(seconds=2), [2.0, 2.0, 2.0]),
        (wait_fixed(3), [3.0, 3.0, 3.0]),
        (wait_exponential(multiplier=0.5, max=10), [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]),
        (wait_exponential(multiplier=1, min=2), [2.0, 2.0, 4.0, 8.0]),
        (wait_chain(wait_fixed(1), wait_fixed(1), wait_fixed(5)), [1.0, 1.0, 5.0, 5.0]),
        (wait_fixed(1) + wait_fixed(2), [3.0, 3.0, 3.0]),
        (wait_exponential(multiplier=1, max=4) + wait_fixed(0.5), [1.5, 2.5, 4.5, 4.5]),
        (wait_incrementing(start=1, increment=2), [1.0, 3.0, 5.0]),
        (lambda call: 10.0 * call.attempt_number, [10.0, 20.0, 30.0]),
    ],
    ids=[
        "number",
        "zero",
        "timedelta",
        "wait_fixed",
        "wait_exponential-capped",
        "wait_exponential-min",
        "wait_chain",
        "sum-of-fixed",
        "sum-exponential-and-fixed",
        "wait_incrementing",
        "plain-function",
    ],
)
def test_delays_of_a_deterministic_backoff(backoff: object, expected: list[float]) -> None:
    assert RetryPolicy(backoff=backoff).delays(len(expected)) == expected


def test_delays_ignore_max_attempts() -> None:
    assert RetryPolicy(max_attempts=1, backoff=1).delays(4) == [1.0, 1.0, 1.0, 1.0]


def test_delays_of_zero_attempts_is_empty() -> None:
    assert RetryPolicy(backoff=1).delays(0) == []


def test_delays_simulate_attempts_failing_at_once() -> None:
    """Each delay sees the time since start and idle time equal to the delays before it."""
    seen: list[tuple[int, float | None, float]] = []

    def backoff(call: RetryCallState) -> float:
        seen.append((call.attempt_number, call.seconds_since_start, call.idle_for))
        return 2.0

    RetryPolicy(backoff=backoff).delays(3)

    assert seen == [(1, 0.0, 0.0), (2, 2.0, 2.0), (3, 4.0, 4.0)]


@pytest.mark.parametrize("result", [-5.0, -0.001])
def test_a_negative_delay_from_the_backoff_becomes_zero(result: float) -> None:
    assert RetryPolicy(backoff=lambda call: result).delays(2) == [0.0, 0.0]


def test_default_backoff_stays_within_full_jitter_bounds() -> None:
    policy = RetryPolicy()
    n_attempts = 12
    bounds = [min(600.0, 2.0 ** (n - 1)) for n in range(1, n_attempts + 1)]

    samples = [policy.delays(n_attempts) for _ in range(300)]

    for schedule in samples:
        for delay, bound in zip(schedule, bounds, strict=True):
            assert 0.0 <= delay <= bound


def test_default_backoff_spreads_over_its_whole_window() -> None:
    """Full jitter, not a fixed fraction: samples reach the upper half of every window."""
    policy = RetryPolicy()
    n_attempts = 12
    bounds = [min(600.0, 2.0 ** (n - 1)) for n in range(1, n_attempts + 1)]

    samples = [policy.delays(n_attempts) for _ in range(300)]

    for index, bound in enumerate(bounds):
        column = [schedule[index] for schedule in samples]
        assert max(column) > bound / 2
        assert min(column) < bound / 2


# --- decide: the wait strategy's view ----------------------------------------------------------


def test_wait_strategy_sees_the_failed_attempt_number() -> None:
    call = captured_call(1.0, state(ConnectionError(), attempt=3))

    assert call.attempt_number == 3


def test_wait_strategy_sees_seconds_since_the_first_attempt_started() -> None:
    call = captured_call(1.0, state(ConnectionError(), attempt=2, elapsed=42.5))

    assert call.seconds_since_start == 42.5


def test_wait_strategy_sees_the_sum_of_earlier_delays_as_idle_for() -> None:
    history = history_with_delays(1.5, None, 2.25)

    call = captured_call(1.0, state(ConnectionError(), attempt=4, elapsed=10.0, history=history))

    assert call.idle_for == 3.75


def test_wait_strategy_sees_the_exception_as_the_outcome() -> None:
    exc = ConnectionResetError("peer")

    call = captured_call(1.0, state(exc))

    assert call.outcome is not None
    assert call.outcome.failed
    assert call.outcome.exception() is exc


# --- decide: Permanent -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exception",
    [
        Permanent("gone"),
        Permanent(ConnectionError("reset")),
        raised_from(ConnectionError("reset"), Permanent("gone")),
        raised_while_handling(ConnectionError("reset"), Permanent("gone")),
        raised_from(
            ConnectionError("outer"),
            raised_while_handling(TimeoutError("middle"), Permanent("deep")),
        ),
        Permanent(RetryAfter(1)),
        raised_from(RetryAfter(1), Permanent("gone")),
    ],
    ids=[
        "itself",
        "wrapping-a-retryable",
        "as-cause",
        "as-context",
        "deep-in-chain",
        "wrapping-retry-after",
        "causing-retry-after",
    ],
)
def test_permanent_anywhere_in_the_chain_gives_up_as_permanent(exception: BaseException) -> None:
    policy = RetryPolicy(retry_on=(ConnectionError, TimeoutError, Permanent), backoff=1)

    assert decide(policy, state(exception)) == GiveUp("permanent")


def test_permanent_wins_over_give_up_on() -> None:
    policy = RetryPolicy(give_up_on=Permanent, backoff=1)

    assert decide(policy, state(Permanent("gone"))) == GiveUp("permanent")


# --- decide: give_up_on / retry_on -------------------------------------------------------------


def test_a_matching_exception_is_retried_after_the_backoff() -> None:
    policy = RetryPolicy(retry_on=ConnectionError, backoff=2)

    assert decide(policy, state(ConnectionError())) == RetryIn(2.0)


def test_a_subclass_of_a_listed_type_matches() -> None:
    policy = RetryPolicy(retry_on=OSError, backoff=2)

    assert decide(policy, state(ConnectionResetError())) == RetryIn(2.0)


def test_an_exception_not_in_retry_on_gives_up_as_exception() -> None:
    policy = RetryPolicy(retry_on=ConnectionError, backoff=2)

    assert decide(policy, state(KeyError("x"))) == GiveUp("exception")


def test_empty_retry_on_retries_nothing() -> None:
    policy = RetryPolicy(retry_on=(), backoff=2)

    assert decide(policy, state(ConnectionError())) == GiveUp("exception")


def test_give_up_on_wins_over_retry_on() -> None:
    policy = RetryPolicy(retry_on=OSError, give_up_on=FileNotFoundError, backoff=1)

    assert decide(policy, state(FileNotFoundError())) == GiveUp("exception")


def test_give_up_on_matches_anywhere_in_the_chain() -> None:
    policy = RetryPolicy(retry_on=ConnectionError, give_up_on=PermissionError, backoff=1)
    exception = raised_from(ConnectionError("refused"), PermissionError("denied"))

    assert decide(policy, state(exception)) == GiveUp("exception")


def test_retry_on_matches_via_cause() -> None:
    policy = RetryPolicy(retry_on=ConnectionError, backoff=1)
    exception = raised_from(RuntimeError("sync failed"), ConnectionResetError("peer"))

    assert decide(policy, state(exception)) == RetryIn(1.0)


def test_retry_on_matches_via_context() -> None:
    policy = RetryPolicy(retry_on=ConnectionError, backoff=1)
    exception = raised_while_handling(RuntimeError("sync failed"), ConnectionResetError("peer"))

    assert decide(policy, state(exception)) == RetryIn(1.0)


@pytest.mark.parametrize(
    ("exception", "expected"),
    [
        (RuntimeError("HTTP 429 too many requests"), RetryIn(1.0)),
        (RuntimeError("HTTP 500"), GiveUp("exception")),
        (raised_from(ValueError("bad reply"), RuntimeError("HTTP 429")), RetryIn(1.0)),
    ],
    ids=["matching", "not-matching", "matching-in-chain"],
)
def test_a_predicate_in_retry_on_decides_by_its_answer(
    exception: BaseException, expected: RetryIn | GiveUp
) -> None:
    policy = RetryPolicy(retry_on=lambda exc: "429" in str(exc), backoff=1)

    assert decide(policy, state(exception)) == expected


def test_a_predicate_in_give_up_on_wins_over_retry_on() -> None:
    policy = RetryPolicy(
        retry_on=ConnectionError, give_up_on=lambda exc: "certificate" in str(exc), backoff=1
    )

    assert decide(policy, state(ConnectionError("bad certificate"))) == GiveUp("exception")


def test_a_predicate_that_raises_counts_as_no_match_in_retry_on() -> None:
    policy = RetryPolicy(retry_on=always_raises, backoff=1)

    assert decide(policy, state(ConnectionError())) == GiveUp("exception")


def test_a_predicate_that_raises_does_not_stop_later_matchers() -> None:
    policy = RetryPolicy(retry_on=(always_raises, ConnectionError), backoff=1)

    assert decide(policy, state(ConnectionError())) == RetryIn(1.0)


def test_a_predicate_that_raises_counts_as_no_match_in_give_up_on() -> None:
    policy = RetryPolicy(retry_on=ConnectionError, give_up_on=always_raises, backoff=1)

    assert decide(policy, state(ConnectionError())) == RetryIn(1.0)


# --- decide: RetryAfter ------------------------------------------------------------------------


def test_retry_after_overrides_the_backoff() -> None:
    policy = RetryPolicy(retry_on=RetryAfter, backoff=1)

    assert decide(policy, state(RetryAfter(7))) == RetryIn(7.0)


def test_retry_after_is_retried_even_when_retry_on_does_not_list_it() -> None:
    policy = RetryPolicy(retry_on=(), backoff=1)

    assert decide(policy, state(RetryAfter(7))) == RetryIn(7.0)


def test_retry_after_anywhere_in_the_chain_sets_the_delay() -> None:
    policy = RetryPolicy(retry_on=(), backoff=1)
    exception = raised_from(RuntimeError("rate limited"), RetryAfter(3))

    assert decide(policy, state(exception)) == RetryIn(3.0)


def test_retry_after_zero_retries_at_once() -> None:
    policy = RetryPolicy(backoff=5)

    assert decide(policy, state(RetryAfter(0))) == RetryIn(0.0)


def test_give_up_on_wins_over_retry_after() -> None:
    policy = RetryPolicy(give_up_on=PermissionError, backoff=1)
    exception = raised_from(RetryAfter(3), PermissionError("denied"))

    assert decide(policy, state(exception)) == GiveUp("exception")


def test_retry_after_is_still_bounded_by_max_attempts() -> None:
    policy = RetryPolicy(retry_on=(), max_attempts=3, backoff=1)

    assert decide(policy, state(RetryAfter(1), attempt=3)) == GiveUp("retries_exhausted")


def test_retry_after_is_still_bounded_by_max_elapsed() -> None:
    policy = RetryPolicy(retry_on=(), max_elapsed=60, backoff=1)

    assert decide(policy, state(RetryAfter(20), elapsed=50.0)) == GiveUp("deadline_exceeded")


def test_a_broker_that_delays_in_steps_has_its_real_wait_judged() -> None:
    # RabbitMQ's delay queues wait in 64 ms steps: a 0.8 s wait is 0.832 s there.
    policy = RetryPolicy(retry_on=ConnectionError, max_elapsed=2.0, backoff=0.8)

    assert decide(policy, state(ConnectionError(), elapsed=1.18)) == RetryIn(0.8)
    assert decide(policy, state(ConnectionError(), elapsed=1.1), delay_queues=True) == RetryIn(0.8)
    assert decide(policy, state(ConnectionError(), elapsed=1.18), delay_queues=True) == GiveUp(
        "deadline_exceeded"
    )


# --- decide: max_attempts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_attempts", "attempt", "expected"),
    [
        (1, 1, GiveUp("retries_exhausted")),
        (3, 1, RetryIn(1.0)),
        (3, 2, RetryIn(1.0)),
        (3, 3, GiveUp("retries_exhausted")),
        (3, 4, GiveUp("retries_exhausted")),
    ],
)
def test_max_attempts_counts_the_first_attempt(
    max_attempts: int, attempt: int, expected: RetryIn | GiveUp
) -> None:
    policy = RetryPolicy(max_attempts=max_attempts, backoff=1)

    assert decide(policy, state(ConnectionError(), attempt=attempt)) == expected


def test_no_attempt_cap_never_exhausts() -> None:
    policy = RetryPolicy(max_attempts=None, backoff=1)

    assert decide(policy, state(ConnectionError(), attempt=1_000_000)) == RetryIn(1.0)


def test_an_unmatched_failure_on_the_last_attempt_gives_up_as_exception() -> None:
    policy = RetryPolicy(max_attempts=2, backoff=1)

    assert decide(policy, state(KeyError("x"), attempt=2)) == GiveUp("exception")


def test_exhausted_attempts_are_reported_before_a_passed_deadline() -> None:
    policy = RetryPolicy(max_attempts=2, max_elapsed=10, backoff=1)

    assert decide(policy, state(ConnectionError(), attempt=2, elapsed=100.0)) == GiveUp(
        "retries_exhausted"
    )


# --- decide: max_elapsed -----------------------------------------------------------------------


def test_a_retry_starting_after_max_elapsed_gives_up_as_deadline_exceeded() -> None:
    policy = RetryPolicy(max_elapsed=10, backoff=1)

    assert decide(policy, state(ConnectionError(), elapsed=9.5)) == GiveUp("deadline_exceeded")


def test_a_retry_starting_exactly_at_max_elapsed_is_made() -> None:
    policy = RetryPolicy(max_elapsed=10, backoff=1)

    assert decide(policy, state(ConnectionError(), elapsed=9.0)) == RetryIn(1.0)


def test_a_backoff_longer_than_max_elapsed_gives_up_on_the_first_attempt() -> None:
    policy = RetryPolicy(max_elapsed=10, backoff=11)

    assert decide(policy, state(ConnectionError(), elapsed=0.0)) == GiveUp("deadline_exceeded")


def test_max_elapsed_given_as_timedelta_bounds_retries() -> None:
    policy = RetryPolicy(max_elapsed=timedelta(minutes=1), backoff=5)

    assert decide(policy, state(ConnectionError(), elapsed=56.0)) == GiveUp("deadline_exceeded")


# --- exception_chain ---------------------------------------------------------------------------


def test_exception_chain_of_a_lone_exception_is_itself() -> None:
    exc = ValueError("x")

    assert list(exception_chain(exc)) == [exc]


def test_exception_chain_follows_a_real_raise_from() -> None:
    exception = raised_from(RuntimeError("sync failed"), ConnectionResetError("peer"))

    assert [type(e).__name__ for e in exception_chain(exception)] == [
        "RuntimeError",
        "ConnectionResetError",
    ]


def test_exception_chain_visits_the_cause_before_the_context() -> None:
    exc, cause, context = RuntimeError("exc"), ValueError("cause"), KeyError("context")
    exc.__cause__ = cause
    exc.__context__ = context
    exc.__suppress_context__ = False  # both links shown, as in "During handling ... above"

    assert list(exception_chain(exc)) == [exc, cause, context]


def test_exception_chain_does_not_follow_a_context_hidden_by_raise_from_none() -> None:
    try:
        try:
            raise ConnectionError("lost")
        except ConnectionError:
            raise RuntimeError("bad input") from None
    except RuntimeError as exc:
        chain = list(exception_chain(exc))

    assert [type(e).__name__ for e in chain] == ["RuntimeError"]


def test_a_failure_raised_from_none_out_of_a_retryable_one_is_not_retried() -> None:
    try:
        try:
            raise ConnectionError("lost")
        except ConnectionError:
            raise ValueError("bad input") from None
    except ValueError as exc:
        state = AttemptState("t", attempt=1, exception=exc)

    assert decide(RetryPolicy(retry_on=ConnectionError), state) == GiveUp("exception")


def test_a_backoff_of_infinity_gives_up_instead_of_retrying_at_once() -> None:
    policy = RetryPolicy(retry_on=ConnectionError, backoff=lambda _: math.inf)

    decision = decide(policy, AttemptState("t", attempt=1, exception=ConnectionError()))

    assert decision == GiveUp("deadline_exceeded")


@pytest.mark.parametrize("option", ["max_elapsed", "backoff"])
def test_an_integer_too_large_for_a_float_is_a_configuration_error(option: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{option} must be a number of seconds"):
        RetryPolicy(**{option: 10**400})


def test_retry_after_refuses_an_integer_too_large_for_a_float() -> None:
    with pytest.raises(TypeError, match="finite number"):
        RetryAfter(10**400)


def test_exception_chain_visits_a_shared_link_once() -> None:
    exc, cause, shared = RuntimeError("exc"), ValueError("cause"), KeyError("shared")
    exc.__cause__ = cause
    exc.__context__ = shared
    cause.__context__ = shared

    assert list(exception_chain(exc)) == [exc, cause, shared]


def test_exception_chain_does_not_loop_on_a_cycle() -> None:
    first, second = RuntimeError("first"), ValueError("second")
    first.__cause__ = second
    second.__context__ = first

    assert list(exception_chain(first)) == [first, second]


def test_exception_chain_does_not_loop_on_a_self_reference() -> None:
    exc = RuntimeError("me")
    exc.__context__ = exc

    assert list(exception_chain(exc)) == [exc]


def test_exception_chain_stops_at_32_exceptions() -> None:
    links = [RuntimeError(str(i)) for i in range(100)]
    for outer, inner in itertools.pairwise(links):
        outer.__cause__ = inner

    assert list(exception_chain(links[0])) == links[:32]


def test_decide_terminates_on_a_cyclic_chain() -> None:
    first, second = RuntimeError("first"), ConnectionError("second")
    first.__context__ = second
    second.__context__ = first

    assert decide(RetryPolicy(backoff=1), state(first)) == RetryIn(1.0)


# --- AttemptState.starting_at ------------------------------------------------------------------


def test_starting_at_counts_elapsed_from_started_on_the_first_attempt() -> None:
    the_state = AttemptState.starting_at(
        task_name="t",
        task_id="id-1",
        attempt=1,
        exception=ConnectionError(),
        history=History(),
        started=T0,
        now=T0 + timedelta(seconds=2.5),
    )

    assert the_state.elapsed == 2.5


def test_starting_at_counts_elapsed_from_the_first_recorded_attempt() -> None:
    history = History().record(
        Attempt.failed(1, ConnectionError(), hostname="w1", delay=1.0, at=T0)
    )

    the_state = AttemptState.starting_at(
        task_name="t",
        task_id="id-1",
        attempt=2,
        exception=ConnectionError(),
        history=history,
        started=T0 + timedelta(seconds=30),
        now=T0 + timedelta(seconds=31),
    )

    assert the_state.elapsed == 31.0


def test_starting_at_never_gives_negative_elapsed() -> None:
    the_state = AttemptState.starting_at(
        task_name="t",
        task_id=None,
        attempt=1,
        exception=ConnectionError(),
        history=History(),
        started=T0,
        now=T0 - timedelta(seconds=5),
    )

    assert the_state.elapsed == 0.0


def test_starting_at_carries_the_attempt_details() -> None:
    exc = ConnectionError("reset")
    history = History().record(Attempt.failed(1, exc, hostname="w1", delay=1.0, at=T0))

    the_state = AttemptState.starting_at(
        task_name="billing.sync",
        task_id="id-7",
        attempt=2,
        exception=exc,
        history=history,
        started=T0 + timedelta(seconds=1),
        now=T0 + timedelta(seconds=2),
    )

    assert the_state.task_name == "billing.sync"
    assert the_state.task_id == "id-7"
    assert the_state.attempt == 2
    assert the_state.exception is exc
    assert the_state.history is history


# --- RetryAfter --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        (1.5, 1.5),
        (2, 2.0),
        (0, 0.0),
        (timedelta(minutes=1, milliseconds=500), 60.5),
        (timedelta(0), 0.0),
    ],
)
def test_retry_after_takes_seconds_as_a_number_or_timedelta(given: object, seconds: float) -> None:
    exc = RetryAfter(given)  # type: ignore[arg-type]

    assert isinstance(exc.seconds, float)
    assert exc.seconds == seconds


@pytest.mark.parametrize("given", [-1, -0.5, timedelta(seconds=-1)])
def test_retry_after_refuses_negative_seconds(given: object) -> None:
    with pytest.raises(ValueError, match="seconds must be >= 0"):
        RetryAfter(given)  # type: ignore[arg-type]


@pytest.mark.parametrize("given", [math.nan, math.inf, -math.inf, True, False, "5", None])
def test_retry_after_refuses_non_finite_or_non_numbers(given: object) -> None:
    with pytest.raises(TypeError, match="seconds must be a finite number"):
        RetryAfter(given)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (RetryAfter(1.5, "rate limited by the API"), "retry after 1.5s: rate limited by the API"),
        (RetryAfter(2), "retry after 2s"),
    ],
)
def test_retry_after_str_shows_the_delay_and_message(exc: RetryAfter, text: str) -> None:
    assert str(exc) == text


def test_retry_after_keeps_its_message() -> None:
    assert RetryAfter(1, "slow down").message == "slow down"


# --- Permanent ---------------------------------------------------------------------------------


def test_permanent_keeps_its_cause() -> None:
    cause = KeyError("customer 42 was deleted")

    assert Permanent(cause).cause is cause


def test_permanent_chains_to_its_cause() -> None:
    cause = KeyError("customer 42 was deleted")

    assert Permanent(cause).__cause__ is cause


def test_permanent_raised_without_from_still_chains_to_its_cause() -> None:
    cause = KeyError("customer 42 was deleted")

    with pytest.raises(Permanent) as info:
        raise Permanent(cause)

    assert info.value.__cause__ is cause


def test_permanent_str_names_the_cause_type() -> None:
    assert str(Permanent(KeyError("customer 42 was deleted"))) == (
        "KeyError: 'customer 42 was deleted'"
    )


def test_permanent_accepts_a_plain_message() -> None:
    exc = Permanent("customer 42 was deleted")

    assert exc.cause == "customer 42 was deleted"
    assert exc.__cause__ is None
    assert str(exc) == "customer 42 was deleted"


def http_error(status: int, retry_after: str | None) -> BaseException:
    requests = pytest.importorskip("requests")
    response = requests.Response()
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return requests.HTTPError(f"{status}", response=response)


def test_a_servers_retry_after_sets_the_delay_of_a_retried_failure() -> None:
    from resilient_tasks import TRANSIENT_ERRORS

    policy = RetryPolicy(retry_on=TRANSIENT_ERRORS, backoff=60)

    decision = decide(policy, AttemptState("t", attempt=1, exception=http_error(429, "7")))

    assert decision == RetryIn(7.0)


def test_a_servers_retry_after_does_not_force_a_retry() -> None:
    policy = RetryPolicy(retry_on=KeyError, backoff=60)

    decision = decide(policy, AttemptState("t", attempt=1, exception=http_error(503, "7")))

    assert decision == GiveUp("exception")


def test_an_explicit_retry_after_wins_over_the_servers() -> None:
    try:
        try:
            raise http_error(429, "7")
        except Exception as exc:
            raise RetryAfter(3) from exc
    except RetryAfter as outer:
        state = AttemptState("t", attempt=1, exception=outer)

    assert decide(RetryPolicy(retry_on=ConnectionError), state) == RetryIn(3.0)
