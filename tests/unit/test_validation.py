"""Bad options fail when the task class is created, naming the task and the option."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery, Task

from resilient_tasks import (
    ConfigurationError,
    DeadLetterMixin,
    FailureHooksMixin,
    ResilientTask,
    RetryMixin,
    RetryPolicy,
    TimeLimitMixin,
)


def ok(*_: Any) -> None:
    """A task body."""


def ok_exc(exc: BaseException) -> None:
    """A hook written as a function of the exception alone."""


def make_task(app: Celery, **options: Any) -> Any:
    # shared=False: a shared task is re-created in every app finalized later in this process.
    return app.task(base=ResilientTask, name="billing.sync_invoice", shared=False, **options)(ok)


@pytest.fixture
def app() -> Celery:
    app = Celery("validation", set_as_current=False)
    app.finalize()
    return app


TASK_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"retry_policy": {"max_attempts": 3}}, "retry_policy={'max_attempts': 3}"),
    ({"retry_policy": "exponential"}, "expected a resilient_tasks.RetryPolicy"),
    ({"soft_time_limit": 40, "time_limit": 30}, "soft_time_limit=40: must be below time_limit=30"),
    ({"soft_time_limit": 30, "time_limit": 30}, "soft_time_limit=30: must be below time_limit=30"),
    ({"soft_time_limit": -1}, "soft_time_limit=-1: expected a number of seconds > 0"),
    ({"time_limit": "30"}, "time_limit='30': expected a number of seconds > 0"),
    ({"time_limit": 0}, "time_limit=0: expected a number of seconds > 0"),
    ({"max_retries": -1}, "max_retries=-1: expected a whole number >= 0"),
    ({"max_retries": 2.5}, "max_retries=2.5: expected a whole number >= 0"),
    ({"default_retry_delay": -5}, "default_retry_delay=-5: expected a number of seconds >= 0"),
    (
        {"autoretry_for": ConnectionError},
        "autoretry_for=<class 'ConnectionError'>: expected a tuple",
    ),
    ({"autoretry_for": ("ConnectionError",)}, "expected a tuple of exception classes"),
    ({"dont_autoretry_for": (42,)}, "dont_autoretry_for=(42,): expected a tuple"),
    ({"retry_backoff": -2}, "retry_backoff=-2: expected a number of seconds >= 0"),
    ({"retry_jitter": "no"}, "retry_jitter='no': expected True or False"),
    ({"retry_kwargs": [("max_retries", 5)]}, "retry_kwargs=[('max_retries', 5)]: expected a dict"),
    ({"acks_late": "yes"}, "acks_late='yes': expected True or False"),
    ({"reject_on_worker_lost": 1}, "reject_on_worker_lost=1: expected True or False"),
    (
        {"retry_policy": RetryPolicy(), "autoretry_for": (ConnectionError,)},
        "autoretry_for=(<class 'ConnectionError'>,): the task also sets retry_policy",
    ),
    (
        {"retry_policy": RetryPolicy(), "max_retries": 5},
        "max_retries=5: the task also sets retry_policy; use RetryPolicy(max_attempts=...)",
    ),
    (
        {"retry_policy": RetryPolicy(), "retry_backoff": True},
        "retry_backoff=True: the task also sets retry_policy",
    ),
    ({"retry_polcy": RetryPolicy()}, "retry_polcy=RetryPolicy("),
    (
        {"retry_policy": RetryPolicy(), "dont_autoretry_for": (KeyError,)},
        "dont_autoretry_for=(<class 'KeyError'>,): the task also sets retry_policy; "
        "list these exceptions in RetryPolicy(give_up_on=...)",
    ),
    (
        {"retry_policy": RetryPolicy(), "retry_kwargs": {"max_retries": 5}},
        "retry_kwargs={'max_retries': 5}: the task also sets retry_policy; put max_retries in "
        "RetryPolicy(max_attempts=max_retries + 1)",
    ),
    ({"dead_letter": "yes"}, "dead_letter='yes': expected True or False"),
    ({"dead_letter": None}, "dead_letter=None: expected True or False"),
    ({"dead_letter_queue": ""}, "dead_letter_queue='': expected a queue name"),
    ({"dead_letter_queue": 7}, "dead_letter_queue=7: expected a queue name"),
    (
        {"dead_letter_queue": "{queu}.dlq"},
        "dead_letter_queue='{queu}.dlq': unknown template field {queu}; "
        "the fields are {queue}, {task}",
    ),
    ({"dead_letter_queue": "{queue.dlq"}, "dead_letter_queue='{queue.dlq': not a valid template"),
    (
        {"dead_letter_queue": "{queue!r}.dlq"},
        "dead_letter_queue='{queue!r}.dlq': not a valid template: {queue!r} formats the name; "
        "a field is written plain, as {queue}",
    ),
    (
        {"dead_letter_queue": "{queue:>10}"},
        "dead_letter_queue='{queue:>10}': not a valid template: {queue:>10} formats the name",
    ),
    (
        {"on_soft_time_limit": ok_exc},
        "a hook is called as a method, on_soft_time_limit(task, exc), so ok_exc must take "
        "(task, exc); or define it on a base class",
    ),
    (
        {"on_give_up": ok_exc},
        "a hook is called as a method, on_give_up(task, details), so ok_exc must take "
        "(task, details)",
    ),
    ({"failure_handlers": [KeyError]}, "failure_handlers=[<class 'KeyError'>]: expected a mapping"),
    ({"failure_handlers": {"KeyError": print}}, "key 'KeyError' is not an exception type"),
    ({"failure_handlers": {KeyError: 42}}, "the handler for KeyError is not callable"),
    ({"delayed_delivery": "later"}, "delayed_delivery='later': expected \"broker\""),
    ({"max_redeliveries": -1}, "max_redeliveries=-1: expected a whole number >= 0"),
    ({"max_redeliveries": None}, "max_redeliveries=None: expected a whole number >= 0"),
    ({"max_redeliveries": 2.0}, "max_redeliveries=2.0: expected a whole number >= 0"),
]


def _id(value: object) -> str:
    """A test id that is the same in every process (pytest-xdist compares them): no address."""
    return re.sub(r" at 0x[0-9a-f]+", "", str(value))[:40]


@pytest.mark.parametrize(("options", "message"), TASK_OPTIONS, ids=_id)
def test_bad_task_option_names_the_task_and_the_option(
    app: Celery, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        make_task(app, **options)

    text = str(info.value)
    assert text.startswith("task 'billing.sync_invoice': option ")
    assert message in text


def test_misspelt_option_suggests_the_right_one(app: Celery) -> None:
    with pytest.raises(ConfigurationError, match=r"unknown option; did you mean retry_policy\?"):
        make_task(app, retry_polcy=RetryPolicy())


def test_misspelt_hook_suggests_the_hook(app: Celery) -> None:
    with pytest.raises(
        ConfigurationError, match=r"unknown option; did you mean on_soft_time_limit\?"
    ):
        make_task(app, on_soft_timelimit=ok_exc)


def test_a_hook_given_to_the_decorator_is_called_with_the_task_and_the_exception(
    app: Celery,
) -> None:
    calls: list[tuple[str, str]] = []

    def cleanup(task: Task, exc: BaseException) -> None:
        calls.append((task.name, str(exc)))

    task = make_task(app, on_soft_time_limit=cleanup)
    task.on_soft_time_limit(RuntimeError("soft"))

    assert calls == [("billing.sync_invoice", "soft")]


POLICY_OPTIONS: list[tuple[Callable[[], Any], str]] = [
    (lambda: RetryPolicy(max_attempts=0), "max_attempts must be a whole number >= 1"),
    (lambda: RetryPolicy(max_attempts=-3), "max_attempts must be a whole number >= 1"),
    (lambda: RetryPolicy(max_attempts=2.5), "max_attempts must be a whole number >= 1"),  # type: ignore[arg-type]
    (lambda: RetryPolicy(max_attempts=True), "got True"),
    (lambda: RetryPolicy(max_elapsed=0), "max_elapsed must be > 0 seconds"),
    (lambda: RetryPolicy(max_elapsed=timedelta(seconds=-1)), "max_elapsed must be > 0 seconds"),
    (lambda: RetryPolicy(max_elapsed="1h"), "max_elapsed must be a number of seconds"),  # type: ignore[arg-type]
    (lambda: RetryPolicy(retry_on=(int,)), "retry_on holds int, which is not an exception type"),
    (lambda: RetryPolicy(retry_on=("ConnectionError",)), "retry_on holds 'ConnectionError'"),
    (lambda: RetryPolicy(retry_on=ConnectionError()), "retry_on holds ConnectionError()"),
    (lambda: RetryPolicy(retry_on=42), "retry_on must be exception types and/or predicates"),
    (lambda: RetryPolicy(give_up_on=(KeyError, 3)), "give_up_on holds 3"),
    (lambda: RetryPolicy(backoff=-1), "backoff must be >= 0 seconds"),
    (lambda: RetryPolicy(backoff="fast"), "backoff must be a tenacity wait strategy"),
    (lambda: RetryPolicy(backoff=float("inf")), "backoff must be a number of seconds"),
    (lambda: RetryPolicy().replace(max_tries=3), "unknown option(s) ['max_tries']"),
]


@pytest.mark.parametrize(("build", "message"), POLICY_OPTIONS)
def test_bad_policy_option_is_refused_when_the_policy_is_built(
    build: Callable[[], Any], message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        build()

    assert message in str(info.value)


def test_class_based_task_is_validated_at_class_statement() -> None:
    with pytest.raises(ConfigurationError, match=r"option soft_time_limit=10: must be below"):

        class Export(ResilientTask):  # type: ignore[misc]
            name = "reports.export"
            soft_time_limit = 10
            time_limit = 5


def test_lazy_task_is_validated_when_the_app_is_finalized() -> None:
    app = Celery("lazy", set_as_current=False)
    app.task(base=ResilientTask, name="lazy.task", shared=False, max_retries=-1)(ok)

    with pytest.raises(ConfigurationError, match=r"task 'lazy.task': option max_retries=-1"):
        app.finalize()


def test_mixin_before_celery_task_takes_its_max_retries_from_the_policy() -> None:
    class Retrying(RetryMixin, Task):  # type: ignore[misc]
        retry_policy = RetryPolicy(max_attempts=4)

    assert Retrying.max_retries == 3


def test_mixin_after_celery_task_is_refused_because_it_would_never_run() -> None:
    with pytest.raises(
        ConfigurationError, match=r"Task comes before RetryMixin.*list RetryMixin first"
    ):

        class Shadowed(Task, RetryMixin):  # type: ignore[misc]
            retry_policy = RetryPolicy(max_attempts=4)


def test_a_task_dropping_its_parents_policy_gets_celerys_max_retries_back(app: Celery) -> None:
    class Base(ResilientTask):  # type: ignore[misc]
        retry_policy = RetryPolicy(max_attempts=10)

    task = app.task(base=Base, name="no.policy", shared=False, retry_policy=None)(ok)

    assert Base.max_retries == 9
    assert task.max_retries == Task.max_retries == 3


def test_valid_configuration_is_accepted_and_max_retries_follows_the_policy(app: Celery) -> None:
    task = make_task(
        app,
        retry_policy=RetryPolicy(retry_on=(ConnectionError,), max_attempts=5),
        soft_time_limit=30,
        time_limit=40,
    )

    assert task.max_retries == 4
    assert task.acks_late is True
    assert task.reject_on_worker_lost is True


def test_policy_without_a_cap_lifts_celerys_max_retries(app: Celery) -> None:
    task = make_task(app, retry_policy=RetryPolicy(max_attempts=None, max_elapsed=60))

    assert task.max_retries is None


def test_without_a_policy_celerys_max_retries_is_kept(app: Celery) -> None:
    task = make_task(app, autoretry_for=(ConnectionError,), max_retries=7)

    assert task.max_retries == 7


@pytest.mark.parametrize(
    "bases", [(RetryMixin, FailureHooksMixin, Task), (FailureHooksMixin, RetryMixin, Task)]
)
def test_failure_hooks_see_the_retry_decision_whatever_the_order_of_the_mixins(
    app: Celery, bases: tuple[type, ...]
) -> None:
    given_up: list[str | None] = []

    class Hooked(*bases):  # type: ignore[misc]
        retry_policy = RetryPolicy(retry_on=(ConnectionError,), max_attempts=1)

        def on_give_up(self, details: Any) -> None:
            given_up.append(details.reason)

    @app.task(base=Hooked, name=f"hooked.{bases[0].__name__}", shared=False)
    def flaky() -> None:
        raise ConnectionError("down")

    flaky.apply()

    assert given_up == ["retries_exhausted"]


@pytest.mark.parametrize("mixin", [DeadLetterMixin, TimeLimitMixin, FailureHooksMixin])
def test_every_mixin_after_celery_task_is_refused(mixin: type) -> None:
    with pytest.raises(ConfigurationError, match=f"Task comes before {mixin.__name__}"):
        type("Shadowed", (Task, mixin), {})
